"""The training state kept in memory after every step, so that a non-finite stop leaves a state to resume from even
without ``--checkpoint-every``: what a checkpoint would hold (the trainable tensors, the optimizer, scheduler and
scaler states, counters, RNG), copied into the buffers of an older copy (no allocation per step)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorax.training.checkpoint import LoopState


class GoodStates:
    """``pending``: the state after the last step whose weights were finite; ``good``: the last one from which the
    next step's loss and gradients were finite too (the one a non-finite stop writes)."""

    def __init__(self) -> None:
        self.pending: GoodState | None = None
        self.good: GoodState | None = None

    def keep(
        self, state: LoopState, tensors: dict[str, Any], optimizer: Any, scheduler: Any, scaler: Any
    ) -> None:
        """Copy what the checkpoint of ``state`` would hold into memory, reusing an older copy's buffers. Once the
        next step's loss and gradients from it are finite it becomes the good state that a non-finite stop writes,
        so a run without ``--checkpoint-every`` still leaves a state to resume (a lower learning rate can go on from
        it; the state just before the stop, finite or not, is the one that overflowed)."""
        import copy

        from lorax.training.checkpoint import rng_states

        old = self.pending
        self.pending = GoodState(
            state=LoopState(
                global_step=state.global_step,
                micro_step=state.micro_step,
                epoch=state.epoch,
                losses=[],
                seconds=state.seconds,
            ),
            n_losses=len(state.losses),
            tensors=copy_into(tensors, old.tensors if old else None),
            optimizer=copy_into(optimizer.state_dict(), old.optimizer if old else None),
            scheduler=copy.deepcopy(scheduler.state_dict()),
            scaler=copy.deepcopy(scaler.state_dict()) if scaler is not None else None,
            rng=rng_states(),
        )

    def confirm(self, grad_norm: Any, parameters: Callable[[], list[Any]]) -> None:
        """The kept state's gradients were finite (its loss was): it is the good one now. Under fp16 an overflowing
        step (skipped by the gradient scaler) confirms nothing. ``grad_norm``: the step's, else computed from the
        ``parameters()``' gradients."""
        if self.pending is None:
            return
        if grad_norm is None:
            import torch

            grads = [p.grad.detach().float().norm() for p in parameters() if p.grad is not None]
            grad_norm = torch.stack(grads).norm() if grads else 0.0
        if math.isfinite(float(grad_norm)):
            # the older copy's buffers serve the next one
            self.good, self.pending = self.pending, self.good


@dataclass
class GoodState:
    state: LoopState  # counters; the losses are the run's first ``n_losses``
    n_losses: int
    tensors: dict[str, Any]
    optimizer: Any
    scheduler: Any
    scaler: Any
    rng: Any


class StateDict:
    """A kept ``state_dict()``, handed to ``save_checkpoint`` where it expects an optimizer or scheduler."""

    def __init__(self, state: Any) -> None:
        self._state = state

    def state_dict(self) -> Any:
        return self._state


def copy_into(src: Any, buf: Any) -> Any:
    """A deep copy of ``src`` (a state dict: tensors in dicts and lists), written into ``buf``'s tensors where their
    shapes, dtypes and devices match (no allocation per step)."""
    import copy

    import torch

    if isinstance(src, torch.Tensor):
        if (
            isinstance(buf, torch.Tensor)
            and buf.shape == src.shape
            and buf.dtype == src.dtype
            and buf.device == src.device
        ):
            return buf.copy_(src.detach())
        return src.detach().clone()
    if isinstance(src, dict):
        old = buf if isinstance(buf, dict) else {}
        return {k: copy_into(v, old.get(k)) for k, v in src.items()}
    if isinstance(src, list | tuple):
        old_seq = buf if isinstance(buf, list | tuple) and len(buf) == len(src) else [None] * len(src)
        return type(src)(copy_into(v, b) for v, b in zip(src, old_seq, strict=True))
    return copy.deepcopy(src)
