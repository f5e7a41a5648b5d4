"""The training recipe shared by ``train``, ``invert`` and ``pivot``, and the steps every run takes before it.

A command's recipe is a ``Recipe``: ``setup`` builds what trains (models on the device, the trainable weights, the
optimizer and schedule, the family's batches and objective, the ``Job``) and the ``TrainingLoop`` over it; the loop
runs the job's train step (``Job.loss`` / ``Job.after_step``); ``save`` writes the result. ``LoraRecipe``
(``lorax.training.lora_recipe``) trains LoRA layers, ``InversionRecipe`` (``lorax.training.inversion_recipe``) new
token rows, ``PivotRecipe`` (``lorax.training.pivot_recipe``) a LoRA around learned tokens; the services only
orchestrate them (read the config, plan the outputs, resume, run, report).

What a family changes (its conditioning, its objective) is no recipe's business: ``lorax.training.family_hooks``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.data.dataset import DataOptions, TrainData, derive_seed
from lorax.data.images import ImageItem, load_image_folder
from lorax.errors import ConfigError, MismatchError
from lorax.progress import Progress

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from lorax.training.checkpoint import Checkpoint
    from lorax.training.config import TrainConfig


class Recipe(ABC):
    """One command's way of training: ``setup`` → the loop (running the job's steps) → ``save``."""

    @abstractmethod
    def setup(self, max_steps: int, progress: Progress) -> Any:
        """Models, trainable weights, optimizer, schedule, batches and job, and the ``TrainingLoop`` over them."""

    @abstractmethod
    def save(self, loop: Any, path: Path, **options: Any) -> Any:
        """Write what ``loop`` trained to ``path``."""


def make_loop(
    job: Any,
    config: TrainConfig,
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    max_steps: int,
    progress: Progress,
    **settings: Any,
) -> Any:
    """The ``TrainingLoop`` over ``job`` with ``config``'s loop settings (and ``settings``: info, description…)."""
    from lorax.training.loop import LoopSettings, TrainingLoop

    loop_settings = LoopSettings.from_config(
        config, max_steps, memory_flags=config.memory_flags(), **settings
    )
    return TrainingLoop(
        job,
        accelerator=accelerator,
        optimizer=optimizer,
        scheduler=scheduler,
        settings=loop_settings,
        progress=progress,
    )


def total_steps(config: TrainConfig, batches_per_epoch: int) -> int:
    if config.steps is not None:
        return int(config.steps)
    if config.epochs is not None:
        return int(config.epochs * math.ceil(batches_per_epoch / config.grad_accum))
    return int(config.DEFAULT_STEPS)


def make_accelerator(config: TrainConfig) -> Accelerator:
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
    from lorax.training.distributed import accelerate_without_fsdp

    try:
        with accelerate_without_fsdp():  # lorax shards the frozen base itself (lorax.training.distributed)
            return Accelerator(mixed_precision=config.mixed_precision, cpu=cpu)
    except ValueError as err:
        raise ConfigError(f"--mixed-precision {config.mixed_precision}: {err}") from None


def load_class_items(
    config: TrainConfig,
    pipe: Any,
    resolution: int,
    accelerator: Accelerator,
    progress: Progress,
) -> list[ImageItem]:
    """The class images for prior preservation, generating the missing ones with the base model."""
    assert config.class_prompt is not None
    folder = Path(config.class_dir) if config.class_dir is not None else None
    return class_images(
        config, pipe, resolution, accelerator, progress, config.class_prompt, folder, config.num_class_images
    )


def class_images(
    config: TrainConfig,
    pipe: Any,
    resolution: int,
    accelerator: Accelerator,
    progress: Progress,
    prompt: str,
    folder: Path | None,
    count: int,
    *,
    generate_into: bool = True,
) -> list[ImageItem]:
    """``count`` class images of ``prompt``, captioned ``prompt``: from ``folder`` (topped up by generating into it
    unless ``generate_into`` is false), else generated into the class-image cache."""
    import torch

    from lorax.data.prior import class_cache_dir, ensure_class_images

    steps, guidance = config.sampling_for(pipe)
    extra = pipeline_call(config, pipe)
    if folder is None:
        folder, generate_into = class_cache_dir(config.model, prompt, resolution, steps, guidance), True
    if accelerator.is_main_process and generate_into:
        pipe.to(accelerator.device)
        pipe.set_progress_bar_config(disable=True)

        def generate(i: int) -> Any:
            generator = torch.Generator(device="cpu").manual_seed(derive_seed(config.seed, "class-image", i))
            with torch.no_grad(), accelerator.autocast():
                return pipe(
                    prompt,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    height=resolution,
                    width=resolution,
                    generator=generator,
                    **extra,
                ).images[0]

        with progress.task("class images", total=count) as task:
            made = ensure_class_images(folder, count, generate, advance=task.advance)
        if made:
            progress.log(f"generated {made} class images in {folder}")
    accelerator.wait_for_everyone()
    items = load_image_folder(folder, instance_prompt=prompt, what="class", warn=progress.log)
    return [ImageItem(it.path, prompt, it.size) for it in items[:count]]


