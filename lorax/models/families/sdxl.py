"""Stable Diffusion XL: CLIP ViT-L and OpenCLIP ViT-bigG text encoders, cross-attention width 2048.

Kohya's SDXL trainer names UNet modules the original (SGM) way; conditioning adds pooled text embeddings and time
ids (``lorax.training.sdxl``); a learned token has a vector per encoder (``clip_l``, ``clip_g``).
"""

from __future__ import annotations

from lorax.io.checkpoint_layouts import SDXL
from lorax.models.families.base import clip, unet_family

FAMILY = unet_family(
    "sdxl",
    clip("sdxl", "lora_te1_", 768, embedding_key="clip_l"),
    clip(
        "sdxl",
        "lora_te2_",
        1280,
        name="text_encoder_2",
        model_class="CLIPTextModelWithProjection",
        tokenizer="tokenizer_2",
        embedding_key="clip_g",
    ),
    checkpoint=SDXL,
    kohya_versions=("sdxl",),
    kohya_version="sdxl_base_v1-0",
    kohya_unet_names="sgm",
    modelspec={"epsilon": ("stable-diffusion-xl-v1-base", 1024)},
    modelspec_implementation="stability",
    pipelines={"txt2img": "StableDiffusionXLPipeline", "img2img": "StableDiffusionXLImg2ImgPipeline"},
    conditioning="text_time",
    embedding_format="sdxl-embedding",
)
