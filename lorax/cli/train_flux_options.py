"""``lorax train``'s Flux options (flow matching, blocks, T5), as ``Annotated`` aliases in their own help panel.

Their checks and the SD options a Flux model refuses: ``lorax.training.flux_config``; their kohya and diffusers
names: docs/train.md.
"""

from __future__ import annotations

from typing import Annotated

from lorax.cli.training_options import in_panel

FLUX = "Flux (flow matching)"
in_flux = in_panel(FLUX, show_default=False)  # a Flux flag's default depends on the model: its help says it

TimestepSamplingOpt = Annotated[
    str | None,
    in_flux(
        help="How σ is drawn: uniform, sigmoid (of N(0,1)·--sigmoid-scale), logit-normal (--logit-mean/--logit-std), "
        "mode, shift (sigmoid, then --discrete-flow-shift) or flux-shift (sigmoid, then Flux's resolution-dependent "
        "shift; the default). kohya's timestep_sampling, diffusers' weighting_scheme density."
    ),
]
DiscreteFlowShiftOpt = Annotated[
    float | None,
    in_flux(
        help="The fixed shift s of --timestep-sampling shift: σ = s·t / (1 + (s − 1)·t) (kohya's "
        "discrete_flow_shift; default 3)."
    ),
]
SigmoidScaleOpt = Annotated[
    float | None,
    in_flux(help="Scale of the normal draw before the sigmoid of sigmoid, shift and flux-shift (default 1)."),
]
LogitMeanOpt = Annotated[float | None, in_flux(help="Mean of --timestep-sampling logit-normal (default 0).")]
LogitStdOpt = Annotated[float | None, in_flux(help="Std of --timestep-sampling logit-normal (default 1).")]
WeightingSchemeOpt = Annotated[
    str | None,
    in_flux(
        help="Loss weight w(σ): none (default), sigma_sqrt (σ⁻²) or cosmap (SD3's; diffusers' weighting_scheme)."
    ),
]
GuidanceOpt = Annotated[
    float | None,
    in_flux(
        help="The guidance value a dev model's guidance embedding is given while training (default 1.0, kohya's "
        "guidance_scale advice); a schnell model has none and refuses it."
    ),
]
MaxSequenceLengthOpt = Annotated[
    int | None,
    in_flux(
        help="T5 tokens per caption (default 512 for dev, 256 for schnell; kohya's t5xxl_max_token_length)."
    ),
]
TrainBlocksOpt = Annotated[
    str | None,
    in_flux(
        help="Which transformer blocks get a LoRA: all (default), double (double-stream) or single "
        "(single-stream); kohya's network_args train_blocks."
    ),
]
TrainT5Opt = Annotated[
    bool,
    in_flux(
        "--train-t5",
        help="With --train-text, a T5 LoRA too (--train-text alone trains CLIP-L; kohya's train_t5xxl).",
        show_default=True,
    ),
]
