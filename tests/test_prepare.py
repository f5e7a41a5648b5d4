"""``lorax prepare``: sizes, crops, duplicates, captions (tiny BLIP), masks (border, tiny CLIPSeg, face), the report,
and a prepared folder that ``train`` and ``invert --mask-dir`` read as it is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def shapes_raw(folder: Path, n: int = 6, size: int = 48, seed: int = 1) -> Path:
    from lorax.zoo.shapes.world import render, scenes

    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes(n, seed=seed)):
        Image.fromarray(render(scene, size)).save(folder / f"{i:02d}.png")
    return folder


def test_border_masker_matches_the_shapes_worlds_true_masks():
    """Measured: the offline masker against the world's own coverage (≥ 0.5 = subject), 24 scenes of every shape
    and colour (held-out ones included), at 32 and 64 px."""
    from lorax.data.prepare import border_mask, iou
    from lorax.zoo.shapes.world import COLOURS, SHAPES, coverage, random_scene, render

    rng = np.random.default_rng(7)
    scores = []
    for resolution in (32, 64):
        for _ in range(12):
            scene = random_scene(rng, SHAPES, tuple(COLOURS), resolution=resolution)
            box = (scene.x, scene.y, scene.x + scene.size, scene.y + scene.size)
            true = coverage(scene.shape, box, resolution) >= 0.5
            pixels = render(scene, resolution).astype(np.float32) / 255.0
            scores.append(iou(border_mask(pixels), true))
    mean = float(np.mean(scores))
    print(f"border masker IoU: mean {mean:.3f}, min {min(scores):.3f} over {len(scores)} images")
    assert len(scores) >= 8 and mean >= 0.9


def test_prepare_writes_a_training_folder_with_report(cli, tmp_path):
    raw = shapes_raw(tmp_path / "raw")
    Image.open(raw / "00.png").save(raw / "zz-copy.bmp")  # same pixels, another format
    noisy = np.asarray(Image.open(raw / "01.png")).astype(np.int16)
    noisy = np.clip(noisy + np.random.default_rng(0).integers(-3, 4, noisy.shape), 0, 255).astype(np.uint8)
    Image.fromarray(noisy).save(raw / "zz-noisy.png")  # looks the same
    (raw / "bad.jpg").write_bytes(b"not a jpeg")
    (raw / "02.txt").write_text("a kept caption\n")
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(
        raw / "small.png"
    )  # plain: upscaled, empty mask
    out = tmp_path / "data"
    result = cli("prepare", raw, "-o", out, "--model", "shapes", "--prefix", "a sks shape, ", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    names = sorted(p.name for p in out.iterdir())
    kept = ["00", "01", "02", "03", "04", "05", "small"]
    assert names == sorted(
        [f"{k}.png" for k in kept] + [f"{k}.txt" for k in kept] + [f"{k}.mask.png" for k in kept]
    )
    assert [i["name"] for i in report["images"]] == [f"{k}.png" for k in kept]  # sorted source order
    for k in kept:
        assert Image.open(out / f"{k}.png").size == (32, 32)  # the shapes model's training resolution
        mask = Image.open(out / f"{k}.mask.png")
        assert mask.mode == "L" and mask.size == (32, 32)
    assert (out / "02.txt").read_text() == "a kept caption\n"
    assert (out / "00.txt").read_text() == "a sks shape\n"
    dropped = {d["source"].split("/")[-1]: (d["reason"], d["detail"]) for d in report["dropped"]}
    assert dropped["bad.jpg"][0] == "unreadable"
    assert dropped["zz-copy.bmp"] == ("duplicate", "same pixels as 00.png")
    assert dropped["zz-noisy.png"][0] == "duplicate" and "01.png" in dropped["zz-noisy.png"][1]
    counts = report["counts"]
    assert (
        counts["found"] == 10
        and counts["kept"] == 7
        and counts["unreadable"] == 1
        and counts["duplicates"] == 2
    )
    assert counts["upscaled"] == 1 and counts["captions kept"] == 1
    small = next(i for i in report["images"] if i["name"] == "small.png")
    assert small["upscaled"] and small["mask_coverage"] == 0.0
    assert report["upscaler"] == "lanczos" and small["upscaled_by"] == "lanczos"
    # the upscale is PIL's Lanczos
    want = Image.open(raw / "small.png").convert("RGB").resize((32, 32), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(Image.open(out / "small.png")), np.asarray(want))
    # the written mask is the border masker's, resized as its image
    from lorax.data.prepare import border_mask

    want_mask = border_mask(np.asarray(Image.open(raw / "03.png"), dtype=np.float32) / 255)
    got = np.asarray(Image.open(out / "03.mask.png")) >= 128
    small_mask = Image.fromarray((want_mask * 255).astype(np.uint8)).resize(
        (32, 32), Image.Resampling.BILINEAR
    )
    assert np.mean(got == (np.asarray(small_mask) >= 128)) == 1.0

    again = cli("prepare", raw, "-o", out)
    assert again.exit_code == 1 and "--force" in again.stderr
    forced = cli("prepare", raw, "-o", out, "--force", "--masker", "none", "-q")
    assert forced.exit_code == 0 and forced.stdout.strip() == str(out)
    assert not list(out.glob("*.mask.png")) and not (out / "00.txt").exists()


def _swin2sr_by_hand(model_dir: Path, image: Image.Image, passes: int) -> Image.Image:
    """The model's own output, straight from transformers: processor, forward, crop of the padding, to 8 bits."""
    import torch
    from transformers import AutoImageProcessor, Swin2SRForImageSuperResolution

    processor = AutoImageProcessor.from_pretrained(model_dir)
    model = Swin2SRForImageSuperResolution.from_pretrained(model_dir).eval()
    for _ in range(passes):
        w, h = image.size
        with torch.no_grad():
            out = model(**processor(images=image, return_tensors="pt")).reconstruction[0, :, : 2 * h, : 2 * w]
        image = Image.fromarray(np.round(out.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8))
    return image


