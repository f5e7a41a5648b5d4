"""Stable Diffusion 1.x: one CLIP ViT-L text encoder, cross-attention width 768."""

from __future__ import annotations

from lorax.io.checkpoint_layouts import SD1
from lorax.models.families.base import Component, Family, register

FAMILY = register(
    Family(
        name="sd1",
        components=(
            Component("unet", "unet", "UNet2DConditionModel", "sd1_unet", "lora_unet_", table="sd1_unet"),
            Component(
                "text_encoder",
                "text",
                "CLIPTextModel",
                "sd1_text_encoder",
                "lora_te_",
                width=768,
                tokenizer="tokenizer",
                table="sd1_text_encoder",
            ),
        ),
        checkpoint=SD1,
        kohya_versions=("sd_v1",),
        kohya_version="sd_v1",
        pipelines={"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline"},
    )
)
