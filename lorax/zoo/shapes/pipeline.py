"""The shapes model as a pipeline: its architecture, loading the packaged folder, sampling images to score."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorax.zoo.shapes.world import RESOLUTION, vocabulary

# Sampling settings the model card's scores were measured with.
SAMPLE_STEPS = 20
GUIDANCE_SCALE = 5.0

LATENT_SIZE = 8  # 32-pixel images, VAE downsampling 4
TEXT_HIDDEN = 64

# What the packaged model carries in its lorax.json (lorax.models.defaults): sampling as the card was scored, and
# training settings measured to teach a held-out colour with nothing else given (figures: docs/model-card.md).
LORAX_DEFAULTS: dict[str, dict[str, Any]] = {
    "generate": {
        "steps": SAMPLE_STEPS,
        "guidance": GUIDANCE_SCALE,
        "width": RESOLUTION,
        "height": RESOLUTION,
    },
    "train": {
        "resolution": RESOLUTION,
        "learning_rate": 5e-3,
        "batch_size": 4,
        "snr_gamma": 5.0,
        "steps": 300,
    },
    "invert": {
        "resolution": RESOLUTION,
        "learning_rate": 5e-3,
        "batch_size": 4,
        "auto_mask": True,
        "norm_decay": False,
        "steps": 300,
    },
    "pivot": {
        "resolution": RESOLUTION,
        "ti_learning_rate": 5e-3,
        "batch_size": 4,
        "auto_mask": True,
        "norm_decay": False,
        "ti_steps": 300,
        "learning_rate": 1e-3,
        "steps": 200,
    },
}


def unet_config() -> dict[str, Any]:
    """SD1's UNet layout (cross-attention down blocks, then a plain one; mirrored up), narrow and short."""
    return {
        "sample_size": LATENT_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": [32, 64, 96],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": TEXT_HIDDEN,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    }


def vae_config() -> dict[str, Any]:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "sample_size": RESOLUTION,
    }


def text_config(vocab_size: int) -> dict[str, Any]:
    """A CLIP ViT-L-style text encoder (quick_gelu, causal, 77 positions), 64 wide and 3 deep."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": 4 * TEXT_HIDDEN,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": TEXT_HIDDEN,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }


def scheduler_config() -> dict[str, Any]:
    """SD1's noise schedule."""
    return {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
    }


def build_components(seed: int = 0) -> dict[str, Any]:
    """Fresh (untrained) components of the shapes model, deterministic in ``seed``."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorax.zoo.tiny import build_tokenizer

    tokenizer = build_tokenizer(vocabulary())
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config())
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config(len(tokenizer))))
    unet = UNet2DConditionModel(**unet_config())
    scheduler = DDIMScheduler(**scheduler_config(), clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def assemble(components: dict[str, Any]) -> Any:
    """A ``StableDiffusionPipeline`` (no safety checker) of the given components."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def load_builtin(
    name: str, pipeline: str, path: str | Path | None = None, dtype: Any = None, **extra: Any
) -> Any:
    """Load the packaged built-in model ``name`` (or the diffusers folder ``path``) as diffusers' ``pipeline`` class,
    float32 unless ``dtype``, local files only, without progress bars."""
    import diffusers
    import torch

    if path is None:
        from lorax.models.registry import resolve_builtin

        path = resolve_builtin(name)
    cls = getattr(diffusers, pipeline)
    pipe = cls.from_pretrained(str(path), torch_dtype=dtype or torch.float32, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_shapes_pipeline(path: str | Path | None = None, dtype: Any = None) -> Any:
    """Load the packaged shapes model (or the diffusers folder ``path``) as a float32 ``StableDiffusionPipeline``."""
    return load_builtin("shapes", "StableDiffusionPipeline", path, dtype, safety_checker=None)


def sample(
    pipe: Any,
    prompts: Sequence[str],
    seed: int = 0,
    steps: int = SAMPLE_STEPS,
    guidance_scale: float = GUIDANCE_SCALE,
    batch_size: int = 64,
) -> list[np.ndarray]:
    """Generate one image per prompt (uint8 arrays [H, W, 3]), deterministic in ``seed``."""
    import torch

    images: list[np.ndarray] = []
    generator = torch.Generator("cpu").manual_seed(seed)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        latents = torch.randn(
            (
                len(chunk),
                pipe.unet.config.in_channels,
                pipe.unet.config.sample_size,
                pipe.unet.config.sample_size,
            ),
            generator=generator,
        ).to(pipe.device, pipe.unet.dtype)
        out = pipe(
            chunk,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            latents=latents,
            output_type="np",
        ).images
        images.extend(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8) for img in out)
    return images


def seen_prompts() -> list[str]:
    """Every base shape × base colour × background: the prompts the base model's quality is judged on (60)."""
    from lorax.zoo.shapes.world import BACKGROUNDS, BASE_COLOURS, BASE_SHAPES, caption

    return [caption(s, c, b) for b in BACKGROUNDS for s in BASE_SHAPES for c in BASE_COLOURS]


def heldout_prompts() -> dict[str, list[str]]:
    """Prompts naming a held-out shape (with base colours) or a held-out colour (with base shapes)."""
    from lorax.zoo.shapes.world import (
        BACKGROUNDS,
        BASE_COLOURS,
        BASE_SHAPES,
        HELDOUT_COLOURS,
        HELDOUT_SHAPES,
        caption,
    )

    return {
        "shape": [caption(s, c, b) for b in BACKGROUNDS for s in HELDOUT_SHAPES for c in BASE_COLOURS],
        "colour": [caption(s, c, b) for b in BACKGROUNDS for s in BASE_SHAPES for c in HELDOUT_COLOURS],
    }


def evaluate(
    pipe: Any,
    seed: int = 0,
    steps: int = SAMPLE_STEPS,
    guidance_scale: float = GUIDANCE_SCALE,
    sampler: Callable[..., list[np.ndarray]] | None = None,
) -> dict:
    """Scores of ``pipe`` on the seen prompts and on the held-out concepts (accuracies in [0, 1]).

    ``sampler`` makes the images (``sampler(pipe, prompts, seed=, steps=, guidance_scale=)``; default: ``sample``,
    for this SD pipeline); ``lorax.zoo.shapes_flux`` passes its own, so both models are scored the same way.
    """
    from lorax.zoo.shapes.scorers import score_images

    seen = seen_prompts()
    held = heldout_prompts()
    prompts = seen + held["shape"] + held["colour"]
    images = (sampler or sample)(pipe, prompts, seed=seed, steps=steps, guidance_scale=guidance_scale)
    a, b = len(seen), len(seen) + len(held["shape"])
    seen_scores = score_images(images[:a], seen)
    return {
        "steps": steps,
        "guidance_scale": guidance_scale,
        "seen": {k: seen_scores[k] for k in ("colour", "shape", "background", "n")},
        "heldout_shape": score_images(images[a:b], held["shape"])["shape"],
        "heldout_colour": score_images(images[b:], held["colour"])["colour"],
        "n_heldout_shape": b - a,
        "n_heldout_colour": len(images) - b,
    }
