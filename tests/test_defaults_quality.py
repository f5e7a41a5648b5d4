"""Acceptance (slow): with only the shapes model's own defaults (its lorax.json), the plain commands teach a held-out
colour. Each runs the CLI as a user types it and scores 8 generated images with the shapes world's scorers.

Measured on the 2-core CPU (figures in docs/model-card.md): train, purple circles, 8/8 (39 s of training);
invert, orange squares, 6/8 (34 s); pivot, orange squares, 7/8 (64 s).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def images_without_captions(folder: Path, shape: str, colour: str, n: int, seed: int = 0) -> Path:
    from lorax.zoo.shapes import write_concept_dir

    write_concept_dir(folder, shape, colour, n, seed=seed)
    for txt in folder.glob("*.txt"):
        txt.unlink()
    return folder


def share(folder: Path, colour: str, shape: str) -> float:
    from lorax.zoo.shapes import classify_colour, classify_shape

    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
    assert len(images) == 8
    return sum(classify_colour(i) == colour and classify_shape(i) == shape for i in images) / len(images)


def generate(cli, tmp_path: Path, prompt: str, *extra: str) -> Path:
    out = tmp_path / "generated"
    result = cli("generate", prompt, "--model", "shapes", *extra, "-n", "8", "--seed", "1", "-o", out)
    assert result.exit_code == 0, result.stderr
    return out


def test_train_with_the_models_defaults_teaches_purple(cli, tmp_path):
    images = images_without_captions(tmp_path / "images", "circle", "purple", 8)
    base = share(generate(cli, tmp_path / "base", "a sks circle"), "purple", "circle")
    lora = tmp_path / "sks.safetensors"
    result = cli("train", images, "--model", "shapes", "--instance-prompt", "a sks circle", "-o", lora)
    assert result.exit_code == 0, result.stderr
    after = share(generate(cli, tmp_path, "a sks circle", "--lora", str(lora)), "purple", "circle")
    print(f"train: purple circles {base:.2f} → {after:.2f}")
    assert base <= 0.125 and after >= 0.7


@pytest.mark.parametrize("command", ["invert", "pivot"])
def test_invert_and_pivot_with_the_models_defaults_teach_orange(cli, tmp_path, command):
    images = images_without_captions(tmp_path / "images", "square", "orange", 16, seed=3)
    out = tmp_path / ("s1.pt" if command == "invert" else "s1.safetensors")
    result = cli(
        command,
        images,
        "--model",
        "shapes",
        "--token",
        "<s1>",
        "--instance-prompt",
        "a <s1> square",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.stderr
    use = ["--embedding", str(out)] if command == "invert" else ["--lora", str(out)]
    after = share(generate(cli, tmp_path, "a <s1> square", *use), "orange", "square")
    print(f"{command}: orange squares {after:.2f}")
    assert after >= 0.7
