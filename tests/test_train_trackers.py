"""`lorax train --log-with` (issue 19 item 9): tensorboard event files read back by tensorboard's own
EventAccumulator hold the run's loss, lr and grad norm per step and the validation samples; csv streams the same
rows; a tracker whose package is missing is a one-line error naming it."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tracker-images")
    rng = np.random.default_rng(5)
    for i in range(2):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    return folder


def _losses(loss_csv: Path) -> dict[int, tuple[float, float]]:
    with loss_csv.open() as f:
        return {int(r["step"]): (float(r["loss"]), float(r["lr"])) for r in csv.DictReader(f)}


def test_tensorboard_event_files_hold_the_logged_losses(cli, tmp_path, image_dir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb.safetensors"
    result = cli(
        "train", image_dir, "--model", "shapes", "--instance-prompt", "a star", "--steps", "3", "--device", "cpu",
        "--log-with", "tensorboard", "--validation-prompt", "a star", "--validation-every", "3",
        "--sample-steps", "2", "-o", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    run_dir = tmp_path / "tb.logs" / "tb"
    assert list(run_dir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    expected = _losses(tmp_path / "tb.loss.csv")
    loss = {e.step: e.value for e in acc.Scalars("loss")}
    lr = {e.step: e.value for e in acc.Scalars("lr")}
    assert sorted(loss) == [1, 2, 3]
    for step, (value, rate) in expected.items():
        assert loss[step] == pytest.approx(value, rel=1e-5) and lr[step] == pytest.approx(rate, rel=1e-5)
    norms = [e.value for e in acc.Scalars("grad_norm")]
    assert len(norms) == 3 and all(n > 0 for n in norms)
    images = acc.Images("samples/0")
    assert [im.step for im in images] == [3] and (images[0].width, images[0].height) == (32, 32)


def test_csv_tracker_rows_and_missing_package_error(cli, tmp_path, image_dir, monkeypatch):
    base = [
        "train",
        image_dir,
        "--model",
        "shapes",
        "--instance-prompt",
        "x",
        "--steps",
        "2",
        "--device",
        "cpu",
    ]
    logs = tmp_path / "my-logs"
    result = cli(*base, "--log-with", "csv", "--logging-dir", logs, "-o", tmp_path / "c.safetensors")
    assert result.exit_code == 0, result.stderr
    with (logs / "c.csv").open() as f:
        rows = list(csv.DictReader(f))
    expected = _losses(tmp_path / "c.loss.csv")
    assert [int(r["step"]) for r in rows] == [1, 2]
    for r in rows:
        assert float(r["loss"]) == pytest.approx(expected[int(r["step"])][0]) and float(r["grad_norm"]) > 0

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if wandb were not installed
    out = tmp_path / "w.safetensors"
    result = cli(*base, "--log-with", "wandb", "-o", out)
    assert result.exit_code == 1 and not out.exists()
    assert "--log-with wandb needs the wandb package: pip install wandb" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = cli(*base, "--log-with", "mlflow", "-o", out)
    assert result.exit_code == 1 and "--log-with must be one of tensorboard, wandb, csv" in result.stderr
