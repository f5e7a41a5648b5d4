"""``--log-with tensorboard|wandb|csv``: loss, learning rate and gradient norm every step, and the validation samples,
sent to an experiment tracker while ``lorax train`` runs.

tensorboard and wandb go through accelerate's own tracker classes (``accelerate.tracking``), on the main process only.
tensorboard writes event files into ``--logging-dir`` (default: OUTPUT's stem + ``.logs``), one sub-folder per run
named after OUTPUT; wandb writes there too and runs offline (``WANDB_MODE=offline``) when its server cannot be
reached, so a run never waits for or fails on the network. ``csv`` is lorax's own: ``LOGGING_DIR/RUN.csv`` with a
row per step (step, loss, lr, grad_norm, seconds), flushed as it goes, so it can be followed during the run.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.errors import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from lorax.training.config import TrainConfig

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
WANDB_HOST = ("api.wandb.ai", 443)


def logging_dir_for(config: TrainConfig) -> Path:
    if config.logging_dir is not None:
        return Path(config.logging_dir)
    assert config.output is not None  # validated
    out = Path(config.output)
    return out.with_name(out.stem + ".logs")


def _require(kind: str) -> None:
    package = PACKAGES.get(kind)
    if package is None:
        return
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, or half-installed
        found = False
    if not found:
        raise ConfigError(f"--log-with {kind} needs the {package} package: pip install {package}")


def network_reachable(host: tuple[str, int] = WANDB_HOST, timeout: float = 2.0) -> bool:
    import socket

    try:
        with socket.create_connection(host, timeout=timeout):
            return True
    except OSError:
        return False


class CsvTracker:
    """lorax's own tracker: one CSV row per step, written and flushed at once."""

    name = "csv"
    COLUMNS = ("step", "loss", "lr", "grad_norm", "seconds")

    def __init__(self, run_name: str, logging_dir: Path) -> None:
        self.path = Path(logging_dir) / f"{run_name}.csv"
        self._file: Any = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", encoding="utf-8", newline="")
        self._file.write(",".join(self.COLUMNS) + "\n")
        self._file.flush()

    def log(self, values: dict[str, Any], step: int) -> None:
        row = [str(step)] + [repr(float(values[c])) if c in values else "" for c in self.COLUMNS[1:]]
        self._file.write(",".join(row) + "\n")
        self._file.flush()

    def finish(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class StepTracker:
    """What the training loop calls: ``log_step`` after each optimizer step, ``log_samples`` after validation,
    ``finish`` at the end. Inactive (``None`` tracker) on processes other than the main one."""

    def __init__(self, kind: str, tracker: Any, where: Path) -> None:
        self.kind = kind
        self.tracker = tracker
        self.where = where

    def log_step(self, step: int, values: dict[str, float]) -> None:
        if self.tracker is not None:
            self.tracker.log(values, step=step)

    def log_samples(self, step: int, paths: Sequence[Path]) -> None:
        if self.tracker is None or not paths or self.kind == "csv":
            return
        import numpy as np
        from PIL import Image

        arrays = []
        for p in paths:
            with Image.open(p) as im:
                arrays.append(np.asarray(im.convert("RGB")))
        if self.kind == "tensorboard":
            for i, a in enumerate(arrays):
                self.tracker.log_images({f"samples/{i}": a[None]}, step=step, dataformats="NHWC")
        else:
            self.tracker.log_images({"samples": arrays}, step=step)

    def finish(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None


def make_tracker(config: TrainConfig, accelerator: Accelerator, log: Any) -> StepTracker | None:
    """The run's tracker (``None`` without ``--log-with``); a missing package is a one-line error before training."""
    kind = config.log_with
    if kind is None:
        return None
    _require(kind)
    where = logging_dir_for(config)
    assert config.output is not None  # validated
    run_name = Path(config.output).stem
    if not accelerator.is_main_process:
        return StepTracker(kind, None, where)
    tracker: Any
    if kind == "tensorboard":
        from accelerate.tracking import TensorBoardTracker

        tracker = TensorBoardTracker(run_name, str(where))
    elif kind == "wandb":
        from accelerate.tracking import WandBTracker

        if "WANDB_MODE" not in os.environ and not network_reachable():
            os.environ["WANDB_MODE"] = "offline"
            log("wandb: no network, logging offline (wandb sync later)")
        where.mkdir(parents=True, exist_ok=True)
        tracker = WandBTracker(run_name, dir=str(where))
    else:
        tracker = CsvTracker(run_name, where)
    try:
        where.mkdir(parents=True, exist_ok=True)
        tracker.start()
    except OSError as err:
        raise ConfigError(f"--log-with {kind}: cannot write {where} ({err.strerror or err})") from None
    log(f"logging with {kind} to {where}")
    return StepTracker(kind, tracker, where)
