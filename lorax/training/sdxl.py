"""SDXL conditioning for training: both text encoders and the size/crop ids (``add_time_ids``).

What ``StableDiffusionXLPipeline`` feeds its UNet, rebuilt for training batches:

* the context is the penultimate hidden states of ``text_encoder`` (CLIP ViT-L) and ``text_encoder_2``
  (OpenCLIP bigG, ``CLIPTextModelWithProjection``) concatenated along the feature axis;
* ``added_cond_kwargs["text_embeds"]`` is ``text_encoder_2``'s pooled, projected output;
* ``added_cond_kwargs["time_ids"]`` is ``(original height, original width, crop top, crop left, target height,
  target width)`` per example: the image's size before resizing, the crop's top-left corner in the resized image, and
  the training size (as diffusers' ``train_dreambooth_lora_sdxl.py`` computes them).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorax.data.transforms import crop_box
from lorax.training.job import DiffusionBatches
from lorax.training.text import tokenize

if TYPE_CHECKING:
    import torch


@dataclass
class SdxlCond:
    """The UNet's text conditioning for a batch: context ``[B, 77, d1 + d2]`` and pooled ``[B, proj]``."""

    hidden: Any
    pooled: Any
    time_ids: Any = None

    @property
    def added_cond_kwargs(self) -> dict[str, Any]:
        return {"text_embeds": self.pooled, "time_ids": self.time_ids}

    def to(self, dtype: torch.dtype) -> Any:
        """The context in ``dtype`` (what ``DiffusionObjective.loss`` casts); added kwargs are cast there too."""
        return self.hidden.to(dtype)


def encode_sdxl(
    tokenizers: Sequence[Any], encoders: Sequence[Any], prompts: Sequence[str], device: torch.device
) -> SdxlCond:
    """Both encoders' penultimate hidden states concatenated, and the second encoder's pooled projection."""
    import torch

    hidden = []
    pooled = None
    for tokenizer, encoder in zip(tokenizers, encoders, strict=True):
        out = encoder(tokenize(tokenizer, prompts, device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # CLIPTextModelWithProjection: text_embeds (the last encoder's wins)
    return SdxlCond(torch.cat(hidden, dim=-1), pooled)


class SdxlPromptEncoder:
    """Prompts → ``SdxlCond``; with ``cache=True`` (frozen text encoders) each distinct prompt is encoded once."""

    def __init__(
        self, tokenizers: Sequence[Any], encoders: Sequence[Any], device: torch.device, *, cache: bool
    ) -> None:
        self.tokenizers = list(tokenizers)
        self.encoders = list(encoders)
        self.device = device
        self.cache_enabled = cache
        self._cache: dict[str, tuple[Any, Any]] = {}

    def __call__(self, prompts: Sequence[str]) -> SdxlCond:
        import torch

        if not self.cache_enabled:
            return encode_sdxl(self.tokenizers, self.encoders, prompts, self.device)
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            with torch.no_grad():
                cond = encode_sdxl(self.tokenizers, self.encoders, missing, self.device)
            for i, prompt in enumerate(missing):
                self._cache[prompt] = (cond.hidden[i], cond.pooled[i])
        return SdxlCond(
            torch.stack([self._cache[p][0] for p in prompts]),
            torch.stack([self._cache[p][1] for p in prompts]),
        )


def time_ids_of(original: tuple[int, int], target: tuple[int, int], *, random_crop: bool, rng: random.Random) -> list[int]:  # fmt: skip
    """SDXL's six size/crop ids for an image of ``original`` ``(width, height)`` trained at ``target`` ``(w, h)``.

    ``rng`` is the example's crop generator in the state ``load_training_image`` will find it (a copy is drawn from).
    """
    copy = random.Random()
    copy.setstate(rng.getstate())
    _, (left, top) = crop_box(original, target, random_crop=random_crop, rng=copy)
    return [original[1], original[0], top, left, target[1], target[0]]


@dataclass
class SdxlBatches(DiffusionBatches):
    """``DiffusionBatches`` whose conditioning also carries SDXL's pooled text embeddings and size/crop ids."""

    def time_ids(self, epoch: int, indices: list[int]) -> Any:
        import torch

        keys, _, rngs = self.data.batch_keys(epoch, indices)
        rows = []
        for key, rng in zip(keys, rngs, strict=True):
            items = self.data.items if key.source == "instance" else self.data.class_items
            rows.append(
                time_ids_of(
                    items[key.item].size, key.size, random_crop=self.data.options.random_crop, rng=rng
                )
            )
        return torch.tensor(rows, dtype=torch.float32, device=self.device)

    def conditioning(self, epoch: int, indices: list[int], captions: list[str]) -> Any:
        cond = self.prompts(captions)
        cond.time_ids = self.time_ids(epoch, indices)
        return cond
