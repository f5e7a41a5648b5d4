"""Stable Diffusion 2.x: an OpenCLIP ViT-H text encoder (diffusers keeps 23 of its layers), width 1024; the 768 px
models predict v (``ss_base_model_version`` ``sd_v2_v``)."""

from __future__ import annotations

from lorax.io.checkpoint_layouts import SD2
from lorax.models.families.base import clip, unet_family
from lorax.models.families.sd1 import FAMILY as SD1

FAMILY = unet_family(
    "sd2",
    clip("sd2", "lora_te_", 1024),
    checkpoint=SD2,
    kohya_version="sd_v2",
    kohya_version_v="sd_v2_v",
    modelspec={"epsilon": ("stable-diffusion-v2-512", 512), "v": ("stable-diffusion-v2-768-v", 768)},
    pipelines=SD1.pipelines,
)
