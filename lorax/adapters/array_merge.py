"""The common merge without torch: plain LoRA / LoCon pairs added to fp16, bf16 or fp32 weights with numpy.

Starting Python and importing torch (about 1.2 s here) cost more than copying a 2 GB SD1.5 checkpoint; the merge
itself is a few hundred MB of arithmetic. ``lorax.adapters.array_inputs`` decides when a merge needs no torch and
reads its LoRAs as numpy arrays; this module merges each targeted tensor exactly as ``lorax.adapters.merge_rows``
does, block of rows by block of rows, with the same operations on each element in the same order:

    w = fp32(W0[rows])                       (bf16: its 16 bits are an fp32's upper half)
    w += alpha·up[rows] @ down               (``sgemm`` with beta 1, as torch's ``addmm_`` calls it)
    bounds: every value finite and inside what the output dtype holds after rounding
    out[rows] = cast(w)                      (round to nearest even, as torch's cast; bf16 by bit arithmetic)

so the file written is the torch path's, byte for byte (tests/test_merge_numpy.py). The product is the one place
where that needs more than IEEE arithmetic: torch's BLAS (MKL) and numpy's (OpenBLAS) sum a rank-r product in
different orders for many shapes (an fp32 ulp apart), so ``sgemm`` is called in torch's own library
(``libtorch_cpu.so``, loaded by ``ctypes`` in 0.2 s, without importing torch's 1.2 s of Python), with the arguments
torch passes. Where that library is not there, or the rule does not run (a value that is not finite or would
overflow, a delta whose rows are not the weight's), ``NeedsTorch`` is raised and the merge runs again on the torch
path, which words the error.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lorax.adapters.merge_rows import _BOUNDS, _FP32_MAX, BLOCK, Term, run_blocks
from lorax.io.buffers import empty
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
    """fp32 → bf16 bits, rounded to nearest even as torch's cast (c10's ``round_to_nearest_even``); NaN stays a NaN
    (which NaN torch writes depends on its kernel; ``merge_rows`` never casts one: its bounds check stops first)."""
    bits = a.view(np.uint32)
    rounded = ((bits + (np.uint32(0x7FFF) + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def _terms(contributions: list[Contribution], shape: tuple[int, ...]) -> list[Term[np.ndarray]]:
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
        terms.append(
            Term[np.ndarray](
                c.part * rows, np.ascontiguousarray(up), np.ascontiguousarray(down), c.weight * m.scale
            )
        )
    return terms


def _columns(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def merge_rows(weight: np.ndarray, terms: list[Term[np.ndarray]], dt: str) -> np.ndarray:
    """``weight`` (numpy, bf16 as bits) merged and cast to ``dt``, block by block as ``merge_rows.merge_rows``;
    ``NeedsTorch`` when a value is not finite or would overflow ``dt``."""
    rows_total = weight.shape[0]
    columns = _columns(tuple(weight.shape))
    if dt not in NUMPY_DTYPES or columns < 2:  # torch multiplies a single column its own way
        raise NeedsTorch
    addmm = _addmm()
    src = weight.reshape(rows_total, columns)
    kind = np.dtype(NUMPY_DTYPES[dt])
    out = empty(rows_total * columns * kind.itemsize).view(kind).reshape(rows_total, columns)
    step = max(1, BLOCK // max(columns, 1))
    bound = _BOUNDS.get(dt, _FP32_MAX)

    to32, to16 = _half()

    def block() -> np.ndarray:
        return np.empty((min(step, rows_total), columns), np.float32)

    def rows(i: int, scratch: np.ndarray) -> bool:
        n = min(step, rows_total - i)
        if src.dtype == np.float16:
            b = scratch[:n]
            to32(src[i : i + n], b)
        else:
            b = to_fp32(src[i : i + n])
        for t in terms:
            lo, hi = max(i, t.start), min(i + n, t.start + t.up.shape[0])
            if lo < hi:
                addmm(b[lo - i : hi - i], t.up[lo - t.start : hi - t.start], t.down, t.alpha)
        low, high = float(b.min()), float(b.max())  # NaN fails every comparison
        if not (low >= -_FP32_MAX and high <= _FP32_MAX):
            return False
        if bound != _FP32_MAX and not (-bound < low and high < bound):
            return False
        if dt == "F16":
            to16(b, out[i : i + n])
        else:
            out[i : i + n] = to_bf16_bits(b) if dt == "BF16" else b
        return True

    if not run_blocks(range(0, rows_total, step), rows, block):
        raise NeedsTorch
    return out.reshape(weight.shape)


Addmm = Callable[[np.ndarray, np.ndarray, np.ndarray, float], None]


@cache
def _torch_library() -> Any:
    """torch's C++ library (``libtorch_cpu.so``), loaded without importing torch; ``NeedsTorch`` where it is not."""
    import ctypes
    import importlib.util
    import os

    spec = importlib.util.find_spec("torch")
    where = spec.submodule_search_locations if spec is not None else None
    path = os.path.join(next(iter(where)), "lib", "libtorch_cpu.so") if where else ""
    try:
        return ctypes.CDLL(path)
    except OSError:
        raise NeedsTorch from None


