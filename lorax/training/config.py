"""``TrainConfig``: every option of ``lorax train`` in one dataclass, validated in one place.

Field names are the flag names (``learning_rate`` ⇄ ``--learning-rate``), and a TOML ``--config`` file uses the
same keys (dashes or underscores). Flags given on the command line win over the file. ``validate()`` collects
every problem into one ``ConfigError`` that names the flags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomllib

from lorax.errors import ConfigError, InputError

FORMATS = ("kohya", "diffusers")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
SCHEDULERS = ("constant", "linear", "cosine")
MIXED_PRECISION = ("no", "fp16", "bf16")
SAVE_DTYPES = ("fp16", "bf16", "fp32")
PREDICTION_TYPES = ("epsilon", "v_prediction")
DEVICES = ("auto", "cpu", "cuda", "gpu")
TEMPLATES = ("object", "style")
TARGET_PRESETS = ("attn", "attn-ff", "all")
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
    # optimisation
    optimizer: str = "adamw"
    learning_rate: float = 1e-4
    text_learning_rate: float | None = None
    weight_decay: float = 1e-2
    lr_scheduler: str = "constant"
    warmup_steps: int = 0
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
    # output
    save_dtype: str = "fp16"
    output_name: str | None = None

    DEFAULT_STEPS = 500
    COMMAND = "train"  # subclasses (invert, pivot) name their command: TOML section and messages

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
        values rule out (a default ``steps`` when ``epochs`` is given)."""
        from lorax.models.defaults import model_defaults

        defaults = model_defaults(values.get("model", cls.model)).for_command(cls.COMMAND)
        if values.get("epochs") is not None:
            defaults.pop("steps", None)
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

    def problems(self) -> list[str]:
        """Every inconsistency, each naming its flag(s)."""
        p: list[str] = []

        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value is not None and value not in allowed:
                p.append(f"{flag(name)} must be one of {', '.join(allowed)} (got {value!r})")

        def positive(name: str, *, zero: bool = False) -> None:
            value = getattr(self, name)
            if value is not None and (value < 0 or (value == 0 and not zero)):
                p.append(f"{flag(name)} must be {'≥ 0' if zero else '> 0'} (got {value})")

        if self.data_dir is None and self.dataset_config is None:
            either = " or --dataset-config" if self.COMMAND == "train" else ""
            p.append(f"DATA_DIR is required (a folder of training images){either}")
        if self.data_dir is not None and self.dataset_config is not None:
            p.append("give DATA_DIR or --dataset-config, not both (the dataset config names its image_dir)")
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
            p.append(f"--resolution must be a positive multiple of 8 (got {self.resolution})")
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
                p.append(f"{flag(name)} must be in [0, 1) (got {value})")
        if self.steps is not None and self.epochs is not None:
            p.append("--steps and --epochs are exclusive: pass one")
        if self.text_learning_rate is not None and not self.train_text:
            p.append("--text-learning-rate needs --train-text (the text encoder is frozen without it)")
        if self.class_dir is not None and self.class_prompt is None and not self.kohya_class_dir:
            p.append(
                "--class-dir needs --class-prompt (prior preservation is on when a class prompt is given), "
                "or '<repeats>_<class>' sub-folders as in kohya's layout"
            )
        if self.kohya_class_dir and self.class_prompt is not None:
            p.append(
                "--class-dir in kohya's '<repeats>_<class>' layout captions its images by folder: drop --class-prompt"
            )
        if self.cache_latents and self.random_crop:
            p.append(
                "--cache-latents and --random-crop are exclusive (a random crop changes the latents every step)"
            )
        if self.validation_every and not self.validation_prompt:
            p.append("--validation-every needs at least one --validation-prompt")
        if self.targets not in TARGET_PRESETS and not [t for t in self.targets.split(",") if t.strip()]:
            p.append(f"--targets must be one of {', '.join(TARGET_PRESETS)} or module patterns")
        if self.dora and self.format == "diffusers":
            p.append("--dora files are written in kohya (LyCORIS dora_scale) format: drop --format diffusers")
        if self.dora and self.targets == "all":
            p.append("--dora covers Linear layers only with PEFT: use --targets attn or attn-ff")
        return p

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
    name_of = name_of or flag
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
            elif name == "validation_prompt":
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
