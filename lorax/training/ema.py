"""``--ema-decay D``: an exponential moving average of the adapter weights, written as the output.

The average is diffusers' own ``EMAModel`` (``diffusers.training_utils``, as its training scripts use with ``use_ema``
it) over the trainable LoRA parameters, updated after every optimizer step. Its decay ramps up: the n-th update uses
``min(D, n / (n + 9))`` (``(1 + s) / (10 + s)`` with ``s = n - 1``; 0 at the first update, which copies the
weights), so a short run is not pulled back toward the initial (zero-delta) LoRA. Snapshots and the output hold the
average; checkpoints hold both the live weights and the average, so a resumed run continues both exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

EMA_PREFIX = "ema."
EMA_STEP = "ema_step"


class EmaJob:
    """A training job (``LoraJob``) whose trainable weights are also averaged; every other attribute is the job's."""

    def __init__(self, job: Any, decay: float) -> None:
        from diffusers.training_utils import EMAModel

        self.job = job
        self.decay = decay
        self._named = [
            (f"{component}.{name}", p)
            for component, model in job.components().items()
            for name, p in model.named_parameters()
            if p.requires_grad
        ]
        self.ema = EMAModel(
            [p for _, p in self._named], decay=decay, min_decay=0.0, update_after_step=0, use_ema_warmup=False
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self.job, name)

    def _params(self) -> list[Any]:
        return [p for _, p in self._named]

    def after_step(self, step: int) -> None:
        self.job.after_step(step)
        self.ema.step(self._params())

    def state_tensors(self) -> dict[str, Any]:
        import torch

        tensors = dict(self.job.state_tensors())
        for (name, _), shadow in zip(self._named, self.ema.shadow_params, strict=True):
            tensors[EMA_PREFIX + name] = shadow.detach().float().cpu().clone()
        tensors[EMA_STEP] = torch.tensor(self.ema.optimization_step, dtype=torch.int64)
        return tensors

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        from lorax.errors import MismatchError

        own = {k: v for k, v in tensors.items() if k.startswith(EMA_PREFIX) or k == EMA_STEP}
        self.job.load_state_tensors({k: v for k, v in tensors.items() if k not in own})
        names = [name for name, _ in self._named]
        if EMA_STEP not in own or any(EMA_PREFIX + n not in own for n in names):
            raise MismatchError("the checkpoint holds no EMA of these weights: resume without --ema-decay")
        for name, shadow in zip(names, self.ema.shadow_params, strict=True):
            shadow.data.copy_(own[EMA_PREFIX + name].to(shadow.device, shadow.dtype))
        self.ema.optimization_step = int(own[EMA_STEP])

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """The live modules hold the average inside the block, their trained weights again after it."""
        params = self._params()
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            yield
        finally:
            self.ema.restore(params)


def averaged_weights(job: Any) -> contextlib.AbstractContextManager[None]:
    """``job.averaged()`` for an ``EmaJob``, else nothing."""
    return job.averaged() if isinstance(job, EmaJob) else contextlib.nullcontext()
