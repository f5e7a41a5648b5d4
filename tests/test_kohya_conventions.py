"""kohya's dataset conventions (``N_name`` folders, the dataset TOML) and the metadata UIs read from a LoRA.

Oracles: kohya's published rules (``library/config_util.py``: ``10_sks dog`` → 10 repeats, class tokens ``sks dog``;
``train_util.set_tag_frequency``), A1111's hash formulas (``modules/hashes.py``: sha256 of the bytes after the header;
``sd_models.model_hash``: sha256 of 0x10000 bytes at 0x100000, first 8 hex digits) computed here from the file.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from lorax.zoo.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("kohya-model") / "model"
    tiny_pipeline("sd1").save_pretrained(folder)
    return folder


def _images(folder: Path, n: int, seed: int = 0, size: tuple[int, int] = (32, 32)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{i}.png"
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype("uint8")).save(path)
        paths.append(path)
    return paths


@pytest.fixture()
def kohya_tree(tmp_path) -> Path:
    data = tmp_path / "train"
    _images(data / "10_sks dog", 2, seed=1)
    tagged = _images(data / "3_other thing", 1, seed=2)
    tagged[0].with_suffix(".txt").write_text("A Red, circle\nsecond line ignored\n", encoding="utf-8")
    (data / "notes").mkdir()  # no repeat prefix: skipped with a warning, as kohya does
    return data


def _header(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n])["__metadata__"], 8 + n


def test_repeat_folders_are_kohya_repeats_and_captions(kohya_tree):
    from lorax.data.dataset import DataOptions, TrainData
    from lorax.data.training_images import load_training_images

    warnings: list[str] = []
    images = load_training_images(kohya_tree, warn=warnings.append)
    assert any("notes" in w for w in warnings)
    data = TrainData(images.items, DataOptions(resolution=32))
    assert len(data) == 2 * 10 + 1 * 3
    captions = Counter(data.example(0, i)[1] for i in range(len(data)))
    assert captions == {
        "sks dog": 20,
        "A Red, circle": 3,
    }  # first line of the caption file, as kohya reads it


def test_train_on_kohya_folders_writes_kohya_dataset_metadata(cli, tmp_path, kohya_tree, model_dir):
    out = tmp_path / "dog.safetensors"
    result = cli("train", kohya_tree, "--model", model_dir, "-o", out, "--steps", "1", "--resolution", "32")
    assert result.exit_code == 0, result.stderr
    meta, _ = _header(out)
    assert json.loads(meta["ss_dataset_dirs"]) == {
        "10_sks dog": {"n_repeats": 10, "img_count": 2},
        "3_other thing": {"n_repeats": 3, "img_count": 1},
    }
    assert json.loads(meta["ss_tag_frequency"]) == {
        "10_sks dog": {"sks dog": 2},
        "3_other thing": {"a red": 1, "circle": 1},
    }
    assert meta["ss_num_train_images"] == "23"
    assert meta["ss_output_name"] == "dog"
    assert "sks dog" in meta["modelspec.trigger_phrase"]
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.title"] == "dog"
    assert meta["modelspec.resolution"] == "32x32"


def test_dataset_config_toml(cli, tmp_path, model_dir):
    _images(tmp_path / "imgs" / "dog", 2, seed=3)
    for p in _images(tmp_path / "imgs" / "cat", 1, seed=4):
        p.with_suffix(".caption").write_text("a cat, sitting", encoding="utf-8")
    _images(tmp_path / "reg" / "1_dog", 2, seed=5)
    ds = tmp_path / "ds.toml"
    ds.write_text(
        """
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".caption"

[[datasets]]
resolution = 32
batch_size = 2
enable_bucket = true
min_bucket_reso = 16
max_bucket_reso = 64
bucket_reso_steps = 8

  [[datasets.subsets]]
  image_dir = "imgs/dog"
  num_repeats = 4
  class_tokens = "sks dog"

  [[datasets.subsets]]
  image_dir = "imgs/cat"
  num_repeats = 2

  [[datasets.subsets]]
  image_dir = "reg/1_dog"
  is_reg = true
  class_tokens = "dog"
