"""``lorax pivot``: pivotal tuning — textual inversion first, then a LoRA trained around the learned tokens.

Phase 1 is ``lorax invert``'s (``lorax.services.invert``): only the new rows train, ``--ti-steps`` steps at
``--ti-learning-rate``. Phase 2 is ``lorax train``'s LoRA job (``lorax.services.train._build``: UNet LoRA, the text
encoder's with ``--train-text``, prior preservation, caches, validation) over the same data, with the tokens frozen,
or trained on at a small learning rate with ``--continue-inversion``; loss masks apply in both phases. Steps count on
across the phases (phase 2's first step is ``ti_steps + 1``), so one folder of checkpoints and one loss curve cover
the run, and ``--resume`` picks the phase from the checkpoint.

The output is one file holding the LoRA and the tokens: kohya with the embeddings bundled
(``bundle_emb.<token>.string_to_param.*``, loaded by A1111/ComfyUI and ``lorax generate --lora``), or the seed's own
``lora_diffusion`` format. On SDXL the tokens live in both text encoders (``bundle_emb.<token>.clip_l`` / ``.clip_g``,
``lora_te1_`` / ``lora_te2_`` with ``--train-text``); ``lora_diffusion`` has no SDXL layout and is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorax import dtypes
from lorax.errors import ConfigError
from lorax.models.skeleton import skeleton
from lorax.progress import NullProgress, Progress
from lorax.services.invert import (
    Session,
    build_inversion,
    companion_paths,
    inversion_metadata,
    load_resume,
    make_batches,
    plan_outputs,
    prepare,
    steps_of,
    token_info,
    write_companions,
)
from lorax.training import setup
from lorax.training.job import LoraJob
from lorax.training.pivot_config import PivotConfig


@dataclass
class PivotResult:
    output: Path
    format: str
    tokens: list[str]
    ti_steps: int
    steps: int  # LoRA steps (phase 2)
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
    losses: list[list[float]] = field(default_factory=list)
    samples_png: Path | None = (
        None  # the validation samples as one sheet (prompts × steps), when there are any
    )


class PivotJob(LoraJob):
    """``LoraJob`` plus the learned tokens: checkpointed with the LoRA, trained on with ``--continue-inversion``.

    ``text_encoders``: the encoders whose tables hold the tokens (SDXL: both), in training mode while the tokens train.
    """

    def __init__(
        self, job: LoraJob, tokens: Any, *, continue_inversion: bool, text_encoders: list[Any]
    ) -> None:
        super().__init__(
            job.batches,
            unet=job.unet,
            text_encoder=job.text_encoder,
            accelerator=job.accelerator,
            sampler=job.sampler,
            text_encoder_2=job.text_encoder_2,
        )
        self.tokens = tokens
        self.continue_inversion = continue_inversion
        self.prompt_encoders = list(text_encoders)

    def trainable_models(self) -> list[Any]:
        models = super().trainable_models()
        if self.continue_inversion:
            unwrapped = [self.accelerator.unwrap_model(m) for m in models]
            models += [m for m in self.prompt_encoders if not any(m is u for u in unwrapped)]
        return models

    def parameters(self) -> list[Any]:
        params = super().parameters()
        return [*params, *self.tokens.parameters()] if self.continue_inversion else params

    def after_step(self, step: int) -> None:
        if self.continue_inversion:
            self.tokens.restore()

    def state_tensors(self) -> dict[str, Any]:
        return {**super().state_tensors(), **self.tokens.state_tensors()}

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        from lorax.training.inversion import is_state_key

        self.tokens.load_state_tensors({k: v for k, v in tensors.items() if is_state_key(k)})
        super().load_state_tensors({k: v for k, v in tensors.items() if not is_state_key(k)})


def pivot(config: PivotConfig, progress: Progress | None = None, *, pipeline: Any = None) -> PivotResult:
    """Pivotal tuning as ``config`` says; returns where everything went and what it measured."""
    progress = progress or NullProgress()
    config.validate()
    assert config.output is not None
    output = Path(config.output)
    plan_outputs(config, output)
    resume = load_resume(config)
    phase = resume.info.get("phase") if resume is not None else None
    session = prepare(config, progress, pipeline)
    info = token_info(session)
    ti_steps = config.ti_steps
    lora_steps = steps_of(config, session.data.batches_per_epoch())
    if resume is not None and resume.info.get("ti_steps", ti_steps) != ti_steps:
        raise ConfigError(
            f"--resume: the checkpoint's run has --ti-steps {resume.info['ti_steps']}; resume with the same value"
        )
    info["ti_steps"] = ti_steps

    resumed = (resume.path, resume.state.global_step) if resume is not None else None
    # Phase 1: textual inversion (skipped when resuming inside phase 2).
    state = None
    checkpoints: list[Path] = []
    samples: list[Path] = []
    if phase != "tuning":
        loop, _ = build_inversion(
            session, max_steps=ti_steps, info={**info, "phase": "inversion"}, progress=progress
        )
        if resume is not None:
            loop.restore(resume)
            progress.log(f"resuming inversion from {resume.path} at step {loop.state.global_step}")
        if ti_steps > 0:
            result = loop.run()
            checkpoints += result.checkpoints
            samples += result.samples
            every = config.checkpoint_every
            if every and ti_steps % every == 0 and result.steps_this_run:  # the loop skips its last step
                saved = loop.save()
                if saved is not None:
                    checkpoints.append(saved)
                    progress.log(f"checkpoint: {saved}")
        state = loop.state
    session.tokens.freeze()

    # Phase 2: LoRA around the learned tokens.
    loop2, job, prediction_type, modules = _build_tuning(session, lora_steps, info, progress)
    if state is not None:
        loop2.state = state
    else:
        assert resume is not None
        loop2.restore(resume)
        progress.log(f"resuming tuning from {resume.path} at step {loop2.state.global_step}")
    if loop2.state.global_step > ti_steps + lora_steps:
        raise ConfigError(
            f"--resume: the checkpoint is at step {loop2.state.global_step}, past this run's "
            f"{ti_steps + lora_steps} steps"
        )
    result2 = loop2.run()
    checkpoints += result2.checkpoints
    samples += result2.samples
    session.accelerator.wait_for_everyone()
    from lorax.training.report import sample_files

    sheet_files = sample_files(samples, companion_paths(output)["samples"], resumed[1] if resumed else None)

    file_bytes = 0
    if session.accelerator.is_main_process:
        file_bytes = _write(
            session,
            job,
            loop2,
            output,
            ti_steps,
            prediction_type,
            modules,
            checkpoints=checkpoints,
            resumed=resumed,
            samples=sheet_files,
        )
    session.accelerator.wait_for_everyone()
    companions = companion_paths(output)
    losses = loop2.state.losses
    return PivotResult(
        output=output,
        format=config.format,
        tokens=session.tokens.tokens,
        ti_steps=ti_steps,
        steps=loop2.state.global_step - ti_steps,
        final_loss=losses[-1][1] if losses else None,
        seconds=loop2.state.seconds,
        num_images=len(session.items),
        num_class_images=len(session.class_items),
        loss_csv=companions["loss_csv"],
        loss_png=companions["loss_png"],
        config_path=companions["config"],
        file_bytes=file_bytes,
        base_model_bytes=session.base_bytes,
        resumed_from=resume.path if resume is not None else None,
        checkpoints=checkpoints,
        samples=samples,
        modules=modules,
        losses=losses,
        samples_png=companions["samples_png"] if sheet_files else None,
    )


def _build_tuning(
    session: Session, lora_steps: int, info: dict[str, Any], progress: Progress
) -> tuple[Any, PivotJob, str, dict[str, int]]:
    """``lorax train``'s LoRA job and loop on the session's data, with the tokens in the loop."""
    from lorax.services.train import _build

    config = session.config
    assert isinstance(config, PivotConfig)
    ti_steps = config.ti_steps
    build_config = config.replace(cache_text=False) if config.continue_inversion else config
    job, loop, prepared, modules = _build(
        build_config,
        session.pipe,
        session.data,
        session.accelerator,
        session.resolution,
        lora_steps,
        session.family,
        progress,
    )
    job.batches = make_batches(session, job.batches)
    pipe = session.pipe
    pivot_job = PivotJob(
        job,
        session.tokens,
        continue_inversion=config.continue_inversion,
        text_encoders=setup.text_encoders(pipe, session.family),
    )
    if config.continue_inversion:
        params = session.tokens.make_trainable()
        _add_param_group(loop.optimizer, loop.scheduler, params, config.continue_lr, config.ti_weight_decay)
    loop.job = pivot_job
    loop.settings.max_steps = ti_steps + lora_steps
    loop.settings.info = {**info, "phase": "tuning", "rank": config.rank, "targets": config.targets}
    loop.settings.description = "tuning"
    return loop, pivot_job, prepared.prediction_type, modules


def _add_param_group(
    optimizer: Any, scheduler: Any, params: list[Any], lr: float, weight_decay: float
) -> None:
    """Add the embedding table(s) to an optimizer whose LambdaLR schedule is already built (same schedule)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    factor = scheduler.lr_lambdas[0]
    inner.add_param_group(
        {
            "params": list(params),
            "lr": lr * factor(scheduler.last_epoch),
            "initial_lr": lr,
            "weight_decay": weight_decay,
        }
    )
    scheduler.base_lrs.append(lr)
    scheduler.lr_lambdas.append(factor)


