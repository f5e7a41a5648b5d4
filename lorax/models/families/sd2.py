"""Stable Diffusion 2.x: an OpenCLIP ViT-H text encoder (diffusers keeps 23 of its layers), width 1024."""

from __future__ import annotations

from lorax.io.checkpoint_layouts import SD2
from lorax.models.families.base import Component, Family, register

FAMILY = register(
    Family(
        name="sd2",
        components=(
            Component("unet", "unet", "UNet2DConditionModel", "sd2_unet", "lora_unet_", table="sd2_unet"),
            Component(
                "text_encoder",
                "text",
                "CLIPTextModel",
                "sd2_text_encoder",
                "lora_te_",
                width=1024,
                tokenizer="tokenizer",
                table="sd2_text_encoder",
            ),
        ),
        checkpoint=SD2,
        kohya_versions=("sd_v2",),
        kohya_version="sd_v2",
        kohya_version_v="sd_v2_v",
        pipelines={"txt2img": "StableDiffusionPipeline", "img2img": "StableDiffusionImg2ImgPipeline"},
    )
)
