"""A training config's file side: ``--config`` TOML files read (``load_toml``) with each value coerced to its field's
type (``coerce``), and a checkpoint's saved config found
(``resumed_config``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.data.tomlfile import read_toml
from lorax.errors import ConfigError

if TYPE_CHECKING:
    from lorax.training.config import TrainConfig


# The commands' config classes by command (train, invert, pivot), registered as they are defined
# (``TrainConfig.__init_subclass__``); importing ``lorax.training`` defines all three.
_COMMANDS: dict[str, type[TrainConfig]] = {}


def register_command(cls: type[TrainConfig]) -> None:
    """``cls`` is the config of ``lorax {cls.COMMAND}``."""
    _COMMANDS[cls.COMMAND] = cls


def _command_class(cls: type[TrainConfig] | None) -> type[TrainConfig]:
    return cls if cls is not None else _COMMANDS["train"]


def masks_beside(data_dir: Any) -> bool:
    """Whether ``NAME.mask.png`` loss masks lie in ``data_dir`` (or its sub-folders, kohya's layout)."""
    from lorax.data.images import has_mask_files

    return data_dir is not None and has_mask_files(Path(data_dir))


def field_names(cls: type[TrainConfig] | None = None) -> set[str]:
    return {f.name for f in fields(_command_class(cls))}


def path_fields(cls: type[TrainConfig]) -> set[str]:
    return {f.name for f in fields(cls) if "Path" in str(f.type)}


def load_toml(path: str | Path, cls: type[TrainConfig] | None = None) -> dict[str, Any]:
    """Read a ``--config`` TOML file: flag-named keys at the top level (or under ``[train]``)."""
    path = Path(path)
    data = read_toml(path, "config file not found")
    cls = _command_class(cls)
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

        values["concept"], classes = concepts_from_toml(values.pop("concepts"), path)
        spelled["concept"] = spelled.pop("concepts")
        if classes:
            values["concept_class"] = classes
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
    for name in path_fields(cls):
        if isinstance(values.get(name), str):
            p = Path(values[name]).expanduser()
            values[name] = p if p.is_absolute() else path.parent / p
    # each value of the type its key takes: a wrong one names this file and the key, not the flag
    coerce(values, cls, name_of=lambda n: f"{section}key {spelled.get(n, n)}", path=path)
    return values


def resumed_config(resume: str | Path) -> Path | None:
    """The ``config.toml`` a checkpoint (or the latest in a folder of them) carries, if it has one."""
    from lorax.training.checkpoint import find_checkpoint

    saved = find_checkpoint(resume) / "config.toml"
    return saved if saved.is_file() else None


def coerce(
    values: dict[str, Any],
    cls: type[TrainConfig] | None = None,
    *,
    name_of: Callable[[str], str] | None = None,
    path: Path | None = None,
) -> dict[str, Any]:
    """Each value converted to its field's type; problems named by ``name_of`` (the flag, or a TOML key)."""
    cls = _command_class(cls)
    name_of = name_of or cls.option_name
    types = {f.name: str(f.type) for f in fields(cls)}
    paths = path_fields(cls)
    out: dict[str, Any] = {}
    problems: list[str] = []
    for name, value in values.items():
        kind = types[name]
        try:
            if value is None:
                out[name] = None
            elif name in paths:
                out[name] = Path(value)
            elif name in ("validation_prompt", "concept", "concept_class"):
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


def plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


# Where a model's files live and what the run writes are the user's, never a model's defaults'.
USER_ONLY = frozenset({"data_dir", "output", "model", "force", "resume", "checkpoint_dir"})


def check_model_defaults(defaults: Any) -> None:
    """A model's training defaults (``lorax.models.defaults.ModelDefaults``) name only config keys of their
    commands; ``FormatError`` naming the file and every unknown key otherwise."""
    from lorax.errors import FormatError

    problems = []
    for command, cls in _COMMANDS.items():
        bad = sorted(set(defaults.training.get(command, {})) - (field_names(cls) - USER_ONLY))
        if bad:
            problems.append(
                f"{command}: unknown key(s) {', '.join(bad)} (keys are `lorax {command}`'s flag names)"
            )
    if problems:
        raise FormatError(f"{defaults.source}: " + "; ".join(problems))
