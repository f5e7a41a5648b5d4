"""Pictures people look at (issue 14 item 4): labelled X/Y sheets, ``generate --xy``, labelled sweeps, the loss plot
and the validation-samples sheet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorax.gen.grid import font, make_grid, wrap, xy_grid


def ink(sheet: Image.Image, box: tuple[int, int, int, int]) -> int:
    """Dark pixels (text) inside ``box`` = (left, top, right, bottom)."""
    a = np.asarray(sheet.convert("L").crop(box))
    return int((a < 128).sum())


def cells(rows: int, cols: int, size: int = 32) -> list[list[Image.Image]]:
    return [
        [Image.new("RGB", (size, size), (200, 40 + 50 * r, 40 + 40 * c)) for c in range(cols)]
        for r in range(rows)
    ]


def test_xy_grid_places_cells_and_labels_like_a1111() -> None:
    grid = cells(2, 3)
    sheet = xy_grid(grid, col_labels=["x0", "x1", "x2"], row_labels=["y0", "y1"], title="a prompt", gap=4)
    # 32-pixel cells are scaled 4× (to ≥ 128) by a whole factor; find them by their exact colours
    a = np.asarray(sheet)
    for r in range(2):
        for c in range(3):
            colour = grid[r][c].getpixel((0, 0))
            ys, xs = np.nonzero((a == colour).all(axis=-1))
            assert xs.max() - xs.min() + 1 == 128 and ys.max() - ys.min() + 1 == 128
            if c:  # columns left to right, rows top to bottom, one gap apart
                prev = np.nonzero((a == grid[r][c - 1].getpixel((0, 0))).all(axis=-1))[1]
                assert xs.min() == prev.max() + 1 + 4
    ys, xs = np.nonzero((a == grid[0][0].getpixel((0, 0))).all(axis=-1))
    top, left = int(ys.min()), int(xs.min())
    # text above each column (in its own span), at the left of each row, and the title above that
    for c in range(3):
        x = left + c * 132
        assert ink(sheet, (x, top - 20, x + 128, top)) > 10
    for r in range(2):
        y = top + r * 132
        assert ink(sheet, (0, y, left, y + 128)) > 10
    assert ink(sheet, (0, 0, sheet.width, 12)) > 10
    plain = xy_grid(grid, col_labels=["x0", "x1", "x2"])  # no row labels, no title: no left column, less height
    assert plain.width < sheet.width and plain.height < sheet.height


def test_long_labels_wrap_within_their_cell() -> None:
    fnt = font(16)
    lines = wrap("a red circle on a white background with a long tail", fnt, 100)
    assert len(lines) > 2
    assert all(fnt.getbbox(line)[2] - fnt.getbbox(line)[0] <= 100 for line in lines)
    assert " ".join(lines) == "a red circle on a white background with a long tail"
    cut = wrap("x" * 80, fnt, 60)  # one word wider than the cell is cut, nothing lost
    assert "".join(cut) == "x" * 80 and len(cut) > 1
    short = xy_grid(cells(1, 2), col_labels=["a", "b"])
    long = xy_grid(cells(1, 2), col_labels=["a", "a label long enough to need three lines or more"])
    assert long.width == short.width and long.height > short.height + 20


def test_small_cells_are_scaled_by_a_whole_factor_and_big_ones_kept() -> None:
    small = xy_grid(cells(1, 1, 20), col_labels=["s"], min_cell=128)
    a = np.asarray(small)
    ys, xs = np.nonzero((a == (200, 40, 40)).all(axis=-1))
    assert xs.max() - xs.min() + 1 == 140  # 20 × 7 ≥ 128
    big = xy_grid(cells(1, 1, 200), col_labels=["b"], min_cell=128)
    ys, xs = np.nonzero((np.asarray(big) == (200, 40, 40)).all(axis=-1))
    assert xs.max() - xs.min() + 1 == 200


def test_bad_grids_are_refused() -> None:
    with pytest.raises(ValueError):
        xy_grid([], col_labels=[])
    with pytest.raises(ValueError, match="one image per column"):
        xy_grid(cells(2, 2), col_labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="row label"):
        xy_grid(cells(2, 2), col_labels=["a", "b"], row_labels=["only one"])
    mixed = cells(1, 2)
    mixed[0][1] = Image.new("RGB", (16, 16))
    with pytest.raises(ValueError, match="same size"):
        xy_grid(mixed, col_labels=["a", "b"])
    assert make_grid([Image.new("RGB", (16, 16))] * 4, 2).size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)
