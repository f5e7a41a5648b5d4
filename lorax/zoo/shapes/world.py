"""The shapes world: seeded renders of one coloured shape on a plain background, with captions.

Every image shows one shape (``circle``, ``square``, ``triangle``, ``cross``; held out: ``star``, ``heart``) in one
colour (``red``, ``yellow``, ``green``, ``cyan``, ``blue``; held out: ``orange``, ``purple``) on a plain ``white``,
``black`` or ``gray`` background, at a random size and position. Captions read "a red circle on a white background".

The base model's UNet and text encoder never see a held-out shape or colour. Their words are nevertheless in the
tokenizer (one token each), untrained: an embedding row that no caption ever touched, as a real model has words it
knows but cannot draw. That gives textual inversion an existing row to start from and LoRA / DreamBooth a single
token to attach a concept to; were the words absent, "purple" would split into letters whose trained embeddings
already mean something else. ``sks`` is likewise a rare, untrained token for DreamBooth prompts ("a sks star").
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RESOLUTION = 32

BASE_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
HELDOUT_SHAPES: tuple[str, ...] = ("star", "heart")
SHAPES: tuple[str, ...] = BASE_SHAPES + HELDOUT_SHAPES

# Foreground colours, RGB in [0, 1]. All are saturated, so none can be mistaken for a background.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "yellow": (0.95, 0.85, 0.10),
    "green": (0.10, 0.75, 0.15),
    "cyan": (0.10, 0.80, 0.85),
    "blue": (0.15, 0.25, 0.95),
    "orange": (1.00, 0.50, 0.05),
    "purple": (0.55, 0.15, 0.80),
}
BASE_COLOURS: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue")
HELDOUT_COLOURS: tuple[str, ...] = ("orange", "purple")

BACKGROUNDS: dict[str, tuple[float, float, float]] = {
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "gray": (0.5, 0.5, 0.5),
}

GENERIC_SHAPE = (
    "shape"  # the class noun: "a red shape on a white background", DreamBooth's class prompt "a shape"
)
RARE_TOKEN = "sks"

MIN_SIZE, MAX_SIZE = 12, 24  # side of the shape's bounding box, in pixels at RESOLUTION
_SUPERSAMPLE = 4


def vocabulary() -> list[str]:
    """Every whole word of the world's tokenizer: caption words, held-out words (untrained) and ``sks``."""
    words = [
        "a",
        "an",
        "on",
        "of",
        "the",
        "background",
        GENERIC_SHAPE,
        "photo",
        "picture",
        "drawing",
        "plain",
    ]
    words += list(SHAPES) + list(COLOURS) + list(BACKGROUNDS) + [RARE_TOKEN]
    # Longest first: ``build_tokenizer`` adds each word's merges in turn, and a short word's merge ranked earlier
    # ("r"+"e" from "red") would otherwise split a longer word ("green") that needs a different first merge.
    return sorted(words, key=len, reverse=True)


# ---------------------------------------------------------------------------------------------------------------
# Shapes as polygons filling the box [-1, 1]² (x to the right, y up), so one even-odd test renders all of them.


def _normalise(points: np.ndarray) -> np.ndarray:
    lo, hi = points.min(axis=0), points.max(axis=0)
    return (points - lo) / (hi - lo) * 2.0 - 1.0


