"""Contact sheets: images in a grid, plain (:func:`make_grid`) or labelled like A1111's X/Y plot (:func:`xy_grid`).

The X/Y layout is AUTOMATIC1111's ``draw_grid_annotations``: one label above each column (the X axis), one at the left
of each row (the Y axis), each wrapped to its cell and centred on it; here an optional title line (the prompt) heads
the sheet. Small images (the built-in models make 32×32 pictures) are scaled up by a whole factor so that labels fit
and pixels stay sharp.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:
    from PIL import Image, ImageFont

# Pillow's default font: scalable since Pillow 10.1, a fixed bitmap before.
Font: TypeAlias = "ImageFont.FreeTypeFont | ImageFont.ImageFont"

_INK = (0, 0, 0)
_BACKGROUND = (255, 255, 255)


def make_grid(
    images: Sequence[Image.Image],
    cols: int,
    *,
    col_labels: Sequence[str] | None = None,
    gap: int = 2,
    background: tuple[int, int, int] = _BACKGROUND,
    min_cell: int = 64,
) -> Image.Image:
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
    factor = upscale_factor(w, min_cell)
    cw, ch = w * factor, h * factor
    label_h = 14 if col_labels else 0
    sheet = Image.new(
        "RGB", (cols * cw + (cols + 1) * gap, label_h + rows * ch + (rows + 1) * gap), background
    )
    draw = ImageDraw.Draw(sheet)
    if col_labels:
        for c, label in enumerate(col_labels[:cols]):
            x = gap + c * (cw + gap)
            draw.text((x + 2, 1), str(label), fill=_INK)
    for i, image in enumerate(images):
        if image.size != (w, h):
            raise ValueError("grid images must all have the same size")
        r, c = divmod(i, cols)
        sheet.paste(_cell(image, factor), (gap + c * (cw + gap), label_h + gap + r * (ch + gap)))
    return sheet


def upscale_factor(width: int, min_cell: int) -> int:
    """The whole factor that makes a ``width``-pixel image at least ``min_cell`` pixels wide (1 if it is already)."""
    return max(1, -(-min_cell // max(1, width)))


def font(size: int) -> Font:
    """Pillow's default font at ``size`` pixels (a scalable font since Pillow 10.1; the fixed bitmap before)."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def wrap(text: str, fnt: Font, width: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels (at spaces; a single long word is cut)."""
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if _width(candidate, fnt) <= width or not line:
                line = candidate
            else:
                lines.append(line)
                line = word
            while _width(line, fnt) > width and len(line) > 1:  # one word wider than the cell: cut it
                cut = len(line) - 1
                while cut > 1 and _width(line[:cut], fnt) > width:
                    cut -= 1
                lines.append(line[:cut])
                line = line[cut:]
        lines.append(line)
    return lines


def _width(text: str, fnt: Font) -> int:
    left, _, right, _ = fnt.getbbox(text)
    return int(right - left)


def _line_height(fnt: Font) -> int:
    _, top, _, bottom = fnt.getbbox("Ag|")
    return int(bottom - top) + 3


def _cell(image: Image.Image, factor: int) -> Image.Image:
    from PIL import Image

    cell = image.convert("RGB")
    if factor > 1:
        cell = cell.resize((cell.width * factor, cell.height * factor), Image.Resampling.NEAREST)
    return cell


def xy_grid(
    cells: Sequence[Sequence[Image.Image]],
    *,
    col_labels: Sequence[str],
    row_labels: Sequence[str] | None = None,
    title: str | None = None,
    min_cell: int = 128,
    gap: int = 4,
    font_size: int | None = None,
    background: tuple[int, int, int] = _BACKGROUND,
) -> Image.Image:
    """An A1111-style X/Y plot: ``cells[row][col]`` (PIL images, all one size) with labelled columns and rows.

    Args:
        cells: the images, one list per row, every row as long as ``col_labels``.
        col_labels: one label per column (the X axis values), drawn above the columns.
        row_labels: one label per row (the Y axis values), drawn at the left; None or empty strings for none.
        title: a line (wrapped) above everything, e.g. the prompt.
        min_cell: cells narrower than this are scaled up by a whole factor (nearest neighbour).
        gap: pixels between cells.
        font_size: text size in pixels (default: from the cell size, as A1111 does, at least 12).
    """
    from PIL import Image, ImageDraw

    rows = [list(row) for row in cells]
    if not rows or not rows[0]:
        raise ValueError("no images to lay out")
    n_cols = len(col_labels)
    if any(len(row) != n_cols for row in rows):
        raise ValueError("every row of the grid needs one image per column label")
    if row_labels is not None and len(row_labels) != len(rows):
        raise ValueError("one row label per row")
    w, h = rows[0][0].size
    if any(image.size != (w, h) for row in rows for image in row):
        raise ValueError("grid images must all have the same size")
    factor = upscale_factor(w, min_cell)
    cw, ch = w * factor, h * factor
    fnt = font(font_size or max(12, min(28, (cw + ch) // 16)))
    line_h = _line_height(fnt)
    pad = max(4, line_h // 3)

    col_lines = [wrap(label, fnt, cw - 2) for label in col_labels]
    top = max((len(lines) for lines in col_lines), default=0) * line_h + pad if any(col_labels) else 0
    has_rows = row_labels is not None and any(row_labels)
    left = 0
    row_lines: list[list[str]] = []
    if has_rows:
        assert row_labels is not None
        # A1111 gives row labels a column as wide as a cell; a narrower one suffices for short labels
        natural = max(_width(label, fnt) for label in row_labels) + 2 * pad
        left = min(natural, max(cw, 3 * line_h))
        row_lines = [wrap(label, fnt, left - 2 * pad) for label in row_labels]
    grid_w = left + n_cols * cw + (n_cols + 1) * gap
    title_lines = wrap(title, fnt, grid_w - 2 * pad) if title else []
    head = len(title_lines) * line_h + pad if title_lines else 0
    sheet = Image.new("RGB", (grid_w, head + top + len(rows) * ch + (len(rows) + 1) * gap), background)
    draw = ImageDraw.Draw(sheet)

    y = pad // 2
    for line in title_lines:
        draw.text((pad, y), line, fill=_INK, font=fnt)
        y += line_h
    x0, y0 = left + gap, head + top + gap
    for c, lines in enumerate(col_lines):  # centred above the column, bottom-aligned on the cells
        x_mid = x0 + c * (cw + gap) + cw // 2
        y = head + top - pad // 2 - len(lines) * line_h
        for line in lines:
            draw.text((x_mid - _width(line, fnt) // 2, y), line, fill=_INK, font=fnt)
            y += line_h
    for r, lines in enumerate(row_lines):  # centred on the row, in the left column
        y = y0 + r * (ch + gap) + (ch - len(lines) * line_h) // 2
        for line in lines:
            draw.text((left - pad - _width(line, fnt), y), line, fill=_INK, font=fnt)
            y += line_h
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            sheet.paste(_cell(image, factor), (x0 + c * (cw + gap), y0 + r * (ch + gap)))
    return sheet
