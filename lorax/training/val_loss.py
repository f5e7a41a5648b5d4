"""Validation loss on a held-out split (``lorax train --val-split 0.1``).

A fixed share of the training images, drawn with ``--seed``, is never trained on. Every N steps the denoising loss
of the current weights on them is measured at fixed timesteps (``TIMESTEPS`` evenly spaced over the schedule) with
fixed noise (one seeded generator per image batch and timestep) and no augmentation (no flip, crop, caption
shuffle or dropout), so the value changes only when the weights do: the curve is comparable across steps, unlike
the training loss, whose noise and timesteps are drawn anew each step.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Sequence
from typing import Any

from lorax.data.dataset import TrainData, derive_seed
from lorax.data.images import ImageItem
from lorax.errors import ConfigError
from lorax.training.objective import LossInputs

TIMESTEPS = 4  # per held-out image: t = (k + ½) · T / 4, k = 0…3


def split_held_out(
    items: Sequence[ImageItem], share: float, seed: int
) -> tuple[list[ImageItem], list[ImageItem]]:
    """``(train, held_out)``: ``round(share × images)`` distinct images (at least one) drawn with ``seed``; every
    entry of a held-out image leaves the training list (kohya layouts may list an image in several subsets)."""
    paths = list(dict.fromkeys(item.path for item in items))
    count = max(1, round(share * len(paths)))
    if count >= len(paths):
        raise ConfigError(
            f"--val-split {share}: {len(paths)} image(s) leave none to train on; use more images or a smaller split"
        )
    rng = random.Random(derive_seed(seed, "val-split"))
    held = set(rng.sample(paths, count))
    train = [item for item in items if item.path not in held]
    first: dict[Any, ImageItem] = {}
    for item in items:
        if item.path in held:
            first.setdefault(item.path, dataclasses.replace(item, repeats=1))
    return train, [first[p] for p in paths if p in first]


def held_out_data(items: Sequence[ImageItem], data: TrainData) -> TrainData:
    """The held-out images as data: the run's resolution, buckets and batch size, no augmentation."""
    options = dataclasses.replace(
        data.options, random_crop=False, flip=False, repeats=1, caption_shuffle=False, caption_dropout=0.0
    )
    return TrainData(items, options)


class ValidationLoss:
    """``evaluate()`` → the mean denoising loss on the held-out images; as a step hook, every ``every`` steps
    (and at the last step) it records ``(step, loss)`` in ``history``.

    Args:
        batches: the run's ``DiffusionBatches`` (or ``SdxlBatches``); its text encoding and objective are reused
            over ``data``, the held-out images (their latents are encoded once, here).
        models: the trained models, put in eval mode while measuring (no LoRA dropout).
    """

    def __init__(
        self,
        batches: Any,
        data: TrainData,
        *,
        unet: Any,
        models: Sequence[Any],
        autocast: Callable[[], Any],
        seed: int,
        every: int,
        max_steps: int,
        is_main: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        import torch

        self.batches = dataclasses.replace(batches, data=data, latent_cache=None, _plans={})
        self.unet = unet
        self.models = list(models)
        self.autocast = autocast
        self.seed = seed
        self.every = every
        self.max_steps = max_steps
        self.is_main = is_main
        self.log = log
        self.history: list[tuple[int, float]] = []
        num = self.batches.objective.num_timesteps
        self.timesteps = [int((k + 0.5) * num / TIMESTEPS) for k in range(TIMESTEPS)]
        self.plan = data.epoch_plan(0) if is_main else []
        with torch.no_grad():
            self._latents = [self.batches.latents(0, indices) for indices in self.plan]

    def evaluate(self) -> float:
        """The held-out loss of the weights as they are now (the same weights give the same value)."""
        import torch

        training = [m.training for m in self.models]
        for m in self.models:
            m.eval()
        total, count = 0.0, 0
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad(), self.autocast():
                for b, (indices, (latents, captions, n)) in enumerate(
                    zip(self.plan, self._latents, strict=True)
                ):
                    cond = self.batches.conditioning(0, indices, captions)
                    for k, t in enumerate(self.timesteps):
                        generator = torch.Generator(device=latents.device).manual_seed(
                            derive_seed(self.seed, "val-noise", b, k)
                        )
                        timesteps = torch.full((n,), t, device=latents.device, dtype=torch.long)
                        step = LossInputs(latents, cond, timesteps=timesteps)
                        per_example = self.batches.objective.loss(self.unet, step, generator)
                        total += float(per_example.sum())
                        count += n
        finally:
            for m, was in zip(self.models, training, strict=True):
                m.train(was)
        return total / max(1, count)

    def __call__(self, state: Any) -> None:
        step = int(state.global_step)
        if not self.is_main or not (step % self.every == 0 or step == self.max_steps):
            return
        if self.history and self.history[-1][0] == step:
            return
        value = self.evaluate()
        self.history.append((step, value))
        if self.log is not None:
            self.log(f"validation loss at step {step}: {value:.6g}")


def validation_every(every: int, max_steps: int) -> int:
    """``--validation-every`` N, else about 20 measurements over the run."""
    return every if every else max(1, max_steps // 20)
