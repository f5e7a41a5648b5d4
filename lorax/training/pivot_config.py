"""``InvertConfig`` and ``PivotConfig``: ``TrainConfig`` plus the options of textual inversion and pivotal tuning.

Same rules as ``TrainConfig``: field names are the flag names, a TOML ``--config`` file uses the same keys (at the
top level or under ``[invert]`` / ``[pivot]``), and ``validate()`` reports every problem at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from lorax.models import families
from lorax.training.config import TRAIN_ONLY, TrainConfig, flag
from lorax.training.extras import TRAIN_ONLY_EXTRAS


def _several_text_encoders(family: str) -> bool:
    """SDXL's two encoders: a learned token is a vector per encoder (``clip_l``, ``clip_g``)."""
    found = families.find(family)
    return found is not None and len(found.text_components()) > 1


EMBEDDING_FORMATS = ("a1111", "diffusers")
PIVOT_FORMATS = ("kohya", "lora_diffusion")


@dataclass
class InversionOptions(TrainConfig):
    """The options shared by ``invert`` and ``pivot`` (their phase 1)."""

    token: str = "<s1>"
    vectors: int = 1
    init_token: str | None = None
    overwrite_token: bool = False
    token_at_data: str | None = None
    norm_decay: bool = True
    norm_target: float = 0.4
    mask_dir: Path | None = None
    auto_mask: bool = False
    mask_temperature: float = 1.0
    ignore_masks: bool = False  # NAME.mask.png beside the images are used unless this is set

    COMMAND = "invert"
    # the fields that hold the embedding tables' learning rate and weight decay (pivot: its ti_ ones)
    INVERSION_OPTIM: ClassVar[tuple[str, str]] = ("learning_rate", "weight_decay")

    @property
    def tokens(self) -> list[str]:
        from lorax.training.token_specs import parse_tokens

        return parse_tokens(self.token)

    @property
    def inversion_lr(self) -> float:
        return float(getattr(self, self.INVERSION_OPTIM[0]))

    @property
    def inversion_weight_decay(self) -> float:
        return float(getattr(self, self.INVERSION_OPTIM[1]))

    @property
    def masked(self) -> bool:
        return self.mask_dir is not None or self.auto_mask

    def problems(self) -> list[str]:
        p = [x for x in super().problems() if not x.startswith("-o/--output must end")]
        try:
            from lorax.training.token_specs import parse_init, parse_replacements

            tokens = self.tokens
            parse_init(self.init_token, tokens)
            parse_replacements(self.token_at_data, tokens)
        except Exception as err:  # ConfigError: one problem among the others
            p.append(str(err))
        if self.vectors < 1 or self.vectors > 75:
            p.append(f"--vectors must be between 1 and 75 (got {self.vectors})")
        if self.norm_target <= 0:
            p.append(f"--norm-target must be > 0 (got {self.norm_target})")
        if self.mask_temperature <= 0:
            p.append(f"--mask-temperature must be > 0 (got {self.mask_temperature})")
        if self.mask_dir is not None and self.auto_mask:
            p.append("--mask-dir and --auto-mask are exclusive: pass one")
        if self.ignore_masks and self.masked:
            p.append("--ignore-masks and --mask-dir/--auto-mask are exclusive: pass one")
        return p


@dataclass
class InvertConfig(InversionOptions):
    """``lorax invert``: learn token embeddings only. ``learning_rate`` and ``steps`` are the inversion's own."""

    format: str = "a1111"
    learning_rate: float = 5e-3
    weight_decay: float = 0.0
    lr_scheduler: str = "constant"

    COMMAND = "invert"
    # The LoRA, prior-preservation, caption and loss options are train's and pivot's; invert's TOML still takes them.
    CONFIG_ONLY: ClassVar[frozenset[str]] = frozenset(
        {
            "data_dir", "dataset_config", "alpha", "rank", "dora", "targets", "train_text", "text_learning_rate",
            "lora_dropout", "buckets", "cache_text", "caption_dropout", "caption_shuffle", "keep_tokens",
            "random_crop", "recursive", "strict", "class_dir", "class_prompt", "num_class_images", "prior_weight",
            "sample_steps", "guidance_scale", "optimizer", "weight_decay", "max_grad_norm", "noise_offset",
            "snr_gamma", "prediction_type", "sdpa", "output_name",
        }
    ) | frozenset(TRAIN_ONLY)  # fmt: skip
    CONFIG_ONLY = CONFIG_ONLY | TRAIN_ONLY_EXTRAS
    # The seed's max_train_steps_ti. On shapes, all-default runs teach a held-out colour at 1000 steps (orange 69%
    # of "a <s1> square") and not at 300 (19%).
    DEFAULT_STEPS = 1000

    def problems(self) -> list[str]:
        p = [x for x in super().problems() if not x.startswith(flag("format"))]
        if self.format not in EMBEDDING_FORMATS:
            p.append(f"--format must be one of {', '.join(EMBEDDING_FORMATS)} (got {self.format!r})")
        if self.output is not None:
            suffix = Path(self.output).suffix
            if suffix not in (".pt", ".safetensors"):
                p.append(f"-o/--output must end in .safetensors or .pt (got {Path(self.output).name})")
            elif suffix == ".pt" and self.format != "a1111":
                p.append(
                    "-o/--output .pt files are A1111 embeddings: drop --format diffusers or use .safetensors"
                )
            elif self.format == "a1111" and len(self.tokens) > 1:
                p.append(
                    "an A1111 embedding holds one token: use --format diffusers for several --token "
                    "(SD1/SD2; on SDXL, learn several with lorax pivot)"
                )
        for name in ("train_text", "dora"):
            if getattr(self, name):
                p.append(f"{self.option_name(name)} is a LoRA option: use lorax pivot")
        return p

    def family_problems(self, family: str) -> list[str]:
        """SDXL embeddings exist in one format: ``.safetensors`` with ``clip_l`` / ``clip_g`` (A1111, ComfyUI)."""
        p = super().family_problems(family)
        if not _several_text_encoders(family):
            return p
        if self.format == "diffusers":
            p.append(
                "--format diffusers holds one text encoder's vectors; an SDXL model needs clip_l and clip_g: "
                + (
                    "drop --format (the default writes an SDXL .safetensors embedding)"
                    if len(self.tokens) == 1
                    else "an SDXL embedding holds one token, so learn one --token per file (or several with lorax pivot)"
                )
            )
        elif self.output is not None and Path(self.output).suffix == ".pt":
            p.append(
                "-o/--output .pt embeddings hold one text encoder's vectors; an SDXL model needs clip_l and clip_g: "
                f"write {Path(self.output).with_suffix('.safetensors').name}"
            )
        return p


