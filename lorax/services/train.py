"""``lorax train``: LoRA fine-tuning and DreamBooth (with prior preservation) on a Stable Diffusion model.

``train(config, progress)`` runs the whole job: read the images, load the model, generate missing class images,
inject LoRA through PEFT, train with ``TrainingLoop``, and write the LoRA (kohya by default), the loss curve (CSV + PNG)
and the resolved config beside it. Under ``accelerate launch -m lorax train …`` the same function runs on every
process; only the main process writes files.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorax import dtypes
from lorax.data.dataset import DataOptions, TrainData, derive_seed
from lorax.data.images import ImageItem, load_image_folder
from lorax.data.kohya import TrainingImages, load_training_images
from lorax.errors import ConfigError
from lorax.io.atomic import FILES_FOLDER, Planned, atomic_path, check_outputs
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
    samples_png: Path | None = (
        None  # the validation samples as one sheet (prompts × steps), when there are any
    )
    val_losses: list[list[float]] = field(default_factory=list)  # [step, held-out loss] (--val-split)
    num_val_images: int = 0


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


# Settings a resumed run must share with the run that wrote the checkpoint (else it would not continue it).
RESUME_KEYS = (
    "model",
    "rank",
    "alpha",
    "targets",
    "train_text",
    "dora",
    "algo",
    "conv_rank",
    "conv_alpha",
    "seed",
    "batch_size",
    "grad_accum",
    "resolution",
    "repeats",
    "buckets",
    "optimizer",
    "ema_decay",
    "block_dims",
    "block_lr",
    "val_split",  # the held-out images are not trained on
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
    if config.dataset_config is not None and _same_file(
        companion_paths(output)["config"], Path(config.dataset_config)
    ):
        raise ConfigError(
            f"-o {output.name} would write its resolved config over --dataset-config {config.dataset_config}; "
            "name the output differently"
        )
    companions = plan_outputs(config, output)
    from lorax.training.sample_prompts import run_prompts

    run_prompts(
        config.validation_prompt, config.sample_prompts
    )  # a bad prompt file fails before the model loads
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
    resumed_at = loop.state.global_step if resume_ckpt is not None else None
    val_loss = None
    if held_out:
        val_loss = _validation_loss(config, job, data, held_out, accelerator, max_steps, progress)
        loop.step_hooks.append(val_loss)
    if accelerator.is_main_process:
        _check_checkpoint_room(config, loop, max_steps)

    def save_lora_to(path: Path, **kwargs: Any) -> bool:
        """The LoRA as it stands, with its metadata, to ``path`` (the output or a snapshot)."""
        return _save_lora_file(
            config, job, loop, path, family, prepared, resolution, data, class_items, started_at, modules, images,
            **kwargs,
        )  # fmt: skip

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
        result = loop.run()
    finally:
        if loop.settings.tracker is not None:
            loop.settings.tracker.finish()
    accelerator.wait_for_everyone()
    from lorax.training.report import sample_files

    sheet_files = sample_files(result.samples, companions["samples"], resumed_at)

    file_bytes = 0
    if accelerator.is_main_process:
        file_bytes = _write_outputs(
            config,
            loop,
            output,
            companions,
            save_lora_to,
            resumed=(resume_ckpt.path, resumed_at)
            if resume_ckpt is not None and resumed_at is not None
            else None,
            samples=sheet_files,
            val_losses=val_loss.history if val_loss is not None else None,
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
        samples_png=companions["samples_png"] if sheet_files else None,
        val_losses=[[s, v] for s, v in val_loss.history] if val_loss is not None else [],
        num_val_images=len(held_out),
    )


def _validation_loss(
    config: TrainConfig,
    job: Any,
    data: TrainData,
    held_out: list[ImageItem],
    accelerator: Any,
    max_steps: int,
    progress: Progress,
) -> Any:
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


@dataclass
class _Prepared:
    prediction_type: str
    alpha_patterns: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # per-module alphas (--block-dims)


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

    if config.clip_skip and config.clip_skip > 1 and family == "sdxl":
        raise ConfigError(
            f"--clip-skip {config.clip_skip}: SDXL already conditions on its text encoders' penultimate layers "
            "(kohya's SDXL trainer has no clip skip either); drop it"
        )
    targets = resolve_targets(unet, text_encoder if config.train_text else None, config.targets)
    if text_encoder_2 is not None and config.train_text:
        from lorax.training.targets import find_targets

        targets["text_encoder_2"] = find_targets(text_encoder_2, config.targets, "text_encoder_2")
    blocks = _block_plan(config, targets["unet"], family, unet)
    if blocks is not None:
        targets["unet"] = blocks.targets
    modules = {k: len(v) for k, v in targets.items()}
    initial = _initial_lora(config, pipe, targets, family, progress)
    lora_kwargs: dict[str, Any] = dict(
        rank=config.rank, alpha=config.lora_alpha, dropout=config.lora_dropout, dora=config.dora
    )
    from lorax.training.algo_setup import inject_unet

    unet_params, targets["unet"], unet_alphas = inject_unet(
        config, unet, targets["unet"], blocks, derive_seed(config.seed, "init", "unet"), lora_kwargs
    )
    modules["unet"] = len(targets["unet"])
    groups: list[dict[str, Any]] = (
        blocks.groups(unet, config.learning_rate)
        if blocks is not None
        else [{"params": unet_params, "lr": config.learning_rate}]
    )
    if config.train_text:
        from lorax.training.algo_setup import text_injector

        inject_lora = text_injector(config)  # LoRA, or the --algo loha/lokr text layers
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
    if initial is not None:
        from lorax.training.lora import load_lora_tensors

        live = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
        for component, tensors in initial.items():
            load_lora_tensors(live[component], tensors)
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

    if config.loraplus_ratio is not None:
        from lorax.training.optim import loraplus_groups

        groups = loraplus_groups(groups, [unet, text_encoder, text_encoder_2], config.loraplus_ratio)

    from lorax.training.speed import apply_unet_knobs

    apply_unet_knobs(unet, config, progress.log)
    optimizer = build_optimizer(config.optimizer, groups, weight_decay=config.weight_decay)
    scheduler = build_scheduler(
        config.lr_scheduler,
        optimizer,
        warmup_steps=_warmup_steps(config, max_steps),
        total_steps=max_steps,
        cycles=config.lr_cycles,
        power=config.lr_power,
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
        **({"clip_skip": config.clip_skip} if config.clip_skip else {}),
    )
    from lorax.training.masks import with_train_masks

    batches = with_train_masks(batches, config, progress.log)

    sampler = None
    from lorax.training.sample_prompts import run_prompts

    sample_prompts = run_prompts(config.validation_prompt, config.sample_prompts)
    if sample_prompts and config.validation_every:
        assert config.output is not None
        folder = companion_paths(Path(config.output))["samples"]
        sampler = Sampler(
            setup.sampling_pipeline(pipe, accelerator, unet, live_encoders),
            list(sample_prompts),
            folder,
            resolution,
            *config.sampling,
            config.seed,
            is_main=accelerator.is_main_process,
            release=(lambda: vae.to("cpu")) if cache is not None else None,
            clip_skip=config.clip_skip or 1,
        )
    job = LoraJob(
        batches,
        unet=unet,
        text_encoder=text_encoder if config.train_text else None,
        accelerator=accelerator,
        sampler=sampler,
        text_encoder_2=text_encoder_2 if config.train_text else None,
    )
    if config.ema_decay is not None:
        from lorax.training.ema import EmaJob

        job = EmaJob(job, config.ema_decay)  # type: ignore[assignment]  # the job, its weights also averaged
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
    alpha_patterns = {"unet": unet_alphas} if unet_alphas else {}  # --block-dims, --algo locon's convs
    return job, loop, _Prepared(objective.prediction_type, alpha_patterns), modules


def _write_outputs(
    config: TrainConfig,
    loop: Any,
    output: Path,
    companions: dict[str, Path],
    save_lora_to: Callable[..., bool],
    *,
    resumed: tuple[Path, int] | None = None,
    samples: list[Path] | None = None,
    val_losses: list[tuple[int, float]] | None = None,
) -> int:
    from lorax.training.report import loss_csv, run_markers, write_loss_png, write_samples_sheet
    from lorax.training.sample_prompts import run_prompts

    save_lora_to(output)
    with atomic_path(companions["loss_csv"], config.force) as tmp:
        tmp.write_text(loss_csv(loop.state.losses, val_losses), encoding="utf-8")
    with atomic_path(companions["loss_png"], config.force) as tmp:
        write_loss_png(
            loop.state.losses,
            tmp,
            title=f"lorax train: {output.name}",
            checkpoints=run_markers(loop.checkpoints, *(resumed or (None, None))),
            resumed_at=resumed[1] if resumed is not None else None,
            val_losses=val_losses,
        )
    if samples:
        with atomic_path(companions["samples_png"], config.force) as tmp:
            write_samples_sheet(
                samples,
                [spec.prompt for spec in run_prompts(config.validation_prompt, config.sample_prompts)],
                tmp,
                title=f"lorax train: {output.name}, validation samples",
            )
    with atomic_path(companions["config"], config.force) as tmp:
        tmp.write_text(config.to_toml(), encoding="utf-8")
    return output.stat().st_size


def _save_lora_file(
    config: TrainConfig,
    job: Any,
    loop: Any,
    path: Path,
    family: str,
    prepared: _Prepared,
    resolution: int,
    data: TrainData,
    class_items: list[ImageItem],
    started_at: float,
    modules: dict[str, int],
    images: TrainingImages,
    *,
    max_steps: int | None = None,
    finite_only: bool = False,
) -> bool:
    """Write the LoRA as it stands to ``path`` (the output, or a snapshot at ``max_steps``' run) with its metadata;
    with ``finite_only`` nothing is written (False) when a weight is not finite."""
    import torch

    from lorax.formats import save_lora
    from lorax.training.lora import trained_state
    from lorax.training.metadata import training_metadata

    if finite_only and not all(bool(torch.isfinite(t).all()) for t in job.state_tensors().values()):
        return False
    from lorax.training.algos import LYCORIS_ALGOS, lycoris_state
    from lorax.training.ema import averaged_weights

    with averaged_weights(job):  # --ema-decay: the average is the output
        state = (
            lycoris_state(job.components(), family)
            if config.algo in LYCORIS_ALGOS
            else trained_state(
                job.components(),
                rank=config.rank,
                alpha=config.lora_alpha,
                family=family,
                alpha_patterns=prepared.alpha_patterns,
            )
        )
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
        max_steps=max_steps,
    )
    dtype = dtypes.torch_dtype(config.save_dtype)
    save_lora(state, path, format=config.format, dtype=dtype, force=config.force, metadata=metadata)
    return True


def _plan_snapshots(
    config: TrainConfig, output: Path, data: TrainData, max_steps: int, start_step: int, *, check: bool = True
) -> Any:
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


def _initial_lora(
    config: TrainConfig, pipe: Any, targets: dict[str, list[str]], family: str, progress: Progress
) -> dict[str, dict[str, Any]] | None:
    """``--init-lora``'s weights per component, checked against the run (not when resuming: the checkpoint wins)."""
    if config.init_lora is None or config.resume is not None:
        return None
    from lorax.training.init_lora import initial_lora

    return initial_lora(
        Path(config.init_lora),
        pipe,
        targets,
        rank=config.rank,
        alpha=config.lora_alpha,
        family=family,
        log=progress.log,
    )


def _warmup_steps(config: TrainConfig, max_steps: int) -> int:
    from lorax.training.optim import warmup_steps_of

    return warmup_steps_of(config.warmup_steps, config.warmup_ratio, max_steps)


def _block_plan(config: TrainConfig, targets: list[str], family: str, unet: Any) -> Any:
    """``--block-dims`` / ``--block-lr`` over kohya's UNet blocks, or ``None`` without them."""
    if config.block_dims is None and config.block_lr is None:
        return None
    from lorax.training.blocks import BlockPlan

    return BlockPlan(
        targets,
        family,
        unet.config,
        rank=config.rank,
        alpha=config.alpha,
        block_dims=config.block_dims,
        block_lr=config.block_lr,
    )
