"""Image preprocessing: resize to cover a target size, centre or random crop, flip, to a ``[-1, 1]`` tensor."""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def crop_box(
    size: tuple[int, int], target: tuple[int, int], *, random_crop: bool, rng: random.Random
) -> tuple[float, tuple[int, int]]:
    """The resize scale that makes ``size`` cover ``target`` and the crop's top-left corner after resizing."""
    width, height = size
    tw, th = target
    scale = max(tw / width, th / height)
    rw, rh = max(tw, round(width * scale)), max(th, round(height * scale))
    if random_crop:
        left, top = rng.randint(0, rw - tw), rng.randint(0, rh - th)
    else:
        left, top = (rw - tw) // 2, (rh - th) // 2
    return scale, (left, top)


def load_training_image(
    path: Path,
    target: tuple[int, int],
    *,
    random_crop: bool,
    flip: bool,
    rng: random.Random,
) -> torch.Tensor:
    """``path`` as a float tensor ``[3, H, W]`` in ``[-1, 1]``, resized to cover ``target`` and cropped to it.

    ``rng`` decides the crop (when random); ``flip`` mirrors the result horizontally.
    """
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as opened:
        img = opened.convert("RGB")
    tw, th = target
    scale, (left, top) = crop_box(img.size, target, random_crop=random_crop, rng=rng)
    rw, rh = max(tw, round(img.width * scale)), max(th, round(img.height * scale))
    if (rw, rh) != img.size:
        img = img.resize((rw, rh), Image.Resampling.BICUBIC)
    img = img.crop((left, top, left + tw, top + th))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
