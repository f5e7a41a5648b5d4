"""Tiny Stable-Diffusion-architecture components built from configs (no downloads).

Used by the tests (random weights, real component types and key layouts) and as the architecture of the built-in
``shapes`` model. ``family`` picks the layout: ``sd1`` (CLIP ViT-L style text encoder, 768-like cross attention
with ``attention_head_dim`` 8), ``sd2`` (OpenCLIP-style: linear projections in transformers, gelu text encoder) or
``sdxl`` (two text encoders, ``CLIPTextModel`` + ``CLIPTextModelWithProjection``, whose penultimate hidden states are
concatenated as the context; ``text_time`` added conditioning from the pooled projection and the six size/crop ids).
The tiny SDXL UNet keeps the full-size model's first and last levels (a plain ``DownBlock2D`` level, then cross
attention with two transformer layers), so its module paths name the same original (SGM) blocks as the real one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level alphabet: every byte maps to a printable unicode character."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def build_tokenizer(words: Iterable[str] = (), model_max_length: int = 77) -> Any:
    """A real ``CLIPTokenizer`` whose BPE knows every byte, plus ``words`` as whole tokens.

    Words not listed still encode (character by character), like rare words in the real CLIP vocabulary.
    """
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in seen:
                seen.add(pair)
                merges.append(pair)
            joined = pieces[0] + pieces[1]
            vocab.setdefault(joined, len(vocab))
            pieces = [joined, *pieces[2:]]
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,  # type: ignore[arg-type]  # the tokenizers backend takes (a, b) pairs
        model_max_length=model_max_length,
    )


def _tiny_unet(sample_size: int) -> dict[str, Any]:
    """What every tiny UNet shares: 4 latent channels, two blocks of 32 and 64 channels, two layers each."""
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [32, 64],
    }


def tiny_unet_config(
    family: str = "sd1", cross_attention_dim: int = 32, sample_size: int = 8
) -> dict[str, Any]:
    config: dict[str, Any] = {
        **_tiny_unet(sample_size),
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }
    if family == "sd2":
        config.update(attention_head_dim=[2, 4], use_linear_projection=True)
    return config


def tiny_vae_config() -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "sample_size": 16,
    }


def tiny_text_config(family: str = "sd1", vocab_size: int = 1000, hidden_size: int = 32) -> dict[str, Any]:
    return {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "gelu" if family == "sd2" else "quick_gelu",
        "projection_dim": hidden_size,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }


# Tiny SDXL sizes: text encoder 1 is 32 wide, text encoder 2 is 64 wide with a 32-wide projection, so the context
# is 96 wide and the added conditioning takes 6 * 8 time features + 32 pooled features.
SDXL_TEXT_WIDTHS = (32, 64)
SDXL_PROJECTION_DIM = 32
SDXL_TIME_EMBED_DIM = 8


def tiny_sdxl_unet_config(sample_size: int = 8) -> dict[str, Any]:
    return {
        **_tiny_unet(sample_size),
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "cross_attention_dim": sum(SDXL_TEXT_WIDTHS),
        "attention_head_dim": [2, 4],
        "transformer_layers_per_block": [1, 2],
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": SDXL_TIME_EMBED_DIM,
        "projection_class_embeddings_input_dim": 6 * SDXL_TIME_EMBED_DIM + SDXL_PROJECTION_DIM,
        "norm_num_groups": 32,
    }


def _tiny_scheduler(**options: Any) -> Any:
    """Stable Diffusion's DDIM schedule (scaled linear betas 0.00085 … 0.012) with ``options``."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        **options,
    )


def tiny_sdxl_components(seed: int = 0, words: Iterable[str] = ()) -> dict[str, Any]:
    """Random-weight components of a tiny SDXL pipeline, deterministic in ``seed``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tokenizer(words)
    tokenizer_2 = build_tokenizer(words)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config())
    vae = AutoencoderKL(**tiny_vae_config(), scaling_factor=0.13025, force_upcast=False)
    config_1 = tiny_text_config("sd1", vocab_size=len(tokenizer), hidden_size=SDXL_TEXT_WIDTHS[0])
    config_2 = tiny_text_config("sd2", vocab_size=len(tokenizer_2), hidden_size=SDXL_TEXT_WIDTHS[1])
    config_2["projection_dim"] = SDXL_PROJECTION_DIM
    text_encoder = CLIPTextModel(CLIPTextConfig(**config_1))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config_2))
    scheduler = _tiny_scheduler(steps_offset=1)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
    }


def tiny_components(family: str = "sd1", seed: int = 0, words: Iterable[str] = ()) -> dict[str, Any]:
    """Random-weight components of a tiny SD pipeline of ``family`` (``sd1``, ``sd2`` or ``sdxl``), deterministic in
    ``seed``."""
    if family == "sdxl":
        return tiny_sdxl_components(seed, words)
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer(words)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config(family))
    vae = AutoencoderKL(**tiny_vae_config())
    text_config = tiny_text_config(family, vocab_size=len(tokenizer))
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    scheduler = _tiny_scheduler(prediction_type="v_prediction" if family == "sd2" else "epsilon")
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def tiny_pipeline(family: str = "sd1", seed: int = 0, words: Iterable[str] = ()) -> Any:
    """A ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` for ``sdxl``) of random tiny components (no safety
    checker)."""
    from diffusers import StableDiffusionPipeline

    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(**tiny_sdxl_components(seed, words))

    return StableDiffusionPipeline(
        **tiny_components(family, seed, words),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
