"""The one rule for every strength a user, a recipe or a prompt gives a LoRA: a finite number in float32 range.

(Alphas a file gives follow the same rule in ``lorax.formats.keys.finite_alpha``; weights a file holds are checked by
``lorax.formats.check_state``.)
"""

from __future__ import annotations

import math
from pathlib import Path

from lorax.errors import InputError

FLOAT32_MAX = 3.4028234663852886e38


def is_finite_scale(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= FLOAT32_MAX


def check_scale(value: float | None, path: str | Path | None, what: str = "scale") -> None:
    """Refuse a non-finite (or float32-overflowing) scale with one line naming the LoRA."""
    if value is not None and not is_finite_scale(float(value)):
        raise InputError(f"{what} {value!r} is not a finite number in float32 range", path=path)
