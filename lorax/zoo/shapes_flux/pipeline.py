"""The ``shapes-flux`` model as a pipeline: its Flux.1 architecture (tiny), loading the packaged folder, sampling.

The same shapes world as ``lorax.zoo.shapes`` (renders, captions, scorers, prompts), drawn by the component types of
FLUX.1: a ``FluxTransformer2DModel`` (double- and single-stream blocks, RoPE over 2-D latent positions, no guidance
embedding: a schnell-style, not guidance-distilled, transformer), a CLIP-L-shaped ``CLIPTextModel`` (quick_gelu, 77
positions; its pooled output conditions the modulation), a ``T5EncoderModel`` (gated-gelu, like T5 v1.1 XXL; its
hidden states are the joint-attention text stream), a 16-channel ``AutoencoderKL`` without quant convolutions (with a
``shift_factor``, as Flux's) and a ``FlowMatchEulerDiscreteScheduler``. Tokenizers are built locally
(``lorax.zoo.tiny.build_tokenizer``): no download, ever.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorax.zoo.shapes.pipeline import heldout_prompts, load_builtin, seen_prompts, text_config
from lorax.zoo.shapes.pipeline import vae_config as shapes_vae_config
from lorax.zoo.shapes.world import RESOLUTION, vocabulary

__all__ = [
    "LORAX_DEFAULTS",
    "SAMPLE_STEPS",
    "T5_LENGTH",
    "assemble",
    "build_components",
    "evaluate",
    "heldout_prompts",
    "load_shapes_flux_pipeline",
    "sample",
    "seen_prompts",
]

# What the packaged model carries in its lorax.json (lorax.models.defaults), a table beside this module: sampling as
# the card was scored (20 Euler steps), the T5 length (16 padded tokens: every caption of the world fits, with room
# for "sks" and a class noun) and the measured DreamBooth recipe's training settings (docs/train.md).
LORAX_DEFAULTS: dict[str, dict[str, Any]] = json.loads(
    (Path(__file__).with_name("defaults.json")).read_text()
)
SAMPLE_STEPS = int(LORAX_DEFAULTS["generate"]["steps"])
T5_LENGTH = int(LORAX_DEFAULTS["generate"]["max_sequence_length"])
VAE_SCALE = 4  # 32-pixel images → 8 × 8 latents → 4 × 4 packed tokens of 64 channels
LATENT_CHANNELS = 16
HIDDEN = 128  # the transformer's width: 4 heads of 32
T5_WIDTH = 64


def transformer_config() -> dict[str, Any]:
    """FLUX.1's transformer, 128 wide: 2 double-stream and 6 single-stream blocks, RoPE axes 8 + 12 + 12 = 32."""
    return {
        "patch_size": 1,
        "in_channels": 4 * LATENT_CHANNELS,
        "num_layers": 2,
        "num_single_layers": 6,
        "attention_head_dim": HIDDEN // 4,
        "num_attention_heads": 4,
        "joint_attention_dim": T5_WIDTH,
        "pooled_projection_dim": text_config(2)["hidden_size"],
        "guidance_embeds": False,
        "axes_dims_rope": [8, 12, 12],
    }


def vae_config() -> dict[str, Any]:
    """The shapes VAE's levels (4× down) in Flux's layout: 16 latent channels, no quant convolutions, a shift factor."""
    return {
        **shapes_vae_config(),
        "latent_channels": LATENT_CHANNELS,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "shift_factor": 0.0,
        "scaling_factor": 1.0,
    }


def t5_config(vocab_size: int) -> dict[str, Any]:
    """T5 v1.1's encoder layout (gated-gelu feed-forward, relative attention), 64 wide and 2 deep, no dropout."""
    return {
        "vocab_size": vocab_size,
        "d_model": T5_WIDTH,
        "d_ff": 2 * T5_WIDTH,
        "d_kv": T5_WIDTH // 4,
        "num_layers": 2,
        "num_heads": 4,
        "feed_forward_proj": "gated-gelu",
        "dropout_rate": 0.0,
        "pad_token_id": vocab_size - 1,
        "eos_token_id": vocab_size - 1,
    }


def scheduler_config() -> dict[str, Any]:
    """Flow matching with plain Euler steps (σ from 1 down to 1/steps, no shift: 16 tokens need none)."""
    return {"num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}


def build_components(seed: int = 0) -> dict[str, Any]:
    """Fresh (untrained) components of the shapes-flux model, deterministic in ``seed``."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from lorax.zoo.tiny import build_tokenizer

    tokenizer = build_tokenizer(vocabulary())
    tokenizer_2 = build_tokenizer(vocabulary(), model_max_length=T5_LENGTH)
    torch.manual_seed(seed)
    return {
        "transformer": FluxTransformer2DModel(**transformer_config()),
        "vae": AutoencoderKL(**vae_config()),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**text_config(len(tokenizer)))),
        "text_encoder_2": T5EncoderModel(T5Config(**t5_config(len(tokenizer_2)))),
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": FlowMatchEulerDiscreteScheduler(**scheduler_config()),
    }


def assemble(components: dict[str, Any]) -> Any:
    """A ``FluxPipeline`` of the given components."""
    from diffusers import FluxPipeline

    return FluxPipeline(**components)


def load_shapes_flux_pipeline(path: str | Path | None = None, dtype: Any = None) -> Any:
    """Load the packaged shapes-flux model (or the diffusers folder ``path``) as a float32 ``FluxPipeline``."""
    return load_builtin("shapes-flux", "FluxPipeline", path, dtype)


def sample(
    pipe: Any,
    prompts: Sequence[str],
    seed: int = 0,
    steps: int = SAMPLE_STEPS,
    guidance_scale: float = 1.0,
    batch_size: int = 64,
) -> list[np.ndarray]:
    """Generate one image per prompt (uint8 arrays [H, W, 3]), deterministic in ``seed``.

    ``guidance_scale`` is what a guidance-embedding transformer would be given; this one has none (it is ignored),
    and Flux takes no classifier-free guidance: each image is one conditional flow from noise.
    """
    import torch

    images: list[np.ndarray] = []
    generator = torch.Generator("cpu").manual_seed(seed)
    channels = pipe.transformer.config.in_channels // 4
    side = RESOLUTION // int(pipe.vae_scale_factor)
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        noise = torch.randn((len(chunk), channels, side, side), generator=generator)
        latents = pipe._pack_latents(noise, len(chunk), channels, side, side)
        out = pipe(
            chunk,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=RESOLUTION,
            width=RESOLUTION,
            latents=latents.to(pipe.device, pipe.transformer.dtype),
            max_sequence_length=T5_LENGTH,
            output_type="np",
        ).images
        images.extend(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8) for img in out)
    return images


def evaluate(pipe: Any, seed: int = 0, steps: int = SAMPLE_STEPS) -> dict:
    """Scores of ``pipe`` on the shapes world's seen prompts and held-out concepts, as the SD shapes model's."""
    from lorax.zoo.shapes.pipeline import evaluate as evaluate_shapes

    return evaluate_shapes(pipe, seed=seed, steps=steps, guidance_scale=1.0, sampler=sample)
