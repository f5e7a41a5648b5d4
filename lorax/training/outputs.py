"""The files a training run writes beside its output: the loss curve (CSV + PNG), the validation samples and their
sheet, and the resolved config; planned together before step 1, written together at the end."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from lorax.io.atomic import FILES_FOLDER, Planned, atomic_path, check_outputs

if TYPE_CHECKING:
    from lorax.training.config import TrainConfig
    from lorax.training.loop import TrainingLoop


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


def start_run(config: TrainConfig) -> Path:
    """A run's checks before anything loads: its config's (``validate``), then its output and companions planned
    (refused where they exist, without --force). Returns the output's path."""
    config.validate()
    assert config.output is not None
    output = Path(config.output)
    plan_outputs(config, output)
    return output


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


class RunFields(TypedDict):
    """What every training command's result reports about its run and the files beside its output."""

    final_loss: float | None
    seconds: float
    loss_csv: Path
    loss_png: Path
    config_path: Path
    file_bytes: int
    resumed_from: Path | None
    checkpoints: list[Path]
    samples: list[Path]
    losses: list[list[float]]
    samples_png: Path | None


def finish_run(
    config: TrainConfig,
    loop: TrainingLoop,
    save: Callable[[], object],
    *,
    resumed: tuple[Path, int] | None,
    checkpoints: list[Path] | None = None,
    samples: list[Path] | None = None,
    **companions: Any,
) -> RunFields:
    """The end of a training run that ``loop`` ran last, on every process: the validation ``samples`` this run drew
    (default: the loop's, as are ``checkpoints``; ``resumed``: the checkpoint it continued from and its step) go to the samples folder, the
    main process ``save``s the output and writes its companions (the loop's ``checkpoints`` marked on the loss curve;
    ``write_companions``' other keywords), and all wait for it. Returns the run's ``RunFields`` (``file_bytes`` is 0
    on the other processes)."""
    from lorax.training.report import sample_files

    assert config.output is not None
    output, state, accelerator = Path(config.output), loop.state, loop.accelerator
    checkpoints = loop.checkpoints if checkpoints is None else checkpoints
    samples = loop.samples if samples is None else samples
    accelerator.wait_for_everyone()
    sheet_files = sample_files(samples, companion_paths(output)["samples"], resumed[1] if resumed else None)
    file_bytes = 0
    if accelerator.is_main_process:
        save()
        write_companions(
            config,
            state.losses,
            output,
            checkpoints=checkpoints,
            resumed=resumed,
            samples=sheet_files,
            **companions,
        )
        file_bytes = output.stat().st_size
    accelerator.wait_for_everyone()
    companion = companion_paths(output)
    return RunFields(
        final_loss=state.losses[-1][1] if state.losses else None,
        seconds=state.seconds,
        loss_csv=companion["loss_csv"],
        loss_png=companion["loss_png"],
        config_path=companion["config"],
        file_bytes=file_bytes,
        resumed_from=resumed[0] if resumed else None,
        checkpoints=checkpoints,
        samples=samples,
        losses=state.losses,
        samples_png=companion["samples_png"] if sheet_files else None,
    )


@dataclass
class LoraRunReport:
    """The fields ``lorax train``'s and ``lorax pivot``'s results share, in their JSON order. A result lists it
    first among its bases and its own leading fields in a last base (dataclass fields follow the reversed MRO):
    ``class TrainResult(LoraRunReport, _TrainHead)`` reads ``_TrainHead``'s fields, these, then its own."""

    final_loss: float | None
    seconds: float
    num_images: int
    num_class_images: int
    loss_csv: Path
    loss_png: Path
    config_path: Path
    file_bytes: int
    base_model_bytes: int
    resumed_from: Path | None = None
    checkpoints: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    modules: dict[str, int] = field(default_factory=dict)
    losses: list[list[float]] = field(default_factory=list)  # [step, loss, lr, training seconds so far]
