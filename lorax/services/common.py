"""What several services share: the ``FILE[:WEIGHT]`` LoRA argument of ``merge`` and ``mix``, the checks every
request dataclass makes (a ``--dtype``, a ``--rank``, all problems in one error), and the model defaults that
conversions carry along (handed to ``lorax.io.model_layout``, which does not know them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lorax.errors import ConfigError
from lorax.specs import split_numbers


@dataclass
class LoraSpec:
    path: Path
    alpha: float | None = None

    def __post_init__(self) -> None:
        from lorax.adapters.finite import check_scale

        check_scale(self.alpha, self.path)  # one rule for every scale a user or recipe gives

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``FILE`` or ``FILE:ALPHA`` (a path that exists as written wins over the split)."""
        path, numbers = split_numbers(text, 1)
        return cls(path, numbers[0] if numbers else None)

    def __str__(self) -> str:
        return f"{self.path}" + ("" if self.alpha is None else f":{self.alpha:g}")


def dtype_problem(dtype: str | None, choices: Mapping[str, object], *, got: bool = True) -> list[str]:
    """``--dtype`` outside ``choices``, as a problem line (``got``: quote the value given)."""
    if dtype is None or dtype in choices:
        return []
    return [f"--dtype must be one of {', '.join(choices)}" + (f" (got {dtype!r})" if got else "")]


def rank_problem(rank: int | None) -> list[str]:
    return [] if rank is None or rank >= 1 else [f"--rank must be at least 1 (got {rank})"]


def refuse(problems: list[str]) -> None:
    """Every problem of a request in one ``ConfigError`` (nothing when there are none)."""
    if problems:
        raise ConfigError("; ".join(problems))


class _ModelDefaults:
    """A model's ``lorax.json`` (``lorax.models.defaults``), as ``lorax.io.model_layout.CarriedDefaults``."""

    def header_entries(self, folder: Path) -> dict[str, str]:
        from lorax.models.defaults import metadata_entry, read_folder_defaults

        return metadata_entry(read_folder_defaults(folder))

    def write_folder(self, folder: Path, metadata: Mapping[str, str], source: str) -> None:
        from lorax.models.defaults import read_metadata_defaults, write_folder_defaults

        write_folder_defaults(folder, read_metadata_defaults(metadata, source))


MODEL_DEFAULTS = _ModelDefaults()
