"""Stable Diffusion XL: CLIP ViT-L and OpenCLIP ViT-bigG text encoders, cross-attention width 2048.

Kohya's SDXL trainer names UNet modules the original (SGM) way; conditioning adds pooled text embeddings and time
ids (``lorax.training.sdxl``).
"""

from __future__ import annotations

from lorax.io.checkpoint_layouts import SDXL
from lorax.models.families.base import Component, Family, register

FAMILY = register(
    Family(
        name="sdxl",
        components=(
            Component("unet", "unet", "UNet2DConditionModel", "sdxl_unet", "lora_unet_", table="sdxl_unet"),
            Component(
                "text_encoder",
                "text",
                "CLIPTextModel",
                "sdxl_text_encoder",
                "lora_te1_",
                width=768,
                tokenizer="tokenizer",
                embedding_key="clip_l",
                table="sdxl_text_encoder",
            ),
            Component(
                "text_encoder_2",
                "text",
                "CLIPTextModelWithProjection",
                "sdxl_text_encoder_2",
                "lora_te2_",
                width=1280,
                tokenizer="tokenizer_2",
                embedding_key="clip_g",
                table="sdxl_text_encoder_2",
            ),
        ),
        checkpoint=SDXL,
        kohya_versions=("sdxl",),
        kohya_version="sdxl_base_v1-0",
        kohya_unet_names="sgm",
        pipelines={"txt2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline"},
        conditioning="text_time",
        embedding_format="sdxl-embedding",
    )
)
