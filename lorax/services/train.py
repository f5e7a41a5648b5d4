"""``lorax train``: LoRA fine-tuning and DreamBooth (with prior preservation) on a Stable Diffusion model.

``train(config, progress)`` runs the whole job: read the images, load the model, generate missing class images,
inject LoRA through PEFT, train with ``TrainingLoop``, and write the LoRA (kohya by default), the loss curve (CSV + PNG)
and the resolved config beside it. Under ``accelerate launch -m lorax train …`` the same function runs on every
process; only the main process writes files.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorax.data.dataset import DataOptions, TrainData, derive_seed
from lorax.data.images import ImageItem, load_image_folder
from lorax.data.kohya import TrainingImages, load_training_images
from lorax.errors import ConfigError
from lorax.io.atomic import atomic_path, check_output
from lorax.progress import NullProgress, Progress
from lorax.training.config import TrainConfig


@dataclass
class TrainResult:
    output: Path
    format: str
    steps: int
    epochs: float  # epochs done (micro-batches / batches per epoch)
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
    processes: int = 1
    main_process: bool = True  # under accelerate/torchrun only the main process writes and reports


def companion_paths(output: Path) -> dict[str, Path]:
    """Files written beside the LoRA: loss curve, resolved config, validation samples."""
    stem = output.with_name(output.stem)
    return {
        "loss_csv": stem.with_name(stem.name + ".loss.csv"),
        "loss_png": stem.with_name(stem.name + ".loss.png"),
        "config": stem.with_name(stem.name + ".toml"),
        "samples": stem.with_name(stem.name + ".samples"),
    }


# Settings a resumed run must share with the run that wrote the checkpoint (else it would not continue it).
RESUME_KEYS = (
    "model",
    "rank",
    "alpha",
    "targets",
    "train_text",
    "dora",
    "seed",
    "batch_size",
    "grad_accum",
    "resolution",
    "repeats",
    "buckets",
    "optimizer",
)


def resume_identity(config: TrainConfig) -> dict[str, Any]:
    return {k: getattr(config, k) for k in RESUME_KEYS}


def check_resume_fits(config: TrainConfig, info: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint written with other values of the settings that define the run."""
    mine = resume_identity(config)
    differ = [
        f"{config.option_name(k)} {info[k]!r} (now {mine[k]!r})"
        for k in RESUME_KEYS
        if k in info and info[k] != mine[k]
    ]
    if differ:
        raise ConfigError(
            f"--resume {path}: the checkpoint was trained with " + ", ".join(differ) + "; pass the same"
        )


def total_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    if config.steps is not None:
        return config.steps
    if config.epochs is not None:
        return config.epochs * math.ceil(batches_per_epoch / config.grad_accum)
    return TrainConfig.DEFAULT_STEPS


def make_accelerator(config: TrainConfig) -> Any:
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        AcceleratorState._reset_state(
            reset_partial_state=True
        )  # one process may run several trainings (tests)
    device = (config.device or "auto").lower()
    if device in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError(
            f"--device {config.device}: no CUDA GPU is available; use --device cpu (or leave it out)"
        )
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if cpu and config.mixed_precision == "fp16":
        raise ConfigError(
            "--mixed-precision fp16 needs a CUDA GPU; on the CPU use --mixed-precision bf16 or no (fp32)"
        )
    try:
        return Accelerator(mixed_precision=config.mixed_precision, cpu=cpu)
    except ValueError as err:
        raise ConfigError(f"--mixed-precision {config.mixed_precision}: {err}") from None


