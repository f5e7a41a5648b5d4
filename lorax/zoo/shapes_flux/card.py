"""Figures for the shapes-flux model card: the sample grid and the scores (``python -m lorax.zoo.shapes_flux.card``).

The same grid as the SD shapes model's card (``lorax.zoo.shapes.card``): each base shape in every base colour, then
held-out prompts, drawn by this model's sampler.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from lorax.zoo.shapes.card import grid_prompts, sample_grid
from lorax.zoo.shapes_flux.pipeline import evaluate, load_shapes_flux_pipeline, sample


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="diffusers folder (default: the packaged model)"
    )
    parser.add_argument("--png", type=Path, default=Path("docs/img/shapes-flux-samples.png"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from PIL import Image

    pipe = load_shapes_flux_pipeline(args.model)
    args.png.parent.mkdir(parents=True, exist_ok=True)
    grid = sample_grid(pipe, grid_prompts(), seed=args.seed, sampler=sample)
    Image.fromarray(grid).save(args.png, optimize=True)
    print(json.dumps(evaluate(pipe, seed=args.seed), indent=2))


if __name__ == "__main__":
    main()
