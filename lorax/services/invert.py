"""``lorax invert``: textual inversion — learn new token embeddings, nothing else.

``invert(config, progress)`` reads the images (captions with the token substituted, or templates), loads the model,
registers the placeholder tokens (``lorax.training.inversion``) and trains only their rows through the shared
``TrainingLoop`` (checkpoints, exact resume, validation images, progress, NaN/OOM stops), then writes an A1111
(``.pt`` ``string_to_param`` / ``.safetensors`` ``emb_params``) or diffusers (``learned_embeds``) embedding, with the
loss curve and resolved config beside it. On SDXL the tokens train in both text encoders (``LearnedTokenSet``), the
batches carry SDXL's pooled embeddings and size/crop ids (``lorax.training.sdxl``, as ``lorax train``), and the output
is an SDXL embedding (``.safetensors`` with ``clip_l`` / ``clip_g``). ``lorax pivot`` runs the same phase first (``prepare`` and
``build_inversion`` are shared).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorax import dtypes
from lorax.data.dataset import DataOptions, TrainData
from lorax.data.images import ImageItem, load_image_folder
from lorax.errors import ConfigError, MismatchError
from lorax.io.atomic import atomic_path
from lorax.models import families
from lorax.progress import NullProgress, Progress
from lorax.services.train import companion_paths, make_accelerator, plan_outputs, total_steps
from lorax.training.masks import MaskedBatches
from lorax.training.pivot_config import InversionOptions, InvertConfig
from lorax.training.report import sample_files
from lorax.training.sdxl import SdxlBatches


@dataclass
class InvertResult:
    output: Path
    format: str
    tokens: list[str]
    vectors: int
    steps: int
    final_loss: float | None
    seconds: float
    num_images: int
    loss_csv: Path
    loss_png: Path
    config_path: Path
    file_bytes: int
    resumed_from: Path | None = None
    checkpoints: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    norms: dict[str, list[float]] = field(default_factory=dict)  # learned vectors' norms per token
    norms_2: dict[str, list[float]] = field(default_factory=dict)  # SDXL: the same in text_encoder_2 (clip_g)
    losses: list[list[float]] = field(default_factory=list)
    samples_png: Path | None = (
        None  # the validation samples as one sheet (prompts × steps), when there are any
    )


# -------------------------------------------------------------------------------------------------------------
# Shared with pivot


@dataclass
class Session:
    """Everything an inversion (or pivotal-tuning) run has set up before any optimizer exists."""

    config: InversionOptions
    pipe: Any
    family: str
    resolution: int
    accelerator: Any
    items: list[ImageItem]
    class_items: list[ImageItem]
    data: TrainData
    tokens: Any  # LearnedTokens, or LearnedTokenSet on SDXL
    mask_paths: list[Path | None] | None
    base_bytes: int
    started_at: float


class ExpandingPrompts:
    """A prompt encoder that first expands multi-vector tokens (``<s1>`` → ``<s1> <s1>_1 …``)."""

    def __init__(self, encoder: Any, expand: Callable[[str], str]) -> None:
        self.encoder = encoder
        self.expand = expand

    def __call__(self, prompts: Sequence[str]) -> Any:
        return self.encoder([self.expand(p) for p in prompts])


def steps_of(config: InversionOptions, batches_per_epoch: int) -> int:
    """``--steps``, else whole ``--epochs``, else the command's default."""
    if config.steps is None and config.epochs is None:
        return config.DEFAULT_STEPS
    return total_steps(config, batches_per_epoch)


