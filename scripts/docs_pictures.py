"""The pictures in docs/ (`make pictures`): made with lorax's own commands from the shipped shapes model.

    python scripts/docs_pictures.py [--out docs/img] [--work docs-pictures-work]

Every command is the worked example its doc page shows (docs/generate.md, docs/prepare.md, docs/score.md,
docs/train.md), with fixed seeds, so a rerun draws the same pictures. CPU only: the LoRAs of the sweep and the X/Y
plot are closed-form concept edits (``lorax.gen.concept``, no training); one short ``lorax train`` run gives the loss
plot and the validation-samples sheet, another (docs/score.md's worked example, 150 steps at batch 4: the longest
part, 38 minutes on two cores shared with six other jobs) the LoRA that ``lorax score --sweep`` sweeps.

Writes into --out: generate-sweep.png, generate-xy.png, generate-inpaint.png, prepare.png, score-sweep.png,
train-loss.png, train-samples.png.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLUE = "a blue circle on a white background"
PURPLE = "a sks purple circle"
SCORE_STEPS = 150


def lorax(*args: str | Path) -> str:
    """Run ``lorax ARGS`` (this checkout's, through ``python -m lorax``); its stdout."""
    command = [sys.executable, "-m", "lorax", *map(str, args)]
    print("$ lorax " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    return subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True, cwd=ROOT).stdout


def concept(source: str, target: str, out: Path) -> Path:
    if not out.exists():
        subprocess.run(
            [sys.executable, "-m", "lorax.gen.concept", "shapes", source, target, "-o", str(out)],
            check=True,
            cwd=ROOT,
        )
    return out


def last_path(stdout: str, suffix: str) -> Path:
    return Path(next(line for line in reversed(stdout.split()) if line.endswith(suffix)))


def inpaint_sheet(work: Path, out: Path) -> None:
    """docs/generate.md's inpainting example: init image, mask (right half white), two inpainted seeds, side by side."""
    import numpy as np
    from PIL import Image, ImageDraw

    from lorax.zoo.shapes.world import Scene, render

    folder = work / "inpaint"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render(Scene("circle", "red", "white", 14, 2, 9))).save(folder / "init.png")
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    made = lorax(
        "generate", "a blue square on a white background", "--model", "shapes", "--init-image", folder / "init.png",
        "--mask-image", folder / "mask.png", "--strength", "1", "-n", "2", "--seed", "0", "-o", folder / "out",
        "--force",
    )  # fmt: skip
    cells = [(folder / "init.png", "--init-image"), (folder / "mask.png", "--mask-image")]
    cells += [(Path(p), f"seed {i}") for i, p in enumerate(made.split())]
    side = 128
    sheet = Image.new("RGB", (len(cells) * (side + 12) + 8, side + 30), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (path, label) in enumerate(cells):
        x = 8 + i * (side + 12)
        draw.text((x, 4), label, fill="black")
        sheet.paste(Image.open(path).convert("RGB").resize((side, side), Image.Resampling.NEAREST), (x, 20))
        draw.rectangle((x - 1, 19, x + side, 20 + side), outline=(160, 160, 160))
    sheet.save(out / "generate-inpaint.png", optimize=True)


def prepare_sheet(work: Path, out: Path) -> None:
    """docs/prepare.md's worked example: four wide (96x64) pictures of purple stars (one also saved again as a
    JPEG, a duplicate), ``lorax prepare --crop subject``, and a sheet: raw picture, prepared image, its mask."""
    from PIL import Image, ImageDraw

    from lorax.zoo.shapes.world import Scene, render

    photos = work / "prepare" / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    scenes = [("black", 18, 6, 30), ("black", 24, 58, 16), ("gray", 40, 36, 20), ("white", 24, 70, 30)]
    for i, (background, size, x, y) in enumerate(scenes):
        pixels = render(Scene("star", "purple", background, size, x, y), 96)[:64]
        Image.fromarray(pixels).save(photos / f"star-{i}.png")
    Image.open(photos / "star-0.png").convert("RGB").save(photos / "star-4.jpg", quality=95)
    data = work / "prepare" / "data"
    lorax(
        "prepare", photos, "-o", data, "--model", "shapes", "--prefix", "a sks star", "--crop", "subject",
        "--force", "-q",
    )  # fmt: skip
    wide, side, gap, top = (200, 128), 128, 8, 20
    columns = [("photos/ (96x64)", wide[0]), ("data/NAME.png", side), ("data/NAME.mask.png", side)]
    width = gap + sum(w + gap for _, w in columns)
    sheet = Image.new("RGB", (width, top + len(scenes) * (side + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    x = gap
    for label, w in columns:
        draw.text((x, 4), label, fill="black")
        x += w + gap
    for row in range(len(scenes)):
        y = top + row * (side + gap)
        cells = [
            photos / f"star-{row}.png",
            data / f"star-{row}.png",
            data / f"star-{row}.mask.png",
        ]
        x = gap
        for (_, w), path in zip(columns, cells, strict=True):
            image = Image.open(path).convert("RGB").resize((w, side), Image.Resampling.NEAREST)
            sheet.paste(image, (x, y))
            x += w + gap
    sheet.save(out / "prepare.png", optimize=True)


def score_sweep(work: Path, out: Path) -> None:
    """docs/score.md's worked example: eight purple circles (a colour the model never learned) prepared, a LoRA
    trained on them (``SCORE_STEPS`` steps, the model's other defaults), and ``lorax score --sweep`` over six scales
    with a tiny random-weight CLIP (``tests/tiny_vision.py``: no real CLIP is downloaded)."""
    folder = work / "score"
    photos, data, lora = folder / "photos", folder / "data", folder / "sks.safetensors"
    if not photos.exists():
        from lorax.zoo.shapes import write_concept_dir

        write_concept_dir(photos, "circle", "purple", 8, seed=0)
        for caption in photos.glob("*.txt"):
            caption.unlink()  # raw pictures: prepare writes the captions
    clip = folder / "clip"
    if not clip.exists():
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_vision import save_tiny_clip

        save_tiny_clip(clip)
    lorax("prepare", photos, "-o", data, "--model", "shapes", "--prefix", PURPLE, "--force", "-q")
    lorax("train", data, "--model", "shapes", "--steps", str(SCORE_STEPS), "-o", lora, "--force", "-q")
    made = lorax(
        "score", "--sweep", lora, "--prompt", PURPLE, "--reference", data, "--clip", clip, "-n", "8",
        "-o", folder / "sweep", "--scales", "0,0.25,0.5,0.75,1,1.25", "--force",
    )  # fmt: skip
    shutil.copyfile(last_path(made, "-alignment.png"), out / "score-sweep.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--work", type=Path, default=ROOT / "docs-pictures-work")
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    work: Path = args.work
    out: Path = args.out
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    # docs/generate.md: a labelled scale sweep (the prompt on top, a column per scale, a row per seed)
    red = concept(BLUE, BLUE.replace("blue", "red"), work / "blue-to-red.safetensors")
    concept(BLUE, BLUE.replace("blue", "green"), work / "blue-to-green.safetensors")
    sweep = lorax(
        "generate", BLUE, "--model", "shapes", "--lora", red, "--sweep-scale", "0,0.25,0.5,0.75,1",
        "-n", "3", "--seed", "1", "-o", work / "sweep", "--force",
    )  # fmt: skip
    shutil.copyfile(last_path(sweep, "-sweep.png"), out / "generate-sweep.png")

    # docs/generate.md: an X/Y plot, LoRA (columns) × scale (rows), LoRA files by name from --lora-dir
    xy = lorax(
        "generate", BLUE, "--model", "shapes", "--lora-dir", work, "--xy", "lora=blue-to-red,blue-to-green",
        "--xy", "scale=0,0.5,1", "--seed", "2", "-o", work / "xy", "--force",
    )  # fmt: skip
    shutil.copyfile(last_path(xy, "-xy.png"), out / "generate-xy.png")

    inpaint_sheet(work, out)

    # docs/prepare.md: raw pictures, their subject crops and masks
    prepare_sheet(work, out)

    # docs/score.md: a LoRA trained on prepared pictures, swept over its scales
    score_sweep(work, out)

    # docs/train.md: a short DreamBooth-LoRA run with a checkpoint and validation samples
    data = work / "sks-circle"
    if not data.exists():
        from lorax.zoo.shapes import write_concept_dir

        write_concept_dir(data, "circle", "purple", 8, caption="a sks circle")
    lorax(
        "train", data, "--model", "shapes", "--instance-prompt", "a sks circle", "--steps", "120", "--seed", "0",
        "--checkpoint-every", "60", "--validation-every", "30", "--sample-steps", "10",
        "--validation-prompt", "a sks circle", "--validation-prompt", "a sks circle on a black background",
        "-o", work / "sks-circle.safetensors", "--force",
    )  # fmt: skip
    shutil.copyfile(work / "sks-circle.loss.png", out / "train-loss.png")
    shutil.copyfile(work / "sks-circle.samples.png", out / "train-samples.png")

    for name in (
        "generate-sweep.png",
        "generate-xy.png",
        "generate-inpaint.png",
        "prepare.png",
        "score-sweep.png",
        "train-loss.png",
        "train-samples.png",
    ):
        size = (out / name).stat().st_size
        print(f"{out / name} ({size / 1e3:.0f} kB)")
        if size > 300_000:
            raise SystemExit(f"{out / name} is over 300 kB")
    print(f"done in {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