Convert = Callable[[np.ndarray, np.ndarray], None]


@cache
def _half() -> tuple[Convert, Convert]:
    """fp16 → fp32 and fp32 → fp16 (round to nearest even: the one correctly rounded result, as torch's cast) by
    fbgemm's vector kernels in torch's library, 10 times numpy's ``astype`` (2.5 ns an element here); numpy's where
    they are missing."""
    import ctypes

    lib = _torch_library()
    try:
        widen = lib._ZN6fbgemm19Float16ToFloat_simdEPKtPfm  # fbgemm::Float16ToFloat_simd(src, dst, n)
        narrow = lib._ZN6fbgemm19FloatToFloat16_simdEPKfPtmb  # fbgemm::FloatToFloat16_simd(src, dst, n, clip)
    except AttributeError:
        return (lambda src, dst: np.copyto(dst, src)), (lambda src, dst: np.copyto(dst, src))
    widen.restype = narrow.restype = None
    ptr, size, false = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_bool(False)

    def to32(src: np.ndarray, dst: np.ndarray) -> None:
        assert src.flags.c_contiguous and dst.flags.c_contiguous and src.size == dst.size
        widen(ptr(src.ctypes.data), ptr(dst.ctypes.data), size(src.size))

    def to16(src: np.ndarray, dst: np.ndarray) -> None:
        assert src.flags.c_contiguous and dst.flags.c_contiguous and src.size == dst.size
        narrow(ptr(src.ctypes.data), ptr(dst.ctypes.data), size(src.size), false)

    return to32, to16


@cache
def _addmm() -> Addmm:
    """``c += alpha · a @ b`` (fp32, C-contiguous) by torch's ``sgemm``: column-major ``cᵀ = alpha·bᵀaᵀ + cᵀ``."""
    import ctypes

    try:
        sgemm = _torch_library().sgemm_
    except AttributeError:
        raise NeedsTorch from None
    sgemm.restype = None
    ref, i32, f32, ptr = ctypes.byref, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    no, one = ctypes.c_char(b"N"), f32(1.0)

    def addmm(c: np.ndarray, a: np.ndarray, b: np.ndarray, alpha: float) -> None:
        (m, k), n = a.shape, b.shape[1]
        assert c.flags.c_contiguous and a.flags.c_contiguous and b.flags.c_contiguous and c.shape == (m, n)
        sgemm(ref(no), ref(no), ref(i32(n)), ref(i32(m)), ref(i32(k)), ref(f32(alpha)), ptr(b.ctypes.data),
              ref(i32(n)), ptr(a.ctypes.data), ref(i32(k)), ref(one), ptr(c.ctypes.data), ref(i32(n)))  # fmt: skip

    return addmm


def _merged(
    contributions: list[Contribution], src_dtype: str, shape: tuple[int, ...], buf: np.ndarray, dt: str
) -> memoryview:
    if src_dtype not in NUMPY_DTYPES:
        raise NeedsTorch
    weight = buf.view(NUMPY_DTYPES[src_dtype]).reshape(shape)
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
