"""``TrainConfig``: every option of ``lorax train`` in one dataclass, validated in one place.

Field names are the flag names (``learning_rate`` ⇄ ``--learning-rate``), and a TOML ``--config`` file uses the
same keys (dashes or underscores). Flags given on the command line win over the file. ``validate()`` collects
every problem into one ``ConfigError`` that names the flags.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from lorax import dtypes
from lorax.errors import ConfigError, InputError

FORMATS = ("kohya", "diffusers")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISION = ("no", "fp16", "bf16")
SAVE_DTYPES = dtypes.NAMES
PREDICTION_TYPES = ("epsilon", "v_prediction")
DEVICES = ("auto", "cpu", "cuda", "gpu")
TEMPLATES = ("object", "style")
TARGET_PRESETS = ("attn", "attn-ff", "all")
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
)
# Memory levers, named in the out-of-memory message.
MEMORY_FLAGS = (
    "--batch-size 1 (with --grad-accum)",
    "--gradient-checkpointing",
    "--mixed-precision fp16/bf16",
    "--cache-latents",
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

    DEFAULT_STEPS = 500
    COMMAND = "train"  # subclasses (invert, pivot) name their command: TOML section and messages
    # Fields that no option of this command sets (a --config file, a model's lorax.json or the Python API do):
    # messages name them as config keys, never as a flag the command lacks. tests/test_config_messages.py pins each
    # command's set to its options.
    CONFIG_ONLY: ClassVar[frozenset[str]] = frozenset({"data_dir"})

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
        values.update(flags)
        if values.get("model") is None:  # LORAX_MODEL, the user config file, else the built-in model
            from lorax.models.registry import default_model

            values["model"] = default_model()[0]
        values = {**cls.model_defaults_for(values), **values}
        config = cls(**_coerce(values, cls))
        if validate:
            config.validate()
        return config

    @classmethod
    def model_defaults_for(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """The config defaults of this command that the model named in ``values`` carries, less those the given
        values rule out (a default ``steps`` when ``epochs`` is given, ``auto_mask`` when ``mask_dir`` is)."""
        from lorax.models.defaults import model_defaults

        defaults = model_defaults(values.get("model", cls.model)).for_command(cls.COMMAND)
        if values.get("epochs") is not None:
            defaults.pop("steps", None)
        if values.get("mask_dir") is not None:  # the user's masks (lorax prepare's) win over computed ones
            defaults.pop("auto_mask", None)
        if "auto_mask" in defaults and (values.get("ignore_masks") or _masks_beside(values.get("data_dir"))):
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
        p: list[str] = []
        opt = self.option_name

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value is not None and value not in allowed:
                p.append(f"{opt(name)} must be one of {', '.join(allowed)} (got {value!r})")

        def positive(name: str, *, zero: bool = False) -> None:
            value = getattr(self, name)
            if value is not None and (value < 0 or (value == 0 and not zero)):
                p.append(f"{opt(name)} must be {'≥ 0' if zero else '> 0'} (got {value})")

        if self.concept and (self.data_dir is not None or self.dataset_config is not None):
            p.append(
                f"{opt('concept')} names every training folder: drop DATA_DIR / {opt('dataset_config')} (or "
                f"give that folder as one more {opt('concept')} DIR:PROMPT)"
            )
        if self.data_dir is None and self.dataset_config is None and not self.concept:
            either = f" or {opt('dataset_config')}" if "dataset_config" not in self.CONFIG_ONLY else ""
            p.append(f"DATA_DIR is required (a folder of training images){either}")
        if self.data_dir is not None and self.dataset_config is not None:
            p.append(
                f"give DATA_DIR or {opt('dataset_config')}, not both (the dataset config names its image_dir)"
            )
        if self.output is None:
            p.append("-o/--output is required (the LoRA file to write)")
        elif self.format == "kohya" and Path(self.output).suffix != ".safetensors":
            p.append(f"-o/--output must end in .safetensors (got {Path(self.output).name})")
        choice("format", FORMATS)
        choice("optimizer", OPTIMIZERS)
        choice("lr_scheduler", SCHEDULERS)
        choice("mixed_precision", MIXED_PRECISION)
        choice("save_dtype", SAVE_DTYPES)
        choice("prediction_type", PREDICTION_TYPES)
        choice("device", DEVICES)
        choice("template", TEMPLATES)
        if self.resolution is not None and (self.resolution <= 0 or self.resolution % 8):
            p.append(f"{opt('resolution')} must be a positive multiple of 8 (got {self.resolution})")
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
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                p.append(f"{opt(name)} must be in [0, 1) (got {value})")
        if self.steps is not None and self.epochs is not None:
            p.append(f"{opt('steps')} and {opt('epochs')} are exclusive: pass one")
        if self.text_learning_rate is not None and not self.train_text:
            p.append(
                f"{opt('text_learning_rate')} needs {opt('train_text')} (the text encoder is frozen without it)"
            )
        if self.class_dir is not None and self.class_prompt is None and not self.kohya_class_dir:
            p.append(
                f"{opt('class_dir')} needs {opt('class_prompt')} (prior preservation is on when a class prompt is "
                "given)"
                + (
                    ", or '<repeats>_<class>' sub-folders as in kohya's layout"
                    if self.COMMAND == "train"
                    else ""
                )
            )
        if self.kohya_class_dir and self.class_prompt is not None:
            p.append(
                f"{opt('class_dir')} in kohya's '<repeats>_<class>' layout captions its images by folder: drop "
                f"{opt('class_prompt')}"
            )
        if self.cache_latents and self.random_crop:
            p.append(
                f"{opt('cache_latents')} and {opt('random_crop')} are exclusive (a random crop changes the latents "
                "every step)"
            )
        if self.validation_every and not (self.validation_prompt or self.sample_prompts or self.val_split):
            p.append(
                f"{opt('validation_every')} needs at least one {opt('validation_prompt')}"
                + (f", {opt('sample_prompts')} or {opt('val_split')}" if self.COMMAND == "train" else "")
            )
        if self.sample_prompts is not None and not self.validation_every:
            p.append(f"{opt('sample_prompts')} needs {opt('validation_every')} N (alias --sample-every)")
        if not 0.0 <= self.val_split < 1.0:
            p.append(f"{opt('val_split')} must be in [0, 1) (got {self.val_split})")
        if self.targets not in TARGET_PRESETS and not [t for t in self.targets.split(",") if t.strip()]:
            p.append(f"{opt('targets')} must be one of {', '.join(TARGET_PRESETS)} or module patterns")
        p += self.snapshot_problems() + self.lr_problems()
        if self.dora and self.format == "diffusers":
            p.append(
                f"{opt('dora')} files are written in kohya (LyCORIS dora_scale) format: drop {opt('format')} "
                "diffusers"
            )
        if self.dora and self.targets == "all":
            p.append(
                f"{opt('dora')} covers Linear layers only with PEFT: use {opt('targets')} attn or attn-ff"
            )
        from lorax.training.extras import extra_problems

        p.extend(extra_problems(self))
        return p

    def snapshot_problems(self) -> list[str]:
        """--save-every, --save-every-epochs and --save-last."""
        opt = self.option_name
        p = [
            f"{opt(n)} must be ≥ 0 (got {getattr(self, n)})"
            for n in ("save_every", "save_every_epochs", "save_last")
            if getattr(self, n) < 0
        ]
        if self.save_last and not (self.save_every or self.save_every_epochs):
            p.append(
                f"{opt('save_last')} needs {opt('save_every')} or {opt('save_every_epochs')} (it bounds how many "
                "snapshots stay)"
            )
        return p + self.train_only_problems()

    def lr_problems(self) -> list[str]:
        """--warmup-ratio, --lr-cycles, --lr-power, --loraplus-ratio, --clip-skip, --ema-decay."""
        opt = self.option_name
        p: list[str] = []
        if not 0.0 <= self.warmup_ratio < 1.0:
            p.append(f"{opt('warmup_ratio')} must be in [0, 1) (got {self.warmup_ratio})")
        if self.warmup_ratio and self.warmup_steps:
            p.append(f"{opt('warmup_steps')} and {opt('warmup_ratio')} are exclusive: pass one")
        if self.lr_cycles < 1:
            p.append(f"{opt('lr_cycles')} must be ≥ 1 (got {self.lr_cycles})")
        if self.lr_cycles != 1 and self.lr_scheduler != "cosine_with_restarts":
            p.append(f"{opt('lr_cycles')} needs {opt('lr_scheduler')} cosine_with_restarts")
        if self.lr_power <= 0:
            p.append(f"{opt('lr_power')} must be > 0 (got {self.lr_power})")
        if self.lr_power != 1.0 and self.lr_scheduler != "polynomial":
            p.append(f"{opt('lr_power')} needs {opt('lr_scheduler')} polynomial")
        if self.clip_skip is not None and self.clip_skip < 1:
            p.append(f"{opt('clip_skip')} must be ≥ 1 (got {self.clip_skip}; 2 is the penultimate layer)")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            p.append(f"{opt('ema_decay')} must be in (0, 1) (got {self.ema_decay}; 0.999 is common)")
        if self.loraplus_ratio is not None and self.loraplus_ratio <= 0:
            p.append(
                f"{opt('loraplus_ratio')} must be > 0 (got {self.loraplus_ratio}; 16 is the paper's default)"
            )
        if self.init_lora is not None and self.block_dims is not None:
            p.append(f"{opt('init_lora')} takes its ranks from the file: drop {opt('block_dims')}")
        if self.init_lora is not None and self.dora:
            p.append(f"{opt('init_lora')} starts from a plain LoRA: drop {opt('dora')}")
        from lorax.training.algo_config import algo_problems

        p += algo_problems(self, opt)
        return p

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
        return []

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
            if value is None or f.name in ("force", "resume"):
                continue
            if isinstance(value, Path):  # absolute, so the file means the same wherever it is read from
                value = value.expanduser().absolute()
            lines.append(f"{f.name.replace('_', '-')} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    def as_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


def _masks_beside(data_dir: Any) -> bool:
    """Whether ``NAME.mask.png`` loss masks lie in ``data_dir`` (or its sub-folders, kohya's layout)."""
    from lorax.data.images import has_mask_files

    return data_dir is not None and has_mask_files(Path(data_dir))


def field_names(cls: type[TrainConfig] | None = None) -> set[str]:
    return {f.name for f in fields(cls or TrainConfig)}


def _path_fields(cls: type[TrainConfig]) -> set[str]:
    return {f.name for f in fields(cls) if "Path" in str(f.type)}


def load_toml(path: str | Path, cls: type[TrainConfig] | None = None) -> dict[str, Any]:
    """Read a ``--config`` TOML file: flag-named keys at the top level (or under ``[train]``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError("config file not found", path=path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"not valid TOML ({err})", path=path) from None
    cls = cls or TrainConfig
    section = ""
    if isinstance(data.get(cls.COMMAND), dict):
        data, section = data[cls.COMMAND], f"[{cls.COMMAND}] "
    values = {str(k).replace("-", "_"): v for k, v in data.items()}
    spelled = {str(k).replace("-", "_"): str(k) for k in data}  # each key as the file writes it
    if "validation_prompts" in values:
        values["validation_prompt"] = values.pop("validation_prompts")
        spelled["validation_prompt"] = spelled["validation_prompts"]
    if "sample_every" in values:  # the other name of --validation-every (kohya's sample_every_n_steps)
        values["validation_every"] = values.pop("sample_every")
        spelled["validation_every"] = spelled["sample_every"]
    if "concepts" in values:  # [[concepts]] tables: --concept values
        from lorax.data.concepts import concepts_from_toml

        values["concept"] = concepts_from_toml(values.pop("concepts"), path)
        spelled["concept"] = spelled.pop("concepts")
    if "network_alpha" in values:  # kohya's name of --alpha
        values["alpha"] = values.pop("network_alpha")
        spelled["alpha"] = spelled["network_alpha"]
    unknown = sorted(set(values) - field_names(cls))
    if unknown:
        names = ", ".join(k.replace("_", "-") for k in unknown)
        raise ConfigError(
            f"unknown key(s) {names}; keys are the flag names of `lorax {cls.COMMAND}`", path=path
        )
    # Relative paths in a config file are relative to the file's folder.
    for name in _path_fields(cls):
        if isinstance(values.get(name), str):
            p = Path(values[name]).expanduser()
            values[name] = p if p.is_absolute() else path.parent / p
    # each value of the type its key takes: a wrong one names this file and the key, not the flag
    _coerce(values, cls, name_of=lambda n: f"{section}key {spelled.get(n, n)}", path=path)
    return values


_PATH_FIELDS = ("data_dir", "output", "class_dir", "checkpoint_dir", "resume")


def resumed_config(resume: str | Path) -> Path | None:
    """The ``config.toml`` a checkpoint (or the latest in a folder of them) carries, if it has one."""
    from lorax.training.checkpoint import find_checkpoint

    saved = find_checkpoint(resume) / "config.toml"
    return saved if saved.is_file() else None


def _coerce(
    values: dict[str, Any],
    cls: type[TrainConfig] | None = None,
    *,
    name_of: Callable[[str], str] | None = None,
    path: Path | None = None,
) -> dict[str, Any]:
    """Each value converted to its field's type; problems named by ``name_of`` (the flag, or a TOML key)."""
    cls = cls or TrainConfig
    name_of = name_of or cls.option_name
    types = {f.name: str(f.type) for f in fields(cls)}
    path_fields = _path_fields(cls)
    out: dict[str, Any] = {}
    problems: list[str] = []
    for name, value in values.items():
        kind = types[name]
        try:
            if value is None:
                out[name] = None
            elif name in path_fields:
                out[name] = Path(value)
            elif name in ("validation_prompt", "concept"):
                out[name] = [value] if isinstance(value, str) else [str(v) for v in value]
            elif kind.startswith("bool"):
                if not isinstance(value, bool):
                    raise TypeError("expected true or false")
                out[name] = value
            elif kind.startswith("int"):
                out[name] = _number(value, int)
            elif kind.startswith("float"):
                out[name] = _number(value, float)
            else:
                out[name] = str(value)
        except (TypeError, ValueError) as err:
            problems.append(f"{name_of(name)}: {err} (got {value!r})")
    if problems:
        raise ConfigError("; ".join(problems), path=path)
    return out


def _number(value: Any, kind: type[int] | type[float]) -> int | float:
    """An int or float from a flag's text or a TOML value; ``TypeError`` saying what was expected otherwise."""
    expected = "expected an integer" if kind is int else "expected a number"
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TypeError(expected)
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise TypeError(expected)
    try:
        return kind(value)
    except (ValueError, OverflowError):
        raise TypeError(expected) from None


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid TOML basic string
