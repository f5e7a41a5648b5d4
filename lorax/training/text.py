"""Prompts → text-encoder hidden states, with a cache for when the text encoder is frozen."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def tokenize(tokenizer: Any, prompts: Sequence[str], device: torch.device | str) -> torch.Tensor:
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return ids.to(device)


def encode(
    tokenizer: Any, text_encoder: Any, prompts: Sequence[str], device: torch.device | str, clip_skip: int = 1
) -> torch.Tensor:
    """The last hidden state ``[B, 77, dim]`` of ``prompts`` (what SD1/SD2 UNets cross-attend to), or with
    ``clip_skip`` N > 1 that of the N-th layer from the end, through the final layer norm (kohya's and A1111's clip
    skip: 2 is the penultimate layer)."""
    ids = tokenize(tokenizer, prompts, device)
    if clip_skip <= 1:
        return text_encoder(ids, return_dict=False)[0]
    return skip_layers(text_encoder, ids, clip_skip)


def skip_layers(text_encoder: Any, ids: torch.Tensor, clip_skip: int) -> torch.Tensor:
    """``hidden_states[-clip_skip]`` through CLIP's final layer norm, as kohya's sd-scripts compute it."""
    from lorax.errors import ConfigError

    out = text_encoder(ids, output_hidden_states=True, return_dict=True)
    layers = len(out.hidden_states) - 1
    if clip_skip > layers:
        raise ConfigError(f"--clip-skip {clip_skip}: the text encoder has only {layers} layers")
    model = getattr(text_encoder, "module", text_encoder)  # DDP
    norm = getattr(model, "text_model", model).final_layer_norm  # transformers 5 drops text_model
    return norm(out.hidden_states[-clip_skip])


def clip_skip_embeds(pipe: Any, prompt: str, negative: str | None, clip_skip: int) -> dict[str, torch.Tensor]:
    """``prompt_embeds`` / ``negative_prompt_embeds`` for a diffusers SD1/SD2 pipeline call with clip skip
    (diffusers' own ``clip_skip`` argument needs ``text_encoder.text_model``, which transformers 5 no longer has;
    its ``clip_skip=1`` is A1111's 2)."""
    base = getattr(pipe.text_encoder, "module", pipe.text_encoder)
    embeds = encode(pipe.tokenizer, pipe.text_encoder, [prompt, negative or ""], base.device, clip_skip)
    dtype = base.dtype
    return {"prompt_embeds": embeds[:1].to(dtype), "negative_prompt_embeds": embeds[1:].to(dtype)}


class PromptEncoder:
    """Encodes prompts; with ``cache=True`` (frozen text encoder) each distinct prompt is encoded once, exactly."""

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        device: torch.device | str,
        *,
        cache: bool,
        clip_skip: int = 1,
    ) -> None:
        self.clip_skip = clip_skip
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.cache_enabled = cache
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(
        self, prompts: Sequence[str]
    ) -> Any:  # a tensor (Any: DiffusionBatches.prompts holds SDXL's too)
        import torch

        if not self.cache_enabled:
            return encode(self.tokenizer, self.text_encoder, prompts, self.device, self.clip_skip)
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            with torch.no_grad():
                hidden = encode(self.tokenizer, self.text_encoder, missing, self.device, self.clip_skip)
            for prompt, h in zip(missing, hidden, strict=True):
                self._cache[prompt] = h
        return torch.stack([self._cache[p] for p in prompts])
