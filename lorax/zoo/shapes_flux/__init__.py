"""The built-in ``shapes-flux`` model: the shapes world (``lorax.zoo.shapes``) drawn by a tiny FLUX.1 architecture."""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"

__all__ = ["MODEL_DIR"]
