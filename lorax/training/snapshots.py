"""Snapshots: the LoRA as it stands every N steps or epochs, written as a usable file beside the output.

A snapshot is what the final output would be at that step (same format, same metadata: ``ss_*``, ``sshs_*``,
``modelspec.*``), named the way kohya's sd-scripts name theirs (``library/train_util.py``: ``STEP_FILE_NAME`` and
``EPOCH_FILE_NAME``): ``OUT-step00000200.safetensors`` (the step, 8 digits) and ``OUT-000002.safetensors`` (the
epoch, 6 digits). No snapshot is written at the last step (the output is that one). ``--save-last K`` keeps the K
newest snapshots, deleting only files this run wrote. Resume checkpoints (``--checkpoint-every``) are separate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STEP_DIGITS = 8  # kohya's STEP_FILE_NAME "{}-step{:08d}"
EPOCH_DIGITS = 6  # kohya's EPOCH_FILE_NAME "{}-{:06d}"


def step_snapshot(output: Path, step: int) -> Path:
    """``OUT-step00000200.safetensors`` for ``step`` 200."""
    return output.with_name(f"{output.stem}-step{step:0{STEP_DIGITS}d}{output.suffix}")


def epoch_snapshot(output: Path, epoch: int) -> Path:
    """``OUT-000002.safetensors`` for ``epoch`` 2."""
    return output.with_name(f"{output.stem}-{epoch:0{EPOCH_DIGITS}d}{output.suffix}")


def plan_snapshots(
    output: Path,
    *,
    max_steps: int,
    every_steps: int,
    every_epochs: int,
    epoch_after: Callable[[int], int],
    start_step: int = 0,
) -> dict[int, list[Path]]:
    """``{step: [snapshot paths written after that step]}`` for steps after ``start_step`` and before the last.

    ``epoch_after(step)`` is the number of whole epochs done after ``step`` optimizer steps; a step that completes
    an epoch divisible by ``every_epochs`` writes that epoch's snapshot.
    """
    plan: dict[int, list[Path]] = {}
    for step in range(start_step + 1, max_steps):
        paths: list[Path] = []
        if every_steps and step % every_steps == 0:
            paths.append(step_snapshot(output, step))
        if every_epochs:
            before, after = epoch_after(step - 1), epoch_after(step)
            paths += [
                epoch_snapshot(output, e) for e in range(before + 1, after + 1) if e % every_epochs == 0
            ]
        if paths:
            plan[step] = paths
    return plan


@dataclass
class Snapshots:
    """The loop's step hook that writes the planned snapshots.

    ``write(path)`` writes the LoRA as it stands to ``path`` and returns False when it would not (non-finite
    weights); ``keep_last`` (0: all) bounds how many of this run's snapshots stay on disk.
    """

    plan: dict[int, list[Path]]
    write: Callable[[Path], bool]
    keep_last: int = 0
    log: Callable[[str], None] = print
    is_main: bool = True
    written: list[Path] = field(default_factory=list)

    def __call__(self, state: Any) -> None:
        paths = self.plan.get(state.global_step, [])
        if not paths or not self.is_main:
            return
        for path in paths:
            if not self.write(path):
                self.log(f"snapshot skipped at step {state.global_step}: the weights are not finite")
                return
            self.written.append(path)
            self.log(f"snapshot: {path}")
        if self.keep_last:
            while len(self.written) > self.keep_last:
                self.written.pop(0).unlink(missing_ok=True)
