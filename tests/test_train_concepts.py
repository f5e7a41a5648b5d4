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


# ---- per-concept class images ([[concepts]] class_prompt / class_dir / num_class_images) ---------------------------


@pytest.fixture(scope="module")
def class_folders(concepts) -> tuple[Path, Path]:
    """A class folder per concept: 2 star-class images, 3 moon-class images (a caption file there is ignored)."""
    root = concepts[0].parent
    rng = np.random.default_rng(11)
    folders = []
    for name, count in (("star-class", 2), ("moon-class", 3)):
        folder = root / name
        folder.mkdir(exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
                folder / f"{name}-{i}.png"
            )
        folders.append(folder)
    (folders[0] / "star-class-0.txt").write_text("not the class prompt\n", encoding="utf-8")
    return folders[0], folders[1]


def spy_pairs(monkeypatch) -> list[tuple[str, str, Path]]:
    """(instance caption, class caption, class image path) of every pair the batches draw."""
    from lorax.data.dataset import TrainData

    pairs: list[tuple[str, str, Path]] = []
    real = TrainData.batch_keys

    def spy(self, epoch, indices):
        keys, captions, rngs = real(self, epoch, indices)
        n = len(indices)
        assert len(keys) == 2 * n  # every instance example has its class example
        for k in range(n):
            pairs.append((captions[k], captions[n + k], Path(self.class_items[keys[n + k].item].path)))
        return keys, captions, rngs

    monkeypatch.setattr(TrainData, "batch_keys", spy)
    return pairs


def concept_toml(path: Path, stars: Path, moons: Path, star_class: str, moon_class: str) -> Path:
    path.write_text(
        f'[[concepts]]\ndir = "{stars}"\nprompt = "a sks star"\nrepeats = 2\n{star_class}\n\n'
        f'[[concepts]]\ndir = "{moons}"\nprompt = "a ohwx moon"\n{moon_class}\n',
        encoding="utf-8",
    )
    return path


def test_each_concept_pairs_with_its_own_class_images_and_prompt(
    cli, tmp_path, model_dir, concepts, class_folders, monkeypatch
):
    stars, moons = concepts
    star_class, moon_class = class_folders
    pairs = spy_pairs(monkeypatch)
    toml = concept_toml(
        tmp_path / "run.toml",
        stars,
        moons,
        f'class_prompt = "a star"\nclass_dir = "{star_class}"',
        f'class_prompt = "a moon"\nclass_dir = "{moon_class}"\nnum_class_images = 2',
    )
    out = tmp_path / "own.safetensors"
    result = cli("train", "--config", toml, *common(model_dir, out))
    assert result.exit_code == 0, result.stderr
    assert len(pairs) == 7  # one epoch: 2 × 2 stars + 3 moons
    by_concept: dict[str, set[tuple[str, Path]]] = {}
    for instance, caption, path in pairs:
        concept = "star" if instance == "a sks star" else "moon"
        by_concept.setdefault(concept, set()).add((caption, path))
    # the star examples draw only star-class images, captioned "a star" (not their caption file); the moons only
    # the first 2 moon-class images (num_class_images = 2), captioned "a moon"
    assert by_concept["star"] == {("a star", star_class / f"star-class-{i}.png") for i in range(2)}
    assert by_concept["moon"] == {("a moon", moon_class / f"moon-class-{i}.png") for i in range(2)}
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {
        "star-class": {"n_repeats": 1, "img_count": 2},
        "moon-class": {"n_repeats": 1, "img_count": 2},
    }
    assert meta["ss_num_reg_images"] == "4"


def test_class_images_per_concept_are_generated_from_its_class_prompt(
    cli, tmp_path, model_dir, concepts, monkeypatch
):
    import os

    from lorax.data.images import find_images

    stars, moons = concepts
    encoded: list[str] = []
    from diffusers import StableDiffusionPipeline

    real_call = StableDiffusionPipeline.__call__

    def spy_call(self, prompt, *args, **kwargs):
        encoded.append(prompt)
        return real_call(self, prompt, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy_call)
    pairs = spy_pairs(monkeypatch)
    toml = concept_toml(
        tmp_path / "gen-run.toml",
        stars,
        moons,
        'class_prompt = "a star"\nnum_class_images = 3',
        'class_prompt = "a moon"\nnum_class_images = 2',
    )
    out = tmp_path / "gen.safetensors"
    result = cli("train", "--config", toml, "--sample-steps", "2", *common(model_dir, out))
    assert result.exit_code == 0, result.stderr
    assert Counter(encoded) == {"a star": 3, "a moon": 2}
    # generated into the class-image cache, one folder per class prompt, num_class_images each
    made = sorted((Path(os.environ["LORAX_CACHE"]) / "class-images").iterdir())
    assert [d.name.split("-")[:2] for d in made] == [["a", "moon"], ["a", "star"]]
    moon_dir, star_dir = made
    assert len(find_images(star_dir)) == 3 and len(find_images(moon_dir)) == 2
    drawn = {("star" if i == "a sks star" else "moon", c, path.parent) for i, c, path in pairs}
    assert drawn == {("star", "a star", star_dir), ("moon", "a moon", moon_dir)}
    with safe_open(out, "pt") as f:
        assert f.metadata()["ss_num_reg_images"] == "5"


