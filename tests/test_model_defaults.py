"""Models carry their own defaults (``lorax.json`` / ``lorax.defaults`` metadata): read by every command, copied by
merge and convert, overridden by flags."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lorax.zoo.shapes import MODEL_DIR

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def shipped_defaults() -> dict:
    return json.loads((MODEL_DIR / "lorax.json").read_text())


def test_the_shipped_model_carries_the_defaults_its_trainer_writes():
    from lorax.models.defaults import model_defaults, parse_defaults
    from lorax.zoo.shapes.pipeline import GUIDANCE_SCALE, LORAX_DEFAULTS, SAMPLE_STEPS

    assert shipped_defaults() == parse_defaults(LORAX_DEFAULTS, "x").as_dict()
    d = model_defaults("shapes")
    assert d.sampling == (SAMPLE_STEPS, GUIDANCE_SCALE) == (20, 5.0)
    assert d.size == (32, 32)


def copy_with_defaults(tmp_path: Path, defaults: dict) -> Path:
    """A model folder holding only what defaults need to be read (configs are not opened)."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    (folder / "lorax.json").write_text(json.dumps(defaults))
    return folder


def test_config_layers_lorax_then_model_then_file_then_flags(tmp_path):
    from lorax.training.config import TrainConfig
    from lorax.training.pivot_config import InvertConfig, PivotConfig

    model = copy_with_defaults(
        tmp_path,
        {
            "train": {"learning-rate": 0.002, "steps": 40, "rank": 8},
            "invert": {"steps": 70},
            "pivot": {"ti_steps": 9},
        },
    )
    base = {"data_dir": tmp_path, "output": tmp_path / "o.safetensors", "model": str(model)}
    cfg = TrainConfig.from_sources(base)
    assert (cfg.learning_rate, cfg.steps, cfg.rank, cfg.batch_size) == (0.002, 40, 8, 1)
    toml = tmp_path / "run.toml"
    toml.write_text("rank = 2\n")
    cfg = TrainConfig.from_sources({**base, "learning_rate": 0.01}, toml)
    assert (cfg.learning_rate, cfg.steps, cfg.rank) == (0.01, 40, 2)
    cfg = TrainConfig.from_sources({**base, "epochs": 3})  # the model's steps give way to --epochs
    assert (cfg.steps, cfg.epochs) == (None, 3)
    assert InvertConfig.from_sources({**base, "output": tmp_path / "e.pt"}).steps == 70
    assert PivotConfig.from_sources(base).ti_steps == 9
    # a model without lorax.json: lorax's own defaults, SD's sampling
    plain = tmp_path / "plain"
    plain.mkdir()
    cfg = TrainConfig.from_sources({**base, "model": str(plain)})
    assert (cfg.learning_rate, cfg.steps, cfg.sampling) == (1e-4, None, (20, 7.5))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"sample": {}}', "unknown section(s) sample"),
        ('{"generate": {"cfg": 5}}', "generate.cfg is unknown"),
        ('{"train": {"learning_rat": 0.1}}', "train: unknown key(s) learning_rat"),
        ('{"train": {"output": "x"}}', "train: unknown key(s) output"),
    ],
)
def test_bad_model_defaults_are_one_line_errors(cli, tmp_path, content, message):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    (folder / "lorax.json").write_text(content)
    images = tmp_path / "images"
    images.mkdir()
    result = cli("train", images, "--model", folder, "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 1
    assert message in result.stderr and "lorax.json" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def shapes_lora(tmp_path_factory) -> Path:
    from lorax.formats import save_lora
    from lorax.models.pipeline import load_pipeline
    from lorax.zoo.random_lora import random_lora

    pipe = load_pipeline("shapes")
    path = tmp_path_factory.mktemp("lora") / "red.safetensors"
    save_lora(random_lora(pipe, std=0.05, seed=3, family="sd1"), path, format="kohya")
    return path


def defaults_of(spec: Path) -> dict:
    from lorax.models.defaults import model_defaults

    return model_defaults(spec).as_dict()


def test_merge_and_convert_carry_the_defaults_into_their_outputs(cli, tmp_path, shapes_lora):
    from lorax.io.safetensors_io import read_header

    merged = tmp_path / "merged"
    assert cli("merge", "shapes", shapes_lora, "-o", merged).exit_code == 0
    assert json.loads((merged / "lorax.json").read_text()) == shipped_defaults()
    single = tmp_path / "merged.safetensors"
    result = cli("merge", "shapes", shapes_lora, "--to", "single-file", "-o", single)
    assert result.exit_code == 0, result.stderr
    assert json.loads(read_header(single).metadata["lorax.defaults"]) == shipped_defaults()
    # folder → single file → folder, and single file → single file (merge again)
    assert cli("convert", merged, "-o", tmp_path / "conv.safetensors").exit_code == 0
    assert defaults_of(tmp_path / "conv.safetensors") == shipped_defaults()
    assert cli("convert", tmp_path / "conv.safetensors", "-o", tmp_path / "back").exit_code == 0
    assert json.loads((tmp_path / "back" / "lorax.json").read_text()) == shipped_defaults()
    again = tmp_path / "again.safetensors"
    assert cli("merge", single, shapes_lora, "-o", again).exit_code == 0
    assert defaults_of(again) == shipped_defaults()


def read_png(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64)


def png_parameters(path: str) -> str:
    from PIL import Image

    with Image.open(path) as im:
        return str(im.info["parameters"])


def test_a_merged_model_loaded_by_path_generates_like_the_runtime_lora(cli, tmp_path, shapes_lora):
    """The demo's claim: the merged folder samples with the base's steps and guidance (5, not SD's 7.5), so its
    images are the runtime LoRA's."""
    merged = tmp_path / "merged"
    assert cli("merge", "shapes", shapes_lora, "-o", merged).exit_code == 0

    def run(name: str, *args: str) -> list[dict]:
        result = cli(
            "generate", "a red circle", *args, "-n", "2", "--seed", "1", "-o", tmp_path / name, "--json"
        )
        assert result.exit_code == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    runtime = run("runtime", "--model", "shapes", "--lora", str(shapes_lora))
    by_path = run("by-path", "--model", str(merged))
    for a, b in zip(runtime, by_path, strict=True):
        assert "CFG scale: 5," in png_parameters(b["path"]) and "Steps: 20," in png_parameters(b["path"])
        assert (b["width"], b["height"]) == (32, 32)
        assert np.abs(read_png(a["path"]) - read_png(b["path"])).mean() < 2.0  # of 255
    # a flag still wins over the model's default
    flagged = run("flagged", "--model", str(merged), "--guidance", "7.5")
    assert "CFG scale: 7.5," in png_parameters(flagged[0]["path"])
