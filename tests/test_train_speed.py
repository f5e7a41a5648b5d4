"""Speed knobs of `lorax train` (issue 19 item 11): --cache-latents-to-disk writes safetensors latents that the next
run reads without calling the VAE encoder (and that equal fresh encodings); --channels-last and --compile are
plumbed through to the UNet and a run with them trains. (A real torch.compile of the UNet takes half a minute on
two CPU cores, too slow here: bench/train_speed.py compiles and times it.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("speed-images")
    rng = np.random.default_rng(9)
    for i in range(3):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    return folder


def _count_encodes(monkeypatch) -> list[int]:
    from diffusers import AutoencoderKL

    calls: list[int] = []
    original = AutoencoderKL.encode

    def spy(self, x, *args, **kwargs):
        calls.append(int(x.shape[0]))
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", spy)
    return calls


def test_disk_latent_cache_is_reused_by_the_next_run(cli, tmp_path, image_dir, monkeypatch):
    import os

    from safetensors.torch import load_file

    calls = _count_encodes(monkeypatch)
    base = [
        "train",
        image_dir,
        "--model",
        "shapes",
        "--instance-prompt",
        "x",
        "--steps",
        "1",
        "--device",
        "cpu",
    ]
    first = cli(*base, "--cache-latents-to-disk", "--flip", "-o", tmp_path / "a.safetensors")
    assert first.exit_code == 0, first.stderr
    assert sum(calls) == 6  # 3 images × (plain, flipped)
    assert "latent cache: 0 read, 6 written" in first.stderr
    files = sorted((Path(os.environ["LORAX_CACHE"]) / "latents").glob("*/*.safetensors"))
    assert len(files) == 6
    calls.clear()
    second = cli(*base, "--cache-latents-to-disk", "--flip", "-o", tmp_path / "b.safetensors")
    assert second.exit_code == 0, second.stderr
    assert calls == [] and "latent cache: 6 read, 0 written" in second.stderr
    # same latents as a run that encodes in memory, and the same trained LoRA
    third = cli(*base, "--cache-latents", "--flip", "-o", tmp_path / "c.safetensors")
    assert third.exit_code == 0 and sum(calls) == 6
    b, c = load_file(str(tmp_path / "b.safetensors")), load_file(str(tmp_path / "c.safetensors"))
    assert b.keys() == c.keys() and all(torch.equal(b[k], c[k]) for k in b)
    # a changed image gets a new file, never the stale latent
    Image.new("RGB", (32, 32), (200, 10, 10)).save(image_dir / "0.png")
    calls.clear()
    fourth = cli(*base, "--cache-latents-to-disk", "--flip", "-o", tmp_path / "d.safetensors")
    assert fourth.exit_code == 0 and sum(calls) == 2 and "latent cache: 4 read, 2 written" in fourth.stderr


def test_channels_last_and_compile_reach_the_unet(cli, tmp_path, image_dir, monkeypatch):
    from diffusers import UNet2DConditionModel

    seen: dict[str, object] = {}
    original_compile = torch.nn.Module.compile

    def compile_spy(self, *args, **kwargs):
        if isinstance(self, UNet2DConditionModel):
            seen["layout"] = self.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
            seen["compiled"] = True
            return None  # plumbing only: the bench runs the real compile
        return original_compile(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "compile", compile_spy)
    out = tmp_path / "k.safetensors"
    result = cli(
        "train", image_dir, "--model", "shapes", "--instance-prompt", "x", "--steps", "1", "--device", "cpu",
        "--channels-last", "--compile", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert seen == {"layout": True, "compiled": True}
    assert "compiling the UNet" in result.stderr and out.is_file()
