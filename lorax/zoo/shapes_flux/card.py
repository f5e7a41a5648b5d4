"""Figures for the shapes-flux model card: the sample grid and the scores (``python -m lorax.zoo.shapes_flux.card``).

The same grid as the SD shapes model's card (``lorax.zoo.shapes.card``): each base shape in every base colour, then
held-out prompts, drawn by this model's sampler.
"""

from __future__ import annotations

from collections.abc import Sequence

from lorax.zoo.shapes.card import card_main
from lorax.zoo.shapes_flux.pipeline import evaluate, load_shapes_flux_pipeline, sample


def main(argv: Sequence[str] | None = None) -> None:
    description = (__doc__ or "").split("\n")[0]
    card_main(
        argv, description, "docs/img/shapes-flux-samples.png", load_shapes_flux_pipeline, evaluate, sample
    )


if __name__ == "__main__":
    main()