""",
        encoding="utf-8",
    )
    out = tmp_path / "ds-lora.safetensors"
    result = cli("train", "--dataset-config", ds, "--model", model_dir, "-o", out, "--steps", "1")
    assert result.exit_code == 0, result.stderr
    meta, _ = _header(out)
    assert json.loads(meta["ss_dataset_dirs"]) == {
        "dog": {"n_repeats": 4, "img_count": 2},
        "cat": {"n_repeats": 2, "img_count": 1},
    }
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 2}}
    assert meta["ss_num_train_images"] == "10"
    assert meta["ss_num_reg_images"] == "2"
    assert meta["ss_batch_size_per_device"] == "2"  # from the dataset config
    assert meta["ss_enable_bucket"] == "True"
    assert meta["ss_resolution"] == "(32, 32)"

    from lorax.data.dataset import DataOptions, TrainData
    from lorax.data.kohya import read_dataset_config
    from lorax.data.training_images import load_training_images

    spec = read_dataset_config(ds)
    images = load_training_images(None, dataset_config=ds)
    data = TrainData(
        images.items,
        DataOptions(resolution=32, buckets=True, bucket_min=16, bucket_max=64, bucket_step=8),
        class_items=images.class_items,
    )
    assert all(min(b) >= 16 and max(b) <= 64 and b[0] % 8 == 0 for b in data.buckets)
    assert spec.batch_size == 2 and spec.subsets[1].options.shuffle_caption is True
    cat = Counter(
        data.example(e, i)[1] for e in range(3) for i in range(len(data)) if data.example(e, i)[0].item == 2
    )
    assert cat == {"a cat, sitting": 6}  # its own .caption file, 2 repeats × 3 epochs
    _, class_caption, _ = data.class_example(0, 0, (32, 32))
    assert class_caption == "dog"  # reg images train on their subset's class tokens


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("[general]\ncolor = 1\n[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\n", "unknown key(s) color"),
        ("[[datasets]]\nwhatever = 1\n[[datasets.subsets]]\nimage_dir='a'\n", "unknown key(s) whatever"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\nrepeats=2\n", "unknown key(s) repeats"),
        ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats=2\n", "has no image_dir"),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir='a'\nnum_repeats='x'\n", "num_repeats"),
    ],
)
def test_dataset_config_refuses_unknown_keys_in_one_line(cli, tmp_path, body, expected):
    ds = tmp_path / "ds.toml"
    ds.write_text(body, encoding="utf-8")
    out = tmp_path / "o.safetensors"
    result = cli("train", "--dataset_config", ds, "-o", out, "--steps", "1")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and str(ds) in lines[0], result.stderr
    assert not out.exists()


def test_kohya_class_dir_gives_prior_images(cli, tmp_path, kohya_tree, model_dir):
    _images(tmp_path / "reg" / "1_dog", 3, seed=7)
    out = tmp_path / "prior.safetensors"
    result = cli(
        "train",
        kohya_tree,
        "--class-dir",
        tmp_path / "reg",
        "--model",
        model_dir,
        "-o",
        out,
        "--steps",
        "1",
        "--resolution",
        "32",
    )
    assert result.exit_code == 0, result.stderr
    meta, _ = _header(out)
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_dog": {"n_repeats": 1, "img_count": 3}}
    assert meta["ss_num_reg_images"] == "3" and meta["ss_prior_loss_weight"] == "1"


def _a1111_hashes(path: Path) -> tuple[str, str]:
    """A1111's formulas, straight from the file's bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    model = hashlib.sha256(raw[8 + n :]).hexdigest()
    legacy = hashlib.sha256(raw[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    return model, legacy


def test_trained_lora_carries_a1111_hashes(cli, tmp_path, kohya_tree, model_dir):
    out = tmp_path / "h.safetensors"
    assert cli("train", kohya_tree, "--model", model_dir, "-o", out, "--steps", "1").exit_code == 0
    meta, _ = _header(out)
    model, legacy = _a1111_hashes(out)
    assert meta["sshs_model_hash"] == model
    assert meta["sshs_legacy_hash"] == legacy


def test_written_lora_over_1mib_carries_a1111_hashes(cli, tmp_path):
    """A file large enough that the legacy window (0x100000..0x110000) holds tensor bytes, through `convert`."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for block in range(4):
        name = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn{1 + block % 2}_to_{'qkv'[block % 3]}"
        name = name if block < 3 else "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
        tensors[f"{name}.lora_down.weight"] = torch.randn(64, 320 if block < 3 else 1280, generator=gen)
        tensors[f"{name}.lora_up.weight"] = torch.randn(320 if block < 3 else 1280, 64, generator=gen)
        tensors[f"{name}.alpha"] = torch.tensor(32.0)
    src = tmp_path / "src.safetensors"
    save_file(tensors, str(src), metadata={"ss_network_dim": "64"})
    out = tmp_path / "big.safetensors"
    result = cli("convert", src, "--to", "kohya", "-o", out, "--dtype", "fp32")
    assert result.exit_code == 0, result.stderr
    assert out.stat().st_size > 0x110000
    meta, _ = _header(out)
    model, legacy = _a1111_hashes(out)
    assert meta["sshs_model_hash"] == model and meta["sshs_legacy_hash"] == legacy
    assert legacy != hashlib.sha256(b"").hexdigest()[:8]
    assert meta["ss_output_name"] == "big" and meta["modelspec.title"] == "big"
    assert meta["modelspec.sai_model_spec"] == "1.0.1"
    assert "ss_tag_frequency" in meta and "ss_dataset_dirs" in meta
    with safe_open(str(out), framework="pt") as f:
        assert set(f.keys()) == set(tensors)


@pytest.mark.parametrize("to", ["kohya", "diffusers"])
def test_converted_lora_gets_its_own_a1111_hashes_not_its_sources(cli, tmp_path, to):
    """The source's ``sshs_*`` hashes describe the source's bytes: never carried, always recomputed. A header over
    1 MiB (a long user note) makes the legacy window hold header bytes, where lorax writes no legacy hash: a stale
    one carried from the source would be wrong there. ``ss_*``, ``modelspec.*`` and the user's keys are kept."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(1)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {
        f"{name}.lora_down.weight": torch.randn(4, 320, generator=gen),
        f"{name}.lora_up.weight": torch.randn(320, 4, generator=gen),
        f"{name}.alpha": torch.tensor(2.0),
    }
    src = tmp_path / "src.safetensors"
    note = "n" * 0x110000
    stale = {"sshs_model_hash": "f" * 64, "sshs_legacy_hash": "deadbeef"}
    save_file(
        tensors, str(src), metadata={"ss_network_dim": "4", "modelspec.title": "orig", "note": note, **stale}
    )
    out = tmp_path / "out.safetensors"
    result = cli("convert", src, "--to", to, "-o", out)
    assert result.exit_code == 0, result.stderr
    meta, _ = _header(out)
    model, legacy = _a1111_hashes(out)
    assert meta["sshs_model_hash"] == model
    assert (
        meta.get("sshs_legacy_hash", legacy) == legacy
    )  # absent (header in the window) or A1111's own value
    assert meta["ss_network_dim"] == "4" and meta["modelspec.title"] == "orig" and meta["note"] == note


def test_output_never_overwrites_the_dataset_config(cli, tmp_path):
    _images(tmp_path / "imgs", 1)
    ds = tmp_path / "ds.toml"
    body = '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "imgs"\nclass_tokens = "x"\n'
    ds.write_text(body, encoding="utf-8")
    result = cli("train", "--dataset-config", ds, "-o", tmp_path / "ds.safetensors", "--steps", "1")
    assert result.exit_code == 1 and "--dataset-config" in result.stderr
    assert ds.read_text(encoding="utf-8") == body


def test_pivot_lora_carries_dataset_keys_and_trigger(cli, tmp_path, model_dir):
    folder = tmp_path / "pics"
    for p in _images(folder, 2, seed=9):
        p.with_suffix(".txt").write_text("a <s1>, square", encoding="utf-8")
    out = tmp_path / "pivot.safetensors"
    result = cli(
        "pivot", folder, "-o", out, "--model", model_dir, "--token", "<s1>", "--ti-steps", "1",
        "--steps", "1", "--resolution", "32", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    meta, _ = _header(out)
    assert json.loads(meta["ss_tag_frequency"]) == {"pics": {"a <s1>": 2, "square": 2}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"pics": {"n_repeats": 1, "img_count": 2}}
    assert meta["modelspec.trigger_phrase"] == "<s1>"
    model, legacy = _a1111_hashes(out)
    assert meta["sshs_model_hash"] == model and meta["sshs_legacy_hash"] == legacy
