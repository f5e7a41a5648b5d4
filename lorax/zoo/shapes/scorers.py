"""Deterministic scorers for the shapes world: which colour and which shape an image shows.

No learning. The background is the median colour of the image's border; the foreground is what differs from it.
Colour: the foreground's median colour, named by the nearest palette hue (too grey or too dark: ``unknown``).
Shape: the largest connected blob of the foreground, compared by intersection-over-union with every shape of the
world drawn into the blob's bounding box; the best match wins if its IoU is high enough, else ``unknown``.
"""

from __future__ import annotations

import colorsys
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lorax.zoo.shapes.world import BACKGROUNDS, COLOURS, SHAPES, coverage

UNKNOWN = "unknown"

STRONG_DIFFERENCE = 0.3  # RGB distance from the background that surely belongs to the foreground
MIN_PIXELS = 12  # fewer foreground pixels than this: no shape at all
MIN_IOU = 0.6  # the best template must overlap the blob at least this much
MIN_BLOB_SHARE = (
    0.8  # the largest blob must hold this share of the foreground (else: several things, no one shape)
)
MIN_SATURATION, MIN_VALUE = 0.3, 0.25
MAX_SPREAD = (
    0.25  # median RGB distance of the blob's pixels from its colour: more, and it is not one painted shape
)

_HUES = {name: colorsys.rgb_to_hsv(*rgb)[0] for name, rgb in COLOURS.items()}


@dataclass(frozen=True)
class Reading:
    """What the scorers see in one image."""

    colour: str
    shape: str
    background: str
    shape_iou: float  # IoU of the best template (0 when there is no blob)


def _as_float_image(image: Any) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {arr.shape}")
    if arr.dtype == np.uint8:
        return arr.astype(np.float64) / 255.0
    return np.clip(arr.astype(np.float64), 0.0, 1.0)


def name_colour(rgb: Sequence[float]) -> str:
    """The palette colour nearest in hue to ``rgb`` (floats in [0, 1]), or ``unknown`` if it is grey or dark."""
    h, s, v = colorsys.rgb_to_hsv(*(float(c) for c in rgb))
    if s < MIN_SATURATION or v < MIN_VALUE:
        return UNKNOWN
    return min(_HUES, key=lambda name: min(abs(h - _HUES[name]), 1 - abs(h - _HUES[name])))


def name_background(rgb: Sequence[float]) -> str:
    """The nearest of the world's background colours."""
    arr = np.asarray(rgb, dtype=np.float64)
    return min(BACKGROUNDS, key=lambda name: float(np.linalg.norm(arr - np.array(BACKGROUNDS[name]))))


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    h, w = mask.shape
    best_label, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        stack, size = [(int(y0), int(x0))], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        if size > best_size:
            best_label, best_size = label, size
    return labels == best_label if best_label else np.zeros_like(mask)


def read_image(image: Any) -> Reading:
    """Colour, shape and background of one image (PIL image, or array [H, W, 3] of uint8 or floats in [0, 1])."""
    img = _as_float_image(image)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    bg = np.median(border, axis=0)
    background = name_background(bg)
    dist = np.linalg.norm(img - bg, axis=2)
    strong = dist > STRONG_DIFFERENCE
    if strong.sum() < MIN_PIXELS:
        return Reading(UNKNOWN, UNKNOWN, background, 0.0)
    fg = np.median(img[strong], axis=0)
    mask = dist > 0.5 * float(np.linalg.norm(fg - bg))
    blob = _largest_blob(mask)
    fg = np.median(img[blob & strong], axis=0) if (blob & strong).any() else fg
    if (
        float(np.median(np.linalg.norm(img[blob] - fg, axis=1))) > MAX_SPREAD
    ):  # many colours: noise, not a shape
        return Reading(UNKNOWN, UNKNOWN, background, 0.0)
    colour = name_colour(fg)
    if blob.sum() < MIN_PIXELS or blob.sum() < MIN_BLOB_SHARE * mask.sum():
        return Reading(colour, UNKNOWN, background, 0.0)
    ys, xs = np.nonzero(blob)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))
    best, best_iou = UNKNOWN, 0.0
    for shape in SHAPES:
        template = coverage(shape, box, img.shape[0]) >= 0.5
        if template.shape != blob.shape:  # non-square image: templates are square
            template = np.resize(template, blob.shape)
        iou = float((template & blob).sum() / max(1, (template | blob).sum()))
        if iou > best_iou:
            best, best_iou = shape, iou
    return Reading(colour, best if best_iou >= MIN_IOU else UNKNOWN, background, best_iou)


def classify_colour(image: Any) -> str:
    """The foreground colour's name (a key of ``COLOURS``) or ``unknown``."""
    return read_image(image).colour


def classify_shape(image: Any) -> str:
    """The shape's name (one of ``SHAPES``) or ``unknown``."""
    return read_image(image).shape


_WORD = re.compile(r"[a-z]+")


def parse_prompt(prompt: str) -> dict[str, str | None]:
    """The colour, shape and background a prompt asks for (``None`` where it names none).

    "a red circle on a white background" → red, circle, white. A colour word right before ``background`` names the
    background; the first other colour word names the shape's colour; the first shape word names the shape.
    """
    words = _WORD.findall(prompt.lower())
    colour = shape = background = None
    for i, word in enumerate(words):
        follows = words[i + 1] if i + 1 < len(words) else ""
        if word in BACKGROUNDS and follows == "background":
            background = background or word
        elif word in COLOURS and colour is None:
            colour = word
        elif word in SHAPES and shape is None:
            shape = word
    return {"colour": colour, "shape": shape, "background": background}


def score_images(images: Sequence[Any], prompts: Sequence[str] | str) -> dict[str, Any]:
    """Per-attribute accuracy of ``images`` against the ``prompts`` they were made from.

    ``prompts`` is one prompt per image, or one prompt for all. Returns ``colour``, ``shape`` and ``background``
    accuracies (a float in [0, 1], or ``None`` when no prompt names that attribute), ``n_colour`` / ``n_shape`` /
    ``n_background`` (how many images were judged on each), ``n`` and ``readings`` (one dict per image: what was
    asked, what was seen).
    """
    if isinstance(prompts, str):
        prompts = [prompts] * len(images)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    hits: dict[str, list[bool]] = {"colour": [], "shape": [], "background": []}
    readings = []
    for image, prompt in zip(images, prompts, strict=True):
        asked = parse_prompt(prompt)
        seen = read_image(image)
        got = {"colour": seen.colour, "shape": seen.shape, "background": seen.background}
        for key, want in asked.items():
            if want is not None:
                hits[key].append(got[key] == want)
        readings.append(
            {"prompt": prompt, "asked": asked, "seen": got, "shape_iou": round(seen.shape_iou, 3)}
        )
    result: dict[str, Any] = {"n": len(images), "readings": readings}
    for key, values in hits.items():
        result[key] = (sum(values) / len(values)) if values else None
        result[f"n_{key}"] = len(values)
    return result