def _write(
    session: Session,
    job: PivotJob,
    loop: Any,
    output: Path,
    ti_steps: int,
    prediction_type: str,
    modules: dict[str, int],
    *,
    checkpoints: list[Path] | None = None,
    resumed: tuple[Path, int] | None = None,
    samples: list[Path] | None = None,
) -> int:

    from lorax.formats import save_lora
    from lorax.training.lora import trained_state
    from lorax.training.metadata import training_metadata

    config = session.config
    assert isinstance(config, PivotConfig)
    state = trained_state(job.components(), rank=config.rank, alpha=config.lora_alpha, family=session.family)
    state.embeddings = session.tokens.embeddings()
    metadata = training_metadata(
        config,
        family=session.family,
        prediction_type=prediction_type,
        resolution=session.resolution,
        num_images=len(session.items),
        num_class_images=len(session.class_items),
        steps=loop.state.global_step,
        epoch=loop.state.epoch,
        batches_per_epoch=session.data.batches_per_epoch(),
        started_at=session.started_at,
        finished_at=time.time(),
        seconds=loop.state.seconds,
        modules=modules,
        images=_images_summary(session, config),
        num_examples=len(session.data),
    )
    metadata.update(inversion_metadata(session, ti_steps, loop.state.seconds))
    metadata["lorax_continue_inversion"] = str(config.continue_inversion)
    dtype = dtypes.torch_dtype(config.save_dtype)
    model = skeleton(session.pipe) if config.format == "lora_diffusion" else None
    save_lora(
        state, output, format=config.format, dtype=dtype, force=config.force, metadata=metadata, model=model
    )
    write_companions(
        config, loop.state.losses, output, checkpoints=checkpoints, resumed=resumed, samples=samples
    )
    return output.stat().st_size


def _images_summary(session: Any, config: PivotConfig) -> Any:
    """kohya's dataset keys for the pivot's image folder (its tokens are the trigger words)."""
    from lorax.data.kohya import DatasetSummary, TrainingImages

    summary = DatasetSummary()
    folder = Path(config.data_dir).name if config.data_dir is not None else "images"
    summary.add(folder, config.repeats, [it.caption for it in session.items])
    summary.trigger_words.extend(session.tokens.embeddings())
    return TrainingImages(list(session.items), list(session.class_items), summary)
