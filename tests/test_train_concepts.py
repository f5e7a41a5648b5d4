"""Several concepts in one run (issue 19 item 10): `--concept DIR:PROMPT[:REPEATS]` and `[[concepts]]` in --config,
each folder a kohya subset with its own caption and repeats; an epoch samples both, the metadata records both."""

from __future__ import annotations

import json
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

    folder = tmp_path_factory.mktemp("concept-model") / "model"
    tiny_pipeline("sd1", words=["sks", "star", "ohwx", "moon"]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def concepts(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("concepts")
    rng = np.random.default_rng(7)
    folders = []
    for name, count in (("stars", 2), ("moons", 3)):
        folder = root / name
        folder.mkdir()
        for i in range(count):
            arr = np.full((32, 32, 3), 255, dtype=np.uint8)
            arr[6:26, 6 + i : 26 + i] = rng.integers(0, 255, 3)
            Image.fromarray(arr).save(folder / f"{name}-{i}.png")
        folders.append(folder)
    (folders[1] / "moons-2.txt").write_text("ohwx moon, night\n", encoding="utf-8")  # a caption file wins
    return folders[0], folders[1]


def spy_captions(monkeypatch) -> list[str]:
    from lorax.data.dataset import TrainData

    seen: list[str] = []
    real = TrainData.batch_keys

    def spy(self, epoch, indices):
        keys, captions, rngs = real(self, epoch, indices)
        seen.extend(captions)
        return keys, captions, rngs

    monkeypatch.setattr(TrainData, "batch_keys", spy)
    return seen


def common(model_dir: Path, out: Path) -> list[str]:
    return [
        "--model",
        str(model_dir),
        "--resolution",
        "32",
        "--device",
        "cpu",
        "--epochs",
        "1",
        "-o",
        str(out),
    ]


def check_output(out: Path, stars: Path, moons: Path) -> None:
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_dataset_dirs"]) == {
        stars.name: {"n_repeats": 2, "img_count": 2},
        moons.name: {"n_repeats": 1, "img_count": 3},
    }
    tags = json.loads(meta["ss_tag_frequency"])
    assert tags[stars.name] == {"a sks star": 2}
    assert tags[moons.name] == {"a ohwx moon": 2, "ohwx moon": 1, "night": 1}
    assert meta["ss_num_train_images"] == "7"  # 2 × 2 + 3 × 1


def test_two_concepts_each_train_with_their_prompt_and_repeats(
    cli, tmp_path, model_dir, concepts, monkeypatch
):
    stars, moons = concepts
    seen = spy_captions(monkeypatch)
    out = tmp_path / "two.safetensors"
    result = cli(
        "train",
        "--concept",
        f"{stars}:a sks star:2",
        "--concept",
        f"{moons}:a ohwx moon",
        *common(model_dir, out),
    )
    assert result.exit_code == 0, result.stderr
    # one epoch: every example once — the stars twice each (repeats 2), the moons once each
    assert Counter(seen) == {"a sks star": 4, "a ohwx moon": 2, "ohwx moon, night": 1}
    check_output(out, stars, moons)


def test_concepts_tables_in_the_config_file(cli, tmp_path, model_dir, concepts, monkeypatch):
    stars, moons = concepts
    seen = spy_captions(monkeypatch)
    (moons.parent / "cfg").mkdir(exist_ok=True)
    toml = moons.parent / "cfg" / "run.toml"
    toml.write_text(  # the second dir is relative to the TOML's folder
        f'[[concepts]]\ndir = "{stars}"\nprompt = "a sks star"\nrepeats = 2\n\n'
        f'[[concepts]]\ndir = "../{moons.name}"\nprompt = "a ohwx moon"\n',
        encoding="utf-8",
    )
    out = tmp_path / "toml.safetensors"
    result = cli("train", "--config", toml, *common(model_dir, out))
    assert result.exit_code == 0, result.stderr
    assert Counter(seen) == {"a sks star": 4, "a ohwx moon": 2, "ohwx moon, night": 1}
    check_output(out, stars, moons)


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("nocolon", "expected DIR:PROMPT[:REPEATS]"),
        ("{stars}:a sks star:0", "REPEATS must be ≥ 1"),
        ("{missing}:a sks star", "does not exist"),
    ],
)
def test_concepts_that_do_not_fit_are_one_line(cli, tmp_path, model_dir, concepts, spec, expected):
    stars, _ = concepts
    spec = spec.format(stars=stars, missing=tmp_path / "missing")
    result = cli("train", "--concept", spec, *common(model_dir, tmp_path / "x.safetensors"))
    assert result.exit_code != 0
    assert expected in result.stderr and "Traceback" not in result.stderr


def test_concept_and_data_dir_together_are_refused(cli, tmp_path, model_dir, concepts):
    stars, moons = concepts
    result = cli(
        "train", moons, "--concept", f"{stars}:a sks star", *common(model_dir, tmp_path / "x.safetensors")
    )
    assert result.exit_code != 0
    assert "--concept names every training folder" in result.stderr