def read_items(config: InversionOptions, progress: Progress) -> list[ImageItem]:
    """Training images with captions: files' own captions with ``--token-at-data`` applied, else the tokens."""
    from lorax.training.inversion import parse_replacements, replace_in_caption

    assert config.data_dir is not None
    tokens = config.tokens
    replacements = parse_replacements(config.token_at_data, tokens)
    items = load_image_folder(
        config.data_dir,
        instance_prompt=config.instance_prompt or " ".join(tokens),
        strict=config.strict,
        recursive=config.recursive,
        warn=progress.log,
    )
    items = [ImageItem(it.path, replace_in_caption(it.caption, replacements), it.size) for it in items]
    from lorax.services.train import warn_if_toy_model

    warn_if_toy_model(config.model, items, progress)
    unused = [t for t in tokens if not any(t in it.caption for it in items)]
    if unused:
        raise ConfigError(
            f"no training caption contains {unused[0]}, so it would never train: pass --instance-prompt "
            f"'{unused[0]}' (with --template object), or --token-at-data 'WORD|{unused[0]}' to replace a caption word"
        )
    return items


def prepare(config: InversionOptions, progress: Progress, pipeline: Any = None) -> Session:
    """Images, model, accelerator, class images, the placeholder tokens and the batch plan."""
    from lorax.services.train import _class_items, load_base_model
    from lorax.training import base
    from lorax.training.inversion import learn_tokens, parse_init
    from lorax.training.masks import find_masks, masks_beside_every

    items = read_items(config, progress)
    mask_paths: list[Path | None] | None = None
    if config.mask_dir is not None:
        mask_paths = list(find_masks(items, config.mask_dir))
    elif config.auto_mask:
        mask_paths = [None] * len(items)
    elif not config.ignore_masks:
        beside = masks_beside_every(items)  # NAME.mask.png from lorax prepare
        if beside is not None:
            mask_paths = list(beside)
            progress.log(f"loss masks: the {len(set(beside))} NAME.mask.png files beside the images")
    started_at = time.time()
    pipe = pipeline if pipeline is not None else load_base_model(config.model, progress)
    family = base.family_of(pipe)
    base.check_trainable(pipe, family)
    problems = config.family_problems(family)
    if problems:
        raise ConfigError(f"{config.model} is an {family.upper()} model: " + "; ".join(problems))
    resolution = config.resolution or base.default_resolution(pipe)
    accelerator = make_accelerator(config)
    class_items: list[ImageItem] = []
    if config.prior_preservation:
        class_items = _class_items(config, pipe, resolution, accelerator, progress)
    tokens = learn_tokens(
        pipe,
        family,
        config.tokens,
        vectors=config.vectors,
        init=parse_init(config.init_token, config.tokens),
        overwrite=config.overwrite_token,
        seed=config.seed,
        norm_target=config.norm_target,
    )
    data = TrainData(
        items,
        DataOptions.from_config(config, resolution),
        class_items=class_items,
        class_prompt=config.class_prompt,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
    )
    return Session(
        config,
        pipe,
        family,
        resolution,
        accelerator,
        items,
        class_items,
        data,
        tokens,
        mask_paths,
        base.model_bytes(pipe),
        started_at,
    )


def make_batches(session: Session, batches: Any) -> Any:
    """``batches`` with prompts that expand the tokens, and with loss masks when the run has them."""
    import dataclasses

    batches.prompts = ExpandingPrompts(batches.prompts, session.tokens.expand)
    if session.mask_paths is None:
        return batches
    own = {
        "mask_paths",
        "temperature",
        "weighting",
        "auto",
    }  # train's masks (pivot's LoRA phase) give way to these
    values = {
        f.name: getattr(batches, f.name) for f in dataclasses.fields(batches) if f.init and f.name not in own
    }
    masked = MaskedSdxlBatches if isinstance(batches, SdxlBatches) else MaskedBatches
    return masked(**values, mask_paths=session.mask_paths, temperature=session.config.mask_temperature)


class MaskedSdxlBatches(MaskedBatches, SdxlBatches):
    """Masked losses on SDXL: ``MaskedBatches``' loss weights, ``SdxlBatches``' conditioning with size/crop ids."""


