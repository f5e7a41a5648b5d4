"""A training config's checks: every inconsistency of its values, each naming its flag(s) (``TrainConfig.problems``
and its parts, here as functions of the config; ``validate`` joins them into one ``ConfigError``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lorax import dtypes

if TYPE_CHECKING:
    from lorax.training.config import TrainConfig

# The values each choice flag allows.
FORMATS = ("kohya", "diffusers")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")
SAVE_DTYPES = dtypes.NAMES
PREDICTION_TYPES = ("epsilon", "v_prediction")
DEVICES = ("auto", "cpu", "cuda", "gpu")
TEMPLATES = ("object", "style")
TARGET_PRESETS = ("attn", "attn-ff", "all")


def problems(config: TrainConfig) -> list[str]:
    """Every inconsistency, each naming its flag(s) (``option_name``: only flags this command has)."""
    p: list[str] = []
    opt = config.option_name

    def choice(name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(config, name)
        if value is not None and value not in allowed:
            p.append(f"{opt(name)} must be one of {', '.join(allowed)} (got {value!r})")

    def positive(name: str, *, zero: bool = False) -> None:
        value = getattr(config, name)
        if value is not None and (value < 0 or (value == 0 and not zero)):
            p.append(f"{opt(name)} must be {'≥ 0' if zero else '> 0'} (got {value})")

    if config.concept and (config.data_dir is not None or config.dataset_config is not None):
        p.append(
            f"{opt('concept')} names every training folder: drop DATA_DIR / {opt('dataset_config')} (or "
            f"give that folder as one more {opt('concept')} DIR:PROMPT)"
        )
    if config.concept_class:
        from lorax.data.concepts import class_dir_problems

        p += class_dir_problems(config.concept_class, config.concept)
        p += [
            f"{opt(n)} is run-wide: drop it, or the [[concepts]] tables' class_prompt / class_dir (per concept)"
            for n in ("class_prompt", "class_dir")
            if getattr(config, n) is not None
        ]
    if config.data_dir is None and config.dataset_config is None and not config.concept:
        either = f" or {opt('dataset_config')}" if "dataset_config" not in config.CONFIG_ONLY else ""
        p.append(f"DATA_DIR is required (a folder of training images){either}")
    if config.data_dir is not None and config.dataset_config is not None:
        p.append(
            f"give DATA_DIR or {opt('dataset_config')}, not both (the dataset config names its image_dir)"
        )
    if config.output is None:
        p.append("-o/--output is required (the LoRA file to write)")
    elif config.format == "kohya" and Path(config.output).suffix != ".safetensors":
        p.append(f"-o/--output must end in .safetensors (got {Path(config.output).name})")
    choice("format", FORMATS)
    choice("optimizer", OPTIMIZERS)
    choice("lr_scheduler", SCHEDULERS)
    choice("mixed_precision", MIXED_PRECISION)
    choice("save_dtype", SAVE_DTYPES)
    choice("prediction_type", PREDICTION_TYPES)
    choice("device", DEVICES)
    choice("template", TEMPLATES)
    if config.resolution is not None and (config.resolution <= 0 or config.resolution % 8):
        p.append(f"{opt('resolution')} must be a positive multiple of 8 (got {config.resolution})")
    for name in ("rank", "repeats", "batch_size", "grad_accum", "learning_rate", "num_class_images"):
        positive(name)
    for name in ("sample_steps", "steps", "epochs"):
        positive(name)
    for name in ("warmup_steps", "keep_tokens", "checkpoint_every", "validation_every", "weight_decay"):
        positive(name, zero=True)
    for name in ("max_grad_norm", "noise_offset", "prior_weight"):
        positive(name, zero=True)
    positive("snr_gamma")
    positive("guidance_scale", zero=True)
    positive("alpha")
    positive("text_learning_rate", zero=True)
    for name in ("caption_dropout", "lora_dropout"):
        value = getattr(config, name)
        if not 0.0 <= value < 1.0:
            p.append(f"{opt(name)} must be in [0, 1) (got {value})")
    if config.steps is not None and config.epochs is not None:
        p.append(f"{opt('steps')} and {opt('epochs')} are exclusive: pass one")
    if config.text_learning_rate is not None and not config.train_text:
        p.append(
            f"{opt('text_learning_rate')} needs {opt('train_text')} (the text encoder is frozen without it)"
        )
    if config.class_dir is not None and config.class_prompt is None and not config.kohya_class_dir:
        p.append(
            f"{opt('class_dir')} needs {opt('class_prompt')} (prior preservation is on when a class prompt is "
            "given)"
            + (
                ", or '<repeats>_<class>' sub-folders as in kohya's layout"
                if config.COMMAND == "train"
                else ""
            )
        )
    if config.kohya_class_dir and config.class_prompt is not None:
        p.append(
            f"{opt('class_dir')} in kohya's '<repeats>_<class>' layout captions its images by folder: drop "
            f"{opt('class_prompt')}"
        )
    if config.cache_latents and config.random_crop:
        p.append(
            f"{opt('cache_latents')} and {opt('random_crop')} are exclusive (a random crop changes the latents "
            "every step)"
        )
    if config.validation_every and not (
        config.validation_prompt or config.sample_prompts or config.val_split
    ):
        p.append(
            f"{opt('validation_every')} needs at least one {opt('validation_prompt')}"
            + (f", {opt('sample_prompts')} or {opt('val_split')}" if config.COMMAND == "train" else "")
        )
    if config.sample_prompts is not None and not config.validation_every:
        p.append(f"{opt('sample_prompts')} needs {opt('validation_every')} N (alias --sample-every)")
    if not 0.0 <= config.val_split < 1.0:
        p.append(f"{opt('val_split')} must be in [0, 1) (got {config.val_split})")
    if config.targets not in TARGET_PRESETS and not [t for t in config.targets.split(",") if t.strip()]:
        p.append(f"{opt('targets')} must be one of {', '.join(TARGET_PRESETS)} or module patterns")
    p += config.snapshot_problems() + config.lr_problems()
    if config.dora and config.format == "diffusers":
        p.append(
            f"{opt('dora')} files are written in kohya (LyCORIS dora_scale) format: drop {opt('format')} "
            "diffusers"
        )
    if config.dora and config.targets == "all":
        p.append(f"{opt('dora')} covers Linear layers only with PEFT: use {opt('targets')} attn or attn-ff")
    from lorax.training.extras import extra_problems

    p.extend(extra_problems(config))
    return p


def snapshot_problems(config: TrainConfig) -> list[str]:
    """--save-every, --save-every-epochs and --save-last."""
    opt = config.option_name
    p = [
        f"{opt(n)} must be ≥ 0 (got {getattr(config, n)})"
        for n in ("save_every", "save_every_epochs", "save_last")
        if getattr(config, n) < 0
    ]
    if config.save_last and not (config.save_every or config.save_every_epochs):
        p.append(
            f"{opt('save_last')} needs {opt('save_every')} or {opt('save_every_epochs')} (it bounds how many "
            "snapshots stay)"
        )
    return p + config.train_only_problems()


def lr_problems(config: TrainConfig) -> list[str]:
    """--warmup-ratio, --lr-cycles, --lr-power, --loraplus-ratio, --clip-skip, --ema-decay."""
    opt = config.option_name
    p: list[str] = []
    if not 0.0 <= config.warmup_ratio < 1.0:
        p.append(f"{opt('warmup_ratio')} must be in [0, 1) (got {config.warmup_ratio})")
    if config.warmup_ratio and config.warmup_steps:
        p.append(f"{opt('warmup_steps')} and {opt('warmup_ratio')} are exclusive: pass one")
    if config.lr_cycles < 1:
        p.append(f"{opt('lr_cycles')} must be ≥ 1 (got {config.lr_cycles})")
    if config.lr_cycles != 1 and config.lr_scheduler != "cosine_with_restarts":
        p.append(f"{opt('lr_cycles')} needs {opt('lr_scheduler')} cosine_with_restarts")
    if config.lr_power <= 0:
        p.append(f"{opt('lr_power')} must be > 0 (got {config.lr_power})")
    if config.lr_power != 1.0 and config.lr_scheduler != "polynomial":
        p.append(f"{opt('lr_power')} needs {opt('lr_scheduler')} polynomial")
    if config.clip_skip is not None and config.clip_skip < 1:
        p.append(f"{opt('clip_skip')} must be ≥ 1 (got {config.clip_skip}; 2 is the penultimate layer)")
    if config.ema_decay is not None and not 0.0 < config.ema_decay < 1.0:
        p.append(f"{opt('ema_decay')} must be in (0, 1) (got {config.ema_decay}; 0.999 is common)")
    if config.loraplus_ratio is not None and config.loraplus_ratio <= 0:
        p.append(
            f"{opt('loraplus_ratio')} must be > 0 (got {config.loraplus_ratio}; 16 is the paper's default)"
        )
    if config.init_lora is not None and config.block_dims is not None:
        p.append(f"{opt('init_lora')} takes its ranks from the file: drop {opt('block_dims')}")
    if config.init_lora is not None and config.dora:
        p.append(f"{opt('init_lora')} starts from a plain LoRA: drop {opt('dora')}")
    from lorax.training.algo_config import algo_problems

    p += algo_problems(config, opt)
    return p
