"""The loss curve beside the output: a CSV (step, loss, smoothed loss, lr) and a PNG drawn with Pillow."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Exponential moving average, bias-corrected (so the first values are not pulled toward 0)."""
    out: list[float] = []
    avg = 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def loss_csv(losses: Sequence[Sequence[float]]) -> str:
    smoothed = smooth([row[1] for row in losses])
    lines = ["step,loss,smoothed_loss,lr"]
    lines += [f"{int(r[0])},{r[1]:.6g},{s:.6g},{r[2]:.6g}" for r, s in zip(losses, smoothed, strict=True)]
    return "\n".join(lines) + "\n"


def write_loss_png(losses: Sequence[Sequence[float]], path: Path, *, title: str = "training loss") -> None:
    """A 640×400 line chart: raw loss (light) and smoothed loss (dark) against the step."""
    from PIL import Image, ImageDraw

    width, height, margin = 640, 400, 48
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((margin, 12), title, fill="black")
    if losses:
        steps = [r[0] for r in losses]
        raw = [r[1] for r in losses]
        smoothed = smooth(raw)
        lo, hi = min(raw), max(raw)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        s0, s1 = min(steps), max(steps)
        span = max(1.0, s1 - s0)

        def xy(step: float, value: float) -> tuple[float, float]:
            x = margin + (step - s0) / span * (width - 2 * margin)
            y = height - margin - (value - lo) / (hi - lo) * (height - 2 * margin)
            return x, y

        draw.rectangle((margin, margin, width - margin, height - margin), outline="gray")
        for series, colour in ((raw, (170, 190, 230)), (smoothed, (20, 60, 160))):
            points = [xy(s, v) for s, v in zip(steps, series, strict=True)]
            if len(points) > 1:
                draw.line(points, fill=colour, width=2)
            else:
                x, y = points[0]
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((4, margin - 6), f"{hi:.4g}", fill="black")
        draw.text((4, height - margin - 6), f"{lo:.4g}", fill="black")
        draw.text((margin, height - margin + 6), f"step {int(s0)}", fill="black")
        draw.text((width - margin - 60, height - margin + 6), f"step {int(s1)}", fill="black")
    img.save(path, format="PNG")
