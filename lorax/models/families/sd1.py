"""Stable Diffusion 1.x: one CLIP ViT-L text encoder, cross-attention width 768."""

from __future__ import annotations

from lorax.io.checkpoint_layouts import SD1
from lorax.models.families.base import Family, register, shipped

FAMILY = register(
    Family(
        name="sd1",
        components=(
            shipped("sd1", "unet", "unet", "UNet2DConditionModel", "lora_unet_"),
            shipped(
                "sd1", "text_encoder", "text", "CLIPTextModel", "lora_te_", width=768, tokenizer="tokenizer"
            ),
        ),
        checkpoint=SD1,
        kohya_versions=("sd_v1",),
        kohya_version="sd_v1",
        modelspec={"epsilon": ("stable-diffusion-v1", 512)},
        pipelines={"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline"},
    )
)