def concept_class_items(
    config: TrainConfig,
    pipe: Any,
    resolution: int,
    accelerator: Accelerator,
    progress: Progress,
    summary: Any,
) -> tuple[list[ImageItem], list[tuple[Path, list[int]]]]:
    """Each concept's own class images (``[[concepts]]`` class_prompt / class_dir / num_class_images), all in one
    list, and per concept its folder and the indices of its class images there; ``summary`` records each class
    folder as kohya's ``ss_reg_dataset_dirs`` does. A class_dir's images are used as they are (never written to)."""
    from lorax.data.concepts import ConceptClass, parse_concept

    items: list[ImageItem] = []
    pools: list[tuple[Path, list[int]]] = []
    for spec, class_spec in zip(config.concept, config.concept_class, strict=True):
        own = ConceptClass.parse(class_spec)
        count = own.count if own.count is not None else config.num_class_images
        found = class_images(
            config,
            pipe,
            resolution,
            accelerator,
            progress,
            own.prompt,
            own.folder,
            count,
            generate_into=False,
        )
        name = own.folder.name if own.folder is not None else f"{own.prompt} (generated)"
        summary.add(name, 1, [it.caption for it in found], is_reg=True)
        pools.append((parse_concept(spec)[0], list(range(len(items), len(items) + len(found)))))
        items.extend(found)
    return items, pools


def class_pools_of(items: list[ImageItem], pools: list[tuple[Path, list[int]]]) -> list[list[int]]:
    """Per instance image, the class images it pairs with: those of the concept whose folder holds it."""
    folders = [(folder.resolve(), pool) for folder, pool in pools]
    out = []
    for item in items:
        path = Path(item.path).resolve()
        owners = [(len(f.parts), pool) for f, pool in folders if path.is_relative_to(f)]
        out.append(max(owners, key=lambda o: o[0])[1] if owners else [])
    return out


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


def open_model(
    config: TrainConfig, progress: Progress, pipeline: Any = None
) -> tuple[Any, str, int, Accelerator]:
    """The base pipeline (``pipeline``, else ``config.model`` loaded), checked trainable (and by the config's
    ``family_problems``), with its family, the run's resolution and the accelerator."""
    from lorax.training import base

    pipe = pipeline if pipeline is not None else load_base_model(config.model, progress)
    family = base.family_of(pipe)
    base.check_trainable(pipe, family)
    problems = config.family_problems(family)
    if problems:
        raise ConfigError(f"{config.model} is an {family.upper()} model: " + "; ".join(problems))
    return pipe, family, config.resolution or base.default_resolution(pipe), make_accelerator(config)


def train_data(
    config: TrainConfig,
    items: list[ImageItem],
    class_items: list[ImageItem],
    resolution: int,
    accelerator: Accelerator,
    class_pools: list[tuple[Path, list[int]]] | None = None,
    **bounds: Any,
) -> TrainData:
    """The run's examples and their order on this process (``bounds``: a dataset config's bucket limits;
    ``class_pools``: per concept, its folder and class images, as ``concept_class_items`` gives them)."""
    return TrainData(
        items,
        DataOptions.from_config(config, resolution, **bounds),
        class_items=class_items,
        class_prompt=config.class_prompt,
        class_pools=class_pools_of(items, class_pools) if class_pools else None,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
    )


def load_resume(config: TrainConfig, *, check_command: bool = True) -> Checkpoint | None:
    """The checkpoint to resume from (``None`` without ``--resume``), refusing one written by another command."""
    if config.resume is None:
        return None
    from lorax.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(config.resume)
    command = ckpt.info.get("command", "train")
    if check_command and command != config.COMMAND:
        raise MismatchError(
            f"--resume: this checkpoint was written by lorax {command}, not lorax {config.COMMAND}",
            path=ckpt.path,
        )
    return ckpt


def check_within(step: int, max_steps: int) -> None:
    """A resumed checkpoint's step is no later than the run's last."""
    if step > max_steps:
        raise ConfigError(f"--resume: the checkpoint is at step {step}, past this run's {max_steps} steps")


def pipeline_call(config: Any, pipe: Any) -> dict[str, Any]:
    """What a class or validation image's pipeline call adds for the family: Flux's T5 reads the run's
    ``max_sequence_length``, as the training captions do (FluxPipeline's own default, 512, would not)."""
    if getattr(pipe, "unet", None) is not None:
        return {}
    from lorax.training.flux_train import default_max_sequence

    return {"max_sequence_length": config.max_sequence_length or default_max_sequence(pipe.transformer)}


def validation_sampler(
    config: TrainConfig,
    pipe: Any,
    accelerator: Accelerator,
    family: str,
    resolution: int,
    unet: Any,
    encoders: list[Any],
    vae: Any,
    cache: Any,
    prompts: list[Any],
    clip_skip: int = 1,
) -> Any:
    """Validation images of ``prompts`` every ``--validation-every`` steps over the live modules, or ``None``."""
    from lorax.training import setup
    from lorax.training.job import Sampler
    from lorax.training.outputs import companion_paths

    if not (prompts and config.validation_every):
        return None
    assert config.output is not None
    steps, guidance = config.sampling_for(pipe)
    return Sampler(
        setup.sampling_pipeline(pipe, accelerator, unet, encoders, family),
        prompts,
        companion_paths(Path(config.output))["samples"],
        resolution,
        steps,
        guidance,
        config.seed,
        is_main=accelerator.is_main_process,
        release=(lambda: vae.to("cpu")) if cache is not None else None,
        clip_skip=clip_skip,
        call=pipeline_call(config, pipe),
    )