def test_per_concept_class_settings_round_trip_through_the_resolved_config(
    cli, tmp_path, model_dir, concepts, class_folders
):
    import tomllib

    from safetensors.torch import load_file

    stars, moons = concepts
    star_class, moon_class = class_folders
    (tmp_path / "cfg").mkdir()
    toml = concept_toml(  # relative class_dir: beside the TOML, like dir
        tmp_path / "cfg" / "run.toml",
        stars,
        moons,
        f'class_prompt = "a star"\nclass_dir = "{os_relpath(star_class, tmp_path / "cfg")}"',
        f'class_prompt = "a moon"\nclass_dir = "{moon_class}"\nnum_class_images = 2',
    )
    first = tmp_path / "first.safetensors"
    assert cli("train", "--config", toml, *common(model_dir, first)).exit_code == 0
    resolved = first.with_suffix(".toml")
    tables = tomllib.loads(resolved.read_text(encoding="utf-8"))["concepts"]
    assert tables == [
        {"dir": str(stars), "prompt": "a sks star", "repeats": 2, "class_prompt": "a star",
         "class_dir": str(star_class)},
        {"dir": str(moons), "prompt": "a ohwx moon", "repeats": 1, "class_prompt": "a moon",
         "class_dir": str(moon_class), "num_class_images": 2},
    ]  # fmt: skip
    again = tmp_path / "again.safetensors"
    result = cli("train", "--config", resolved, "-o", again)
    assert result.exit_code == 0, result.stderr
    a, b = load_file(first), load_file(again)
    assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)


def os_relpath(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path, start)


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))


@pytest.mark.parametrize(
    ("star_class", "extra", "expected"),
    [
        ('class_prompt = "a star"', ["--class-prompt", "a thing"], "--class-prompt is run-wide"),
        ('class_prompt = "a star"\nclass_dir = "{missing}"', [], "class_dir {missing} does not exist"),
        ('class_prompt = "a star"\nclass_dir = "{empty}"', [], "class_dir {empty} has no images"),
        ('class_dir = "{empty}"', [], "class_dir needs class_prompt"),
        ("", [], "in every [[concepts]] table, or in none"),
    ],
)
def test_per_concept_class_settings_that_do_not_fit_are_one_line(
    cli, tmp_path, model_dir, concepts, class_folders, star_class, extra, expected
):
    stars, moons = concepts
    names = {"missing": tmp_path / "missing", "empty": tmp_path / "empty"}
    names["empty"].mkdir()
    toml = concept_toml(
        tmp_path / "bad.toml",
        stars,
        moons,
        star_class.format(**names),
        f'class_prompt = "a moon"\nclass_dir = "{class_folders[1]}"',
    )
    result = cli("train", "--config", toml, *extra, *common(model_dir, tmp_path / "x.safetensors"))
    assert result.exit_code != 0
    assert expected.format(**names) in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()


def test_concept_on_the_command_line_replaces_the_files_concepts_and_their_class_settings(
    tmp_path, concepts, class_folders
):
    from lorax.training.config import TrainConfig

    stars, moons = concepts
    toml = concept_toml(
        tmp_path / "file.toml",
        stars,
        moons,
        f'class_prompt = "a star"\nclass_dir = "{class_folders[0]}"',
        'class_prompt = "a moon"',
    )
    kept = TrainConfig.from_sources({"output": tmp_path / "a.safetensors"}, toml)
    assert [c.split(":")[1] for c in kept.concept_class] == ["a star", "a moon"]
    flags = {"output": tmp_path / "b.safetensors", "concept": [f"{moons}:a ohwx moon"]}
    replaced = TrainConfig.from_sources(flags, toml)
    assert replaced.concept == [f"{moons}:a ohwx moon"] and replaced.concept_class == []
