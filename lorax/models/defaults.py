"""Defaults a model carries for the commands that use it: ``lorax.json`` beside ``model_index.json`` in a diffusers
folder, or the ``lorax.defaults`` key (the same JSON) in a single-file checkpoint's safetensors metadata.

The file has one section per command; every key is optional::

    {
      "generate": {"steps": 20, "guidance": 5.0, "width": 32, "height": 32},
      "train":  {"learning_rate": 0.005, "steps": 500, "resolution": 32, "batch_size": 4},
      "invert": {"steps": 1000},
      "pivot":  {"ti_steps": 1000, "steps": 300}
    }

``generate`` keys are ``lorax generate``'s (``--steps``, ``--guidance``, the two sides of ``--size``,
``--max-sequence-length`` for a Flux model's T5); ``train``,
``invert`` and ``pivot`` keys are the commands' config keys (the flag names with underscores, as in a ``--config``
TOML), checked by those commands when they read them (``lorax.training.config_file.check_model_defaults``). Flags and config files win over them; the model's defaults win over lorax's built-in ones. ``merge`` and
``convert`` copy them into their outputs, so a model made from this one keeps them. Models from elsewhere have none:
Stable Diffusion's usual values apply. Standard library only (read before torch loads).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorax.errors import FormatError

FILE_NAME = "lorax.json"
META_KEY = "lorax.defaults"
TRAINING_SECTIONS = ("train", "invert", "pivot")
GENERATE_KEYS = {"steps": int, "guidance": float, "width": int, "height": int, "max_sequence_length": int}
# Stable Diffusion's usual sampling settings, for models that carry none.
SD_STEPS, SD_GUIDANCE = 20, 7.5


@dataclass(frozen=True)
class ModelDefaults:
    """The defaults one model carries (empty sections when it carries none)."""

    generate: dict[str, Any] = field(default_factory=dict)
    training: dict[str, dict[str, Any]] = field(default_factory=dict)  # by command: train, invert, pivot
    source: str | None = None  # where they were read, for messages

    def __bool__(self) -> bool:
        return bool(self.generate or any(self.training.values()))

    def for_command(self, command: str) -> dict[str, Any]:
        """The config defaults of ``lorax <command>`` (``train``, ``invert`` or ``pivot``)."""
        return dict(self.training.get(command, {}))

    @property
    def sampling(self) -> tuple[int, float]:
        """Denoising steps and guidance scale: the model's, else Stable Diffusion's usual 20 and 7.5."""
        return int(self.generate.get("steps", SD_STEPS)), float(self.generate.get("guidance", SD_GUIDANCE))

    @property
    def size(self) -> tuple[int, int] | None:
        """(width, height) the model generates at by default, when it says."""
        if "width" in self.generate and "height" in self.generate:
            return int(self.generate["width"]), int(self.generate["height"])
        return None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.generate:
            out["generate"] = dict(self.generate)
        for command in TRAINING_SECTIONS:
            if self.training.get(command):
                out[command] = dict(self.training[command])
        return out

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=True) + "\n"


NONE = ModelDefaults()


def parse_defaults(data: Any, source: str) -> ModelDefaults:
    """Check and read a defaults document (the parsed JSON); ``source`` names it in errors.

    Raises:
        FormatError: not an object, an unknown section or key, or a value of the wrong type.
    """
    if not isinstance(data, Mapping):
        raise FormatError(f"{source}: model defaults must be a JSON object")
    unknown = sorted(set(data) - {"generate", *TRAINING_SECTIONS})
    if unknown:
        raise FormatError(
            f"{source}: unknown section(s) {', '.join(unknown)}; sections are generate, train, invert, pivot"
        )
    problems: list[str] = []
    generate: dict[str, Any] = {}
    for key, value in dict(data.get("generate") or {}).items():
        kind = GENERATE_KEYS.get(key)
        if kind is None:
            problems.append(f"generate.{key} is unknown (keys: {', '.join(GENERATE_KEYS)})")
        elif isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            problems.append(f"generate.{key} must be a positive number (got {value!r})")
        elif kind is int and not float(value).is_integer():
            problems.append(f"generate.{key} must be an integer (got {value!r})")
        else:
            generate[key] = kind(value)
    training: dict[str, dict[str, Any]] = {}
    for command in TRAINING_SECTIONS:
        section = data.get(command) or {}
        if not isinstance(section, Mapping):
            problems.append(f"{command} must be an object of config keys")
            continue
        # the keys are the command's config fields, checked where those live (lorax.training.config_file)
        training[command] = {str(k).replace("-", "_"): v for k, v in section.items()}
    if problems:
        raise FormatError(f"{source}: " + "; ".join(problems))
    return ModelDefaults(generate, training, source)


def read_folder_defaults(folder: Path) -> ModelDefaults:
    """``folder/lorax.json``, or no defaults when the folder has none."""
    path = Path(folder) / FILE_NAME
    if not path.is_file():
        return NONE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise FormatError(f"not valid JSON ({err})", path=path) from None
    return parse_defaults(data, str(path))


def read_metadata_defaults(metadata: Mapping[str, str], source: str) -> ModelDefaults:
    """The ``lorax.defaults`` entry of a single file's metadata, or no defaults."""
    text = metadata.get(META_KEY)
    if not text:
        return NONE
    try:
        data = json.loads(text)
    except ValueError as err:
        raise FormatError(f"{source}: invalid {META_KEY} metadata ({err})") from None
    return parse_defaults(data, f"{source} ({META_KEY})")


def local_model_path(spec: str | Path) -> Path | None:
    """The folder or file a model spec names on this machine (a path or a built-in name); ``None`` for a Hub id
    (its defaults would need the Hub) or a name that is not there (the command itself then says so)."""
    from lorax.models.registry import BUILTIN_MODELS

    path = Path(spec).expanduser()
    if path.exists():
        return path
    if str(spec) in BUILTIN_MODELS:
        return BUILTIN_MODELS[str(spec)]
    return None


def model_defaults(spec: str | Path | None) -> ModelDefaults:
    """The defaults the model ``spec`` carries (a diffusers folder's ``lorax.json``, a single file's metadata, a
    built-in model's); none for Hub ids and models without them.

    Raises:
        FormatError: the model's defaults are unreadable or name unknown keys.
    """
    if spec is None:
        return NONE
    path = local_model_path(spec)
    if path is None:
        return NONE
    if path.is_dir():
        return read_folder_defaults(path)
    if path.suffix.lower() == ".safetensors":
        from lorax.errors import InputError
        from lorax.io.safetensors_io import read_header

        try:
            metadata = read_header(path).metadata
        except InputError:
            return NONE  # not a safetensors file: the command reading it says so
        return read_metadata_defaults(metadata, str(path))
    return NONE


def write_folder_defaults(folder: Path, defaults: ModelDefaults) -> None:
    """Write ``folder/lorax.json`` (nothing when ``defaults`` is empty)."""
    if defaults:
        (Path(folder) / FILE_NAME).write_text(defaults.to_json(), encoding="utf-8")


def metadata_entry(defaults: ModelDefaults) -> dict[str, str]:
    """``{"lorax.defaults": json}`` for a single file's metadata (empty when there are none)."""
    return {META_KEY: json.dumps(defaults.as_dict(), sort_keys=True)} if defaults else {}
