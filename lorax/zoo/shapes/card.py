"""Figures for the model card: a PNG grid of samples and the scores (``python -m lorax.zoo.shapes.card``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorax.zoo.shapes.pipeline import evaluate, load_shapes_pipeline, sample
from lorax.zoo.shapes.world import BACKGROUNDS, BASE_COLOURS, BASE_SHAPES, caption


def grid_prompts() -> list[list[str]]:
    """Rows of the sample grid: each base shape in every base colour (backgrounds in turn), then held-out prompts."""
    backgrounds = list(BACKGROUNDS)
    rows = [
        [
            caption(shape, colour, backgrounds[(i + j) % len(backgrounds)])
            for j, colour in enumerate(BASE_COLOURS)
        ]
        for i, shape in enumerate(BASE_SHAPES)
    ]
    rows.append(
        [
            caption("star", "red", "white"),
            caption("heart", "blue", "gray"),
            caption("circle", "purple", "white"),
            caption("square", "orange", "black"),
            caption("star", "purple", "gray"),
        ]
    )
    return rows


def sample_grid(
    pipe: object,
    rows: Sequence[Sequence[str]],
    seed: int = 0,
    scale: int = 3,
    sampler: Callable[..., list[np.ndarray]] = sample,
) -> np.ndarray:
    """One image per prompt, laid out in rows (1-pixel gaps), upscaled ``scale``× by pixel repetition.

    ``sampler(pipe, prompts, seed=)`` makes the images (default: this SD model's ``sample``)."""
    flat = [p for row in rows for p in row]
    images = sampler(pipe, flat, seed=seed)
    size = images[0].shape[0]
    cols = max(len(r) for r in rows)
    canvas = np.full(((size + 1) * len(rows) - 1, (size + 1) * cols - 1, 3), 255, dtype=np.uint8)
    k = 0
    for r, row in enumerate(rows):
        for c in range(len(row)):
            canvas[r * (size + 1) : r * (size + 1) + size, c * (size + 1) : c * (size + 1) + size] = images[k]
            k += 1
    return canvas.repeat(scale, axis=0).repeat(scale, axis=1)


def card_main(
    argv: Sequence[str] | None,
    description: str,
    png: str,
    load: Callable[[Path | None], Any],
    evaluate: Callable[..., dict],
    sampler: Callable[..., list[np.ndarray]],
) -> None:
    """A model card's figures command: the sample grid written to ``--png`` and the scores printed as JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--model", type=Path, default=None, help="diffusers folder (default: the packaged model)"
    )
    parser.add_argument("--png", type=Path, default=Path(png))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from PIL import Image

    pipe = load(args.model)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    grid = sample_grid(pipe, grid_prompts(), seed=args.seed, sampler=sampler)
    Image.fromarray(grid).save(args.png, optimize=True)
    print(json.dumps(evaluate(pipe, seed=args.seed), indent=2))


def main(argv: Sequence[str] | None = None) -> None:
    card_main(argv, __doc__ or "", "docs/img/shapes-samples.png", load_shapes_pipeline, evaluate, sample)


if __name__ == "__main__":
    main()
