"""Inpainting for ``lorax generate --init-image IMG --mask-image MASK``.

diffusers' inpaint pipelines do the work, built from the loaded pipeline with ``AutoPipelineForInpainting.from_pipe``
(its components shared, so LoRAs and learned tokens apply as in txt2img): an inpainting checkpoint's 9-channel UNet
(``StableDiffusionInpaintPipeline``, ``StableDiffusionXLInpaintPipeline``) sees the masked image and the mask; an
ordinary 4-channel UNet is inpainted by latent blending (after every step the unmasked latents are reset to the init
image's, noised to that step), as diffusers' inpaint pipelines do with such a UNet. Either way the mask is binarised
at ½ (white = repaint) and the init image's pixels are pasted back where it is black, as AUTOMATIC1111 does, so the
unmasked region comes out exactly as it went in.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

INPAINT_CHANNELS = 9  # latents 4 + mask 1 + masked-image latents 4


def is_inpainting_model(pipe: Any) -> bool:
    """Whether the pipeline's UNet is an inpainting UNet (9 input channels)."""
    unet = getattr(pipe, "unet", None)  # Flux has a transformer, and no inpainting variant lorax loads
    return unet is not None and int(getattr(unet.config, "in_channels", 4)) == INPAINT_CHANNELS


def read_mask_image(path: Path) -> Image.Image:
    """The mask as a greyscale PIL image (white = repaint, black = keep)."""
    from lorax.data.images import read_image_file

    return read_image_file(path, "--mask-image", "L")


def inpaint_pipeline(pipe: Any) -> Any:
    """The inpaint pipeline of ``pipe``'s family over the same components."""
    from diffusers import AutoPipelineForInpainting

    runner = AutoPipelineForInpainting.from_pipe(pipe)
    runner.set_progress_bar_config(disable=True)
    return runner


def binary_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``mask`` at ``size``, binarised at ½ as diffusers' mask processor does: 255 = repaint, 0 = keep."""
    from PIL import Image

    if mask.size != size:
        mask = mask.resize(size, Image.Resampling.BILINEAR)
    return mask.point(lambda v: 255 if v >= 128 else 0)


def paste_unmasked(images: Sequence[Image.Image], init: Image.Image, mask: Image.Image) -> list[Image.Image]:
    """Each generated image with the init image's pixels where ``mask`` (binary, the images' size) is black."""
    from PIL import Image

    out = []
    for image in images:
        kept = init if init.size == image.size else init.resize(image.size)
        m = mask if mask.size == image.size else mask.resize(image.size, Image.Resampling.NEAREST)
        out.append(Image.composite(image.convert("RGB"), kept.convert("RGB"), m))
    return out
