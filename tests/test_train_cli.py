"""`lorax train` through the CLI: bad input gives one line and exit 1 and leaves no output; flags beat --config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from lorax.zoo.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("cli-model") / "model"
    tiny_pipeline("sd1").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli-images")
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    return folder


def _bad(tmp: Path, image_dir: Path, case: str) -> tuple[list[str], str]:
    if case == "missing":
        return [str(tmp / "nope")], "does not exist"
    if case == "empty":
        (tmp / "empty").mkdir()
        return [str(tmp / "empty")], "no images"
    if case == "unreadable":
        (tmp / "bad").mkdir()
        (tmp / "bad" / "a.png").write_bytes(b"garbage")
        return [str(tmp / "bad")], "can be read"
    if case == "resolution":
        return [str(image_dir), "--resolution", "36"], "--resolution must be a positive multiple of 8"
    if case == "text-lr":
        return [str(image_dir), "--text-learning-rate", "1e-5"], "--text-learning-rate needs --train-text"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable", "resolution", "text-lr"])
def test_bad_input_one_line_exit_1_no_output(cli, tmp_path, image_dir, model_dir, case):
    args, expected = _bad(tmp_path, image_dir, case)
    out = tmp_path / "out.safetensors"
    result = cli("train", *args, "--model", model_dir, "--instance-prompt", "x", "-o", out, "--steps", "1")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorax: error: ") and expected in lines[0], result.stderr
    assert not out.exists() and not list(tmp_path.glob("out.*"))


def test_out_of_memory_names_the_memory_flags(cli, tmp_path, image_dir, model_dir, monkeypatch):
    from lorax.training.objective import DiffusionObjective

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(DiffusionObjective, "loss", oom)
    out = tmp_path / "oom.safetensors"
    result = cli(
        "train",
        image_dir,
        "--model",
        model_dir,
        "--instance-prompt",
        "x",
        "-o",
        out,
        "--resolution",
        "32",
        "--device",
        "cpu",
    )
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("lorax: error: out of memory at step 1")
    for flag in ("--gradient-checkpointing", "--batch-size 1", "--mixed-precision", "--cache-latents"):
        assert flag in line
    assert not out.exists()


def test_existing_output_needs_force(cli, tmp_path, image_dir, model_dir):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    result = cli("train", image_dir, "--model", model_dir, "--instance-prompt", "x", "-o", out)
    assert result.exit_code == 1 and "--force" in result.stderr
    assert out.read_bytes() == b"keep me"


def test_config_file_and_flags(cli, tmp_path, image_dir, model_dir):
    cfg = tmp_path / "train.toml"
    cfg.write_text(
        f'data-dir = "{image_dir}"\nmodel = "{model_dir}"\ninstance-prompt = "a sks star"\n'
        'resolution = 32\nsteps = 2\nrank = 8\ndevice = "cpu"\noutput = "from-config.safetensors"\n'
    )
    out = tmp_path / "flags.safetensors"
    result = cli("train", "--config", cfg, "--rank", "2", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    import json

    body = json.loads(result.stdout)
    assert body["output"] == str(out) and body["steps"] == 2
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "2" and meta["ss_steps"] == "2"
    saved = (tmp_path / "flags.toml").read_text()
    assert "rank = 2" in saved and "steps = 2" in saved
    assert not (tmp_path / "from-config.safetensors").exists()


def test_torchrun_two_processes_same_command(tmp_path, image_dir, model_dir):
    """`accelerate launch`/`torchrun -m lorax train …` is the same code path: two CPU processes (gloo DDP) split
    each epoch's batches, agree on the reduced loss, and only the main process writes and reports."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            "-m",
            "lorax",
            "--quiet",
            "train",
            str(image_dir),
            "--model",
            str(model_dir),
            "--instance-prompt",
            "x",
            "--resolution",
            "32",
            "--steps",
            "2",
            "--device",
            "cpu",
            "-o",
            str(out),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout
    body = json.loads(lines[0])
    assert body["processes"] == 2 and body["steps"] == 2
    assert body["epochs"] == 2  # 2 images, 2 processes: one batch each per epoch
    assert out.exists()
