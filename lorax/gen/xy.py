"""``--xy KIND=V1,V2,…``: the axes of an A1111-style X/Y plot (the first given is X, the columns; the second Y, rows).

Kinds follow AUTOMATIC1111's ``xyz_grid`` script: ``prompt`` is its *Prompt S/R* (the first value is the search
string, found in the prompt or the negative prompt, and every value, the first included, replaces it), ``seed``,
``steps`` and ``guidance`` (A1111's *CFG Scale*) set that parameter, ``scale`` multiplies the strength of every
``--lora`` (like ``--sweep-scale``), and ``lora`` picks one LoRA file per value (a name looked up in ``--lora-dir`` as
``<lora:NAME:…>`` tags are, or a path; ``none`` for the model alone). Values are comma-separated, with CSV quoting
(``prompt="red, bright",blue``) for values that hold a comma.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass

from lorax.errors import ConfigError

# kind → (label in the sheet and in PNG info, as A1111's xyz_grid names it; short tag in file names)
XY_KINDS: dict[str, tuple[str, str]] = {
    "prompt": ("Prompt S/R", "p"),
    "scale": ("LoRA scale", "s"),
    "lora": ("LoRA", "lora-"),
    "seed": ("Seed", "seed"),
    "steps": ("Steps", "steps"),
    "guidance": ("CFG Scale", "cfg"),
}
NO_LORA = "none"


@dataclass(frozen=True)
class XYAxis:
    """One axis: its kind and its values, as typed (checked by :func:`parse_xy`)."""

    kind: str
    values: tuple[str, ...]

    @property
    def label(self) -> str:
        return XY_KINDS[self.kind][0]

    def numbers(self) -> list[float]:
        return [float(v) for v in self.values]

    def cell_label(self, index: int) -> str:
        """The text above a column / beside a row: the value itself for prompts and LoRAs, else ``Kind: value``."""
        value = self.values[index]
        if self.kind in ("prompt", "lora"):
            return value
        return f"{self.label}: {_number(value)}"

    def file_tag(self, index: int) -> str:
        """A short part of the file name for this value (e.g. ``s0.5``, ``cfg7``, ``p2``)."""
        if self.kind == "prompt":
            return f"p{index}"
        if self.kind == "lora":
            stem = re.sub(r"[^A-Za-z0-9._-]+", "-", self.values[index].rsplit("/", 1)[-1]).strip("-")
            return f"lora-{stem.removesuffix('.safetensors') or index}"
        return f"{XY_KINDS[self.kind][1]}{_number(self.values[index])}"


def _number(value: str) -> str:
    return f"{float(value):g}"


def parse_xy(spec: str) -> XYAxis:
    """``KIND=V1,V2,…`` → an :class:`XYAxis`, every value checked for its kind.

    Raises:
        ConfigError: an unknown kind, no values, an empty or repeated value, or a value that is not a number of the
            kind's type; one line naming ``--xy``.
    """
    kind, sep, rest = spec.partition("=")
    kind = kind.strip().lower()
    if not sep:
        raise ConfigError(f"--xy {spec!r} is not KIND=V1,V2,…; e.g. --xy scale=0,0.5,1")
    if kind not in XY_KINDS:
        raise ConfigError(f"--xy {kind!r}: unknown kind; choose one of {', '.join(XY_KINDS)}")
    try:
        values = next(csv.reader([rest], skipinitialspace=True), [])
    except csv.Error as err:
        raise ConfigError(f"--xy {kind}: cannot read the values ({err})") from None
    values = [v.strip() if kind != "prompt" else v for v in values]
    if not values or all(not v.strip() for v in values):
        raise ConfigError(
            f"--xy {kind}: no values; give them comma-separated, e.g. --xy {kind}={_example(kind)}"
        )
    if any(not v.strip() for v in values) and kind != "prompt":
        raise ConfigError(f"--xy {kind}={rest}: an empty value (two commas in a row?)")
    if kind == "prompt" and not values[0].strip():
        raise ConfigError("--xy prompt: the first value, the text to search for, is empty")
    seen: set[str] = set()
    for value in values:
        key = (
            _number(value) if kind in ("scale", "seed", "steps", "guidance") and _is_number(value) else value
        )
        if key in seen:
            raise ConfigError(f"--xy {kind}: {value!r} is given twice")
        seen.add(key)
    axis = XYAxis(kind, tuple(values))
    _check_numbers(axis)
    return axis


def _example(kind: str) -> str:
    return {
        "prompt": "red,blue,green",
        "scale": "0,0.5,1",
        "lora": "style-a,style-b",
        "seed": "1,2,3",
        "steps": "10,20,30",
        "guidance": "3,5,7.5",
    }[kind]


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _check_numbers(axis: XYAxis) -> None:
    if axis.kind in ("prompt", "lora"):
        return
    for value in axis.values:
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"--xy {axis.kind}: {value!r} is not a number") from None
        if not math.isfinite(number) or abs(number) > 3.0e38:
            raise ConfigError(f"--xy {axis.kind}: {value!r} is not a finite number")
        if axis.kind in ("seed", "steps"):
            if number != int(number):
                raise ConfigError(f"--xy {axis.kind}: {value!r} is not a whole number")
            if axis.kind == "seed" and not 0 <= number < 2**63:
                raise ConfigError(f"--xy seed: {value!r} must be a non-negative integer")
            if axis.kind == "steps" and number < 1:
                raise ConfigError(f"--xy steps: {value!r} must be at least 1")


def search_replace(text: str, search: str, value: str) -> str:
    """A1111's Prompt S/R: every occurrence of ``search`` in ``text`` replaced by ``value``."""
    return text.replace(search, value)
