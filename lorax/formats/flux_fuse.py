"""Flux.1's fused modules ⇄ diffusers' split ones, exactly (``lorax.formats.flux`` reads and writes the files).

``split``: one file module (BFL's ``qkv``, ``linear1``, a modulation) → one ``LoraModule`` per diffusers part, each
keeping the shared down and its rows of the up. ``fuse`` / ``fused_modules``: the parts back under BFL names, at rank
r where they share one down and alpha, else block-diagonally (``Σ r``). ``resize_fused``: SVD per fused module.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lorax.adapters.state import LoraModule, LoraState
from lorax.errors import FormatError
from lorax.formats.flux_names import FAMILY, MLP_RATIO, SWAPPED, TOP, TRANSFORMER, bfl_parts, to_bfl

if TYPE_CHECKING:
    import torch

    from lorax.adapters.reports import SvdReport
    from lorax.adapters.state import DeltaModule


def split(
    name: str,
    down: torch.Tensor,
    up: torch.Tensor,
    alpha: float | None,
    parts: tuple[str, ...],
    path: str | Path | None = None,
    *,
    swap: bool = False,
) -> list[LoraModule]:
    """One file module → one ``LoraModule`` per diffusers part (exact; block-diagonal ups give each its block);
    ``swap``: the up's halves swap (BFL's final layer → ``norm_out.linear``)."""
    import torch

    rank = int(down.shape[0])
    alpha = float(rank if alpha is None else alpha)
    if len(parts) == 1:
        if swap:
            up = swap_halves(up, name, path)
        return [LoraModule(down, up, alpha)]
    dims = split_dims(name, int(up.shape[0]), int(down.shape[1]), len(parts), path)
    ups = list(torch.split(up, dims, dim=0))
    n = len(parts)
    if rank % n == 0 and rank > n:  # kohya's split-qkv save: a block-diagonal up over a stacked down
        r = rank // n
        blocks = [u[:, i * r : (i + 1) * r] for i, u in enumerate(ups)]
        off = [u.clone() for u in ups]
        for i, o in enumerate(off):
            o[:, i * r : (i + 1) * r] = 0
        if all(not bool(o.any()) for o in off):
            downs = torch.chunk(down, n, dim=0)
            return [
                LoraModule(d, b.contiguous(), alpha * r / rank) for d, b in zip(downs, blocks, strict=True)
            ]
    return [LoraModule(down, u.contiguous(), alpha) for u in ups]


def split_dims(name: str, rows: int, width: int, n: int, path: str | Path | None = None) -> list[int]:
    """The row counts of a fused module's parts: a ``qkv`` is three equal parts; ``linear1`` is ``[h, h, h, rest]``
    with ``h`` its input width."""
    if n == 4:
        dims = [width, width, width, rows - 3 * width]
        if dims[-1] <= 0:
            raise FormatError(
                f"module {name}: {rows} rows cannot hold q, k, v and the MLP of width {width}", path=path
            )
        return dims
    if rows % n:
        raise FormatError(f"module {name}: {rows} rows do not split into {n} equal parts", path=path)
    return [rows // n] * n


def swap_halves(up: torch.Tensor, name: str, path: str | Path | None = None) -> torch.Tensor:
    """Swap the two halves of the rows (BFL's shift, scale ⇄ diffusers' scale, shift)."""
    import torch

    if up.shape[0] % 2:
        raise FormatError(f"module {name}: {up.shape[0]} rows do not split into shift and scale", path=path)
    a, b = torch.chunk(up, 2, dim=0)
    return torch.cat([b, a], dim=0)


def fuse(parts: list[LoraModule | None], dims: list[int]) -> LoraModule:
    """Part modules (``None`` where absent) → one fused module whose delta stacks theirs in rows (exact)."""
    import torch

    present = [p for p in parts if p is not None]
    first = present[0]
    if len(present) == len(parts) and all(
        p.down.shape == first.down.shape and torch.equal(p.down, first.down) and p.alpha == first.alpha
        for p in present
    ):
        return LoraModule(first.down, torch.cat([p.up for p in present], dim=0), first.alpha)
    dtype = torch.promote_types(first.down.dtype, first.up.dtype)
    total = sum(p.rank for p in present)
    down = torch.cat([p.down.to(dtype) for p in present], dim=0)
    up = torch.zeros(sum(dims), total, dtype=dtype)
    row = col = 0
    for p, rows in zip(parts, dims, strict=True):
        if p is not None:
            up[row : row + rows, col : col + p.rank] = p.up.to(dtype) * p.scale
            col += p.rank
        row += rows
    return LoraModule(down, up, float(total))


def fused_modules(state: LoraState) -> dict[str, LoraModule]:
    """The transformer's modules of ``state`` under BFL names, fused where BFL fuses them."""
    by_bfl: dict[str, list[LoraModule | None]] = {}
    for name, module in state.modules.items():
        component, _, inner = name.partition(".")
        if component != TRANSFORMER:
            continue
        if not isinstance(module, LoraModule):
            raise FormatError(
                f"module {name} ({type(module).__name__}) cannot be written in a Flux LoRA layout"
            )
        found = to_bfl(inner)
        if found is None:
            raise FormatError(
                f"module {name} has no BFL name (kohya and BFL files cannot hold it); use --to diffusers"
            )
        bfl, index, n = found
        slot = by_bfl.setdefault(bfl, [None] * n)
        slot[index] = module
    out: dict[str, LoraModule] = {}
    for bfl, parts in by_bfl.items():
        if len(parts) == 1:
            m = parts[0]
            assert m is not None
            out[bfl] = LoraModule(m.down, swap_halves(m.up, bfl), m.alpha) if TOP.get(bfl) in SWAPPED else m
            continue
        width = int(next(p for p in parts if p is not None).down.shape[1])
        dims = [p.out_features if p is not None else width for p in parts[:3]]
        if len(parts) == 4:
            mlp = parts[3]
            dims.append(mlp.out_features if mlp is not None else MLP_RATIO * width)
        out[bfl] = fuse(parts, dims)
    return out


def resize_fused(state: LoraState, rank: int) -> tuple[LoraState, list[SvdReport]]:
    """Every module at ``rank`` by SVD, a transformer module fused the way BFL fuses it (``qkv``, ``linear1``)
    compressed as one: split parts with their own downs (rank Σ r when fused) come out with one shared down of rank
    ``rank``, which the kohya and BFL writers fuse back at that rank. Reports are per fused module (its kept energy)."""
    from lorax.adapters.svd import resize_module

    transformer = LoraState(
        {k: m for k, m in state.modules.items() if k.startswith(TRANSFORMER + ".")}, family=FAMILY
    )
    modules: dict[str, LoraModule | DeltaModule] = {}
    reports = []
    for bfl, fused_module in fused_modules(transformer).items():
        small, report = resize_module(f"{TRANSFORMER}.{bfl}", fused_module, rank)
        reports.append(report)
        parts = tuple(f"{TRANSFORMER}.{p}" for p in bfl_parts(bfl) or ())
        swap = len(parts) == 1 and TOP.get(bfl) in SWAPPED
        for name, m in zip(
            parts, split(bfl, small.down, small.up, small.alpha, parts, swap=swap), strict=True
        ):
            if name in state.modules:  # a part the LoRA lacked stays absent (its rows are zero)
                modules[name] = m
    for name, module in state.modules.items():
        if not name.startswith(TRANSFORMER + "."):
            modules[name], report = resize_module(name, module, rank)
            reports.append(report)
    return LoraState(modules, dict(state.embeddings), dict(state.metadata), state.family), reports