def _class_items(
    config: TrainConfig, pipe: Any, resolution: int, accelerator: Any, progress: Progress
) -> list[ImageItem]:
    """The class images for prior preservation, generating the missing ones with the base model."""
    import torch

    from lorax.data.prior import class_cache_dir, ensure_class_images

    assert config.class_prompt is not None
    steps, guidance = config.sampling
    folder = (
        Path(config.class_dir)
        if config.class_dir is not None
        else class_cache_dir(config.model, config.class_prompt, resolution, steps, guidance)
    )
    if accelerator.is_main_process:
        pipe.to(accelerator.device)
        pipe.set_progress_bar_config(disable=True)

        def generate(i: int) -> Any:
            generator = torch.Generator(device="cpu").manual_seed(derive_seed(config.seed, "class-image", i))
            with torch.no_grad(), accelerator.autocast():
                return pipe(
                    config.class_prompt,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    height=resolution,
                    width=resolution,
                    generator=generator,
                ).images[0]

        with progress.task("class images", total=config.num_class_images) as task:
            made = ensure_class_images(folder, config.num_class_images, generate, advance=task.advance)
        if made:
            progress.log(f"generated {made} class images in {folder}")
    accelerator.wait_for_everyone()
    items = load_image_folder(folder, instance_prompt=config.class_prompt, what="class", warn=progress.log)
    return [ImageItem(it.path, config.class_prompt, it.size) for it in items[: config.num_class_images]]


def warn_if_toy_model(model: str, items: list[ImageItem], progress: Progress) -> None:
    """One warning line when a built-in toy model meets images larger than the ones it makes."""
    from lorax.models.defaults import model_defaults
    from lorax.models.registry import BUILTIN_MODELS

    size = model_defaults(model).size if model in BUILTIN_MODELS else None
    if size is None or not items:
        return
    larger = [it for it in items if min(it.size) > min(size)]
    if not larger:
        return
    width, height = max((it.size for it in larger), key=lambda s: s[0] * s[1])
    progress.log(
        f"warning: {len(larger)} of {len(items)} images are larger (up to {width}×{height}) than the {size[0]}×{size[1]} "
        f"pictures the built-in {model} model makes, a toy for trying lorax: pass --model with your base model "
        "(a diffusers folder, Hub id or .safetensors file), or set LORAX_MODEL"
    )


def load_base_model(spec: str, progress: Progress) -> Any:
    """The base pipeline; a big one is announced first (``loading model …``), as it takes a while to read."""
    from lorax.models.pipeline import load_is_slow
    from lorax.training import base

    if not load_is_slow(spec):
        return base.load_base_pipeline(spec)
    with progress.task(f"loading model {spec}"):
        return base.load_base_pipeline(spec)


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


def _check_checkpoint_room(config: TrainConfig, loop: Any, max_steps: int) -> None:
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
    check_output(output, config.force)
    companions = companion_paths(output)
    if config.dataset_config is not None and _same_file(companions["config"], Path(config.dataset_config)):
        raise ConfigError(
            f"-o {output.name} would write its resolved config over --dataset-config {config.dataset_config}; "
            "name the output differently"
        )
    resume_ckpt = None
    if config.resume is not None:
        from lorax.training.checkpoint import load_checkpoint

        resume_ckpt = load_checkpoint(config.resume)
    images = load_training_images(
        config.data_dir,
        dataset_config=config.dataset_config,
        class_dir=config.class_dir,
        instance_prompt=config.instance_prompt,
        repeats=config.repeats,
        strict=config.strict,
        recursive=config.recursive,
        warn=progress.log,
    )
    items = images.items
    warn_if_toy_model(config.model, items, progress)
    started_at = time.time()

    from lorax.training import base

    base.quiet_libraries()
    pipe = pipeline if pipeline is not None else load_base_model(config.model, progress)
    family = base.family_of(pipe)
    base.check_trainable(pipe, family)
    base_bytes = base.model_bytes(pipe)
    resolution = config.resolution or base.default_resolution(pipe)
    accelerator = make_accelerator(config)

    class_items: list[ImageItem] = images.class_items
    if config.prior_preservation:
        class_items = _class_items(config, pipe, resolution, accelerator, progress)

    options = DataOptions.from_config(config, resolution, **_bucket_bounds(images))
    data = TrainData(
        items,
        options,
        class_items=class_items,
        class_prompt=config.class_prompt,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
    )
    max_steps = total_steps(config, data.batches_per_epoch())

    job, loop, prepared, modules = _build(
        config, pipe, data, accelerator, resolution, max_steps, family, progress
    )
    if resume_ckpt is not None:
        check_resume_fits(config, resume_ckpt.info, resume_ckpt.path)
        loop.restore(resume_ckpt)
        if loop.state.global_step > max_steps:
            raise ConfigError(
                f"--resume: the checkpoint is at step {loop.state.global_step}, past this run's {max_steps} steps"
            )
        progress.log(f"resuming from {resume_ckpt.path} at step {loop.state.global_step}")
    if accelerator.is_main_process:
        _check_checkpoint_room(config, loop, max_steps)
    try:
        result = loop.run()
    finally:
        if loop.settings.tracker is not None:
            loop.settings.tracker.finish()
    accelerator.wait_for_everyone()

    file_bytes = 0
    if accelerator.is_main_process:
        file_bytes = _write_outputs(
            config,
            job,
            loop,
            output,
            companions,
            family,
            prepared,
            resolution,
            data,
            class_items,
            started_at,
            modules,
            images,
        )
    accelerator.wait_for_everyone()
    losses = loop.state.losses
    return TrainResult(
        output=output,
        format=config.format,
        steps=loop.state.global_step,
        epochs=round(loop.state.micro_step / data.batches_per_epoch(), 3),
        final_loss=losses[-1][1] if losses else None,
        seconds=loop.state.seconds,
        num_images=len(items),
        num_class_images=len(class_items),
        loss_csv=companions["loss_csv"],
        loss_png=companions["loss_png"],
        config_path=companions["config"],
        file_bytes=file_bytes,
        base_model_bytes=base_bytes,
        resumed_from=resume_ckpt.path if resume_ckpt is not None else None,
        checkpoints=result.checkpoints,
        samples=result.samples,
        modules=modules,
        losses=losses,
        processes=accelerator.num_processes,
        main_process=accelerator.is_main_process,
    )


