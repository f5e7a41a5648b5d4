"""lorax.data: image folders, captions, crops, buckets, the deterministic batch plan, class-image caching."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorax.data.buckets import make_buckets, nearest_bucket
from lorax.data.captions import augment_caption
from lorax.data.dataset import DataOptions, ImageKey, TrainData
from lorax.data.images import load_image_folder
from lorax.data.prior import class_cache_dir, ensure_class_images
from lorax.data.templates import OBJECT_TEMPLATES, STYLE_TEMPLATES, template_prompt
from lorax.data.transforms import load_training_image
from lorax.errors import InputError


def _image(path: Path, w: int, h: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(path)
    return path


def test_captions_from_txt_metadata_and_instance_prompt(tmp_path):
    _image(tmp_path / "a.png", 8, 8)
    _image(tmp_path / "b.jpg", 8, 8)
    _image(tmp_path / "c.png", 8, 8)
    (tmp_path / "a.txt").write_text("a red circle\n")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "b.jpg", "text": "a blue square"}) + "\n"
    )
    items = load_image_folder(tmp_path, instance_prompt="a sks star")
    assert [(i.path.name, i.caption) for i in items] == [
        ("a.png", "a red circle"),
        ("b.jpg", "a blue square"),
        ("c.png", "a sks star"),
    ]
    with pytest.raises(InputError, match=r"c\.png.*--instance-prompt"):
        load_image_folder(tmp_path)


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        load_image_folder(tmp_path / "missing", instance_prompt="x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        load_image_folder(tmp_path / "empty", instance_prompt="x")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(InputError, match="none of the 1 images"):
        load_image_folder(bad, instance_prompt="x")


def test_unreadable_images_skipped_or_strict(tmp_path):
    _image(tmp_path / "good.png", 8, 8)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    warnings: list[str] = []
    items = load_image_folder(tmp_path, instance_prompt="x", warn=warnings.append)
    assert [i.path.name for i in items] == ["good.png"]
    assert len(warnings) == 1 and "broken.jpg" in warnings[0]
    with pytest.raises(InputError, match=r"broken\.jpg.*--strict"):
        load_image_folder(tmp_path, instance_prompt="x", strict=True)


def test_caption_shuffle_keeps_leading_tags_and_dropout_rate():
    rng = random.Random(0)
    caption = "sks, red, star, white background, centred"
    seen = set()
    for _ in range(50):
        out = augment_caption(caption, rng, shuffle=True, keep_tokens=1)
        tags = out.split(", ")
        assert tags[0] == "sks" and sorted(tags) == sorted(caption.split(", "))
        seen.add(out)
    assert len(seen) > 5
    dropped = sum(augment_caption("a b", rng, dropout=0.3) == "" for _ in range(2000))
    assert abs(dropped / 2000 - 0.3) < 0.04


def test_templates_fill_the_token():
    assert len(OBJECT_TEMPLATES) == 27 and len(STYLE_TEMPLATES) == 19
    prompt = template_prompt("object", "sks star", random.Random(1))
    assert "sks star" in prompt and prompt.replace("sks star", "{}") in OBJECT_TEMPLATES


def test_resize_and_crop_against_hand_computation(tmp_path):
    # 40×20 image whose left half is black and right half white: covering 16×16 scales by 0.8 → 32×16,
    # a centre crop keeps x ∈ [8, 24) of the resized image: left 8 columns black, right 8 white.
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, 20:] = 255
    Image.fromarray(arr).save(tmp_path / "half.png")
    t = load_training_image(
        tmp_path / "half.png", (16, 16), random_crop=False, flip=False, rng=random.Random(0)
    )
    assert tuple(t.shape) == (3, 16, 16)
    assert t.min() >= -1 and t.max() <= 1
    assert float(t[:, :, :7].mean()) == pytest.approx(-1.0, abs=0.02)
    assert float(t[:, :, 9:].mean()) == pytest.approx(1.0, abs=0.02)
    flipped = load_training_image(
        tmp_path / "half.png", (16, 16), random_crop=False, flip=True, rng=random.Random(0)
    )
    assert np.allclose(flipped.numpy(), t.flip(-1).numpy())
    crops = {
        tuple(
            load_training_image(
                tmp_path / "half.png", (16, 16), random_crop=True, flip=False, rng=random.Random(s)
            )[0, 0, :].tolist()
        )
        for s in range(10)
    }
    assert len(crops) > 1


def test_buckets_area_and_nearest():
    buckets = make_buckets(512)
    assert (512, 512) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and min(w, h) >= 256
    assert nearest_bucket((1000, 1000), buckets) == (512, 512)
    w, h = nearest_bucket((1600, 900), buckets)
    assert w > h and abs(math.log(w / h) - math.log(16 / 9)) < 0.1
    w, h = nearest_bucket((600, 1200), buckets)
    assert h > w


def _data(tmp_path: Path, n: int = 5, **options) -> TrainData:
    for i in range(n):
        _image(tmp_path / f"{i}.png", 24 + 8 * (i % 2) * 4, 24, seed=i)
    items = load_image_folder(tmp_path, instance_prompt="a sks star")
    return TrainData(items, DataOptions(resolution=16, seed=3, **options))


def test_plan_is_deterministic_covers_every_example_and_shards(tmp_path):
    data = _data(tmp_path, flip=True, repeats=2, batch_size=2, buckets=True)
    assert len(data) == 10
    plan = data.epoch_plan(0)
    assert plan == data.epoch_plan(0) and plan != data.epoch_plan(1)
    assert sorted(i for b in plan for i in b) == list(range(10))
    for batch in plan:  # one bucket per batch
        assert len({data.item_bucket[i % 5] for i in batch}) == 1
    a = data.batch(0, plan[0])
    b = data.batch(0, plan[0])
    assert a.captions == b.captions and a.keys == b.keys
    assert np.array_equal(a.pixels.numpy(), b.pixels.numpy())
    shards = [
        TrainData(data.items, data.options, process_index=p, num_processes=2).epoch_plan(0) for p in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == len(plan) // 2
    assert not {tuple(b) for b in shards[0]} & {tuple(b) for b in shards[1]}


def test_class_examples_pair_with_instance_batches(tmp_path):
    (tmp_path / "inst").mkdir()
    (tmp_path / "cls").mkdir()
    data = _data(tmp_path / "inst", n=3)
    for i in range(2):
        _image(tmp_path / "cls" / f"{i}.png", 16, 16, seed=10 + i)
    cls = load_image_folder(tmp_path / "cls", instance_prompt="a star")
    both = TrainData(
        data.items, DataOptions(resolution=16, batch_size=2), class_items=cls, class_prompt="a star"
    )
    batch = both.batch(0, both.epoch_plan(0)[0])
    assert batch.num_instance == 2 and batch.pixels.shape[0] == 4
    assert batch.captions[2:] == ["a star", "a star"]
    assert [k.source for k in batch.keys] == ["instance", "instance", "class", "class"]
    keys = both.all_keys()
    assert ImageKey("class", 1, False, (16, 16)) in keys and len(keys) == 5


def test_class_images_generated_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAX_CACHE", str(tmp_path / "cache"))
    folder = class_cache_dir("shapes", "a star", 32, 10, 7.5)
    assert folder.is_relative_to(tmp_path / "cache")
    assert folder != class_cache_dir("shapes", "a circle", 32, 10, 7.5)
    calls: list[int] = []

    def generate(i: int) -> Image.Image:
        calls.append(i)
        return Image.new("RGB", (8, 8), (i, 0, 0))

    assert ensure_class_images(folder, 3, generate) == 3
    assert ensure_class_images(folder, 3, generate) == 0
    assert ensure_class_images(folder, 4, generate) == 1
    assert calls == [0, 1, 2, 3]
    assert len(list(folder.glob("*.png"))) == 4 and not list(folder.glob(".*"))