class InversionJob:
    """The ``Job`` of phase 1: only the new embedding rows train; the others are restored after every step."""

    def __init__(
        self,
        batches: Any,
        tokens: Any,
        *,
        text_encoder: Any,
        accelerator: Any,
        scheduler: Any,
        norm_decay: bool,
        sampler: Any = None,
        text_encoder_2: Any = None,
    ) -> None:
        self.batches = batches
        self.tokens = tokens
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2  # SDXL: its table trains too
        self.accelerator = accelerator
        self.scheduler = scheduler
        self.norm_decay = norm_decay
        self.sampler = sampler

    def trainable_models(self) -> list[Any]:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    def parameters(self) -> list[Any]:
        return list(self.tokens.parameters())

    def loss(self, micro_step: int, generator: Any) -> Any:
        return self.batches.loss(micro_step, generator)

    def epoch_of(self, micro_step: int) -> int:
        return int(self.batches.epoch_of(micro_step))

    def after_step(self, step: int) -> None:
        self.tokens.restore()
        if self.norm_decay:
            self.tokens.decay_norms(float(self.scheduler.get_last_lr()[0]))

    def state_tensors(self) -> dict[str, Any]:
        return dict(self.tokens.state_tensors())

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        self.tokens.load_state_tensors(tensors)

    def validate(self, step: int) -> list[Path]:
        if self.sampler is None:
            return []
        return list(self.sampler(step, self.accelerator.autocast))


def build_inversion(
    session: Session,
    *,
    max_steps: int,
    info: dict[str, Any],
    progress: Progress,
) -> Any:
    """Phase 1 ready to run: models on the device, the table trainable, optimizer, batches, loop."""
    from lorax.training import setup
    from lorax.training.job import Sampler
    from lorax.training.loop import LoopSettings, TrainingLoop
    from lorax.training.optim import build_optimizer, build_scheduler

    config, pipe, accelerator = session.config, session.pipe, session.accelerator
    device = accelerator.device
    unet, vae = pipe.unet, pipe.vae
    # SDXL: the second text encoder conditions, and its table trains the same tokens
    encoders = setup.text_encoders(pipe, session.family)
    setup.freeze(unet, vae, encoders, sdpa=config.sdpa)
    setup.place(unet, vae, encoders, device, config.mixed_precision)
    params = session.tokens.make_trainable()
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        for encoder in encoders:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = build_optimizer(
        config.optimizer,
        [{"params": params, "lr": config.inversion_lr}],
        weight_decay=config.inversion_weight_decay,
    )
    scheduler = build_scheduler(
        config.lr_scheduler, optimizer, warmup_steps=config.warmup_steps, total_steps=max_steps
    )
    *encoders, optimizer = accelerator.prepare(*encoders, optimizer)
    objective = setup.objective_for(pipe, config)
    cache = setup.cache_latents(vae, session.data, progress) if config.cache_latents else None
    batches = make_batches(
        session,
        setup.diffusion_batches(
            pipe,
            session.data,
            unet=unet,
            vae=vae,
            encoders=encoders,
            objective=objective,
            device=device,
            prior_weight=config.prior_weight,
            latent_cache=cache,
            cache_text=False,  # the tables train
        ),
    )
    sampler = None
    if config.validation_prompt and config.validation_every:
        assert config.output is not None
        sampler = Sampler(
            setup.sampling_pipeline(pipe, accelerator, unet, encoders),
            list(config.validation_prompt),
            companion_paths(Path(config.output))["samples"],
            session.resolution,
            *config.sampling,
            config.seed,
            is_main=accelerator.is_main_process,
            release=(lambda: vae.to("cpu")) if cache is not None else None,
        )
    text_encoder, text_encoder_2 = encoders[0], (encoders[1] if len(encoders) == 2 else None)
    job = InversionJob(
        batches,
        session.tokens,
        text_encoder=text_encoder,
        accelerator=accelerator,
        scheduler=scheduler,
        norm_decay=config.norm_decay,
        sampler=sampler,
        text_encoder_2=text_encoder_2,
    )
    settings = LoopSettings.from_config(
        config,
        max_steps,
        memory_flags=config.memory_flags(),
        info=info,
        description="inversion",
    )
    loop = TrainingLoop(
        job,
        accelerator=accelerator,
        optimizer=optimizer,
        scheduler=scheduler,
        settings=settings,
        progress=progress,
    )
    return loop, objective.prediction_type


