"""LoRA scale schedules over the denoising steps (``--scale-schedule``).

A schedule maps the position ``t`` in ``[0, 1]`` of a denoising step (first step 0, last step 1) to a factor that
multiplies each LoRA's UNet scale at that step:

- ``linear:A:B`` — from A at the first step to B at the last; ``cosine:A:B`` the same along a half cosine;
- ``step:F`` — 0 for the first fraction F of the steps, then 1; ``step:F:A:B`` — A, then B;
- ``A,B,C,…`` — values spread evenly over the steps, linearly interpolated between (a list with one value per step
  gives exactly those values).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lorax.errors import ConfigError


@dataclass(frozen=True)
class ScaleSchedule:
    kind: str
    values: tuple[float, ...]
    spec: str

    def at(self, t: float) -> float:
        """The factor at position ``t`` (0 = first step, 1 = last)."""
        t = min(1.0, max(0.0, t))
        if self.kind == "linear":
            a, b = self.values
            return a + (b - a) * t
        if self.kind == "cosine":
            a, b = self.values
            return a + (b - a) * (1 - math.cos(math.pi * t)) / 2
        if self.kind == "step":
            fraction, a, b = self.values
            return a if t < fraction else b
        points = self.values
        if len(points) == 1:
            return points[0]
        x = t * (len(points) - 1)
        i = min(int(x), len(points) - 2)
        return points[i] + (points[i + 1] - points[i]) * (x - i)

    def for_step(self, step: int, total: int) -> float:
        """The factor for step ``step`` (0-based) of ``total``."""
        return self.at(step / (total - 1) if total > 1 else 0.0)


def _floats(parts: list[str], spec: str) -> tuple[float, ...]:
    try:
        return tuple(float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"--scale-schedule {spec!r}: {', '.join(parts)} are not all numbers") from None


def parse_schedule(spec: str) -> ScaleSchedule:
    """Parse a ``--scale-schedule`` value (see the module docstring)."""
    text = spec.strip()
    kind, sep, rest = text.partition(":")
    kind = kind.lower()
    if sep and kind in ("linear", "cosine"):
        values = _floats(rest.split(":"), spec)
        if len(values) != 2:
            raise ConfigError(f"--scale-schedule {spec!r}: {kind} takes two values, e.g. {kind}:0:1")
        return ScaleSchedule(kind, values, text)
    if sep and kind == "step":
        values = _floats(rest.split(":"), spec)
        if len(values) == 1:
            values = (values[0], 0.0, 1.0)
        if len(values) != 3 or not 0.0 <= values[0] <= 1.0:
            raise ConfigError(
                f"--scale-schedule {spec!r}: step takes a fraction in [0, 1] and optionally two values, "
                "e.g. step:0.5 or step:0.5:1:0"
            )
        return ScaleSchedule("step", values, text)
    if sep:
        raise ConfigError(
            f"--scale-schedule {spec!r}: unknown kind {kind!r}; use linear:A:B, cosine:A:B, step:F or a list A,B,…"
        )
    values = _floats([p for p in text.split(",") if p.strip()], spec)
    if not values:
        raise ConfigError("--scale-schedule is empty; use linear:A:B, cosine:A:B, step:F or a list A,B,…")
    return ScaleSchedule("list", values, text)
