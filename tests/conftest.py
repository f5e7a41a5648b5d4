"""Shared fixtures. Nothing here downloads: tiny models are built from configs."""

from __future__ import annotations

import os

import pytest

# Isolate every cache before anything imports huggingface_hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("LORAX_CACHE", str(home / "lorax"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # the user's default model (LORAX_MODEL, ~/.config/lorax/config.toml) never reaches a test
    monkeypatch.delenv("LORAX_MODEL", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / "config"))
    # a slow (loaded) machine would otherwise add plain progress lines to a stderr that a test counts the lines of;
    # the tests of those lines set their own interval
    monkeypatch.setenv("LORAX_PROGRESS_INTERVAL", "3600")


@pytest.fixture()
def cli():
    """Run the lorax CLI in-process; returns a function(args) -> click Result (stdout and stderr apart)."""
    from typer.testing import CliRunner

    from lorax.cli.app import app

    runner = CliRunner()

    def run(*args: str, input: str | None = None):
        return runner.invoke(app, [str(a) for a in args], input=input)

    return run


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module's tests: the tiny models run fastest that way, and the CI machine's two
    cores are shared by everything (two threads spinning against each other are several times slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def star_model(tmp_path_factory: pytest.TempPathFactory):
    """A tiny SD1 model folder whose tokenizer knows ``sks`` and ``star`` (train's option tests read it, never write)."""
    from lorax.zoo.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("star-model") / "model"
    tiny_pipeline("sd1", words=["sks", "star"]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def star_images(tmp_path_factory: pytest.TempPathFactory):
    """Two 32 px training images: a coloured square on white, shifted by a pixel."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("star-images")
    rng = np.random.default_rng(3)
    for i in range(2):
        arr = np.full((32, 32, 3), 255, dtype=np.uint8)
        arr[6:26, 6 + i : 26 + i] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(folder / f"star-{i}.png")
    return folder
