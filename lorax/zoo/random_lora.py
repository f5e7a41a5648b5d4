"""Random LoRAs for a given model: fixtures for tests, the demo and benchmarks (deterministic in ``seed``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lorax.adapters.state import LoraModule, LoraState
from lorax.formats.naming import components_of
from lorax.models import families


def random_lora(
    model: Any,
    *,
    kinds: Iterable[str] = ("attention",),
    components: Iterable[str] | None = None,
    rank: int = 4,
    alpha: float | None = None,
    seed: int = 0,
    std: float = 0.1,
    family: str | None = None,
) -> LoraState:
    """A LoRA on every Linear/Conv2d of ``model``'s components whose ``target_kind`` is in ``kinds``.

    ``model`` is a pipeline or ``{component: nn.Module}``. Both ``up`` and ``down`` are random (not zero), so each
    module's delta is non-trivial. Conv layers get LoCon pairs: ``down [r, in, kh, kw]``, ``up [out, r, 1, 1]``.
    """
    import torch

    kinds = set(kinds)
    gen = torch.Generator().manual_seed(seed)
    state = LoraState(family=family)
    for component, module in components_of(model).items():
        if components is not None and component not in set(components):
            continue
        if component not in families.all_components():
            continue
        for path, shape in families.weight_table(module, component).items():
            if families.target_kind(path) not in kinds:
                continue
            r = min(rank, shape[0], shape[1])
            down_shape = (r, shape[1], *shape[2:]) if len(shape) == 4 else (r, shape[1])
            up_shape = (shape[0], r, 1, 1) if len(shape) == 4 else (shape[0], r)
            down = torch.randn(down_shape, generator=gen) * std
            up = torch.randn(up_shape, generator=gen) * std
            state.modules[f"{component}.{path}"] = LoraModule(down, up, alpha if alpha is not None else r)
    return state