def _polygon(shape: str) -> np.ndarray:
    if shape == "circle":
        t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float)
    if shape == "triangle":
        return np.array([[-1, -1], [1, -1], [0, 1]], dtype=float)
    if shape == "cross":
        a = 1 / 3
        return np.array(
            [
                [-a, -1],
                [a, -1],
                [a, -a],
                [1, -a],
                [1, a],
                [a, a],
                [a, 1],
                [-a, 1],
                [-a, a],
                [-1, a],
                [-1, -a],
                [-a, -a],
            ],
            dtype=float,
        )
    if shape == "star":
        k = np.arange(10)
        r = np.where(k % 2 == 0, 1.0, 0.5)
        t = math.pi / 2 + k * math.pi / 5
        return _normalise(np.stack([r * np.cos(t), r * np.sin(t)], axis=1))
    if shape == "heart":
        t = np.linspace(0, 2 * math.pi, 128, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        return _normalise(np.stack([x, y], axis=1))
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


_POLYGONS = {s: _polygon(s) for s in SHAPES}


def _inside(poly: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the points (x, y)."""
    inside = np.zeros(x.shape, dtype=bool)
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    for ax, ay, bx, by in zip(x0, y0, x1, y1, strict=True):
        if ay == by:
            continue
        crosses = (ay > y) != (by > y)
        xi = ax + (y - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (x < xi)
    return inside


def coverage(shape: str, box: tuple[float, float, float, float], resolution: int = RESOLUTION) -> np.ndarray:
    """Fraction of each pixel covered by ``shape`` drawn to fill ``box`` = (left, top, right, bottom) in pixels.

    Returns a float array [resolution, resolution] in [0, 1] (4×4 supersampled, so edges are anti-aliased).
    """
    left, top, right, bottom = box
    n = resolution * _SUPERSAMPLE
    centres = (np.arange(n) + 0.5) / _SUPERSAMPLE
    px, py = np.meshgrid(centres, centres)
    u = (px - left) / (right - left) * 2 - 1
    v = 1 - (py - top) / (bottom - top) * 2  # image rows go down, the polygon's y goes up
    hit = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    hit[hit] = _inside(_POLYGONS[shape], u[hit], v[hit])
    return hit.reshape(resolution, _SUPERSAMPLE, resolution, _SUPERSAMPLE).mean(axis=(1, 3))


# ---------------------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True)
class Scene:
    """One image of the world: what it shows and where."""

    shape: str
    colour: str
    background: str
    size: float  # bounding-box side, pixels
    x: float  # top-left corner of the bounding box, pixels
    y: float
    tint: tuple[float, float, float] = (0.0, 0.0, 0.0)  # small per-image colour jitter

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background)


def caption(shape: str | None, colour: str | None = None, background: str | None = None) -> str:
    """``"a red circle on a white background"``; leave a part out with ``None``."""
    words = ["a"]
    if colour:
        words.append(colour)
    words.append(shape or GENERIC_SHAPE)
    if background:
        words += ["on", "a", background, "background"]
    return " ".join(words)


def random_scene(
    rng: np.random.Generator,
    shapes: Sequence[str] = BASE_SHAPES,
    colours: Sequence[str] = BASE_COLOURS,
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
    resolution: int = RESOLUTION,
) -> Scene:
    """A scene drawn uniformly from the given shapes, colours and backgrounds, at a random size and place."""
    scale = resolution / RESOLUTION
    size = float(rng.uniform(MIN_SIZE, MAX_SIZE)) * scale
    margin = 1.0 * scale
    x = float(rng.uniform(margin, resolution - margin - size))
    y = float(rng.uniform(margin, resolution - margin - size))
    tint = tuple(float(t) for t in rng.uniform(-0.04, 0.04, size=3))
    return Scene(
        shape=str(rng.choice(list(shapes))),
        colour=str(rng.choice(list(colours))),
        background=str(rng.choice(list(backgrounds))),
        size=size,
        x=x,
        y=y,
        tint=(tint[0], tint[1], tint[2]),
    )


def render(scene: Scene, resolution: int = RESOLUTION) -> np.ndarray:
    """The scene as an RGB uint8 array [resolution, resolution, 3]."""
    if scene.colour not in COLOURS:
        raise ValueError(f"unknown colour {scene.colour!r}; known: {', '.join(COLOURS)}")
    if scene.background not in BACKGROUNDS:
        raise ValueError(f"unknown background {scene.background!r}; known: {', '.join(BACKGROUNDS)}")
    cover = coverage(scene.shape, (scene.x, scene.y, scene.x + scene.size, scene.y + scene.size), resolution)
    fg = np.clip(np.array(COLOURS[scene.colour]) + np.array(scene.tint), 0, 1)
    bg = np.array(BACKGROUNDS[scene.background])
    img = cover[..., None] * fg + (1 - cover[..., None]) * bg
    return np.round(img * 255).astype(np.uint8)


def scenes(
    n: int,
    seed: int,
    shapes: Sequence[str] = BASE_SHAPES,
    colours: Sequence[str] = BASE_COLOURS,
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
) -> Iterator[Scene]:
    """``n`` random scenes, deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield random_scene(rng, shapes, colours, backgrounds)


def render_batch(scene_list: Sequence[Scene], resolution: int = RESOLUTION) -> np.ndarray:
    """Renders as uint8 [n, resolution, resolution, 3]."""
    return np.stack([render(s, resolution) for s in scene_list])


def write_concept_dir(
    directory: str | Path,
    shape: str,
    colour: str,
    n: int,
    seed: int = 0,
    caption: str | None = None,
    backgrounds: Sequence[str] = tuple(BACKGROUNDS),
    resolution: int = RESOLUTION,
) -> list[Path]:
    """Write ``n`` training images of one concept (a ``colour`` ``shape``) as PNGs with ``.txt`` captions.

    ``caption`` is written for every image (e.g. ``"a sks star"``); by default each image's own full caption
    ("a purple star on a black background"). Backgrounds, sizes and places vary. Returns the image paths, in order.
    """
    from PIL import Image

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths: list[Path] = []
    for i in range(n):
        scene = random_scene(rng, (shape,), (colour,), backgrounds, resolution)
        path = out / f"{i:04d}.png"
        Image.fromarray(render(scene, resolution)).save(path)
        path.with_suffix(".txt").write_text((caption if caption is not None else scene.caption) + "\n")
        paths.append(path)
    return paths
