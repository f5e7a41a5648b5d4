"""Upscaling small pictures for ``lorax prepare``: Swin2SR (transformers' ``Swin2SRForImageSuperResolution`` and its
image processor, from a local folder or the Hugging Face cache), or PIL's Lanczos when no model is given.

A picture smaller than its resize target goes through the model as many times as it takes to reach the target
(each pass multiplies its sides by the model's ``upscale`` factor); ``apply_geometry`` then resizes the result to
the exact size with Lanczos, as it resizes every other picture.
"""

from __future__ import annotations

import math
from typing import Any

from lorax.errors import ModelNotFoundError

LANCZOS = "lanczos"


class Swin2SRUpscaler:
    """``upscale(image, goal)``: an RGB PIL image at least ``goal`` (width, height) on both sides, or as large as
    the passes reach, made by the model (the image itself when it is already large enough)."""

    def __init__(self, model: str) -> None:
        from transformers import AutoConfig, Swin2SRForImageSuperResolution

        from lorax.data.maskers import load_transformers

        try:
            model_type = AutoConfig.from_pretrained(model, local_files_only=True).model_type
        except (OSError, ValueError, KeyError):
            model_type = None  # load_transformers says why, in the same words as the other models' errors
        if model_type is not None and model_type != "swin2sr":
            raise ModelNotFoundError(
                f"--upscaler {model!r} is a {model_type} model, not a Swin2SR super-resolution model "
                "(e.g. caidas/swin2SR-classical-sr-x4-64)"
            )
        self.processor, self.model = load_transformers(model, "--upscaler", Swin2SRForImageSuperResolution)
        self.spec = model
        self.factor = int(self.model.config.upscale)

    @property
    def name(self) -> str:
        return f"swin2sr x{self.factor}"

    def passes(self, size: tuple[int, int], goal: tuple[int, int]) -> int:
        """How many model passes bring ``size`` up to ``goal`` on both sides (0 when it is there already)."""
        ratio = max(goal[0] / size[0], goal[1] / size[1])
        if ratio <= 1 or self.factor <= 1:
            return 0
        return math.ceil(math.log(ratio, self.factor) - 1e-9)

    def upscale(self, image: Any, goal: tuple[int, int]) -> Any:
        for _ in range(self.passes(image.size, goal)):
            image = self.one_pass(image)
        return image

    def one_pass(self, image: Any) -> Any:
        """``image`` through the model once: ``factor`` × its size. The processor pads the bottom and right edges
        (symmetric) to a multiple of the window; that margin is cut from the output."""
        import numpy as np
        import torch
        from PIL import Image

        width, height = image.size
        inputs = self.processor(images=[image.convert("RGB")], return_tensors="pt")
        with torch.inference_mode():
            out = self.model(pixel_values=inputs["pixel_values"].to(self.model.dtype)).reconstruction
        out = out[0, :, : height * self.factor, : width * self.factor].float().clamp(0, 1)
        pixels = np.round(out.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        return Image.fromarray(pixels)
