"""``lorax generate``: images from a model with any number of LoRAs and learned tokens applied (no file changes).

One call: read every LoRA, embedding and init image first (bad input fails before the model loads), plan every output
name (existing files need ``force``), load the pipeline, register tokens, apply the LoRAs, then for each prompt
generate a batch of ``n`` images — once, or once per ``sweep`` scale — and write each as a PNG whose ``parameters``
text chunk (A1111's convention) records how it was made.

The pieces live in ``lorax.gen``: the config (:mod:`lorax.gen.config`), the plan of calls and files
(:mod:`lorax.gen.plan`), the live pipeline (:mod:`lorax.gen.runtime`), the run's LoRAs (:mod:`lorax.gen.loras`) and
the PNG info (:mod:`lorax.gen.infotext`); this module runs them in order.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections.abc import Callable
from typing import Any

from lorax.errors import ConfigError
from lorax.gen.config import (
    DEFAULT_OUT,
    DEVICES,
    DTYPES,
    SCHEDULERS,
    GenerateConfig,
    GeneratedImage,
    GenerateResult,
    LoraSpec,
    parse_lora_arg,
    parse_scales,
    parse_size,
    read_prompts,
)
from lorax.gen.flux import check_size as check_flux_size
from lorax.gen.flux import img2img_pipeline as flux_img2img
from lorax.gen.flux import is_flux, sampling, schnell_note
from lorax.gen.flux import round_size as flux_round_size
from lorax.gen.infotext import file_hash
from lorax.gen.plan import Job, check_outputs, plan, slugify, take_prompt_loras
from lorax.gen.runtime import (
    default_size,
    load_model,
    resolve_device,
    resolve_dtype,
    sampler_name,
    sampling_defaults,
    set_scheduler,
)
from lorax.models.defaults import model_defaults
from lorax.progress import NullProgress, Progress

__all__ = [  # the names other modules import from here (the pieces themselves live in lorax.gen)
    "DEFAULT_OUT",
    "DEVICES",
    "DTYPES",
    "SCHEDULERS",
    "GenerateConfig",
    "GenerateResult",
    "GeneratedImage",
    "LoraSpec",
    "default_size",
    "file_hash",
    "generate",
    "load_model",
    "parse_lora_arg",
    "parse_scales",
    "parse_size",
    "read_prompts",
    "resolve_device",
    "resolve_dtype",
    "sampler_name",
    "sampling_defaults",
    "set_scheduler",
    "slugify",
]


def generate(
    config: GenerateConfig,
    progress: Progress | None = None,
    *,
    on_image: Callable[[GeneratedImage], None] | None = None,
    pipe: Any = None,
) -> GenerateResult:
    """Generate and write the images ``config`` asks for; ``on_image`` is called as each file lands.

    ``pipe`` (a loaded diffusers pipeline) skips model loading; it is used as given and its LoRAs are taken off
    again before returning.

    Raises:
        ConfigError, InputError, MismatchError, OutputExistsError, ModelNotFoundError: one line each.
    """
    import torch

    from lorax.adapters.apply import check_prompt_tokens, quiet_libraries
    from lorax.gen import inpaint, runtime
    from lorax.gen.grid import make_grid, xy_grid
    from lorax.gen.infotext import Infotext
    from lorax.gen.loras import put_on, run_specs
    from lorax.gen.params import save_png
    from lorax.gen.schedule import parse_schedule
    from lorax.io.atomic import atomic_path

    progress = progress or NullProgress()
    config = take_prompt_loras(config)
    config.validate()
    defaults = model_defaults(config.model)
    schedule = parse_schedule(config.schedule) if config.schedule is not None else None
    seed = config.seed if config.seed is not None else random.randrange(2**32)

    # Check every input before the (slow) model load, so bad input fails fast.
    run = run_specs(config)  # an --xy lora axis: its files go on after the --lora ones, all at once
    for i, spec in enumerate(run.specs):
        if spec.state is None:
            if spec.path is None:
                raise ConfigError("a LoRA needs a file or an in-memory state")
            runtime.check_input_file(spec.path, "--lora" if i < run.fixed else "--xy lora")
    for path in config.embeddings:
        runtime.check_input_file(path, "--embedding")
    embeddings = [(path, runtime.load_embedding_file(path)) for path in config.embeddings]
    for path, embedding in embeddings:
        note = runtime.trigger_note(path, list(embedding))
        if note:
            progress.log(note)
    init = runtime.read_init_image(config.init_image) if config.init_image is not None else None
    mask = inpaint.read_mask_image(config.mask_image) if config.mask_image is not None else None
    jobs, sheets = plan(config, seed)
    check_outputs([p for job in jobs for p in job.names] + [sheet.path for sheet in sheets], config.force)

    own_pipe = pipe is None
    if own_pipe:
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        # diffusers' load reports and deprecation notes are not the user's business
        from lorax.models.pipeline import load_is_slow

        announce = progress.task(f"loading model {config.model}") if load_is_slow(config.model) else None
        with announce or contextlib.nullcontext(), quiet_libraries(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            pipe = load_model(config.model, dtype=dtype, device=device, config_from=config.config_from)
    else:  # a pipeline the caller holds keeps its device and precision
        device, dtype = str(pipe.device.type), (getattr(pipe, "unet", None) or pipe.transformer).dtype
    pipe.set_progress_bar_config(disable=True)
    flux = is_flux(pipe)
    samp = sampling(config, defaults, pipe)  # Flux dev / schnell defaults come from the model's own config
    steps, guidance = samp.steps, samp.guidance
    note = schnell_note(config, pipe)
    if note:
        progress.log(note)
    states = [
        spec.state if spec.state is not None else runtime.load_lora_file(spec.path, pipe)  # type: ignore[arg-type]
        for spec in run.specs
    ]
    if config.scheduler:
        set_scheduler(pipe, config.scheduler)
    clip_skip = runtime.clip_skip(config, pipe, run.specs, states, progress)

    lora_tokens = runtime.register_run_tokens(pipe, embeddings, run.specs, states)
    expand = runtime.expand_lora_tokens
    prompts = [expand(p, lora_tokens) for p in config.prompts]
    negative = expand(config.negative, lora_tokens)
    job_prompts = [expand(job.prompt, lora_tokens) for job in jobs]
    job_negatives = [expand(job.negative, lora_tokens) for job in jobs]
    check_prompt_tokens(pipe, [*prompts, negative, *job_prompts, *job_negatives])

    loras = put_on(pipe, config, run, states)
    applied = loras.applied
    for warning in applied.warnings if applied is not None else []:
        progress.log(f"warning: {warning}")

    runner = pipe
    if inpaint.is_inpainting_model(pipe) and mask is None:
        raise ConfigError(
            f"{config.model} is an inpainting model (9-channel UNet): give --init-image and --mask-image"
        )
    if mask is not None:
        runner = inpaint.inpaint_pipeline(pipe)
    elif init is not None and flux:
        runner = flux_img2img(pipe)
    elif init is not None:
        from diffusers import AutoPipelineForImage2Image

        runner = AutoPipelineForImage2Image.from_pipe(pipe)
        runner.set_progress_bar_config(disable=True)
    round_init = flux_round_size if flux else lambda _, size: runtime.round8(size)
    width, height = config.size or (
        round_init(pipe, init.size) if init is not None else (defaults.size or default_size(pipe))
    )
    if flux:
        check_flux_size(pipe, (width, height))
    if init is not None and init.size != (width, height):
        init = init.resize((width, height))
    if mask is not None:
        mask = inpaint.binary_mask(mask, (width, height))

    info = Infotext(
        config,
        loras,
        sampler_name(pipe),
        (width, height),
        clip_skip=clip_skip,
        img2img=init is not None,
        schedule=schedule.spec if schedule is not None else None,
        embeddings=[path for path, _ in embeddings],
        sampling=samp if flux else None,
    )

    def calls_steps(job_steps: int) -> int:
        return job_steps if init is None else max(1, min(int(job_steps * config.strength), job_steps))

    written: list[GeneratedImage] = []
    held: dict[int, list[Any]] = {}  # job index → its images, only for jobs a sheet shows
    shown = {j for sheet in sheets for row in sheet.cells for j, _ in row}
    started = time.perf_counter()
    n_images = 0

    def emit(record: GeneratedImage) -> None:
        written.append(record)
        if on_image is not None:
            on_image(record)

    def call_kwargs(
        j: int, job: Job, job_steps: int, job_guidance: float, on_step_end: Any
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "prompt": job_prompts[j],
            "negative_prompt": job_negatives[j] or None,
            "num_inference_steps": job_steps,
            "guidance_scale": job_guidance,
            "num_images_per_prompt": len(job.seeds),
            "generator": [torch.Generator("cpu").manual_seed(s) for s in job.seeds],
            "callback_on_step_end": on_step_end,
            "output_type": "pil",
            **samp.call,
        }
        if flux:  # guidance-distilled: no negative prompt (refused above), and img2img takes the size too
            del kwargs["negative_prompt"]
        if clip_skip > 1:  # the embeddings of the skipped layers, through the current LoRA scales
            from lorax.training.text import clip_skip_embeds

            with torch.inference_mode():
                kwargs.update(
                    clip_skip_embeds(runner, kwargs.pop("prompt"), kwargs.pop("negative_prompt"), clip_skip)
                )
        if mask is not None:
            kwargs.update(image=init, mask_image=mask, strength=config.strength, width=width, height=height)
        elif init is not None:
            kwargs.update(
                image=init, strength=config.strength, **({"width": width, "height": height} if flux else {})
            )
        else:
            kwargs.update(width=width, height=height)
        return kwargs

    try:
        total = sum(calls_steps(job.steps or steps) for job in jobs)
        with progress.task("generating", total=total) as task:
            for j, job in enumerate(jobs):
                factor = 1.0 if job.factor is None else job.factor
                job_steps = job.steps or steps
                job_guidance = guidance if job.guidance is None else job.guidance
                steps_per_call = calls_steps(job_steps)

                def on_step_end(
                    p: Any,
                    step: int,
                    timestep: Any,
                    kwargs: dict[str, Any],
                    factor: float = factor,
                    steps_per_call: int = steps_per_call,
                ) -> dict[str, Any]:
                    if schedule is not None and applied is not None:
                        total = int(getattr(p, "num_timesteps", 0) or steps_per_call)
                        applied.set_scales(factor * schedule.for_step(step + 1, total), factor)
                    task.advance()
                    return kwargs

                loras.switch(job)
                if applied is not None and not applied.fused:
                    first = schedule.for_step(0, steps_per_call) if schedule is not None else 1.0
                    applied.set_scales(factor * first, factor)
                kwargs = call_kwargs(j, job, job_steps, job_guidance, on_step_end)
                with torch.inference_mode():
                    images = runner(**kwargs).images
                if mask is not None:
                    assert init is not None  # --mask-image needs --init-image (GenerateConfig's check)
                    images = inpaint.paste_unmasked(images, init, mask)
                n_images += len(images)
                if j in shown:  # hold images only for the sheets asked for
                    held[j] = images
                on = loras.active(job)
                for image, image_seed, path in zip(images, job.seeds, job.names, strict=True):
                    text = info.text(
                        job_prompts[j], job_negatives[j], image_seed, job.factor, on, job_steps, job_guidance
                    )
                    with atomic_path(path, config.force) as tmp:
                        save_png(image, tmp, text)
                    emit(
                        GeneratedImage(
                            path=path,
                            kind=job.kind,
                            prompt=job_prompts[j],
                            seed=image_seed,
                            width=image.width,
                            height=image.height,
                            scale=job.factor,
                            parameters=text,
                        )
                    )
        elapsed = time.perf_counter() - started
        for sheet in sheets:
            prompt = prompts[sheet.prompt_index]
            cells = [[held[j][i] for j, i in row] for row in sheet.cells]
            if sheet.kind == "grid":
                flat = [image for row in cells for image in row]
                picture = make_grid(flat, math.ceil(math.sqrt(len(flat))))
            else:
                picture = xy_grid(
                    cells, col_labels=sheet.col_labels, row_labels=sheet.row_labels, title=prompt
                )
            on_all = loras.on_all()
            text = info.text(prompt, negative, seed, sheet.factor, on_all, steps, guidance, sheet.extra)
            with atomic_path(sheet.path, config.force) as tmp:
                save_png(picture, tmp, text)
            emit(
                GeneratedImage(
                    sheet.path, sheet.kind, prompt, seed, picture.width, picture.height, sheet.factor, text
                )
            )
    finally:
        if not own_pipe:
            loras.take_off()
    return GenerateResult(
        images=written,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        seconds=elapsed,
        seconds_per_image=elapsed / max(1, n_images),
    )
