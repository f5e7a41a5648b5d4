"""A1111's prompt conventions: ``<lora:NAME:W>`` tags resolved against --lora-dir, PNG parameters that paste back
into A1111, and ``lorax inspect image.png``.

Oracles: A1111's published syntax (``extra_networks_lora.py``: ``<lora:NAME:TE:UNET>``, one number sets both) and
the image a ``--lora FILE:SCALE`` run makes (itself checked against a hand merge in test_generate_cli).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from test_generate import make_lora, png

from lorax.gen.params import read_png_parameters

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lorax.zoo.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("a1111-model") / "tiny-sd1"
    tiny_pipeline("sd1", seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lorax.formats import save_lora
    from lorax.services.generate import load_model

    folder = tmp_path_factory.mktemp("loras")
    (folder / "styles").mkdir()
    save_lora(make_lora(load_model(str(model_dir)), 21), folder / "styles" / "sks-dog.safetensors")
    return folder


def gen(cli, model_dir: Path, out: Path, *args: object):
    return cli("generate", *args, "--model", model_dir, "-o", out, "--steps", "3", "--seed", "5")


@pytest.mark.parametrize(
    ("tag", "flag"),
    [
        ("<lora:sks-dog:0.8>", "0.8"),
        ("<lora:sks-dog:0.3:0.6>", "0.6:0.3"),
        ("<lora:sks-dog:te=0.3:unet=0.6>", "0.6:0.3"),
    ],
)
def test_prompt_tag_is_the_lora_flag(cli, model_dir, lora_dir, tmp_path, tag, flag):
    tagged = gen(cli, model_dir, tmp_path / "tag", f"a photo {tag}", "--lora-dir", lora_dir)
    assert tagged.exit_code == 0, tagged.stderr
    path = lora_dir / "styles" / "sks-dog.safetensors"
    flagged = gen(cli, model_dir, tmp_path / "flag", "a photo", "--lora", f"{path}:{flag}")
    assert flagged.exit_code == 0, flagged.stderr
    a, b = Path(tagged.stdout.strip()), Path(flagged.stdout.strip())
    assert a.name == b.name == "a-photo-5.png"  # the tag is not part of the prompt the model sees
    np.testing.assert_array_equal(png(a), png(b))
    plain = gen(cli, model_dir, tmp_path / "plain", "a photo")
    assert np.abs(png(a) - png(Path(plain.stdout.strip()))).max() > 10

    params = read_png_parameters(a)
    unet, _, te = flag.partition(":")
    expected = f"<lora:sks-dog:{unet}>" if not te else f"<lora:sks-dog:{te}:{unet}>"  # A1111: TE first
    assert params.prompt == f"a photo {expected}"
    raw = path.read_bytes()
    addnet = hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest()[:12]
    assert params.fields["Lora hashes"] == f"sks-dog: {addnet}"


def test_tag_pastes_back_the_same_image(cli, model_dir, lora_dir, tmp_path):
    first = gen(cli, model_dir, tmp_path / "a", "a red <lora:sks-dog:0.7>, circle", "--lora-dir", lora_dir)
    assert first.exit_code == 0, first.stderr
    prompt = read_png_parameters(Path(first.stdout.strip())).prompt
    again = gen(cli, model_dir, tmp_path / "b", prompt, "--lora-dir", lora_dir)
    assert again.exit_code == 0, again.stderr
    np.testing.assert_array_equal(png(Path(first.stdout.strip())), png(Path(again.stdout.strip())))
    assert read_png_parameters(Path(again.stdout.strip())).prompt == prompt


def test_lora_dir_defaults_to_the_current_folder(cli, model_dir, lora_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(lora_dir)
    result = gen(cli, model_dir, tmp_path / "cwd", "a photo <lora:sks-dog:0.8>")
    assert result.exit_code == 0, result.stderr


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a <lora:nobody:0.8>", "no LoRA file nobody.safetensors"),
        ("a <lora:sks-dog:x>", "must be numbers"),
        ("a <lora::1>", "needs a name"),
    ],
)
def test_bad_tags_one_line(cli, model_dir, lora_dir, tmp_path, prompt, expected):
    result = gen(cli, model_dir, tmp_path, prompt, "--lora-dir", lora_dir)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not list(tmp_path.glob("*.png"))


def test_inspect_png_prints_its_parameters(cli, model_dir, tmp_path):
    result = gen(cli, model_dir, tmp_path, "a blue square", "--negative", "blurry")
    path = Path(result.stdout.strip())
    shown = cli("inspect", path)
    assert shown.exit_code == 0, shown.stderr
    lines = shown.stdout.strip().splitlines()
    assert lines[0] == "a blue square"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 3, Sampler: ") and "Seed: 5" in lines[2] and "Size: " in lines[2]
    from PIL import Image

    with Image.open(path) as image:
        assert shown.stdout.strip() == image.text["parameters"]
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    refused = cli("inspect", plain)
    assert refused.exit_code == 1 and "no 'parameters'" in refused.stderr
