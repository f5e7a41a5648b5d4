"""``LoraState``: the one in-memory form every format reads into and writes from.

Module keys are diffusers module paths with their component prefix, e.g.
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` or
``text_encoder.text_model.encoder.layers.0.self_attn.q_proj`` (text encoders keep ``text_model.``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class DeltaModule(Protocol):
    """Anything that can produce a weight delta for one module (LoRA, LoHa, LoKr, DoRA …)."""

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor: ...

    @property
    def out_features(self) -> int: ...


class LowRankPair:
    """The shape of a low-rank pair, a LoRA's or a DoRA's: ``down`` ``[r, in]`` (conv ``[r, in, kh, kw]``), ``up``
    ``[out, r]`` (conv ``[out, r, 1, 1]``)."""

    down: torch.Tensor
    up: torch.Tensor

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.down.shape[1])


@dataclass
class LoraModule(LowRankPair):
    """One low-rank pair. ``down``: ``[r, in]`` (conv ``[r, in, kh, kw]``); ``up``: ``[out, r]`` (conv ``[out, r, 1, 1]``).

    ``alpha`` defaults to the rank when a file has none, so the scale ``alpha / r`` is then 1.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.alpha is None:
            self.alpha = float(self.rank)
        else:
            self.alpha = float(self.alpha)

    @property
    def scale(self) -> float:
        assert self.alpha is not None
        return self.alpha / self.rank

    def delta_shape(self) -> tuple[int, ...]:
        if self.is_conv:
            return (self.out_features, self.in_features, *self.down.shape[2:])
        return (self.out_features, self.in_features)

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``(alpha / r) * up @ down``, reshaped to the weight's shape for conv layers."""
        up = self.up.to(dtype).reshape(self.up.shape[0], -1)
        down = self.down.to(dtype).reshape(self.down.shape[0], -1)
        return (self.scale * (up @ down)).reshape(self.delta_shape())

    def to(self, dtype: torch.dtype) -> LoraModule:
        return LoraModule(self.down.to(dtype), self.up.to(dtype), self.alpha)


@dataclass
class LoraState:
    """A LoRA (and/or learned token embeddings) in lorax's canonical form."""

    modules: dict[str, LoraModule | DeltaModule] = field(default_factory=dict)
    embeddings: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    family: str | None = None

    def components(self) -> list[str]:
        from lorax.models.families import all_components

        found = {key.split(".", 1)[0] for key in self.modules}
        order = all_components()
        return [c for c in order if c in found] + sorted(found - set(order))

    def component_modules(self, component: str) -> dict[str, LoraModule | DeltaModule]:
        """The modules of one component, keyed by their path inside it (prefix stripped)."""
        prefix = component + "."
        return {k[len(prefix) :]: m for k, m in self.modules.items() if k.startswith(prefix)}

    def ranks(self) -> list[int]:
        return sorted({m.rank for m in self.modules.values() if isinstance(m, LoraModule)})

    def alphas(self) -> list[float]:
        return sorted({float(m.alpha) for m in self.modules.values() if isinstance(m, LoraModule)})  # type: ignore[arg-type]

    def deltas(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        return {k: m.delta(dtype) for k, m in self.modules.items()}

    def __bool__(self) -> bool:
        return bool(self.modules) or bool(self.embeddings)
