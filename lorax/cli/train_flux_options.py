"""``lorax train``'s Flux options (flow matching, blocks, T5), as ``Annotated`` aliases in their own help panel.

Their checks and the SD options a Flux model refuses: ``lorax.training.flux_config``; their kohya and diffusers
names: docs/train.md.
"""

from __future__ import annotations

from typing import Annotated

import typer

FLUX = "Flux (flow matching)"

TimestepSamplingOpt = Annotated[
    str | None,
    typer.Option(
        help="How σ is drawn: uniform, sigmoid (of N(0,1)·--sigmoid-scale), logit-normal (--logit-mean/--logit-std), "
        "mode, shift (sigmoid, then --discrete-flow-shift) or flux-shift (sigmoid, then Flux's resolution-dependent "
        "shift; the default). kohya's timestep_sampling, diffusers' weighting_scheme density.",
        rich_help_panel=FLUX,
        show_default=False,
    ),
]
DiscreteFlowShiftOpt = Annotated[
    float | None,
    typer.Option(
        help="The fixed shift s of --timestep-sampling shift: σ = s·t / (1 + (s − 1)·t) (kohya's "
        "discrete_flow_shift; default 3).",
        rich_help_panel=FLUX,
        show_default=False,
    ),
]
SigmoidScaleOpt = Annotated[
    float | None,
    typer.Option(
        help="Scale of the normal draw before the sigmoid of sigmoid, shift and flux-shift (default 1).",
        rich_help_panel=FLUX,
        show_default=False,
    ),
]
LogitMeanOpt = Annotated[
    float | None,
    typer.Option(
        help="Mean of --timestep-sampling logit-normal (default 0).", rich_help_panel=FLUX, show_default=False
    ),
]
LogitStdOpt = Annotated[
    float | None,
    typer.Option(
        help="Std of --timestep-sampling logit-normal (default 1).", rich_help_panel=FLUX, show_default=False
    ),
]
WeightingSchemeOpt = Annotated[
    str | None,
    typer.Option(
        help="Loss weight w(σ): none (default), sigma_sqrt (σ⁻²) or cosmap (SD3's; diffusers' weighting_scheme).",
        rich_help_panel=FLUX,
        show_default=False,
    ),
]
GuidanceOpt = Annotated[
    float | None,
    typer.Option(
        help="The guidance value a dev model's guidance embedding is given while training (default 1.0, kohya's "
        "guidance_scale advice); a schnell model has none and refuses it.",
        rich_help_panel=FLUX,
        show_default=False,
    ),
]
MaxSequenceLengthOpt = Annotated[
    int | None,
    typer.Option(
        help="T5 tokens per caption (default 512 for dev, 256 for schnell; kohya's t5xxl_max_token_length).",
        rich_help_panel=FLUX,
        show_default=False,
    ),
]
TrainBlocksOpt = Annotated[
    str | None,
    typer.Option(
        help="Which transformer blocks get a LoRA: all (default), double (double-stream) or single "
        "(single-stream); kohya's network_args train_blocks.",
        rich_help_panel=FLUX,
        show_default=False,
    ),
]
TrainT5Opt = Annotated[
    bool,
    typer.Option(
        "--train-t5",
        help="With --train-text, a T5 LoRA too (--train-text alone trains CLIP-L; kohya's train_t5xxl).",
        rich_help_panel=FLUX,
    ),
]