def test_upscaler_runs_a_swin2sr_model_on_small_images_only(cli, tmp_path):
    import torch
    from tiny_vision import save_tiny_swin2sr
    from transformers import Swin2SRForImageSuperResolution

    model_dir = save_tiny_swin2sr(tmp_path / "sr", upscale=2)
    raw = shapes_raw(tmp_path / "raw", n=1, size=48)  # 00.png: larger than the target, downscaled
    rng = np.random.default_rng(3)
    for name, side in (("exact", 16), ("twice", 10)):  # 16 → 32 in one pass; 10 → 20 → 40 → Lanczos 32
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(raw / f"{name}.png")
    out = tmp_path / "data"
    result = cli("prepare", raw, "-o", out, "--size", "32", "--upscaler", model_dir, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["upscaler"] == f"swin2sr x2 ({model_dir})"
    assert {i["name"]: i["upscaled_by"] for i in report["images"]} == {
        "00.png": None, "exact.png": "swin2sr x2", "twice.png": "swin2sr x2",
    }  # fmt: skip
    lanczos = {
        n: Image.open(raw / n).convert("RGB").resize((32, 32), Image.Resampling.LANCZOS)
        for n in ("00.png", "exact.png", "twice.png")
    }
    got = {n: np.asarray(Image.open(out / n)) for n in lanczos}
    assert np.array_equal(got["00.png"], np.asarray(lanczos["00.png"]))  # not small: no model
    exact = _swin2sr_by_hand(model_dir, Image.open(raw / "exact.png"), passes=1)
    assert exact.size == (32, 32) and np.array_equal(got["exact.png"], np.asarray(exact))
    twice = _swin2sr_by_hand(model_dir, Image.open(raw / "twice.png"), passes=2)
    assert twice.size == (40, 40)
    assert np.array_equal(got["twice.png"], np.asarray(twice.resize((32, 32), Image.Resampling.LANCZOS)))
    for n in ("exact.png", "twice.png"):
        assert np.abs(got[n].astype(int) - np.asarray(lanczos[n]).astype(int)).mean() > 10

    # weights set by hand: a zero last convolution leaves only the model's mean colour (Swin2SR adds it back)
    model = Swin2SRForImageSuperResolution.from_pretrained(model_dir)
    with torch.no_grad():
        model.upsample.final_convolution.weight.zero_()
        model.upsample.final_convolution.bias.zero_()
    model.save_pretrained(model_dir)
    flat = cli("prepare", raw, "-o", tmp_path / "flat", "--size", "32", "--upscaler", model_dir)
    assert flat.exit_code == 0, flat.stderr
    assert "upscaled by swin2sr x2" in flat.stderr  # the log line
    assert "(upscaled:" in flat.stderr and "swin2sr x2)" in flat.stderr  # the table (rich folds the cell)
    mean = np.round(np.array([0.4488, 0.4371, 0.4040]) * 255)  # Swin2SR's RGB mean (its modeling code)
    for n in ("exact.png", "twice.png"):
        assert (np.asarray(Image.open(tmp_path / "flat" / n)) == mean).all()


def test_upscaler_that_cannot_be_loaded_is_one_line(cli, tmp_path):
    raw = shapes_raw(tmp_path / "raw", n=1, size=16)
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "bert"}')
    for model, expected in [
        (tmp_path / "missing", "cannot be loaded"),
        (other, "is a bert model, not a Swin2SR"),
    ]:
        result = cli("prepare", raw, "-o", tmp_path / "out", "--size", "32", "--upscaler", model)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and lines[-1].startswith("lorax: error:") and expected in lines[-1], (
            result.stderr
        )
    assert not (tmp_path / "out").exists()


