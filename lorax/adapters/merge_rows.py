"""The fast rule for the common merge: plain LoRA pairs added to a weight, computed in blocks of rows.

``apply_contributions`` (``lorax.adapters.merge``) and Flux's ``_Sliced`` (``lorax.adapters.flux_merge``) merge a
whole tensor pass after pass: up-cast to fp32, ``addmm_``, the scale of a scaled-fp8 weight, ``isfinite`` over all
of it, the cast back, ``isfinite`` again. Each pass runs over memory (a ``linear1`` is 264 MB in fp32), and torch's
``isfinite(…).all()`` and its fp8 → fp32 cast are slow scalar loops (5 and 6.6 ns an element here). This module
does the same operations on each element in the same order, on blocks of rows that stay in the CPU cache:

    w = fp32(W0[rows])  (fp8: a 256-entry table, torch's own cast of every byte)
    w *= scale          (scaled fp8)
    w += alpha·up[rows] @ down    for each pair, in the plan's order (``addmm_``, as the whole-tensor rule)
    w /= scale          (scaled fp8)
    bounds: one ``aminmax`` says every value is finite and that the cast cannot overflow the output dtype
    w = clamp(w, ±max)  (an fp8 weight: the saturating requantisation of ``flux_merge``)
    out[rows] = cast(w)

so its result is the whole-tensor rule's, bit for bit (tests/test_merge_fast.py). The blocks run on every core
(``run_blocks``: a 24 GB Flux merge is 12 G elements of this arithmetic), each computed as on one thread, and the
result goes into a buffer the streaming rewrite lends again (``lorax.io.buffers``). Anything else (DoRA, IA3, LyCORIS
deltas, a delta whose rows are not the weight's rows, an fp64 weight, a bound that fails) returns ``None`` and the
whole-tensor rule runs, which also words the error.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from lorax.io.buffers import empty

if TYPE_CHECKING:
    import torch

    from lorax.adapters.merge import Contribution

S = TypeVar("S")
A = TypeVar("A")
BLOCK = 1 << 17  # elements per block of rows: 512 KB of fp32, inside the L2 cache
# The largest fp32 magnitude that each output dtype holds after round-to-nearest-even (a value at the bound itself
# rounds to infinity): fp16's 65504 + half an ulp, bf16's (2 − 2^-8)·2^127; fp32 any finite value.
_BOUNDS = {"F16": 65520.0, "BF16": (2 - 2**-8) * 2.0**127}
_FP32_MAX = 3.4028234663852886e38


@dataclass
class Term(Generic[A]):
    """One LoRA pair's rows of the weight: rows ``start`` to ``start + len(up)`` get ``alpha·up @ down`` (torch
    tensors here, numpy arrays in ``lorax.adapters.array_merge``)."""

    start: int
    up: A  # [rows, r] fp32
    down: A  # [r, columns] fp32
    alpha: float


@dataclass
class Plan:
    terms: list[Term[torch.Tensor]]
    scale: float | None = None  # scaled fp8: W = W8·scale
    clamp: float | None = None  # an fp8 weight requantised: saturate at the format's largest value


def plan_rows(contributions: list[Contribution], shape: tuple[int, ...]) -> Plan | None:
    """The row plan of a tensor's contributions, or ``None`` where the whole-tensor rule must run."""
    if not shape or shape[0] == 0:
        return None
    # Flux's single-file tensor (flux_merge._Sliced, known by its kind: importing it would close a cycle)
    if len(contributions) == 1 and getattr(contributions[0].module, "kind", None) == "sliced":
        return _sliced_plan(contributions[0].module, shape)
    terms = []
    rows_total, columns = shape[0], _columns(shape)
    for c in contributions:
        m = c.module
        if not _plain(m) or rows_total % c.parts:
            return None
        rows = rows_total // c.parts
        term = _term(m, c.part * rows, rows, columns, c.weight * m.scale, swap=False)  # type: ignore[union-attr]
        if term is None:
            return None
        terms.append(term)
    return Plan(terms)


def _sliced_plan(sliced: Any, shape: tuple[int, ...]) -> Plan | None:
    from lorax.io.keymaps import part_shapes

    rows = [s[0] for s in part_shapes(sliced.entry, tuple(shape))]
    starts = [sum(rows[:i]) for i in range(len(rows))]
    swap = sliced.entry.reshape == "swap"
    terms = []
    for c in sliced.contributions:
        if not _plain(c.module):  # the generic rule (DoRA, IA3, LyCORIS) on a slice: the whole-tensor way
            return None
        term = _term(c.module, starts[c.part], rows[c.part], _columns(shape), c.weight * c.module.scale, swap)
        if term is None:
            return None
        terms.append(term)
    clamp = None
    if sliced.fp8 is not None:
        import torch

        clamp = float(torch.finfo(torch.float8_e4m3fn if sliced.fp8 == "F8_E4M3" else torch.float8_e5m2).max)
    return Plan(terms, sliced.scale, clamp)


def _plain(module: Any) -> bool:
    from lorax.adapters.state import LoraModule

    return type(module) is LoraModule


