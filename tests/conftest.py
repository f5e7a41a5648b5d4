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