def load_resume(config: InversionOptions) -> Any:
    """The checkpoint to resume from (``None`` without ``--resume``), refusing one written by another command."""
    if config.resume is None:
        return None
    from lorax.training.checkpoint import load_checkpoint

    ckpt = load_checkpoint(config.resume)
    command = ckpt.info.get("command", "train")
    if command != config.COMMAND:
        raise MismatchError(
            f"--resume: this checkpoint was written by lorax {command}, not lorax {config.COMMAND}",
            path=ckpt.path,
        )
    return ckpt


def token_info(session: Session) -> dict[str, Any]:
    config = session.config
    return {
        "command": config.COMMAND,
        "model": config.model,
        "family": session.family,
        "tokens": session.tokens.tokens,
        "vectors": config.vectors,
    }


def inversion_metadata(session: Session, steps: int, seconds: float) -> dict[str, str]:
    """Header metadata of a learned embedding (all strings)."""
    from lorax import __version__

    config = session.config
    meta: dict[str, Any] = {
        "lorax_version": __version__,
        "lorax_command": config.COMMAND,
        "lorax_base_model": config.model,
        "lorax_family": session.family,
        "lorax_tokens": json.dumps(session.tokens.tokens),
        "lorax_vectors": config.vectors,
        "lorax_init_token": config.init_token or "rand",
        "lorax_ti_steps": steps,
        "lorax_ti_learning_rate": f"{config.inversion_lr:g}",
        "lorax_norm_decay": config.norm_decay,
        "lorax_norm_target": f"{config.norm_target:g}" if config.norm_decay else None,
        "lorax_resolution": session.resolution,
        "lorax_num_images": len(session.items),
        "lorax_seed": config.seed,
        "lorax_training_seconds": f"{seconds:.1f}",
        "lorax_training_started_at": f"{session.started_at:.3f}",
        "lorax_training_finished_at": f"{time.time():.3f}",
        "lorax_masks": ("auto" if config.auto_mask else "dir")
        if config.masked
        else ("beside" if session.mask_paths is not None else None),
    }
    return {k: str(v) for k, v in meta.items() if v is not None}


def write_companions(
    config: InversionOptions,
    losses: list[list[float]],
    output: Path,
    *,
    checkpoints: list[Path] | None = None,
    resumed: tuple[Path, int] | None = None,
    samples: list[Path] | None = None,
) -> dict[str, Path]:
    """The loss curve (CSV + PNG, marking ``checkpoints`` and where a ``resumed`` run started), the validation
    ``samples`` as one sheet, and the resolved config beside ``output``."""
    from lorax.training.report import loss_csv, run_markers, write_loss_png, write_samples_sheet

    companions = companion_paths(output)
    with atomic_path(companions["loss_csv"], config.force) as tmp:
        tmp.write_text(loss_csv(losses), encoding="utf-8")
    with atomic_path(companions["loss_png"], config.force) as tmp:
        write_loss_png(
            losses,
            tmp,
            title=f"lorax {config.COMMAND}: {output.name}",
            checkpoints=run_markers(checkpoints or [], *(resumed or (None, None))),
            resumed_at=resumed[1] if resumed is not None else None,
        )
    if samples:
        with atomic_path(companions["samples_png"], config.force) as tmp:
            write_samples_sheet(
                samples,
                list(config.validation_prompt or []),
                tmp,
                title=f"lorax {config.COMMAND}: {output.name}, validation samples",
            )
    with atomic_path(companions["config"], config.force) as tmp:
        tmp.write_text(config.to_toml(), encoding="utf-8")
    return companions


def _norms(embeddings: dict[str, dict[str, Any]], component: str = "text_encoder") -> dict[str, list[float]]:
    return {
        t: [round(float(n), 4) for n in v[component].float().norm(dim=-1)]
        for t, v in embeddings.items()
        if component in v
    }


# -------------------------------------------------------------------------------------------------------------


