"""Contact sheets: images in a grid, optionally with a label above each column."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def make_grid(
    images: Sequence[Any],
    cols: int,
    *,
    col_labels: Sequence[str] | None = None,
    gap: int = 2,
    background: tuple[int, int, int] = (255, 255, 255),
    min_cell: int = 64,
) -> Any:
    """Lay ``images`` (PIL, same size) out row by row, ``cols`` per row.

    Small images are scaled up (nearest neighbour, by a whole factor) so that a cell is at least ``min_cell``
    pixels wide and labels stay readable. With ``col_labels`` a strip of text heads each column.
    """
    from PIL import Image, ImageDraw

    if not images:
        raise ValueError("no images to lay out")
    cols = max(1, min(cols, len(images)))
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    factor = max(1, -(-min_cell // w))
    cw, ch = w * factor, h * factor
    label_h = 14 if col_labels else 0
    sheet = Image.new(
        "RGB", (cols * cw + (cols + 1) * gap, label_h + rows * ch + (rows + 1) * gap), background
    )
    draw = ImageDraw.Draw(sheet)
    if col_labels:
        for c, label in enumerate(col_labels[:cols]):
            x = gap + c * (cw + gap)
            draw.text((x + 2, 1), str(label), fill=(0, 0, 0))
    for i, image in enumerate(images):
        if image.size != (w, h):
            raise ValueError("grid images must all have the same size")
        cell = image.convert("RGB")
        if factor > 1:
            cell = cell.resize((cw, ch), Image.Resampling.NEAREST)
        r, c = divmod(i, cols)
        sheet.paste(cell, (gap + c * (cw + gap), label_h + gap + r * (ch + gap)))
    return sheet
