"""`lorax invert` and `lorax pivot` use the NAME.mask.png loss masks that `lorax prepare` writes beside the images,
without --mask-dir (issue 18); --ignore-masks opts out; some images with and some without is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _concept(folder: Path, masks: int) -> Path:
    from lorax.zoo.shapes import write_concept_dir

    write_concept_dir(folder, "star", "purple", 3, seed=2, caption="a sks star")
    images = sorted(p for p in folder.glob("*.png"))
    for i, image in enumerate(images[:masks]):
        Image.new("L", (32, 32), 200 + i).save(image.with_name(image.stem + ".mask.png"))
    return folder


def test_masks_beside_all_none_or_some(tmp_path):
    from lorax.data.images import load_image_folder
    from lorax.errors import InputError
    from lorax.training.masks import masks_beside_every as masks_beside

    full = _concept(tmp_path / "full", 3)
    items = load_image_folder(full, instance_prompt="x")
    assert len(items) == 3  # the masks are not training images
    assert masks_beside(items) == [it.path.with_name(it.path.stem + ".mask.png") for it in items]
    assert masks_beside(load_image_folder(_concept(tmp_path / "none", 0), instance_prompt="x")) is None
    some = load_image_folder(_concept(tmp_path / "some", 2), instance_prompt="x")
    with pytest.raises(InputError, match=r"2 images have a NAME\.mask\.png .* 1 have none .*--ignore-masks"):
        masks_beside(some)


def _invert(cli, data: Path, out: Path, *extra: str):
    return cli(
        "invert", data, "--model", "shapes", "--token", "<s1>", "--token-at-data", "sks|<s1>",
        "--steps", "1", "--resolution", "32", "-o", out, "--device", "cpu", *extra,
    )  # fmt: skip


def test_invert_and_pivot_pick_up_masks_beside_the_images(cli, tmp_path, monkeypatch):
    import lorax.training.masks as masks_module

    data = _concept(tmp_path / "data", 3)
    read: list[Path | None] = []
    original = masks_module.load_mask

    def spy(mask_path, *args, **kwargs):
        read.append(mask_path)
        return original(mask_path, *args, **kwargs)

    monkeypatch.setattr(masks_module, "load_mask", spy)
    out = tmp_path / "s1.safetensors"
    result = _invert(cli, data, out)
    assert result.exit_code == 0, result.stderr
    assert read and all(p is not None and p.name.endswith(".mask.png") and p.parent == data for p in read)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["lorax_masks"] == "beside"

    read.clear()
    ignored = tmp_path / "s1-plain.safetensors"
    result = _invert(cli, data, ignored, "--ignore-masks")
    assert result.exit_code == 0, result.stderr
    assert not read  # plain MSE: no mask read
    with safe_open(str(ignored), "pt") as f:
        assert "lorax_masks" not in f.metadata()

    lora = tmp_path / "pivot.safetensors"
    result = cli(
        "pivot", data, "--model", "shapes", "--token", "<s1>", "--token-at-data", "sks|<s1>",
        "--ti-steps", "1", "--steps", "2", "--resolution", "32", "-o", lora, "--device", "cpu", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert read and all(p is not None and p.name.endswith(".mask.png") for p in read)
    with safe_open(str(lora), "pt") as f:
        assert f.metadata()["lorax_masks"] == "beside"
    assert json.loads(result.stdout)


def test_some_masks_beside_is_one_line_error(cli, tmp_path):
    data = _concept(tmp_path / "data", 1)
    out = tmp_path / "s1.safetensors"
    result = _invert(cli, data, out)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "have none" in lines[0] and "--ignore-masks" in lines[0], result.stderr
    assert not out.exists()
