"""Prompts → text-encoder hidden states, with a cache for when the text encoder is frozen."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def tokenize(tokenizer: Any, prompts: Sequence[str], device: Any) -> Any:
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)


def encode(tokenizer: Any, text_encoder: Any, prompts: Sequence[str], device: Any) -> Any:
    """The last hidden state ``[B, 77, dim]`` of ``prompts`` (what SD1/SD2 UNets cross-attend to)."""
    return text_encoder(tokenize(tokenizer, prompts, device), return_dict=False)[0]


class PromptEncoder:
    """Encodes prompts; with ``cache=True`` (frozen text encoder) each distinct prompt is encoded once, exactly."""

    def __init__(self, tokenizer: Any, text_encoder: Any, device: Any, *, cache: bool) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.cache_enabled = cache
        self._cache: dict[str, Any] = {}

    def __call__(self, prompts: Sequence[str]) -> Any:
        import torch

        if not self.cache_enabled:
            return encode(self.tokenizer, self.text_encoder, prompts, self.device)
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            with torch.no_grad():
                hidden = encode(self.tokenizer, self.text_encoder, missing, self.device)
            for prompt, h in zip(missing, hidden, strict=True):
                self._cache[prompt] = h
        return torch.stack([self._cache[p] for p in prompts])