@dataclass
class _Prepared:
    prediction_type: str


def _build(
    config: TrainConfig,
    pipe: Any,
    data: TrainData,
    accelerator: Any,
    resolution: int,
    max_steps: int,
    family: str,
    progress: Progress,
) -> tuple[Any, Any, _Prepared, dict[str, int]]:
    """Models on the device, LoRA injected, caches filled, optimizer and loop ready."""

    from lorax.training import setup
    from lorax.training.job import LoraJob, Sampler
    from lorax.training.loop import LoopSettings, TrainingLoop
    from lorax.training.lora import inject_lora
    from lorax.training.optim import build_optimizer, build_scheduler
    from lorax.training.targets import resolve_targets

    device = accelerator.device
    unet, vae = pipe.unet, pipe.vae
    # SDXL: the second text encoder conditions (and, with --train-text, trains) alongside the first
    encoders = setup.text_encoders(pipe, family)
    text_encoder, text_encoder_2 = encoders[0], (encoders[1] if len(encoders) == 2 else None)
    setup.freeze(unet, vae, encoders, sdpa=config.sdpa)

    targets = resolve_targets(unet, text_encoder if config.train_text else None, config.targets)
    if text_encoder_2 is not None and config.train_text:
        from lorax.training.targets import find_targets

        targets["text_encoder_2"] = find_targets(text_encoder_2, config.targets, "text_encoder_2")
    modules = {k: len(v) for k, v in targets.items()}
    lora_kwargs: dict[str, Any] = dict(
        rank=config.rank, alpha=config.lora_alpha, dropout=config.lora_dropout, dora=config.dora
    )
    unet_params = inject_lora(
        unet, targets["unet"], seed=derive_seed(config.seed, "init", "unet"), **lora_kwargs
    )
    groups: list[dict[str, Any]] = [{"params": unet_params, "lr": config.learning_rate}]
    if config.train_text:
        te_params = inject_lora(
            text_encoder, targets["text_encoder"], seed=derive_seed(config.seed, "init", "te"), **lora_kwargs
        )
        groups.append({"params": te_params, "lr": config.text_lr})
        if text_encoder_2 is not None:
            te2_params = inject_lora(
                text_encoder_2,
                targets["text_encoder_2"],
                seed=derive_seed(config.seed, "init", "te2"),
                **lora_kwargs,
            )
            groups.append({"params": te2_params, "lr": config.text_lr})
    setup.place(unet, vae, encoders, device, config.mixed_precision)
    for group in groups:  # trainable LoRA weights stay fp32 under mixed precision
        for p in group["params"]:
            p.data = p.data.float()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if config.train_text:
            text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if text_encoder_2 is not None:
                text_encoder_2.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )

    from lorax.training.speed import apply_unet_knobs

    apply_unet_knobs(unet, config, progress.log)
    optimizer = build_optimizer(config.optimizer, groups, weight_decay=config.weight_decay)
    scheduler = build_scheduler(
        config.lr_scheduler, optimizer, warmup_steps=config.warmup_steps, total_steps=max_steps
    )
    if config.train_text and text_encoder_2 is not None:
        unet, text_encoder, text_encoder_2, optimizer = accelerator.prepare(
            unet, text_encoder, text_encoder_2, optimizer
        )
    elif config.train_text:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)

    live_encoders = [
        m for m in (text_encoder, text_encoder_2) if m is not None
    ]  # accelerate's wrappers when trained
    objective = setup.objective_for(pipe, config)
    from lorax.training.speed import cache_latents

    cache = cache_latents(config, vae, data, progress)
    batches = setup.diffusion_batches(
        pipe,
        data,
        unet=unet,
        vae=vae,
        encoders=live_encoders,
        objective=objective,
        device=device,
        prior_weight=config.prior_weight,
        latent_cache=cache,
        cache_text=config.cache_text and not config.train_text,
    )
    from lorax.training.masks import with_train_masks

    batches = with_train_masks(batches, config, progress.log)

    sampler = None
    if config.validation_prompt and config.validation_every:
        assert config.output is not None
        folder = companion_paths(Path(config.output))["samples"]
        sampler = Sampler(
            setup.sampling_pipeline(pipe, accelerator, unet, live_encoders),
            list(config.validation_prompt),
            folder,
            resolution,
            *config.sampling,
            config.seed,
            is_main=accelerator.is_main_process,
            release=(lambda: vae.to("cpu")) if cache is not None else None,
        )
    job = LoraJob(
        batches,
        unet=unet,
        text_encoder=text_encoder if config.train_text else None,
        accelerator=accelerator,
        sampler=sampler,
        text_encoder_2=text_encoder_2 if config.train_text else None,
    )
    settings = LoopSettings.from_config(
        config,
        max_steps,
        memory_flags=config.memory_flags(),
        info={"family": family, **resume_identity(config)},
    )
    from lorax.training.trackers import make_tracker

    settings.tracker = make_tracker(config, accelerator, progress.log)
    loop = TrainingLoop(
        job,
        accelerator=accelerator,
        optimizer=optimizer,
        scheduler=scheduler,
        settings=settings,
        progress=progress,
    )
    return job, loop, _Prepared(objective.prediction_type), modules