def test_dry_run_writes_nothing_and_shows_the_table(cli, tmp_path):
    raw = shapes_raw(tmp_path / "raw", n=2)
    result = cli("prepare", raw, "-o", tmp_path / "data", "--size", "24", "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert not (tmp_path / "data").exists()
    assert "would write" in result.stderr and "00.png" in result.stderr and "24x24" in result.stderr
    assert result.stdout == ""


def test_subject_crop_follows_the_mask_center_crop_does_not(tmp_path):
    from lorax.services.prepare import PrepareConfig, prepare_folder

    raw = tmp_path / "raw"
    raw.mkdir()
    img = np.full((32, 96, 3), 255, np.uint8)
    img[8:24, 76:92] = (230, 20, 20)  # a red square at the far right of a wide picture
    Image.fromarray(img).save(raw / "wide.png")
    for crop in ("center", "subject"):
        out = tmp_path / crop
        prepare_folder(PrepareConfig(raw, out, size=(32, 32), crop=crop))
        red = (np.asarray(Image.open(out / "wide.png"))[..., 1] < 100).sum()
        mask = np.asarray(Image.open(out / "wide.mask.png")) >= 128
        if crop == "center":
            assert red == 0 and not mask.any()
        else:
            assert red == 16 * 16 and mask.sum() == 16 * 16
    out = tmp_path / "none"
    prepare_folder(PrepareConfig(raw, out, size=(32, 32), crop="none"))
    assert Image.open(out / "wide.png").size == (96, 32)
    out = tmp_path / "buckets"
    result = prepare_folder(PrepareConfig(raw, out, size=(64, 64), buckets=True))
    from lorax.data.buckets import make_buckets, nearest_bucket

    assert (
        Image.open(out / "wide.png").size
        == nearest_bucket((96, 32), make_buckets(64))
        == result.images[0].size
    )


def test_bad_flags_are_one_line(cli, tmp_path):
    raw = shapes_raw(tmp_path / "raw", n=1)
    for args, expected in [
        (["--crop", "middle"], "--crop 'middle' is unknown"),
        (["--masker", "clipseg"], "--mask-prompt"),
        (["--crop", "subject", "--masker", "none"], "--crop subject needs a mask"),
        (["--size", "30"], "multiples of 8"),
        (["--captioner", str(tmp_path / "nothing")], "cannot be loaded"),
    ]:
        result = cli("prepare", raw, "-o", tmp_path / "out", *args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and expected in lines[-1] and lines[-1].startswith("lorax: error:"), (
            result.stderr
        )
    assert not (tmp_path / "out").exists()
    result = cli("prepare", tmp_path / "missing", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "does not exist" in result.stderr


def test_find_images_skips_masks_and_mask_dir_reads_them(tmp_path):
    from lorax.data.images import find_images, load_image_folder
    from lorax.training.masks import find_masks

    for name in ("a.png", "a.mask.png", "b.png", "b.mask.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    assert [p.name for p in find_images(tmp_path)] == ["a.png", "b.png"]
    items = load_image_folder(tmp_path, instance_prompt="x")
    assert [m.name for m in find_masks(items, tmp_path)] == ["a.mask.png", "b.mask.png"]
    (tmp_path / "b.mask.png").unlink()  # b.png itself is no mask of b.png
    with pytest.raises(Exception, match=r"no mask for 1 of 2 images \(b\.png\)"):
        find_masks(items, tmp_path)
    other = tmp_path / "masks"
    other.mkdir()
    for name in ("a.png", "b.png"):  # the old convention: same name in another folder
        Image.new("L", (8, 8)).save(other / name)
    assert [m.parent.name + "/" + m.name for m in find_masks(items, other)] == ["masks/a.png", "masks/b.png"]


def test_captions_from_a_tiny_blip_in_order_kept_unless_force(cli, tmp_path):
    from tiny_vision import save_tiny_blip

    from lorax.data.captioner import Captioner

    blip = save_tiny_blip(tmp_path / "blip")
    raw = shapes_raw(tmp_path / "raw", n=3, size=32)
    (raw / "01.txt").write_text("a kept caption\n")
    out = tmp_path / "data"
    result = cli(
        "prepare", raw, "-o", out, "--size", "32", "--captioner", blip, "--prefix", "sks dog, ", "--json"
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    want = Captioner(str(blip)).captions([Image.open(raw / f"{i:02d}.png").convert("RGB") for i in (0, 2)])
    assert (out / "00.txt").read_text() == f"sks dog, {want[0]}\n"
    assert (out / "02.txt").read_text() == f"sks dog, {want[1]}\n"
    assert (out / "01.txt").read_text() == "a kept caption\n"
    assert [i["caption_from"] for i in report["images"]] == ["captioner", "kept", "captioner"]
    forced = cli("prepare", raw, "-o", out, "--size", "32", "--captioner", blip, "--force", "-q")
    assert forced.exit_code == 0, forced.stderr
    again = Captioner(str(blip)).captions([Image.open(raw / "01.png").convert("RGB")])
    assert (out / "01.txt").read_text() == f"{again[0]}\n"


def test_clipseg_masks_from_a_tiny_model(cli, tmp_path):
    import torch
    from tiny_vision import save_tiny_clipseg
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    model_dir = save_tiny_clipseg(tmp_path / "clipseg")
    raw = shapes_raw(tmp_path / "raw", n=2, size=32)
    out = tmp_path / "data"
    args = [
        "--size",
        "32",
        "--masker",
        "clipseg",
        "--mask-model",
        model_dir,
        "--mask-prompt",
        "a dog",
        "--json",
    ]
    result = cli("prepare", raw, "-o", out, *args)
    assert result.exit_code == 0, result.stderr
    assert [i["mask_from"] for i in json.loads(result.stdout)["images"]] == ["clipseg", "clipseg"]
    # by hand: sigmoid of CLIPSeg's logits, resized to the image, divided by the maximum
    processor = CLIPSegProcessor.from_pretrained(model_dir)
    model = CLIPSegForImageSegmentation.from_pretrained(model_dir).eval()
    image = Image.open(raw / "01.png").convert("RGB")
    with torch.no_grad():
        logits = model(**processor(text=["a dog"], images=[image], return_tensors="pt")).logits
    prob = torch.sigmoid(logits.reshape(1, 1, *logits.shape[-2:]))
    prob = torch.nn.functional.interpolate(prob, size=(32, 32), mode="bilinear")[0, 0]
    want = np.round((prob / prob.max()).numpy() * 255)
    got = np.asarray(Image.open(out / "01.mask.png")).astype(np.float64)
    assert got.max() == 255 and np.abs(got - want).max() <= 1


def test_face_masker_fills_its_boxes_and_finds_nothing_in_a_plain_image():
    pytest.importorskip("cv2")
    from lorax.data.maskers import FaceMasker

    masker = FaceMasker()
    plain = Image.new("RGB", (96, 96), (128, 128, 128))
    assert masker.boxes(plain) == [] and masker.masks([plain])[0].max() == 0.0
    mask = masker.mask_from_boxes((100, 100), [(30, 30, 40, 40)])
    assert mask[50, 50] == pytest.approx(1.0) and mask[2, 2] == 0.0 and mask[50, 95] == 0.0


def test_a_prepared_folder_trains_and_inverts_with_its_masks(cli, tmp_path):
    from lorax.zoo.shapes import write_concept_dir

    raw = tmp_path / "raw"
    write_concept_dir(raw, "star", "purple", 4, seed=2, resolution=48)
    for txt in raw.glob("*.txt"):
        txt.unlink()
    data = tmp_path / "data"
    result = cli(
        "prepare", raw, "-o", data, "--model", "shapes", "--prefix", "a sks star", "--crop", "subject"
    )
    assert result.exit_code == 0, result.stderr
    lora = tmp_path / "sks.safetensors"
    result = cli(
        "train", data, "--model", "shapes", "--steps", "2", "--batch-size", "2", "-o", lora, "--json"
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["steps"] == 2 and lora.is_file()
    emb = tmp_path / "s1.pt"
    result = cli(
        "invert", data, "--model", "shapes", "--token", "<s1>", "--token-at-data", "sks|<s1>",
        "--steps", "2", "--mask-dir", data, "-o", emb, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert emb.is_file()
