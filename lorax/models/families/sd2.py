"""Stable Diffusion 2.x: an OpenCLIP ViT-H text encoder (diffusers keeps 23 of its layers), width 1024; the 768 px
models predict v (``ss_base_model_version`` ``sd_v2_v``)."""

from __future__ import annotations

from lorax.io.checkpoint_layouts import SD2
from lorax.models.families.base import Family, register, shipped
from lorax.models.families.sd1 import FAMILY as SD1

FAMILY = register(
    Family(
        name="sd2",
        components=(
            shipped("sd2", "unet", "unet", "UNet2DConditionModel", "lora_unet_"),
            shipped(
                "sd2", "text_encoder", "text", "CLIPTextModel", "lora_te_", width=1024, tokenizer="tokenizer"
            ),
        ),
        checkpoint=SD2,
        kohya_versions=("sd_v2",),
        kohya_version="sd_v2",
        kohya_version_v="sd_v2_v",
        modelspec={"epsilon": ("stable-diffusion-v2-512", 512), "v": ("stable-diffusion-v2-768-v", 768)},
        pipelines=SD1.pipelines,
    )
)
