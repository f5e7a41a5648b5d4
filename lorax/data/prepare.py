"""The pieces of ``lorax prepare`` that need no model: target sizes, crops, duplicate hashes, the border masker.

Everything here works on PIL images and numpy arrays; the maskers and captioners that load models live in
``lorax.data.maskers`` and ``lorax.data.captioner``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

CROPS = ("center", "subject", "none")


# ---- geometry -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """How one image becomes its training image: resize to ``resized``, then crop ``box`` (left, top, right, bottom)."""

    source: tuple[int, int]
    resized: tuple[int, int]
    box: tuple[int, int, int, int]

    @property
    def size(self) -> tuple[int, int]:
        return self.box[2] - self.box[0], self.box[3] - self.box[1]

    @property
    def upscaled(self) -> bool:
        return self.resized[0] > self.source[0] or self.resized[1] > self.source[1]


def plan_geometry(
    source: tuple[int, int],
    target: tuple[int, int],
    crop: str,
    subject_box: tuple[int, int, int, int] | None = None,
) -> Geometry:
    """The resize and crop that turn an image of ``source`` size into ``target`` (``crop`` center or subject), or
    that scale it so its shorter side meets the target's shorter side (``crop`` none: aspect kept, nothing cut).

    ``subject``: the crop window is centred on ``subject_box`` (the mask's bounding box, in source pixels) and
    clamped to the image; without a box it is the centre crop.
    """
    width, height = source
    tw, th = target
    if crop == "none":
        scale = min(tw, th) / min(width, height)
        rw, rh = max(1, round(width * scale)), max(1, round(height * scale))
        return Geometry(source, (rw, rh), (0, 0, rw, rh))
    scale = max(tw / width, th / height)
    rw, rh = max(tw, round(width * scale)), max(th, round(height * scale))
    if crop == "subject" and subject_box is not None:
        cx = (subject_box[0] + subject_box[2]) / 2 * rw / width
        cy = (subject_box[1] + subject_box[3]) / 2 * rh / height
        left = round(min(max(cx - tw / 2, 0), rw - tw))
        top = round(min(max(cy - th / 2, 0), rh - th))
    else:
        left, top = (rw - tw) // 2, (rh - th) // 2
    return Geometry(source, (rw, rh), (left, top, left + tw, top + th))


def apply_geometry(image: Any, geometry: Geometry, *, mask: bool = False) -> Any:
    """``image`` (PIL) resized (Lanczos; bilinear for masks) and cropped as ``geometry`` says."""
    from PIL import Image

    resample = Image.Resampling.BILINEAR if mask else Image.Resampling.LANCZOS
    if image.size != geometry.resized:
        image = image.resize(geometry.resized, resample)
    if geometry.box != (0, 0, *geometry.resized):
        image = image.crop(geometry.box)
    return image


def mask_box(mask: np.ndarray, threshold: float = 0.5) -> tuple[int, int, int, int] | None:
    """Bounding box (left, top, right, bottom) of ``mask >= threshold``; ``None`` when it is empty."""
    ys, xs = np.nonzero(mask >= threshold)
    if len(xs) == 0:
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ---- duplicates ---------------------------------------------------------------------------------------------


def pixel_digest(image: Any) -> str:
    """SHA-256 of the decoded RGB pixels and size: the same picture saved as PNG and as BMP is one picture."""
    rgb = image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


_DCT32 = _dct_matrix(32)


def perceptual_hash(image: Any) -> int:
    """The 64-bit pHash: the 8×8 lowest frequencies of the 32×32 grey image's DCT, each bit above their median
    (the DC term left out of the median), as in Zauner's pHash and the ``imagehash`` package."""
    from PIL import Image

    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    coeffs = (_DCT32 @ grey @ _DCT32.T)[:8, :8]
    median = np.median(coeffs.flatten()[1:])
    bits = (coeffs > median).flatten()
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


# ---- the offline masker -------------------------------------------------------------------------------------

BORDER_FLOOR = 0.08  # RGB distance a foreground pixel must at least have from the background (noise, jpeg)


def border_mask(pixels: np.ndarray) -> np.ndarray:
    """Foreground ``[H, W]`` in {0, 1} from the border's colour statistics; ``pixels`` is ``[H, W, 3]`` in [0, 1].

    The background is the border's median colour, its spread the 95th percentile of the border's distances to it.
    Pixels clearly off the background (beyond 3 × spread + ``BORDER_FLOOR``) are surely foreground; the cut is half
    way between the background and their median distance (so an anti-aliased edge pixel counts when it is more
    subject than background), never below the border's own spread. Holes enclosed by the foreground are filled.
    """
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    background = np.median(border, axis=0)
    spread = float(np.quantile(np.linalg.norm(border - background, axis=1), 0.95))
    distance = np.linalg.norm(pixels - background, axis=-1)
    sure = distance > 3 * spread + BORDER_FLOOR
    if not sure.any():
        return np.zeros(distance.shape, dtype=np.float32)
    cut = max(0.5 * float(np.median(distance[sure])), 1.5 * spread + BORDER_FLOOR / 2)
    return fill_holes(distance > cut).astype(np.float32)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region that does not touch the image border filled in."""
    from PIL import Image, ImageDraw

    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = np.where(mask, 255, 0)
    img = Image.fromarray(padded).copy()  # a copy: an image sharing the array's memory ignores floodfill
    ImageDraw.floodfill(img, (0, 0), 128)  # the outside, reached from the padding
    return np.asarray(img)[1:-1, 1:-1] != 128


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0
