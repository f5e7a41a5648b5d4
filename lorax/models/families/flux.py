"""Flux.1 (dev, schnell and their finetunes): a rectified-flow transformer, CLIP-L and T5 encoders, a 16-channel VAE.

The transformer (``FluxTransformer2DModel``: 19 double-stream blocks, 38 single-stream blocks, hidden 3072; dev has
a guidance embedding, schnell none) is the LoRA-able "unet" kind. kohya names its modules the BFL way
(``lora_unet_double_blocks_0_img_attn_qkv``) with fused projections; ``lorax.formats.flux`` maps them onto the
diffusers modules structurally. The same full-size config serves schnell with ``guidance_embeds`` false (its module
table lacks the three ``guidance_embedder`` layers; names are checked per module, so both read).

``lorax merge`` folds Flux LoRAs into any Flux checkpoint layout (``lorax.adapters.flux_merge`` places the deltas of
fused BFL tensors).
"""

from __future__ import annotations

from lorax.io.checkpoint_layouts import FLUX
from lorax.models.families.base import Family, register, shipped

FAMILY = register(
    Family(
        name="flux",
        components=(
            shipped("flux", "transformer", "unet", "FluxTransformer2DModel", "lora_unet_"),
            shipped(
                "flux", "text_encoder", "text", "CLIPTextModel", "lora_te1_", width=768, tokenizer="tokenizer"
            ),
            shipped(
                "flux",
                "text_encoder_2",
                "text",
                "T5EncoderModel",
                "lora_te3_",
                width=4096,
                tokenizer="tokenizer_2",
            ),
        ),
        checkpoint=FLUX,
        kohya_versions=("flux1",),
        kohya_version="flux1",
        kohya_unet_names="bfl",
        lora_markers=(
            r"(^|[._])double_blocks[._]\d",
            r"(^|[._])single_blocks[._]\d",
            r"(^|[._])single_transformer_blocks[._]\d",
        ),
        pipelines={"txt2img": "FluxPipeline", "img2img": "FluxImg2ImgPipeline"},
        conditioning="flux",
        embedding_format="a1111-embedding",
        modelspec={"epsilon": ("flux-1-dev", 1024)},
        modelspec_implementation="https://github.com/black-forest-labs/flux",
    )
)
