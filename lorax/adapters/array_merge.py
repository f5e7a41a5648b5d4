"""The common merge without torch: plain LoRA / LoCon pairs added to fp16, bf16 or fp32 weights with numpy.

Starting Python and importing torch (about 1.2 s here) cost more than copying a 2 GB SD1.5 checkpoint; the merge
itself is a few hundred MB of arithmetic. ``lorax.adapters.array_inputs`` decides when a merge needs no torch and
reads its LoRAs as numpy arrays; this module merges each targeted tensor exactly as ``lorax.adapters.merge_rows``
does, block of rows by block of rows, with the same operations on each element in the same order:

    w = fp32(W0[rows])                       (bf16: its 16 bits are an fp32's upper half)
    w += up[rows] @ (alpha·down)             (torch's ``addmm_(up, down, alpha=…)`` scales the packed ``down`` by
                                              alpha in fp32 and adds the product: the same bits, tests compare them)
    bounds: every value finite and inside what the output dtype holds after rounding
    out[rows] = cast(w)                      (round to nearest even, as torch's cast; bf16 by bit arithmetic)

so the file written is the torch path's, byte for byte (tests/test_merge_numpy.py). Where that rule does not run
(a value that is not finite or would overflow, a delta whose rows are not the weight's) ``NeedsTorch`` is raised
and the merge runs again on the torch path, which words the error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lorax.adapters.merge_rows import _BOUNDS, _FP32_MAX, BLOCK
from lorax.io.rewrite import RawChange, rewrite_tensor_file

if TYPE_CHECKING:
    from lorax.adapters.merge import Contribution
    from lorax.io.checkpoint_sources import SafetensorsSource
    from lorax.progress import Task

NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "BF16": np.uint16}  # bf16: its bits


class NeedsTorch(Exception):
    """This merge (or one of its tensors) needs the torch path."""


@dataclass
class ArrayLora:
    """A plain LoRA pair as fp32 numpy arrays (``LoraModule``'s shapes and scale rule, without torch)."""

    down: np.ndarray  # [r, in] (conv [r, in, kh, kw])
    up: np.ndarray  # [out, r] (conv [out, r, 1, 1])
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    def delta_shape(self) -> tuple[int, ...]:
        return (int(self.up.shape[0]), *(int(d) for d in self.down.shape[1:]))


@dataclass
class ArrayState:
    """The part of ``LoraState`` a model merge reads: modules by lorax path, the family, no embeddings."""

    modules: dict[str, ArrayLora]
    family: str | None
    metadata: dict[str, str] = field(default_factory=dict)
    embeddings: dict[str, Any] = field(default_factory=dict)


def to_fp32(a: np.ndarray) -> np.ndarray:
    """fp16 / fp32 / bf16 bits (``uint16``) as fp32, exactly (every such value is an fp32 value)."""
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """fp32 → bf16 bits, rounded to nearest even as torch's cast (c10's ``round_to_nearest_even``); NaN stays NaN."""
    bits = a.view(np.uint32)
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


@dataclass
class _Term:
    start: int
    up: np.ndarray  # [rows, r] fp32
    down: np.ndarray  # [r, columns] fp32, already times alpha (as MKL's sgemm packs it)


def _terms(contributions: list[Contribution], shape: tuple[int, ...]) -> list[_Term]:
    """``merge_rows.plan_rows`` for ``ArrayLora`` contributions: each pair's rows of the weight."""
    if not shape or shape[0] == 0:
        raise NeedsTorch
    rows_total, columns = shape[0], _columns(shape)
    terms = []
    for c in contributions:
        m = c.module
        if not isinstance(m, ArrayLora) or rows_total % c.parts:
            raise NeedsTorch
        rows = rows_total // c.parts
        up = m.up.reshape(m.up.shape[0], -1)
        down = m.down.reshape(m.rank, -1)
        if up.shape[0] != rows or down.shape[1] != columns or up.shape[1] != down.shape[0]:
            raise NeedsTorch
        alpha = np.float32(c.weight * m.scale)  # torch hands sgemm its alpha as a C float
        terms.append(_Term(c.part * rows, np.ascontiguousarray(up), np.ascontiguousarray(down * alpha)))
    return terms


def _columns(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def merge_rows(weight: np.ndarray, terms: list[_Term], dt: str) -> np.ndarray:
    """``weight`` (numpy, bf16 as bits) merged and cast to ``dt``, block by block as ``merge_rows.merge_rows``;
    ``NeedsTorch`` when a value is not finite or would overflow ``dt``."""
    if dt not in NUMPY_DTYPES:
        raise NeedsTorch
    rows_total = weight.shape[0]
    columns = _columns(tuple(weight.shape))
    src = weight.reshape(rows_total, columns)
    out = np.empty((rows_total, columns), dtype=NUMPY_DTYPES[dt])
    step = max(1, BLOCK // max(columns, 1))
    bound = _BOUNDS.get(dt, _FP32_MAX)
    for i in range(0, rows_total, step):
        n = min(step, rows_total - i)
        b = to_fp32(src[i : i + n])
        for t in terms:
            lo, hi = max(i, t.start), min(i + n, t.start + t.up.shape[0])
            if lo < hi:
                b[lo - i : hi - i] += t.up[lo - t.start : hi - t.start] @ t.down
        low, high = float(b.min()), float(b.max())  # NaN fails every comparison
        if not (low >= -_FP32_MAX and high <= _FP32_MAX):
            raise NeedsTorch
        if bound != _FP32_MAX and not (-bound < low and high < bound):
            raise NeedsTorch
        if dt == "BF16":
            out[i : i + n] = to_bf16_bits(b)
        else:
            out[i : i + n] = b
    return out.reshape(weight.shape)


def _merged(
    contributions: list[Contribution], src_dtype: str, shape: tuple[int, ...], buf: bytearray, dt: str
) -> memoryview:
    if src_dtype not in NUMPY_DTYPES:
        raise NeedsTorch
    weight = np.frombuffer(buf, dtype=NUMPY_DTYPES[src_dtype]).reshape(shape)
    merged = merge_rows(weight, _terms(contributions, shape), dt)
    return memoryview(merged).cast("B")  # type: ignore[arg-type]


def merge_file(
    source: SafetensorsSource,
    out: Path,
    targets: Mapping[str, list[Contribution]],
    *,
    metadata: dict[str, str] | None = None,
    task: Task | None = None,
) -> tuple[int, int]:
    """``merge.merge_tensor_file`` without torch: ``targets`` merged, every other tensor copied byte for byte."""
    changes: dict[str, RawChange] = {
        k: partial(_merged, cs, source.dtype(k), tuple(source.shape(k))) for k, cs in targets.items()
    }
    return rewrite_tensor_file(source, out, changes, metadata=metadata, task=task, raw=True)
