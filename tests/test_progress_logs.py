"""Progress that works in logs, Ctrl-C that says how to resume, `--resume DIR` alone, and the default model."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LINE = re.compile(
    r"^training: (\d+)/(\d+) \(\d+%\), loss [0-9.e-]+, lr [0-9.e-]+, [0-9.]+ (it/s|s/it), \d\d:\d\d elapsed"
)


@pytest.fixture()
def circles(tmp_path: Path) -> Path:
    from lorax.zoo.shapes import write_concept_dir

    folder = tmp_path / "images"
    write_concept_dir(folder, "circle", "purple", 4, caption="a sks circle")
    return folder


def env(**extra: str) -> dict[str, str]:
    out = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    out.update(extra)
    return out


def test_piped_stderr_gets_plain_progress_lines_without_escape_codes(tmp_path, circles):
    """A long-ish run with stderr piped (as under nohup, slurm or CI): a tqdm-like line per interval."""
    out = tmp_path / "sks.safetensors"
    proc = subprocess.run(
        [sys.executable, "-m", "lorax", "train", str(circles), "--model", "shapes", "--steps", "60",
         "--batch-size", "1", "--device", "cpu", "-o", str(out)],
        capture_output=True, text=True, timeout=300, env=env(LORAX_PROGRESS_INTERVAL="0.05"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\x1b" not in proc.stderr and "\r" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if LINE.match(ln)]
    assert len(lines) >= 3, proc.stderr
    steps = [int(LINE.match(ln).group(1)) for ln in lines]  # type: ignore[union-attr]
    assert (
        steps == sorted(steps) and steps[-1] == 60 and {int(LINE.match(ln).group(2)) for ln in lines} == {60}
    )  # type: ignore[union-attr]
    assert any("ETA" in ln for ln in lines[:-1])
    assert proc.stdout.strip() == str(out)


def test_plain_task_prints_one_line_per_interval():
    import lorax.cli.app  # noqa: F401  (the CLI package imports in this order)
    from lorax.cli.common import PlainTask

    now = [0.0]
    lines: list[str] = []
    with PlainTask(lines.append, "training", 100, 10.0, clock=lambda: now[0]) as task:
        task.update(completed=0)
        for i in range(1, 101):
            now[0] += 0.5
            task.update(completed=i, loss=0.5, lr=1e-3)
    assert len(lines) == 5  # at 10, 20, 30, 40 and 50 s (the last one is the end: not repeated)
    assert lines[0] == "training: 20/100 (20%), loss 0.5, lr 0.001, 2 it/s, 00:10 elapsed, ETA 00:40"
    announced: list[str] = []
    PlainTask(announced.append, "loading model big", None, 10.0)
    assert announced == ["loading model big …"]


def test_a_big_model_is_announced_before_it_loads(cli, tmp_path, circles, monkeypatch):
    from lorax.models import pipeline

    monkeypatch.setattr(pipeline, "SLOW_LOAD_BYTES", 1)
    result = cli(
        "train",
        circles,
        "--model",
        "shapes",
        "--steps",
        "1",
        "--device",
        "cpu",
        "-o",
        tmp_path / "a.safetensors",
    )
    assert result.exit_code == 0, result.stderr
    assert result.stderr.splitlines()[0] == "loading model shapes …"


def test_ctrl_c_prints_the_resume_command_and_resume_dir_alone_finishes_the_run(
    tmp_path, circles, monkeypatch
):
    out = tmp_path / "run" / "sks.safetensors"
    out.parent.mkdir()
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorax", "train", "images", "--model", "shapes", "--steps", "4000",
         "--batch-size", "1", "--device", "cpu", "-o", str(out)],
        cwd=circles.parent, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env=env(LORAX_PROGRESS_INTERVAL="0.2"), start_new_session=True,
    )  # fmt: skip
    assert proc.stderr is not None
    for line in proc.stderr:  # wait until it trains, then press Ctrl-C
        if line.startswith("training: "):
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    found = re.search(r"resume with: (lorax train --resume (\S+))$", err.strip())
    assert found, err
    checkpoint = Path(found.group(2))
    assert checkpoint.parent == out.with_name("sks.checkpoints") and (checkpoint / "state.json").is_file()
    stopped_at = int(checkpoint.name.removeprefix("step-"))
    assert 0 < stopped_at < 4000 and f"interrupted at step {stopped_at}/4000" in err
    # the printed command alone, from another folder: data, model, config and output come from the checkpoint
    from typer.testing import CliRunner

    from lorax.cli.app import app

    args = [*found.group(1).split()[1:], "--steps", str(stopped_at + 2), "--json"]
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.stderr
    import json

    body = json.loads(result.stdout)
    assert body["output"] == str(out) and body["steps"] == stopped_at + 2 and body["num_images"] == 4
    assert body["resumed_from"] == str(checkpoint)


def test_config_paths_are_relative_to_the_config_file(cli, tmp_path, circles, monkeypatch):
    project = circles.parent
    (project / "run.toml").write_text(
        'data-dir = "images"\nmodel = "shapes"\noutput = "out/sks.safetensors"\nsteps = 1\ndevice = "cpu"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = cli("train", "--config", project / "run.toml")
    assert result.exit_code == 0, result.stderr
    assert (project / "out" / "sks.safetensors").is_file() and not list(elsewhere.iterdir())


def photos(folder: Path, size: int = 64) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    return folder


def test_without_model_the_model_is_named_first_and_a_toy_warning_names_the_flag(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("LORAX_MODEL", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    images = photos(tmp_path / "photos")
    result = cli("train", images, "--instance-prompt", "a sks photo", "--steps", "1", "--device", "cpu",
                 "-o", tmp_path / "p.safetensors")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("model: shapes (lorax's built-in 32×32 toy model; name yours with --model")
    warnings = [ln for ln in lines if ln.startswith("warning:")]
    assert len(warnings) == 1 and "64×64" in warnings[0] and "--model" in warnings[0]
    assert "model shapes" in lines[-1]  # the summary
    # named explicitly, no model line; 32-pixel images, no warning
    small = photos(tmp_path / "small", size=32)
    result = cli("train", small, "--model", "shapes", "--instance-prompt", "x", "--steps", "1", "--device", "cpu",
                 "-o", tmp_path / "q.safetensors")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert not [ln for ln in result.stderr.splitlines() if ln.startswith(("model:", "warning:"))]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from lorax.zoo.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny") / "my-model"
    tiny_pipeline("sd1").save_pretrained(folder)
    return folder


@pytest.mark.parametrize("where", ["env", "user-config"])
def test_a_default_model_set_once(cli, tmp_path, monkeypatch, tiny_dir, where):
    from safetensors import safe_open

    monkeypatch.delenv("LORAX_MODEL", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    if where == "env":
        monkeypatch.setenv("LORAX_MODEL", str(tiny_dir))
        origin = "(from LORAX_MODEL)"
    else:
        conf = tmp_path / "config" / "lorax" / "config.toml"
        conf.parent.mkdir(parents=True)
        (conf.parent / "models").mkdir()
        (conf.parent / "models" / "my-model").symlink_to(tiny_dir)
        conf.write_text('model = "models/my-model"\n')
        origin = f"(from {conf})"
    images = photos(tmp_path / "photos", size=32)
    out = tmp_path / "t.safetensors"
    result = cli("train", images, "--instance-prompt", "x", "--steps", "1", "--device", "cpu", "-o", out)
    assert result.exit_code == 0, result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith("model: ") and first.endswith(origin) and "my-model" in first
    with safe_open(str(out), "pt") as f:
        assert Path(f.metadata()["ss_sd_model_name"]).name == "my-model"


def test_a_bad_user_config_is_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("LORAX_MODEL", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    (tmp_path / "lorax").mkdir()
    (tmp_path / "lorax" / "config.toml").write_text('modle = "x"\n')
    images = photos(tmp_path / "photos", size=32)
    result = cli("train", images, "--instance-prompt", "x", "-o", tmp_path / "t.safetensors")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.toml: unknown key(s) modle" in lines[0]