def invert(config: InvertConfig, progress: Progress | None = None, *, pipeline: Any = None) -> InvertResult:
    """Learn ``config.token``'s embedding(s) from ``config.data_dir``; returns where everything went.

    ``pipeline``: an already loaded ``StableDiffusionPipeline`` (or ``StableDiffusionXLPipeline``) instead of
    ``config.model`` (tests, benchmarks).
    """

    from lorax.formats import save_embeddings

    progress = progress or NullProgress()
    config.validate()
    assert config.output is not None
    output = Path(config.output)
    plan_outputs(config, output)
    resume = load_resume(config)
    session = prepare(config, progress, pipeline)
    max_steps = steps_of(config, session.data.batches_per_epoch())
    loop, _prediction = build_inversion(
        session, max_steps=max_steps, info={**token_info(session), "phase": "inversion"}, progress=progress
    )
    if resume is not None:
        loop.restore(resume)
        if loop.state.global_step > max_steps:
            raise ConfigError(
                f"--resume: the checkpoint is at step {loop.state.global_step}, past this run's {max_steps} steps"
            )
        progress.log(f"resuming from {resume.path} at step {loop.state.global_step}")
    resumed = (resume.path, loop.state.global_step) if resume is not None else None
    result = loop.run()
    session.accelerator.wait_for_everyone()
    sheet_files = sample_files(
        result.samples, companion_paths(output)["samples"], resumed[1] if resumed is not None else None
    )

    embeddings = session.tokens.embeddings()
    dtype = dtypes.torch_dtype(config.save_dtype)
    stored = {t: {c: v.to(dtype) for c, v in per.items()} for t, per in embeddings.items()}
    fmt = "a1111-embedding" if config.format == "a1111" else "diffusers-embedding"
    family = families.get(session.family)
    if (
        len(family.text_components()) > 1
    ):  # family_problems refused the rest: SDXL's clip_l / clip_g .safetensors
        fmt = family.embedding_format
    file_bytes = 0
    if session.accelerator.is_main_process:
        if (
            fmt != "diffusers-embedding"
            and output.suffix == ".safetensors"
            and output.stem != config.tokens[0]
        ):
            progress.log(
                f"note: A1111 and ComfyUI trigger .safetensors embeddings by their file name: '{output.stem}'; "
                f"lorax generate --embedding {output.name} reads the trained token '{config.tokens[0]}' from its "
                "header"
            )
        if fmt == "diffusers-embedding" and len(config.tokens) > 1:
            progress.log(
                f"note: diffusers' load_textual_inversion takes one token per file; load {output.name}'s tokens "
                "with load_textual_inversion(list(tensors.values()), token=list(tensors)), tensors = "
                "safetensors.torch.load_file(...)"
            )
        save_embeddings(
            stored,
            output,
            format=fmt,
            force=config.force,
            metadata=inversion_metadata(session, loop.state.global_step, loop.state.seconds),
        )
        write_companions(
            config,
            loop.state.losses,
            output,
            checkpoints=result.checkpoints,
            resumed=resumed,
            samples=sheet_files,
        )
        file_bytes = output.stat().st_size
    session.accelerator.wait_for_everyone()
    companions = companion_paths(output)
    losses = loop.state.losses
    return InvertResult(
        output=output,
        format=fmt,  # the file's format: a1111-embedding, diffusers-embedding or sdxl-embedding
        tokens=session.tokens.tokens,
        vectors=config.vectors,
        steps=loop.state.global_step,
        final_loss=losses[-1][1] if losses else None,
        seconds=loop.state.seconds,
        num_images=len(session.items),
        loss_csv=companions["loss_csv"],
        loss_png=companions["loss_png"],
        config_path=companions["config"],
        file_bytes=file_bytes,
        resumed_from=resume.path if resume is not None else None,
        checkpoints=result.checkpoints,
        samples=result.samples,
        samples_png=companions["samples_png"] if sheet_files else None,
        norms=_norms(embeddings),
        norms_2=_norms(embeddings, "text_encoder_2"),
        losses=losses,
    )
