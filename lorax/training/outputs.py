"""The files a training run writes beside its output: the loss curve (CSV + PNG), the validation samples and their
sheet, and the resolved config; planned together before step 1, written together at the end."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lorax.io.atomic import FILES_FOLDER, Planned, atomic_path, check_outputs

if TYPE_CHECKING:
    from lorax.training.config import TrainConfig


def companion_paths(output: Path) -> dict[str, Path]:
    """Files written beside the LoRA: loss curve, resolved config, validation samples."""
    stem = output.with_name(output.stem)
    return {
        "loss_csv": stem.with_name(stem.name + ".loss.csv"),
        "loss_png": stem.with_name(stem.name + ".loss.png"),
        "config": stem.with_name(stem.name + ".toml"),
        "samples": stem.with_name(stem.name + ".samples"),
        "samples_png": stem.with_name(stem.name + ".samples.png"),
    }


def plan_outputs(config: TrainConfig, output: Path) -> dict[str, Path]:
    """Check the command's output and every companion it will write together, before step 1 (``check_outputs``):
    without ``--force`` an existing one is refused with one line, as the output itself is; returns the companions.

    The samples folder (and sheet) are planned only when validation samples are asked for, and not on ``--resume``:
    the interrupted run being continued wrote them.
    """
    companions = companion_paths(output)
    planned: list[Planned] = [output, companions["config"], companions["loss_csv"], companions["loss_png"]]
    if (
        (config.validation_prompt or config.sample_prompts)
        and config.validation_every
        and config.resume is None
    ):
        sheet = companions.get("samples_png", output.with_name(output.stem + ".samples.png"))
        planned += [(companions["samples"], FILES_FOLDER), sheet]
    check_outputs(planned, config.force)
    return companions


def write_companions(
    config: TrainConfig,
    losses: list[list[float]],
    output: Path,
    *,
    checkpoints: list[Path] | None = None,
    resumed: tuple[Path, int] | None = None,
    samples: list[Path] | None = None,
    prompts: Sequence[str] | None = None,
    val_losses: list[tuple[int, float]] | None = None,
) -> dict[str, Path]:
    """The loss curve (CSV + PNG, marking ``checkpoints`` and where a ``resumed`` run started, with the held-out
    ``val_losses``), the validation ``samples`` as one sheet (rows: ``prompts``, else the config's validation prompts),
    and the resolved config beside ``output``."""
    from lorax.training.report import loss_csv, run_markers, write_loss_png, write_samples_sheet

    companions = companion_paths(output)
    with atomic_path(companions["loss_csv"], config.force) as tmp:
        tmp.write_text(loss_csv(losses, val_losses), encoding="utf-8")
    with atomic_path(companions["loss_png"], config.force) as tmp:
        write_loss_png(
            losses,
            tmp,
            title=f"lorax {config.COMMAND}: {output.name}",
            checkpoints=run_markers(checkpoints or [], *(resumed or (None, None))),
            resumed_at=resumed[1] if resumed is not None else None,
            val_losses=val_losses,
        )
    if samples:
        with atomic_path(companions["samples_png"], config.force) as tmp:
            write_samples_sheet(
                samples,
                list(prompts if prompts is not None else config.validation_prompt or []),
                tmp,
                title=f"lorax {config.COMMAND}: {output.name}, validation samples",
            )
    with atomic_path(companions["config"], config.force) as tmp:
        tmp.write_text(config.to_toml(), encoding="utf-8")
    return companions
