"""``lorax train``: LoRA fine-tuning and DreamBooth (with prior preservation) on a Stable Diffusion model.

``train(config, progress)`` orchestrates the run: read the images, load the model, generate missing class images,
set up ``LoraRecipe`` (``lorax.training.lora_recipe``: LoRA through PEFT, optimizer, the family's batches, the job),
run its ``TrainingLoop`` (with snapshots and a held-out validation loss as step hooks), and write the LoRA (kohya by
default), the loss curve (CSV + PNG) and the resolved config beside it. Under ``accelerate launch -m lorax train …``
the same function runs on every process; only the main process writes files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.data.dataset import TrainData
from lorax.data.images import ImageItem
from lorax.data.training_images import TrainingImages, load_training_images
from lorax.errors import ConfigError
from lorax.progress import NullProgress, Progress
from lorax.training.config import TrainConfig
from lorax.training.lora_recipe import RESUME_KEYS, LoraRecipe, check_resume_fits, resume_identity
from lorax.training.outputs import LoraRunReport, companion_paths, finish_run, plan_outputs
from lorax.training.recipe import (
    check_within,
    concept_class_items,
    load_base_model,
    load_class_items,
    load_resume,
    make_accelerator,
    open_model,
    total_steps,
    train_data,
    warn_if_toy_model,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

    from lorax.training.job import LoraJob
    from lorax.training.loop import TrainingLoop
    from lorax.training.val_loss import ValidationLoss

__all__ = [
    "RESUME_KEYS",
    "TrainResult",
    "check_resume_fits",
    "companion_paths",
    "load_base_model",
    "make_accelerator",
    "plan_outputs",
    "resume_identity",
    "total_steps",
    "train",
    "warn_if_toy_model",
]


@dataclass
class _TrainHead:
    output: Path
    format: str
    steps: int
    epochs: float  # epochs done (micro-batches / batches per epoch)


@dataclass
class TrainResult(LoraRunReport, _TrainHead):  # JSON order: _TrainHead's fields, LoraRunReport's, these
    processes: int = 1
    main_process: bool = True  # under accelerate/torchrun only the main process writes and reports
    samples_png: Path | None = (
        None  # the validation samples as one sheet (prompts × steps), when there are any
    )
    val_losses: list[list[float]] = field(default_factory=list)  # [step, held-out loss] (--val-split)
    num_val_images: int = 0


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _bucket_bounds(images: TrainingImages) -> dict[str, Any]:
    """kohya's min/max bucket resolution and step from a dataset config."""
    spec = images.spec
    if spec is None:
        return {}
    bounds = {
        "bucket_min": spec.min_bucket_reso,
        "bucket_max": spec.max_bucket_reso,
        "bucket_step": spec.bucket_reso_steps,
    }
    return {k: v for k, v in bounds.items() if v is not None}


def _check_checkpoint_room(config: TrainConfig, loop: TrainingLoop, max_steps: int) -> None:
    """Before step 1: the checkpoint folder (written on Ctrl-C and every N steps) can be written, and its disk has
    room, roughly, for the checkpoints asked for (each the trainable weights and two optimizer moments, fp32)."""
    from lorax.io.atomic import check_free_space, check_writable

    folder = config.checkpoints_path
    check_writable(folder)
    if not config.checkpoint_every:
        return
    count = (max_steps - 1) // config.checkpoint_every  # saved at every N-th step before the last
    if count <= 0:
        return
    per = 3 * 4 * sum(int(t.numel()) for t in loop.job.state_tensors().values())
    check_free_space(
        folder, count * per, f"{count} checkpoints (--checkpoint-every {config.checkpoint_every})"
    )


