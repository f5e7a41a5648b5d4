"""``TrainConfig``: every option of ``lorax train`` in one dataclass, validated in one place.

Field names are the flag names (``learning_rate`` ⇄ ``--learning-rate``), and a TOML ``--config`` file uses the
same keys (dashes or underscores). Flags given on the command line win over the file. ``validate()`` collects
every problem into one ``ConfigError`` that names the flags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from lorax.data.tomlfile import toml_value
from lorax.errors import ConfigError
from lorax.training.config_file import (
    check_model_defaults,
    coerce,
    field_names,
    load_toml,
    masks_beside,
    plain,
    register_command,
    resumed_config,
)
from lorax.training.flux_config import FLUX_FIELDS

# Options that only ``lorax train`` reads (invert and pivot configs inherit the fields and refuse them set).
TRAIN_ONLY = (
    "save_every",
    "save_every_epochs",
    "save_last",
    "init_lora",
    "warmup_ratio",
    "lr_cycles",
    "lr_power",
    "loraplus_ratio",
    "ema_decay",
    "clip_skip",
    "block_dims",
    "block_lr",
    "sample_prompts",
    "val_split",
    "algo",
    "conv_rank",
    "conv_alpha",
    "concept",
    "concept_class",
    *FLUX_FIELDS,
)
# Memory levers, named in the out-of-memory message.
MEMORY_FLAGS = (
    "--batch-size 1 (with --grad-accum)",
    "--gradient-checkpointing",
    "--mixed-precision fp16/bf16",
    "--cache-latents",
    "--fp8-base",
    "--blocks-to-swap N (with --gradient-checkpointing)",
    "--optimizer adamw8bit",
    "a lower --resolution",
    "a lower --rank",
)


def flag(name: str) -> str:
    """The command-line flag of a config field."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Everything a training run needs. A model's own defaults (its ``lorax.json``) replace these in ``from_sources``."""

    data_dir: Path | None = None
    dataset_config: Path | None = None  # kohya's dataset TOML (--dataset-config)
    concept: list[str] = field(default_factory=list)  # DIR:PROMPT[:REPEATS] per concept (train only)
    # per concept, its class images ([[concepts]] class_prompt/class_dir/num_class_images; lorax.data.concepts)
    concept_class: list[str] = field(default_factory=list)
    output: Path | None = None
    model: str = "shapes"
    format: str = "kohya"
    force: bool = False
    # data
    instance_prompt: str | None = None
    template: str | None = None
    resolution: int | None = None
    random_crop: bool = False
    flip: bool = False
    buckets: bool = False
    repeats: int = 1
    caption_shuffle: bool = False
    keep_tokens: int = 1
    caption_dropout: float = 0.0
    strict: bool = False
    recursive: bool = False
    # prior preservation
    class_prompt: str | None = None
    class_dir: Path | None = None
    num_class_images: int = 100
    prior_weight: float = 1.0
    sample_steps: int | None = None
    guidance_scale: float | None = None
    # LoRA
    rank: int = 4
    alpha: float | None = None
    targets: str = "attn"
    train_text: bool = False
    lora_dropout: float = 0.0
    dora: bool = False
    algo: str = "lora"  # lora, locon, loha, lokr, dora (= --dora) (train only; lorax/training/algos.py)
    conv_rank: int | None = None  # locon/loha/lokr: the convs' rank (kohya's conv_dim; default --rank)
    conv_alpha: float | None = None  # … and alpha (kohya's conv_alpha; default the conv rank)
    block_dims: str | None = None  # kohya's block_dims: a rank per UNet block (train only)
    init_lora: Path | None = None  # kohya's network_weights, train only
    # optimisation
    optimizer: str = "adamw"
    learning_rate: float = 1e-4
    text_learning_rate: float | None = None
    weight_decay: float = 1e-2
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # train only: warm-up as a fraction of the run's steps
    lr_cycles: int = 1  # cosine_with_restarts' hard restarts (train only)
    lr_power: float = 1.0  # polynomial's power (train only)
    block_lr: str | None = None  # a --lr multiplier per kohya UNet block (train only)
    loraplus_ratio: float | None = None  # LoRA+: lora_B at this × lr (train only)
    clip_skip: int | None = None  # kohya's / A1111's clip skip (2: penultimate layer), train only
    ema_decay: float | None = None  # EMA of the adapter weights, written as the output (train only)
    steps: int | None = None
    epochs: int | None = None
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    prediction_type: str | None = None
    # Flux (flow matching, lorax.training.flux_config): None = not given, the model's / FlowConfig's default
    timestep_sampling: str | None = None
    discrete_flow_shift: float | None = None
    sigmoid_scale: float | None = None
    logit_mean: float | None = None
    logit_std: float | None = None
    weighting_scheme: str | None = None
    guidance: float | None = None
    max_sequence_length: int | None = None
    train_blocks: str | None = None
    train_t5: bool = False
    seed: int = 0
    # memory and speed
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    sdpa: bool = True
    cache_latents: bool = False
    cache_text: bool = True
    device: str | None = None
    # during training
    checkpoint_every: int = 0
    checkpoint_dir: Path | None = None
    resume: Path | None = None
    validation_prompt: list[str] = field(default_factory=list)
    validation_every: int = 0
    save_every: int = 0  # usable snapshots (lorax.training.snapshots), train only
    save_every_epochs: int = 0
    save_last: int = 0
    sample_prompts: Path | None = None  # kohya's prompt file (lorax.training.sample_prompts), train only
    val_split: float = 0.0  # held-out share of the images for a validation loss (lorax.training.val_loss)
    # output
    save_dtype: str = "fp16"
    output_name: str | None = None
    # issue 19: loss masks, trackers, speed knobs (checked in lorax.training.extras)
    mask_dir: Path | None = None
    auto_mask: bool = False
    log_with: str | None = None
    logging_dir: Path | None = None
    compile: bool = False
    channels_last: bool = False
    cache_latents_to_disk: bool = False
    # issue 17: memory options (lorax.training.quantized_base, block_swap, text_cache; checked in extras)
    fp8_base: bool = False
    blocks_to_swap: int = 0
    cache_text_to_disk: bool = False

    DEFAULT_STEPS = 500
    COMMAND = "train"  # subclasses (invert, pivot) name their command: TOML section and messages
    # Fields that no option of this command sets (a --config file, a model's lorax.json or the Python API do):
    # messages name them as config keys, never as a flag the command lacks. tests/test_config_messages.py pins each
    # command's set to its options.
    CONFIG_ONLY: ClassVar[frozenset[str]] = frozenset({"data_dir", "concept_class"})

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "COMMAND" in cls.__dict__:  # a command's config (invert, pivot), not a variant of one
            register_command(cls)

    # ---------------------------------------------------------------------------------------------------------
    @classmethod
    def from_sources(
        cls, flags: Mapping[str, Any], config_file: str | Path | None = None, *, validate: bool = True
    ) -> TrainConfig:
        """A config from a TOML file (optional) overlaid by ``flags`` (the options given on the command line), over
        the defaults the model carries (``lorax.json``; see ``lorax.models.defaults``), over lorax's own."""
        values: dict[str, Any] = {}
        if config_file is None and flags.get("resume") is not None:
            config_file = resumed_config(flags["resume"])  # `--resume DIR` alone repeats the checkpoint's run
        if config_file is not None:
            values.update(load_toml(config_file, cls))
        unknown = sorted(set(flags) - field_names(cls))
        if unknown:
            raise ConfigError(f"unknown option(s): {', '.join(unknown)}")
        dataset_config = flags.get("dataset_config", values.get("dataset_config"))
        if dataset_config is not None:  # its resolution, buckets and batch size; flags still win
            from lorax.data.kohya import read_dataset_config

            values.update(read_dataset_config(dataset_config).config_values())
        if flags.get(
            "concept"
        ):  # --concept on the command line replaces the file's concepts, class settings too
            values.pop("concept_class", None)
        values.update(flags)
        if values.get("model") is None:  # LORAX_MODEL, the user config file, else the built-in model
            from lorax.models.registry import default_model

            values["model"] = default_model()[0]
        values = {**cls.model_defaults_for(values), **values}
        config = cls(**coerce(values, cls))
        if validate:
            config.validate()
        return config

    @classmethod
    def model_defaults_for(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """The config defaults of this command that the model named in ``values`` carries, less those the given
        values rule out (a default ``steps`` when ``epochs`` is given, ``auto_mask`` when ``mask_dir`` is)."""
        from lorax.models.defaults import model_defaults

        found = model_defaults(values.get("model", cls.model))
        check_model_defaults(found)
        defaults = found.for_command(cls.COMMAND)
        if values.get("epochs") is not None:
            defaults.pop("steps", None)
        if values.get("mask_dir") is not None:  # the user's masks (lorax prepare's) win over computed ones
            defaults.pop("auto_mask", None)
        if "auto_mask" in defaults and (values.get("ignore_masks") or masks_beside(values.get("data_dir"))):
            defaults.pop("auto_mask", None)  # NAME.mask.png beside the images win too; --ignore-masks: none
        return defaults

    def resume_command(self, checkpoint: Path) -> str:
        """The command line that continues this run from ``checkpoint`` (its config travels in the checkpoint)."""
        import shlex

        args = ["lorax", self.COMMAND, "--resume", str(Path(checkpoint).absolute())]
        if self.force:
            args.append("--force")
        return shlex.join(args)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    @property
    def text_lr(self) -> float:
        return self.learning_rate if self.text_learning_rate is None else self.text_learning_rate

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    @property
    def prior_preservation(self) -> bool:
        """Class images are generated from --class-prompt (a kohya-layout --class-dir brings its own)."""
        return self.class_prompt is not None

    @property
    def kohya_class_dir(self) -> bool:
        from lorax.data.kohya import is_kohya_folder

        # train reads kohya's layout; invert and pivot take a class folder with --class-prompt
        return self.COMMAND == "train" and self.class_dir is not None and is_kohya_folder(self.class_dir)

    @property
    def sampling(self) -> tuple[int, float]:
        """Denoising steps and guidance for class and validation images: the flags, else the model's defaults."""
        from lorax.models.defaults import model_defaults

        steps, guidance = model_defaults(self.model).sampling
        return (
            self.sample_steps if self.sample_steps is not None else steps,
            self.guidance_scale if self.guidance_scale is not None else guidance,
        )

    def sampling_for(self, pipe: Any) -> tuple[int, float]:
        """``sampling`` for ``pipe``'s family: a Flux model's own defaults are Flux's (``flux_train.flux_sampling``)."""
        if getattr(pipe, "unet", None) is not None:
            return self.sampling
        from lorax.training.flux_train import flux_sampling

        return flux_sampling(self, pipe)

    @property
    def checkpoints_path(self) -> Path:
        if self.checkpoint_dir is not None:
            return Path(self.checkpoint_dir)
        assert self.output is not None
        out = Path(self.output)
        return out.with_name(out.stem + ".checkpoints")

    @classmethod
    def option_name(cls, name: str) -> str:
        """How a message names field ``name``: this command's flag (``--weight-decay``), or, where the command has
        no such flag, the config key (``config key weight_decay``)."""
        if (
            name == "concept_class"
        ):  # internal: the class settings of [[concepts]] tables, as the user wrote them
            return "config key concepts (class_prompt / class_dir)"
        return f"config key {name}" if name in cls.CONFIG_ONLY else flag(name)

    @classmethod
    def memory_flags(cls) -> tuple[str, ...]:
        """The memory levers (``MEMORY_FLAGS``) this command has a flag for, named in its out-of-memory message."""
        import re

        def field_of(lever: str) -> str:
            found = re.search(r"--([a-z0-9-]+)", lever)
            return found.group(1).replace("-", "_") if found else ""

        return tuple(lever for lever in MEMORY_FLAGS if field_of(lever) not in cls.CONFIG_ONLY)

    def problems(self) -> list[str]:
        """Every inconsistency, each naming its flag(s) (``option_name``: only flags this command has)."""
        from lorax.training.config_checks import problems
        from lorax.training.flux_config import flag_problems

        return problems(self) + flag_problems(self)

    def snapshot_problems(self) -> list[str]:
        """--save-every, --save-every-epochs and --save-last."""
        from lorax.training.config_checks import snapshot_problems

        return snapshot_problems(self)

    def lr_problems(self) -> list[str]:
        """--warmup-ratio, --lr-cycles, --lr-power, --loraplus-ratio, --clip-skip, --ema-decay."""
        from lorax.training.config_checks import lr_problems

        return lr_problems(self)

    def __post_init__(self) -> None:
        if self.algo == "dora":  # --algo dora is --dora
            self.dora = True

    def train_only_problems(self) -> list[str]:
        """Options of ``lorax train`` alone, refused when another command's config (TOML) sets them."""
        if self.COMMAND == "train":
            return []
        defaults = TrainConfig()
        return [
            f"{self.option_name(n)} is lorax train's; lorax {self.COMMAND} does not use it"
            for n in TRAIN_ONLY
            if getattr(self, n) != getattr(defaults, n)
        ]

    def family_problems(self, family: str) -> list[str]:
        """What this config cannot do on a model of ``family`` (checked once the model is loaded, before training)."""
        from lorax.training.flux_config import family_problems

        return family_problems(self, family)

    def validate(self) -> TrainConfig:
        problems = self.problems()
        if problems:
            raise ConfigError("; ".join(problems))
        return self

    def to_toml(self) -> str:
        """The resolved config as TOML, keys spelled like the flags (reloadable with ``--config``)."""
        lines = [f"# lorax {self.COMMAND}: the resolved configuration of this run", ""]
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name in ("force", "resume", "concept", "concept_class"):
                continue
            if isinstance(value, Path):  # absolute, so the file means the same wherever it is read from
                value = value.expanduser().absolute()
            lines.append(f"{f.name.replace('_', '-')} = {toml_value(value)}")
        if self.concept:  # [[concepts]] tables, after every top-level key
            from lorax.data.concepts import concept_tables

            lines += ["", concept_tables(self.concept, self.concept_class)]
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict[str, Any]:
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}


register_command(TrainConfig)

__all__ = ["TRAIN_ONLY", "TrainConfig", "field_names", "flag", "load_toml", "resumed_config"]
