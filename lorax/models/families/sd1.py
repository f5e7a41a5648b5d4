"""Stable Diffusion 1.x: one CLIP ViT-L text encoder, cross-attention width 768."""

from __future__ import annotations

from lorax.io.checkpoint_layouts import SD1
from lorax.models.families.base import clip, unet_family

FAMILY = unet_family(
    "sd1",
    clip("sd1", "lora_te_", 768),
    checkpoint=SD1,
    kohya_version="sd_v1",
    modelspec={"epsilon": ("stable-diffusion-v1", 512)},
    pipelines={"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline"},
)