def train(config: TrainConfig, progress: Progress | None = None, *, pipeline: Any = None) -> TrainResult:
    """Train a LoRA as ``config`` says; returns where everything went and what it measured.

    ``pipeline``: an already loaded ``StableDiffusionPipeline`` to train on instead of loading ``config.model``
    (benchmarks build random-weight models in memory; ``config.model`` is then only recorded).
    """

    progress = progress or NullProgress()
    config.validate()
    assert config.output is not None
    output = Path(config.output)
    if config.dataset_config is not None and _same_file(
        companion_paths(output)["config"], Path(config.dataset_config)
    ):
        raise ConfigError(
            f"-o {output.name} would write its resolved config over --dataset-config {config.dataset_config}; "
            "name the output differently"
        )
    plan_outputs(config, output)
    from lorax.training.sample_prompts import run_prompts

    run_prompts(
        config.validation_prompt, config.sample_prompts
    )  # a bad prompt file fails before the model loads
    resume_ckpt = load_resume(config, check_command=False)
    images = load_training_images(
        config.data_dir,
        dataset_config=config.dataset_config,
        class_dir=config.class_dir,
        instance_prompt=config.instance_prompt,
        repeats=config.repeats,
        strict=config.strict,
        recursive=config.recursive,
        warn=progress.log,
        concepts=config.concept,
    )
    items = images.items
    held_out: list[ImageItem] = []
    if config.val_split:
        from lorax.training.val_loss import split_held_out

        items, held_out = split_held_out(items, config.val_split, config.seed)
        progress.log(f"validation loss on {len(held_out)} held-out image(s), not trained on")
    warn_if_toy_model(config.model, items, progress)
    started_at = time.time()

    from lorax.training import base

    base.quiet_libraries()
    pipe, family, resolution, accelerator = open_model(config, progress, pipeline)
    base_bytes = base.model_bytes(pipe)

    class_items: list[ImageItem] = images.class_items
    pools = None
    if config.prior_preservation:
        class_items = load_class_items(config, pipe, resolution, accelerator, progress)
    elif config.concept_class:  # each concept its own class images
        class_items, pools = concept_class_items(
            config, pipe, resolution, accelerator, progress, images.summary
        )
    data = train_data(
        config, items, class_items, resolution, accelerator, class_pools=pools, **_bucket_bounds(images)
    )
    max_steps = total_steps(config, data.batches_per_epoch())

    recipe = LoraRecipe(config, pipe, data, accelerator, resolution, family)
    loop = recipe.setup(max_steps, progress)
    if resume_ckpt is not None:
        check_resume_fits(config, resume_ckpt.info, resume_ckpt.path)
        loop.restore(resume_ckpt)
        check_within(loop.state.global_step, max_steps)
        progress.log(f"resuming from {resume_ckpt.path} at step {loop.state.global_step}")
    resumed_at = loop.state.global_step if resume_ckpt is not None else None
    val_loss = None
    if held_out:
        val_loss = _validation_loss(config, recipe.job, data, held_out, accelerator, max_steps, progress)
        loop.step_hooks.append(val_loss)
    if accelerator.is_main_process:
        _check_checkpoint_room(config, loop, max_steps)

    def save_lora_to(path: Path, **kwargs: Any) -> bool:
        """The LoRA as it stands, with its metadata, to ``path`` (the output or a snapshot)."""
        return bool(
            recipe.save(loop, path, images=images, class_items=class_items, started_at=started_at, **kwargs)
        )

    if config.save_every or config.save_every_epochs:
        from lorax.training.snapshots import Snapshots

        loop.step_hooks.append(
            Snapshots(
                _plan_snapshots(
                    config, output, data, max_steps, loop.state.global_step, check=accelerator.is_main_process
                ),
                lambda path: save_lora_to(path, max_steps=max_steps, finite_only=True),
                keep_last=config.save_last,
                log=progress.log,
                is_main=accelerator.is_main_process,
            )
        )
    try:
        loop.run()
    finally:
        if loop.settings.tracker is not None:
            loop.settings.tracker.finish()
    resumed = (resume_ckpt.path, resumed_at) if resume_ckpt is not None and resumed_at is not None else None
    run = finish_run(
        config,
        loop,
        lambda: save_lora_to(output),
        resumed=resumed,
        prompts=[spec.prompt for spec in run_prompts(config.validation_prompt, config.sample_prompts)],
        val_losses=val_loss.history if val_loss is not None else None,
    )
    return TrainResult(
        output=output,
        format=config.format,
        steps=loop.state.global_step,
        epochs=round(loop.state.micro_step / data.batches_per_epoch(), 3),
        **run,
        num_images=len(items),
        num_class_images=len(class_items),
        base_model_bytes=base_bytes,
        modules=recipe.modules,
        processes=accelerator.num_processes,
        main_process=accelerator.is_main_process,
        val_losses=[[s, v] for s, v in val_loss.history] if val_loss is not None else [],
        num_val_images=len(held_out),
    )


def _validation_loss(
    config: TrainConfig,
    job: LoraJob,
    data: TrainData,
    held_out: list[ImageItem],
    accelerator: Accelerator,
    max_steps: int,
    progress: Progress,
) -> ValidationLoss:
    """The ``--val-split`` step hook over the held-out images (``lorax.training.val_loss``)."""
    from lorax.training.val_loss import ValidationLoss, held_out_data, validation_every

    return ValidationLoss(
        job.batches,
        held_out_data(held_out, data),
        unet=accelerator.unwrap_model(job.unet),
        models=job.trainable_models(),
        autocast=accelerator.autocast,
        seed=config.seed,
        every=validation_every(config.validation_every, max_steps),
        max_steps=max_steps,
        is_main=accelerator.is_main_process,
        log=progress.log,
    )


def _plan_snapshots(
    config: TrainConfig, output: Path, data: TrainData, max_steps: int, start_step: int, *, check: bool = True
) -> dict[int, list[Path]]:
    """The snapshots this run will write (``--save-every``, ``--save-every-epochs``), checked like the output:
    one that exists is refused without --force before step 1."""
    from lorax.io.atomic import check_outputs
    from lorax.training.snapshots import plan_snapshots

    bpe = data.batches_per_epoch()
    plan = plan_snapshots(
        output,
        max_steps=max_steps,
        every_steps=config.save_every,
        every_epochs=config.save_every_epochs,
        epoch_after=lambda step: step * config.grad_accum // bpe,
        start_step=start_step,
    )
    if check:  # the main process, which writes them
        check_outputs([p for paths in plan.values() for p in paths], config.force)
    return plan
