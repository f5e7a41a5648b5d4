"""The loss curve beside the output (a CSV: step, loss, smoothed loss, lr; and a PNG drawn with Pillow) and the
validation samples over the steps as one labelled sheet.

The PNG reads like a TensorBoard scalar chart: the raw loss faint, its exponential moving average over it, the
learning rate on a second axis at the right, dashed lines at the steps a checkpoint was written and a red one where a
resumed run took over. Diffusion losses are noisy and mostly flat, but one early spike (a bad batch, the first steps)
can be many times the rest; then the loss axis is logarithmic (:func:`wants_log_scale`).
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# A series whose largest value is this many times its median is drawn on a log axis.
LOG_SCALE_RATIO = 20.0


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected (so the first values are not pulled toward 0)."""
    out: list[float] = []
    avg = 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def loss_csv(losses: Sequence[Sequence[float]], val_losses: Sequence[Sequence[float]] | None = None) -> str:
    """The loss CSV; with ``val_losses`` (``[step, loss]``, ``--val-split``) a ``val_loss`` column, empty at the
    steps it was not measured."""
    smoothed = smooth([row[1] for row in losses])
    rows = [f"{int(r[0])},{r[1]:.6g},{s:.6g},{r[2]:.6g}" for r, s in zip(losses, smoothed, strict=True)]
    if not val_losses:
        return "\n".join(["step,loss,smoothed_loss,lr", *rows]) + "\n"
    val = {int(step): value for step, value in val_losses}
    rows = [
        f"{row},{val[int(r[0])]:.6g}" if int(r[0]) in val else row + ","
        for row, r in zip(rows, losses, strict=True)
    ]
    return "\n".join(["step,loss,smoothed_loss,lr,val_loss", *rows]) + "\n"


def wants_log_scale(values: Sequence[float], ratio: float = LOG_SCALE_RATIO) -> bool:
    """A log loss axis when every value is positive and the largest is over ``ratio`` times the median: one outlier
    would otherwise squash the rest of the curve into a flat line at the bottom."""
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 3 or min(finite) <= 0:
        return False
    return max(finite) > ratio * statistics.median(finite)


def checkpoint_steps(paths: Iterable[Path]) -> list[int]:
    """The steps of checkpoint folders (``step-000100`` → 100); other names are skipped."""
    from lorax.training.checkpoint import PREFIX

    steps = set()
    for path in paths:
        digits = Path(path).name.removeprefix(PREFIX)
        if Path(path).name.startswith(PREFIX) and digits.isdigit():
            steps.add(int(digits))
    return sorted(steps)


def run_markers(this_run: Sequence[Path], resumed_from: Path | None, resume_step: int | None) -> list[int]:
    """Checkpoint steps for the plot: this run's, and those of the run it resumed (the resumed checkpoint's siblings
    up to its step: the loss history of both runs is in one curve)."""
    earlier: list[Path] = []
    if resumed_from is not None and resume_step is not None and resumed_from.parent.is_dir():
        earlier = [p for p in resumed_from.parent.iterdir() if p.is_dir()]
        earlier = [
            p
            for p, s in zip(earlier, map(_step_of, earlier), strict=True)
            if s is not None and s <= resume_step
        ]
    return checkpoint_steps([*earlier, *this_run])


def _step_of(path: Path) -> int | None:
    steps = checkpoint_steps([path])
    return steps[0] if steps else None


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 × 10ⁿ apart) covering [lo, hi], about ``count`` of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    return ticks


