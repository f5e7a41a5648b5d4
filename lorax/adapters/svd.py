"""Low-rank algebra on ``LoraModule``s: weighted sums (exact by rank concatenation), SVD resize with the kept
energy reported, the seed's up/down blend, and extraction of a LoRA from a weight difference.

Conventions: a module's delta is ``(alpha / r) · up @ down`` (conv: flattened). Results of an SVD are written with
``up = U·diag(S)``, ``down = Vh`` and ``alpha = r`` (scale 1), as the seed's ``lora_distill`` did.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorax.adapters.reports import SvdReport
from lorax.adapters.state import DeltaModule, LoraModule, LoraState
from lorax.errors import ConfigError, MismatchError


def _flat(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """(scaled up ``[out, r]``, down ``[r, in·kh·kw]``) in fp32."""
    up = module.up.to(torch.float32).reshape(module.up.shape[0], -1) * module.scale
    down = module.down.to(torch.float32).reshape(module.down.shape[0], -1)
    return up, down


def _from_flat(up: torch.Tensor, down: torch.Tensor, like_down_shape: tuple[int, ...]) -> LoraModule:
    r = down.shape[0]
    if len(like_down_shape) == 4:
        return LoraModule(
            down.reshape(r, *like_down_shape[1:]).contiguous(),
            up.reshape(up.shape[0], r, 1, 1).contiguous(),
            float(r),
        )
    return LoraModule(down.contiguous(), up.contiguous(), float(r))


def _svd_of_product(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ``up @ down`` without forming it: QR of both factors, then the SVD of the small core."""
    qu, ru = torch.linalg.qr(up.to(torch.float64))
    qd, rd = torch.linalg.qr(down.t().to(torch.float64))
    u, s, vh = torch.linalg.svd(ru @ rd.t(), full_matrices=False)
    return qu @ u, s, vh @ qd.t()


def _truncate(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    k = max(1, min(rank, s.shape[0]))
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum())
    energy = 1.0 if total == 0 else kept / total
    error = 0.0 if total == 0 else max(0.0, 1.0 - energy) ** 0.5
    up = (u[:, :k] * s[:k]).to(torch.float32)
    down = vh[:k].to(torch.float32)
    return up, down, energy, error


def resize_module(name: str, module: LoraModule | DeltaModule, rank: int) -> tuple[LoraModule, SvdReport]:
    """Compress (or re-factor) one module to ``rank`` by SVD of its delta."""
    lora = _as_lora(module)
    up, down = _flat(lora)
    shape = tuple(lora.down.shape)
    rank_in = lora.rank
    u, s, vh = _svd_of_product(up, down)
    up_k, down_k, energy, error = _truncate(u, s, vh, rank)
    return _from_flat(up_k, down_k, shape), SvdReport(name, rank_in, down_k.shape[0], energy, error)


def resize_state(state: LoraState, rank: int) -> tuple[LoraState, list[SvdReport]]:
    """Every module resized to ``rank`` (modules already at or below it are re-factored, exactly)."""
    if rank < 1:
        raise ConfigError(f"--rank must be at least 1 (got {rank})")
    modules: dict[str, LoraModule | DeltaModule] = {}
    reports = []
    for name, module in state.modules.items():
        modules[name], report = resize_module(name, module, rank)
        reports.append(report)
    return LoraState(modules, dict(state.embeddings), dict(state.metadata), state.family), reports


