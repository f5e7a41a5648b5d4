"""``lorax score``: CLIP alignments equal a hand computation with a tiny CLIP, shapes scores equal the scorers', and
``--sweep`` generates over scales and plots."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    from tiny_vision import save_tiny_clip

    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def _scene_png(path: Path, seed: int, prompt: str | None, model: str = "shapes") -> Path:
    from lorax.gen.params import format_parameters, save_png
    from lorax.zoo.shapes.world import render, scenes

    image = Image.fromarray(render(next(iter(scenes(1, seed=seed)))))
    if prompt is None:
        image.save(path)
    else:
        save_png(image, path, format_parameters(prompt, "", {"Steps": 20, "Seed": seed, "Model": model}))
    return path


def _hand(clip_dir: Path, images: list[Path], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image and text features, straight from transformers."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    pixels = processor(images=[Image.open(p).convert("RGB") for p in images], return_tensors="pt")[
        "pixel_values"
    ]
    tokens = processor(text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    return img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)


def test_score_equals_the_hand_computed_cosines(cli, tmp_path, clip_dir):
    gen = tmp_path / "gen"
    gen.mkdir()
    prompts = ["a red circle on a white background", "a blue square on a black background"]
    paths = [_scene_png(gen / f"{i}.png", i, prompts[i % 2]) for i in range(4)]
    ref = tmp_path / "ref"
    ref.mkdir()
    refs = [_scene_png(ref / f"r{i}.png", 10 + i, None) for i in range(3)]
    result = cli("score", gen, "--reference", ref, "--clip", clip_dir, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    rows = report["images"]
    assert [Path(r["path"]).name for r in rows] == ["0.png", "1.png", "2.png", "3.png"]
    assert [r["prompt"] for r in rows] == [prompts[i % 2] for i in range(4)]  # read from each PNG
    img, txt = _hand(clip_dir, paths, prompts)
    ref_img, _ = _hand(clip_dir, refs, ["x"])
    text = [float(img[i] @ txt[i % 2]) for i in range(4)]
    image = [float((img[i] @ ref_img.T).mean()) for i in range(4)]
    assert [r["text_alignment"] for r in rows] == pytest.approx(text, abs=1e-5)
    assert [r["image_alignment"] for r in rows] == pytest.approx(image, abs=1e-5)
    assert report["mean"]["text_alignment"] == pytest.approx(np.mean(text), abs=1e-5)
    assert report["mean"]["image_alignment"] == pytest.approx(np.mean(image), abs=1e-5)
    assert report["n_reference"] == 3
    # the shapes world's scores, as its scorers give them (the PNGs say Model: shapes)
    from lorax.zoo.shapes import score_images

    want = score_images([Image.open(p).convert("RGB") for p in paths], [prompts[i % 2] for i in range(4)])
    assert report["mean"]["shapes"] == {k: want[k] for k in ("colour", "shape", "background")}
    assert [r["shapes"]["seen"] for r in rows] == [r["seen"] for r in want["readings"]]
    # --prompt wins over the recorded prompts; plain text mode prints the means on stdout
    plain = cli("score", *paths, "--clip", clip_dir, "--prompt", "a dog", "--no-shapes")
    assert plain.exit_code == 0, plain.stderr
    _, dog = _hand(clip_dir, paths, ["a dog"])
    mean = float(np.mean([float(img[i] @ dog[0]) for i in range(4)]))
    assert plain.stdout.strip() == f"n 4  text_alignment {mean:.4f}  image_alignment -"
    assert "mean" in plain.stderr and "a dog" in plain.stderr


def test_images_without_prompt_get_no_text_alignment(cli, tmp_path, clip_dir):
    path = _scene_png(tmp_path / "plain.png", 0, None)
    result = cli("score", path, "--clip", clip_dir, "--json")
    assert result.exit_code == 0, result.stderr
    row = json.loads(result.stdout)["images"][0]
    assert row["prompt"] is None and row["text_alignment"] is None and row["shapes"] is None


def test_bad_input_is_one_line(cli, tmp_path, clip_dir):
    image = _scene_png(tmp_path / "a.png", 0, None)
    for args, expected in [
        ([], "give IMAGES"),
        (["--sweep", tmp_path / "x.safetensors"], "--sweep needs --prompt"),
        ([tmp_path / "missing.png", "--clip", clip_dir], "no such image"),
        ([image, "--clip", tmp_path / "no-clip"], "cannot be loaded"),
    ]:
        result = cli("score", *args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and lines[-1].startswith("lorax: error:") and expected in lines[-1], (
            result.stderr
        )


def test_sweep_generates_scores_and_plots(cli, tmp_path, clip_dir):
    from test_generate import make_lora

    from lorax.formats import save_lora
    from lorax.services.generate import load_model

    lora = tmp_path / "style.safetensors"
    save_lora(make_lora(load_model("shapes"), 3, magnitude=0.5), lora)
    ref = tmp_path / "ref"
    ref.mkdir()
    _scene_png(ref / "r.png", 1, None)
    out = tmp_path / "sweep"
    args = ["--sweep", lora, "--prompt", "a red circle", "--scales", "0,1", "-n", "2"]
    result = cli("score", *args, "--reference", ref, "--clip", clip_dir, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert [p["scale"] for p in report["sweep"]] == [0.0, 1.0]
    assert all(p["summary"]["n"] == 2 and p["summary"]["shapes"] is not None for p in report["sweep"])
    plot = Path(report["plot"])
    assert plot.parent == out and Image.open(plot).size == (640, 400)
    # each scale's point is the mean of scoring that scale's images on their own
    frames = sorted(out.glob("*-s1.png"))
    alone = cli(
        "score", *frames, "--prompt", "a red circle", "--reference", ref, "--clip", clip_dir, "--json"
    )
    mean = json.loads(alone.stdout)["mean"]
    assert report["sweep"][1]["summary"]["text_alignment"] == pytest.approx(mean["text_alignment"], abs=1e-6)
    assert report["sweep"][1]["summary"]["image_alignment"] == pytest.approx(
        mean["image_alignment"], abs=1e-6
    )
    again = cli("score", *args, "--clip", clip_dir, "-o", out)
    assert again.exit_code == 1 and "--force" in again.stderr