@dataclass
class PivotConfig(InversionOptions):
    """``lorax pivot``: phase 1 inversion (``ti_*``), phase 2 LoRA (``learning_rate``, ``steps``, ``rank`` …)."""

    ti_steps: int = 1000  # the seed's max_train_steps_ti, as lorax invert
    ti_learning_rate: float = 5e-3
    ti_weight_decay: float = 0.0
    continue_inversion: bool = False
    continue_ti_learning_rate: float | None = None
    train_text: bool = True
    text_learning_rate: float | None = 1e-5
    weight_decay: float = 1e-3
    lr_scheduler: str = "linear"

    COMMAND = "pivot"
    DEFAULT_STEPS = 300
    CONFIG_ONLY: ClassVar[frozenset[str]] = frozenset(
        {
            "data_dir", "dataset_config", "dora", "lora_dropout", "buckets", "cache_text", "caption_dropout",
            "caption_shuffle", "keep_tokens", "random_crop", "recursive", "strict", "sample_steps",
            "guidance_scale", "optimizer", "weight_decay", "ti_weight_decay", "max_grad_norm", "noise_offset",
            "snr_gamma", "prediction_type", "sdpa", "output_name",
        }
    ) | frozenset(TRAIN_ONLY)  # fmt: skip
    CONFIG_ONLY = CONFIG_ONLY | TRAIN_ONLY_EXTRAS
    INVERSION_OPTIM = ("ti_learning_rate", "ti_weight_decay")

    @property
    def continue_lr(self) -> float:
        if self.continue_ti_learning_rate is not None:
            return self.continue_ti_learning_rate
        return self.ti_learning_rate / 10

    def problems(self) -> list[str]:
        p = [
            x
            for x in super().problems()
            if not x.startswith(flag("format"))
            and not x.startswith(f"{self.option_name('text_learning_rate')} needs")
        ]
        if self.format not in PIVOT_FORMATS:
            p.append(f"--format must be one of {', '.join(PIVOT_FORMATS)} (got {self.format!r})")
        if self.output is not None and Path(self.output).suffix != ".safetensors":
            p.append(f"-o/--output must end in .safetensors (got {Path(self.output).name})")
        if self.ti_steps < 0:
            p.append(f"--ti-steps must be ≥ 0 (got {self.ti_steps})")
        for name in ("ti_learning_rate", "continue_ti_learning_rate"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                p.append(f"{self.option_name(name)} must be > 0 (got {value})")
        if self.ti_weight_decay < 0:
            p.append(
                f"{self.option_name('ti_weight_decay')} (the inversion's AdamW weight decay) must be ≥ 0 "
                f"(got {self.ti_weight_decay})"
            )
        if self.continue_ti_learning_rate is not None and not self.continue_inversion:
            p.append("--continue-ti-learning-rate needs --continue-inversion")
        if self.dora and self.format == "lora_diffusion":
            p.append(
                f"{self.option_name('dora')} cannot be written in the lora_diffusion format: use --format kohya"
            )
        return p

    def family_problems(self, family: str) -> list[str]:
        p = super().family_problems(family)
        if _several_text_encoders(family) and self.format == "lora_diffusion":
            p.append(
                "--format lora_diffusion has no SDXL layout (one text encoder, no clip_g tokens): use --format kohya"
            )
        return p