def log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks on a log axis: every power of ten in [lo, hi], with 2× and 5× between when there are few decades."""
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    decades = last - first
    mantissas = (1,) if decades > 3 else (1, 2, 5)
    ticks = [m * 10.0**e for e in range(first, last + 1) for m in mantissas]
    return [t for t in ticks if lo * (1 - 1e-9) <= t <= hi * (1 + 1e-9)]


def _label(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        mantissa, _, exponent = f"{value:.2e}".partition("e")
        return f"{float(mantissa):g}e{int(exponent)}"
    return f"{value:.4g}"


_RAW = (178, 196, 232)
_SMOOTH = (24, 64, 168)
_LR = (230, 126, 34)
_CHECKPOINT = (120, 120, 120)
_RESUME = (200, 30, 30)
_AXIS = (60, 60, 60)
_GRID = (232, 232, 232)
_VAL = (46, 160, 67)


def write_loss_png(
    losses: Sequence[Sequence[float]],
    path: Path,
    *,
    title: str = "training loss",
    checkpoints: Sequence[int] = (),
    resumed_at: int | None = None,
    log_scale: bool | None = None,
    size: tuple[int, int] = (800, 450),
    val_losses: Sequence[Sequence[float]] | None = None,
) -> None:
    """A line chart of ``losses`` rows ``[step, loss, lr, …]``, written as PNG to ``path``.

    Args:
        checkpoints: steps a checkpoint was written at (dashed grey lines).
        resumed_at: the step a resumed run started from (a red line).
        log_scale: force the loss axis's scale; None decides with :func:`wants_log_scale`.
        val_losses: ``[step, loss]`` rows of the held-out loss (``--val-split``), a second series on the loss axis.
    """
    from PIL import Image, ImageDraw

    from lorax.gen.grid import font

    width, height = size
    left, right, top, bottom = 70, 70, 46, 46
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    text = font(13)
    draw.text((left, 8), title, fill="black", font=font(15))
    x0, x1, y0, y1 = left, width - right, top, height - bottom  # plot box; y grows downwards
    rows = [r for r in losses if len(r) >= 2 and math.isfinite(r[1])]
    if not rows:
        draw.rectangle((x0, y0, x1, y1), outline=_AXIS)
        draw.text((x0 + 10, y0 + 10), "no steps recorded", fill=_AXIS, font=text)
        img.save(path, format="PNG")
        return
    steps = [float(r[0]) for r in rows]
    raw = [float(r[1]) for r in rows]
    lrs = [float(r[2]) for r in rows if len(r) > 2]
    smoothed = smooth(raw)
    val = [(float(r[0]), float(r[1])) for r in val_losses or () if math.isfinite(r[1]) and r[1] > 0]
    both = raw + [v for _, v in val]
    log = wants_log_scale(both) if log_scale is None else bool(log_scale and min(both) > 0)

    s0, s1 = min(steps), max(steps)
    if s1 - s0 < 1:
        s0, s1 = s0 - 0.5, s1 + 0.5
    lo, hi = min(both), max(both)
    if log:
        flo, fhi = math.log10(lo), math.log10(hi)
        pad = max(0.05, (fhi - flo) * 0.04)
        vlo, vhi = flo - pad, fhi + pad
    else:
        span = hi - lo if hi - lo > 1e-12 else max(abs(hi), 1.0) * 0.1
        vlo, vhi = lo - span * 0.05, hi + span * 0.05

    def sx(step: float) -> float:
        return x0 + (step - s0) / (s1 - s0) * (x1 - x0)

    def sy(value: float) -> float:
        v = math.log10(value) if log else value
        return y1 - (v - vlo) / (vhi - vlo) * (y1 - y0)

    # grid lines and loss ticks (left), step ticks (bottom)
    loss_ticks = log_ticks(10**vlo, 10**vhi) if log else nice_ticks(vlo, vhi)
    for tick in loss_ticks:
        y = sy(tick)
        draw.line((x0, y, x1, y), fill=_GRID)
        draw.line((x0 - 4, y, x0, y), fill=_AXIS)
        label = _label(tick)
        draw.text((x0 - 7 - _text_width(draw, label, text), y - 7), label, fill=_AXIS, font=text)
    for tick in nice_ticks(s0, s1, 8):
        if tick != int(tick):
            continue
        x = sx(tick)
        draw.line((x, y1, x, y1 + 4), fill=_AXIS)
        label = f"{int(tick)}"
        draw.text((x - _text_width(draw, label, text) / 2, y1 + 6), label, fill=_AXIS, font=text)
    draw.text((x0 + (x1 - x0) / 2 - 14, height - 18), "step", fill=_AXIS, font=text)
    draw.text((4, y0 - 18), "loss (log)" if log else "loss", fill=_SMOOTH, font=text)

    # checkpoint and resume markers, under the curves
    for step in checkpoints:
        if s0 <= step <= s1:
            _dashed_vline(draw, sx(step), y0, y1, _CHECKPOINT)
    if resumed_at is not None and s0 <= resumed_at <= s1:
        x = sx(resumed_at)
        draw.line((x, y0, x, y1), fill=_RESUME, width=2)
        draw.text((x + 4, y0 + 2), f"resumed at {resumed_at}", fill=_RESUME, font=text)

    # the learning rate on the right axis
    if lrs and len(lrs) == len(steps):
        lr_lo, lr_hi = 0.0, max(lrs)
        if lr_hi <= 0:
            lr_hi = 1.0

        def sl(value: float) -> float:
            return y1 - (value - lr_lo) / (lr_hi - lr_lo) * (y1 - y0) * 0.95

        for tick in nice_ticks(lr_lo, lr_hi, 4):
            y = sl(tick)
            draw.line((x1, y, x1 + 4, y), fill=_LR)
            draw.text((x1 + 7, y - 7), _label(tick), fill=_LR, font=text)
        _polyline(draw, [(sx(s), sl(v)) for s, v in zip(steps, lrs, strict=True)], _LR, 1)
        draw.text((x1 + 7, y0 - 18), "lr", fill=_LR, font=text)

    _polyline(draw, [(sx(s), sy(v)) for s, v in zip(steps, raw, strict=True)], _RAW, 1)
    _polyline(
        draw, [(sx(s), sy(v)) for s, v in zip(steps, smoothed, strict=True) if v > 0 or not log], _SMOOTH, 2
    )
    if val:
        points = [(sx(s), sy(v)) for s, v in val]
        _polyline(draw, points, _VAL, 2)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=_VAL)
    draw.rectangle((x0, y0, x1, y1), outline=_AXIS)

    # legend, top right above the box
    items = [("loss", _RAW), ("smoothed (EMA 0.9)", _SMOOTH), ("lr", _LR)]
    if val:
        items.append(("validation (held out)", _VAL))
    if checkpoints:
        items.append(("checkpoint", _CHECKPOINT))
    x = x1 - 20 - sum(_text_width(draw, name, text) + 30 for name, _ in items)
    for name, colour in items:
        draw.line((x, 30, x + 16, 30), fill=colour, width=3)
        draw.text((x + 20, 23), name, fill=_AXIS, font=text)
        x += _text_width(draw, name, text) + 30
    img.save(path, format="PNG", optimize=True)


def _text_width(draw: object, label: str, fnt: object) -> float:
    left, _, right, _ = draw.textbbox((0, 0), label, font=fnt)  # type: ignore[attr-defined]
    return float(right - left)


def _polyline(
    draw: object, points: list[tuple[float, float]], colour: tuple[int, int, int], width: int
) -> None:
    if len(points) > 1:
        draw.line(points, fill=colour, width=width)  # type: ignore[attr-defined]
    elif points:
        x, y = points[0]
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)  # type: ignore[attr-defined]


def _dashed_vline(draw: object, x: float, y0: float, y1: float, colour: tuple[int, int, int]) -> None:
    y = y0
    while y < y1:
        draw.line((x, y, x, min(y + 5, y1)), fill=colour, width=1)  # type: ignore[attr-defined]
        y += 9


_SAMPLE_NAME = re.compile(r"step-(\d+)-(\d+)\.png")


def sample_files(
    this_run: Sequence[Path], folder: Path | None = None, resume_step: int | None = None
) -> list[Path]:
    """The validation images of a run: this run's, and (resumed) the earlier run's in ``folder`` up to its step."""
    found = {Path(p) for p in this_run}
    if folder is not None and resume_step is not None and folder.is_dir():
        for path in folder.iterdir():
            match = _SAMPLE_NAME.fullmatch(path.name)
            if match and int(match.group(1)) <= resume_step:
                found.add(path)
    return sorted(found)


def write_samples_sheet(samples: Sequence[Path], prompts: Sequence[str], path: Path, *, title: str) -> bool:
    """One labelled sheet of the validation images ``step-NNNNNN-I.png``: a row per validation prompt, a column per
    step (a missing image is left blank). Returns False, writing nothing, when there are no samples."""
    from PIL import Image

    from lorax.gen.grid import xy_grid

    grid: dict[tuple[int, int], Path] = {}
    for sample in samples:
        match = _SAMPLE_NAME.fullmatch(Path(sample).name)
        if match:
            grid[int(match.group(1)), int(match.group(2))] = Path(sample)
    if not grid:
        return False
    steps = sorted({step for step, _ in grid})
    rows = sorted({row for _, row in grid})
    images: dict[tuple[int, int], Any] = {}
    for key, file in grid.items():
        with Image.open(file) as image:
            images[key] = image.convert("RGB")
    size = next(iter(images.values())).size
    blank = Image.new("RGB", size, (255, 255, 255))
    cells = [[images.get((step, row), blank) for step in steps] for row in rows]
    if any(image.size != size for row in cells for image in row):
        cells = [[image.resize(size) for image in row] for row in cells]
    labels = [prompts[row] if row < len(prompts) else f"prompt {row + 1}" for row in rows]
    sheet = xy_grid(cells, col_labels=[f"step {step}" for step in steps], row_labels=labels, title=title)
    sheet.save(path, format="PNG", optimize=True)
    return True
