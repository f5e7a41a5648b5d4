"""Aspect-ratio bucketing: a set of training sizes of (about) the same area, each image given the closest shape."""

from __future__ import annotations

import math


def make_buckets(
    resolution: int, *, step: int | None = None, low: int | None = None, high: int | None = None
) -> list[tuple[int, int]]:
    """Sizes ``(width, height)``, multiples of ``step``, with area ≤ ``resolution²`` and sides within ½× to 2×.

    ``step`` defaults to ``resolution / 8`` rounded to a multiple of 8 (64 at 512 px, as kohya's trainer uses).
    ``low`` / ``high`` bound the sides instead (kohya's ``min_bucket_reso`` / ``max_bucket_reso``).
    """
    if step is None:
        step = max(8, (resolution // 8) // 8 * 8)
    area = resolution * resolution
    lo = max(step, resolution // 2) if low is None else low
    hi = resolution * 2 if high is None else high
    buckets: set[tuple[int, int]] = {(resolution, resolution)}
    width = lo
    while width <= hi:
        height = min(hi, (area // width) // step * step)
        if height >= lo:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``size``'s (log scale), the larger area on ties."""
    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))
