"""The built-in ``shapes`` model's world: renders, captions, scorers, and the packaged model folder."""

from __future__ import annotations

from pathlib import Path

from lorax.zoo.shapes.scorers import classify_colour, classify_shape, parse_prompt, read_image, score_images
from lorax.zoo.shapes.world import (
    BACKGROUNDS,
    BASE_COLOURS,
    BASE_SHAPES,
    COLOURS,
    HELDOUT_COLOURS,
    HELDOUT_SHAPES,
    RARE_TOKEN,
    RESOLUTION,
    SHAPES,
    Scene,
    caption,
    render,
    vocabulary,
    write_concept_dir,
)

MODEL_DIR = Path(__file__).resolve().parent / "model"

__all__ = [
    "BACKGROUNDS",
    "BASE_COLOURS",
    "BASE_SHAPES",
    "COLOURS",
    "HELDOUT_COLOURS",
    "HELDOUT_SHAPES",
    "MODEL_DIR",
    "RARE_TOKEN",
    "RESOLUTION",
    "SHAPES",
    "Scene",
    "caption",
    "classify_colour",
    "classify_shape",
    "parse_prompt",
    "read_image",
    "render",
    "score_images",
    "vocabulary",
    "write_concept_dir",
]
