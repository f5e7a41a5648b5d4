"""Score the demo's generated PNGs with the shapes world's deterministic readers.

python scripts/demo_score.py "a purple circle" DIR [DIR ...]   → one line per folder: colour / shape accuracy
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(target: str, folders: list[str]) -> None:
    from PIL import Image

    from lorax.zoo.shapes import score_images

    for folder in folders:
        paths = sorted(p for p in Path(folder).glob("*.png") if not p.stem.endswith(("-grid", "-sweep")))
        images = [Image.open(p).convert("RGB") for p in paths]
        scores = score_images(images, [target] * len(images))
        print(
            f"{folder}: {len(images)} images, {scores['colour']:.0%} show the colour, {scores['shape']:.0%} the shape"
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