def _columns(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape[1:]:
        n *= d
    return n


def _term(m: Any, start: int, rows: int, columns: int, alpha: float, swap: bool) -> Term[torch.Tensor] | None:
    import torch

    up = m.up.to(torch.float32).reshape(m.up.shape[0], -1)
    down = m.down.to(torch.float32).reshape(m.rank, -1)
    if up.shape[0] != rows or down.shape[1] != columns or up.shape[1] != down.shape[0]:
        return None
    if swap:
        from lorax.io.keymaps.flux import swap_rows

        up = swap_rows(up)
    return Term(start, up.contiguous(), down.contiguous(), alpha)


def merge_rows(weight: torch.Tensor, plan: Plan, dt: str) -> torch.Tensor | None:
    """``weight`` merged by ``plan`` and cast to ``dt`` (a safetensors dtype), block by block; ``None`` when a value
    is not finite or would overflow ``dt`` (the whole-tensor rule then runs and names the problem)."""
    import torch

    from lorax.io.model_layout import FP8_DTYPES, st_to_torch

    source = str(weight.dtype)
    if source == "torch.float64" or dt == "F64" or (dt in FP8_DTYPES and plan.clamp is None):
        return None
    rows_total = weight.shape[0]
    columns = _columns(tuple(weight.shape))
    if rows_total * columns == 0:
        return None
    src = weight.reshape(rows_total, columns)
    out_dtype = st_to_torch(dt)
    size = out_dtype.itemsize
    out = torch.frombuffer(empty(rows_total * columns * size), dtype=out_dtype).reshape(rows_total, columns)
    step = max(1, BLOCK // max(columns, 1))
    table = _fp8_table(weight.dtype) if weight.element_size() == 1 else None
    bound = plan.clamp if plan.clamp is not None else _BOUNDS.get(dt, _FP32_MAX)

    def block() -> torch.Tensor:
        return torch.empty((min(step, rows_total), columns), dtype=torch.float32)

    def rows(i: int, block: torch.Tensor) -> bool:
        n = min(step, rows_total - i)
        b = block[:n]
        if table is not None:
            torch.index_select(table, 0, src[i : i + n].view(torch.uint8).reshape(-1).int(), out=b.view(-1))
        else:
            b.copy_(src[i : i + n])
        if plan.scale is not None:
            b.mul_(plan.scale)
        for t in plan.terms:
            lo, hi = max(i, t.start), min(i + n, t.start + t.up.shape[0])
            if lo < hi:
                b[lo - i : hi - i].addmm_(t.up[lo - t.start : hi - t.start], t.down, alpha=t.alpha)
        if plan.scale is not None:
            b.div_(plan.scale)
        low, high = (float(v) for v in torch.aminmax(b))  # NaN fails every comparison
        if not (low >= -_FP32_MAX and high <= _FP32_MAX):
            return False
        if plan.clamp is not None:
            b.clamp_(-bound, bound)
        elif bound != _FP32_MAX and not (-bound < low and high < bound):
            return False
        out[i : i + n].copy_(b)
        return True

    inference = torch.is_inference_mode_enabled()
    if not run_blocks(range(0, rows_total, step), rows, block, lambda: torch.inference_mode(inference)):
        return None
    return out.reshape(weight.shape)


def _threads() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores))


THREADS = _threads()
_pool: ThreadPoolExecutor | None = None


def run_blocks(
    starts: Sequence[int],
    work: Callable[[int, S], bool],
    scratch: Callable[[], S],
    context: Callable[[], AbstractContextManager[object]] = nullcontext,
) -> bool:
    """``work(start, scratch)`` for every block of rows, on up to ``THREADS`` threads (torch's and numpy's
    kernels release the GIL), each with a scratch block of its own; ``False`` once any block says ``False``.
    Each block is computed as on one thread, so the result is the same bits whatever the thread count. Each thread
    runs in ``context()`` (torch's inference mode is the calling thread's own)."""
    global _pool
    todo = iter(starts)
    lock = threading.Lock()
    failed: list[BaseException | bool] = []

    def loop() -> None:
        with context():
            run(scratch())

    def run(mine: S) -> None:
        while not failed:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                if not work(i, mine):
                    failed.append(False)
            except BaseException as err:  # raised in the caller, once every thread has stopped
                failed.append(err)

    helpers = []
    if THREADS > 1 and len(starts) > 1:
        _pool = _pool or ThreadPoolExecutor(THREADS - 1, thread_name_prefix="lorax-merge")
        helpers = [_pool.submit(loop) for _ in range(THREADS - 1)]
    loop()
    for h in helpers:
        h.result()
    errors = [e for e in failed if isinstance(e, BaseException)]
    if errors:
        raise errors[0]
    return not failed


_TABLES: dict[str, torch.Tensor] = {}


def _fp8_table(dtype: torch.dtype) -> torch.Tensor:
    """Every byte of an fp8 dtype as fp32, by torch's own cast (exact: fp8 values are fp32 values), NaN included."""
    import torch

    key = str(dtype)
    if key not in _TABLES:
        _TABLES[key] = torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float32)
    return _TABLES[key]