def _as_lora(module: LoraModule | DeltaModule) -> LoraModule:
    """A LoRA module for any delta module: exact factors by SVD at the delta's numerical rank."""
    if isinstance(module, LoraModule):
        return module
    delta = module.delta(torch.float32)
    flat = delta.reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(flat.to(torch.float64), full_matrices=False)
    tol = float(s.max()) * max(flat.shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0
    k = max(1, int((s > tol).sum()))
    shape = (k, *delta.shape[1:]) if delta.dim() == 4 else (k, delta.shape[1])
    return _from_flat((u[:, :k] * s[:k]).float(), vh[:k].float(), shape)


def concat_modules(name: str, weighted: Sequence[tuple[LoraModule | DeltaModule, float]]) -> LoraModule:
    """``Σ wᵢ·ΔWᵢ`` exactly, as one module of rank ``Σ rᵢ``: ``[w₁s₁U₁, w₂s₂U₂] @ [D₁; D₂]``, alpha = rank."""
    ups, downs = [], []
    shape: tuple[int, ...] | None = None
    for module, weight in weighted:
        lora = _as_lora(module)
        up, down = _flat(lora)
        if shape is not None and (up.shape[0], down.shape[1]) != (shape[0], shape[1]):
            raise MismatchError(
                f"module {name}: shapes differ between LoRAs ({list(shape)} vs {[up.shape[0], down.shape[1]]})"
            )
        shape = (up.shape[0], down.shape[1], *lora.down.shape[2:])
        ups.append(up * weight)
        downs.append(down)
    up_cat, down_cat = torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    like = (0, *_in_shape(weighted[0][0]))
    return _from_flat(up_cat, down_cat, like)


def _in_shape(module: LoraModule | DeltaModule) -> tuple[int, ...]:
    lora = _as_lora(module)
    return tuple(lora.down.shape[1:])


def mix_states(
    weighted: Sequence[tuple[LoraState, float]], rank: int | None = None
) -> tuple[LoraState, list[SvdReport]]:
    """The weighted sum of several LoRAs' deltas: exact by concatenation, or SVD-compressed to ``rank``.

    Modules missing from some LoRAs contribute from the others only. Token embeddings are kept (a later file's
    token of the same name wins). Families must agree.
    """
    families = {s.family for s, _ in weighted if s.family}
    if len(families) > 1:
        raise MismatchError(f"the LoRAs are for different model families ({', '.join(sorted(families))})")
    names: list[str] = []
    for state, _ in weighted:
        names += [n for n in state.modules if n not in names]
    modules: dict[str, LoraModule | DeltaModule] = {}
    reports: list[SvdReport] = []
    for name in names:
        parts = [(s.modules[name], w) for s, w in weighted if name in s.modules]
        joined = concat_modules(name, parts)
        if rank is not None:
            joined, report = resize_module(name, joined, rank)
            reports.append(report)
        modules[name] = joined
    embeddings: dict[str, dict[str, torch.Tensor]] = {}
    metadata: dict[str, str] = {}
    for state, _ in weighted:
        embeddings.update(state.embeddings)
    return LoraState(modules, embeddings, metadata, next(iter(families), None)), reports


def blend_states(weighted: Sequence[tuple[LoraState, float]]) -> LoraState:
    """The seed's ``lpl``: ``up = Σ wᵢ·upᵢ``, ``down = Σ wᵢ·downᵢ`` per module (not the sum of deltas).

    Each module's scale is folded into ``up`` first, so files with different alphas blend like the seed's
    (scale-free) files did. Ranks must match.
    """
    names: list[str] = []
    for state, _ in weighted:
        names += [n for n in state.modules if n not in names]
    modules: dict[str, LoraModule | DeltaModule] = {}
    for name in names:
        parts = [(_as_lora(s.modules[name]), w) for s, w in weighted if name in s.modules]
        ranks = {m.rank for m, _ in parts}
        if len(ranks) > 1:
            raise MismatchError(f"module {name}: seed-blend needs equal ranks, got {sorted(ranks)}")
        up = sum(w * (m.up.to(torch.float32) * m.scale) for m, w in parts)
        down = sum(w * m.down.to(torch.float32) for m, w in parts)
        modules[name] = LoraModule(down, up, float(parts[0][0].rank))  # type: ignore[arg-type]
    embeddings: dict[str, dict[str, torch.Tensor]] = {}
    for state, _ in weighted:
        embeddings.update(state.embeddings)
    families = {s.family for s, _ in weighted if s.family}
    return LoraState(modules, embeddings, {}, next(iter(families), None))


def join_tokens(states: Sequence[LoraState]) -> list[LoraState]:
    """The seed's ``ljl`` token renaming: file i's j-th token becomes ``<s{i}-{j}>`` (so tokens never collide)."""
    out = []
    for i, state in enumerate(states):
        renamed = {f"<s{i}-{j}>": emb for j, (_, emb) in enumerate(sorted(state.embeddings.items()))}
        out.append(LoraState(state.modules, renamed, state.metadata, state.family))
    return out


def combine_states(
    weighted: Sequence[tuple[LoraState, float]], rank: int | None = None, mode: str = "concat"
) -> tuple[LoraState, list[SvdReport]]:
    """LoRAs combined by ``mode``: ``concat`` (``mix_states``: the weighted sum of deltas), ``seed-blend``
    (``blend_states``, then resized to ``rank`` when given) or ``seed-join`` (tokens renamed apart, then concat)."""
    if mode == "seed-join":
        weighted = list(zip(join_tokens([s for s, _ in weighted]), [w for _, w in weighted], strict=True))
    if mode == "seed-blend":
        blended = blend_states(weighted)
        return resize_state(blended, rank) if rank is not None else (blended, [])
    return mix_states(weighted, rank)


def extract_module(
    name: str, delta: torch.Tensor, rank: int, clamp_quantile: float | None = None
) -> tuple[LoraModule, SvdReport]:
    """A rank-``rank`` LoRA module from a weight difference (``lora_distill``): truncated SVD, optional clamp."""
    flat = delta.to(torch.float32).reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(flat.to(torch.float64), full_matrices=False)
    up, down, energy, error = _truncate(u, s, vh, rank)
    if clamp_quantile is not None and clamp_quantile < 1.0:
        values = torch.cat([up.flatten(), down.flatten()]).abs()
        limit = float(torch.quantile(values[:16_000_000], clamp_quantile))
        up, down = up.clamp(-limit, limit), down.clamp(-limit, limit)
    shape = (0, *delta.shape[1:])
    module = _from_flat(up, down, shape)
    return module, SvdReport(name, min(flat.shape), module.rank, energy, error)
