"""``lorax train``'s Flux options (flow matching, block selection, T5): their checks, and the SD options a Flux model
refuses (and the Flux options an SD model refuses), each named in one line.

The flags map onto ``lorax.training.flow.FlowConfig`` (``lorax.training.flux_train.flow_config``); their kohya and
diffusers names are in docs/train.md. ``None`` means not given: the model's ``lorax.json`` train defaults, else
``FlowConfig``'s.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorax.training.config import TrainConfig

FLUX_FIELDS = (
    "timestep_sampling",
    "discrete_flow_shift",
    "sigmoid_scale",
    "logit_mean",
    "logit_std",
    "weighting_scheme",
    "guidance",
    "max_sequence_length",
    "train_blocks",
    "train_t5",
)
TRAIN_BLOCKS = ("all", "double", "single")  # kohya's network_args train_blocks
T5_MAX_SEQUENCE = 512  # FluxPipeline refuses more
SIGMOID_SAMPLINGS = ("sigmoid", "shift", "flux-shift")  # the draws sigmoid_scale scales


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def flag_problems(config: TrainConfig) -> list[str]:
    """The Flux options' values and combinations (whatever the model)."""
    from lorax.training.flow import SAMPLINGS, WEIGHTINGS

    p: list[str] = []
    sampling = config.timestep_sampling
    if sampling is not None and sampling not in SAMPLINGS:
        p.append(f"--timestep-sampling {sampling!r}: use one of {', '.join(SAMPLINGS)}")
    if config.weighting_scheme is not None and config.weighting_scheme not in WEIGHTINGS:
        p.append(f"--weighting-scheme {config.weighting_scheme!r}: use one of {', '.join(WEIGHTINGS)}")
    if config.train_blocks is not None and config.train_blocks not in TRAIN_BLOCKS:
        p.append(f"--train-blocks {config.train_blocks!r}: use one of {', '.join(TRAIN_BLOCKS)}")
    for name in ("discrete_flow_shift", "sigmoid_scale", "logit_std"):
        value = getattr(config, name)
        if value is not None and not value > 0:
            p.append(f"{_flag(name)} must be > 0 (got {value:g})")
    if config.max_sequence_length is not None and not 1 <= config.max_sequence_length <= T5_MAX_SEQUENCE:
        p.append(f"--max-sequence-length must be 1 to {T5_MAX_SEQUENCE} (got {config.max_sequence_length})")
    effective = sampling or "flux-shift"
    if config.discrete_flow_shift is not None and effective != "shift":
        p.append(f"--discrete-flow-shift applies to --timestep-sampling shift (not {effective})")
    if config.sigmoid_scale is not None and effective not in SIGMOID_SAMPLINGS:
        p.append(
            f"--sigmoid-scale applies to --timestep-sampling {', '.join(SIGMOID_SAMPLINGS)} (not {effective})"
        )
    for name in ("logit_mean", "logit_std"):
        if getattr(config, name) is not None and effective != "logit-normal":
            p.append(f"{_flag(name)} applies to --timestep-sampling logit-normal (not {effective})")
    if config.train_t5 and not config.train_text:
        p.append("--train-t5 trains T5 alongside CLIP-L: add --train-text")
    if config.train_t5 and config.format == "diffusers":
        p.append(
            "--train-t5 with --format diffusers: diffusers' Flux loader reads no T5 LoRA; use --format kohya"
        )
    return p


def _given(config: TrainConfig, name: str) -> bool:
    """Whether field ``name`` differs from its default (the config's own class's)."""
    import dataclasses

    found = next(f for f in dataclasses.fields(config) if f.name == name)
    default = found.default_factory() if found.default is dataclasses.MISSING else found.default  # type: ignore[misc, operator]
    return bool(getattr(config, name) != default)


# SD options with no meaning for a flow-matching transformer, and why
_SD_ONLY = {
    "prediction_type": "Flux predicts the flow velocity (ε − x0), not epsilon or v",
    "snr_gamma": "min-SNR-γ weights a DDPM schedule; use --weighting-scheme",
    "noise_offset": "the noise offset is for DDPM's epsilon/v training; kohya's Flux trainer does not offer it",
    "clip_skip": "Flux conditions on T5 and CLIP-L's pooled output, which have no clip skip",
    "dora": "the Flux LoRA formats hold plain LoRA pairs",
    "init_lora": "continuing a Flux LoRA is not supported yet",
    "sdpa": "Flux's attention processors always use PyTorch SDPA",
}


def family_problems(config: TrainConfig, family: str) -> list[str]:
    """What ``config`` cannot do on a ``family`` model: SD options on Flux, Flux options elsewhere, and
    ``invert`` / ``pivot`` on Flux (textual inversion on CLIP-L and T5 is not built)."""
    if family != "flux":
        return [
            f"{_flag(n)} is a Flux option (flow matching, Flux's blocks and T5); this model trains with DDPM"
            for n in FLUX_FIELDS
            if _given(config, n)
        ]
    if config.COMMAND != "train":
        return [
            f"lorax {config.COMMAND} does not train Flux models yet (textual inversion on CLIP-L and T5 is not built)"
        ]
    p = [f"{_flag(n)}: {why}" for n, why in _SD_ONLY.items() if _given(config, n)]
    if config.algo not in ("lora", "dora"):
        p.append(f"--algo {config.algo}: the Flux LoRA formats hold plain LoRA pairs; use --algo lora")
    if config.clip_skip == 1:
        p = [x for x in p if not x.startswith("--clip-skip")]
    return p