def _write_outputs(
    config: TrainConfig,
    job: Any,
    loop: Any,
    output: Path,
    companions: dict[str, Path],
    family: str,
    prepared: _Prepared,
    resolution: int,
    data: TrainData,
    class_items: list[ImageItem],
    started_at: float,
    modules: dict[str, int],
    images: TrainingImages,
) -> int:
    import torch

    from lorax.formats import save_lora
    from lorax.training.lora import trained_state
    from lorax.training.metadata import training_metadata
    from lorax.training.report import loss_csv, write_loss_png

    state = trained_state(job.components(), rank=config.rank, alpha=config.lora_alpha, family=family)
    metadata = training_metadata(
        config,
        family=family,
        prediction_type=prepared.prediction_type,
        resolution=resolution,
        num_images=len(data.items),
        num_class_images=len(class_items),
        steps=loop.state.global_step,
        epoch=loop.state.epoch,
        batches_per_epoch=data.batches_per_epoch(),
        started_at=started_at,
        finished_at=time.time(),
        seconds=loop.state.seconds,
        modules=modules,
        images=images,
        num_examples=len(data),
    )
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[config.save_dtype]
    save_lora(state, output, format=config.format, dtype=dtype, force=config.force, metadata=metadata)
    with atomic_path(companions["loss_csv"], force=True) as tmp:
        tmp.write_text(loss_csv(loop.state.losses), encoding="utf-8")
    with atomic_path(companions["loss_png"], force=True) as tmp:
        write_loss_png(loop.state.losses, tmp, title=f"lorax train: {output.name}")
    with atomic_path(companions["config"], force=True) as tmp:
        tmp.write_text(config.to_toml(), encoding="utf-8")
    return output.stat().st_size
