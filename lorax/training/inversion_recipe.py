"""``InversionRecipe``: textual inversion, the recipe of ``lorax invert`` and of ``lorax pivot``'s first phase.

``prepare`` reads the images (captions with the tokens substituted, or templates) and their loss masks, loads the
model, registers the placeholder tokens (``lorax.training.inversion``) and plans the batches (a ``Session``). The
recipe's ``setup`` makes only the new rows trainable (both text encoders' tables on SDXL), with the family's batches
(prompts that expand multi-vector tokens, loss masks) and objective, and the ``InversionJob`` whose step restores
the other rows; ``save`` writes the embedding file (A1111, diffusers or SDXL's ``clip_l`` / ``clip_g``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.data.dataset import TrainData
from lorax.data.images import ImageItem, load_image_folder
from lorax.errors import ConfigError
from lorax.progress import Progress
from lorax.training.pivot_config import InversionOptions
from lorax.training.recipe import (
    Recipe,
    load_class_items,
    make_loop,
    open_model,
    train_data,
    warn_if_toy_model,
)

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator


@dataclass
class Session:
    """Everything an inversion (or pivotal-tuning) run has set up before any optimizer exists."""

    config: InversionOptions
    pipe: Any
    family: str
    resolution: int
    accelerator: Accelerator
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


def read_items(config: InversionOptions, progress: Progress) -> list[ImageItem]:
    """Training images with captions: files' own captions with ``--token-at-data`` applied, else the tokens."""
    from lorax.training.token_specs import parse_replacements, replace_in_caption

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
    from lorax.training import base
    from lorax.training.inversion import learn_tokens
    from lorax.training.masks import find_masks, masks_beside_every
    from lorax.training.token_specs import parse_init

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
    pipe, family, resolution, accelerator = open_model(config, progress, pipeline)
    class_items: list[ImageItem] = []
    if config.prior_preservation:
        class_items = load_class_items(config, pipe, resolution, accelerator, progress)
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
    data = train_data(config, items, class_items, resolution, accelerator)
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
    from lorax.training.mask_batches import masked_batches

    batches.prompts = ExpandingPrompts(batches.prompts, session.tokens.expand)
    if session.mask_paths is None:
        return batches
    return masked_batches(batches, mask_paths=session.mask_paths, temperature=session.config.mask_temperature)


class InversionJob:
    """The ``Job`` of phase 1: only the new embedding rows train; the others are restored after every step."""

    def __init__(
        self,
        batches: Any,
        tokens: Any,
        *,
        text_encoder: Any,
        accelerator: Accelerator,
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

    def loss(self, micro_step: int, generator: torch.Generator) -> Any:
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


@dataclass
class InversionRecipe(Recipe):
    """Textual inversion over a prepared ``session``; ``info`` goes into its checkpoints. After ``setup``: ``job``,
    ``loop`` and the objective's ``prediction_type``."""

    session: Session
    info: dict[str, Any]
    job: Any = None
    loop: Any = None
    prediction_type: str = "epsilon"

    def setup(self, max_steps: int, progress: Progress) -> Any:
        """Models on the device, the table trainable, optimizer, batches, loop."""
        from lorax.training import setup
        from lorax.training.optim import build_optimizer, build_scheduler
        from lorax.training.recipe import validation_sampler

        session = self.session
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
        cache = setup.cache_latents(vae, session.data, progress) if config.cache_latents else None
        diffusion = setup.diffusion_batches(
            pipe,
            session.data,
            config,
            family=session.family,
            unet=unet,
            vae=vae,
            encoders=encoders,
            device=device,
            latent_cache=cache,
            cache_text=False,  # the tables train
        )
        batches = make_batches(session, diffusion)
        sampler = validation_sampler(
            config, pipe, accelerator, session.family, session.resolution, unet, encoders, vae, cache,
            list(config.validation_prompt),
        )  # fmt: skip
        self.job = InversionJob(
            batches,
            session.tokens,
            text_encoder=encoders[0],
            accelerator=accelerator,
            scheduler=scheduler,
            norm_decay=config.norm_decay,
            sampler=sampler,
            text_encoder_2=encoders[1] if len(encoders) == 2 else None,
        )
        settings = {"info": self.info, "description": "inversion"}
        self.loop = make_loop(
            self.job, config, accelerator, optimizer, scheduler, max_steps, progress, **settings
        )
        self.prediction_type = diffusion.objective.prediction_type
        return self.loop

    @property
    def format(self) -> str:
        """The embedding file format of ``--format`` on the model's family: a1111-embedding, diffusers-embedding,
        or the family's own where it has several text encoders (``family_problems`` refused the rest: SDXL's
        clip_l / clip_g ``.safetensors``)."""
        from lorax.models import families

        family = families.get(self.session.family)
        if len(family.text_components()) > 1:
            return str(family.embedding_format)
        return "a1111-embedding" if self.session.config.format == "a1111" else "diffusers-embedding"

    def save(self, loop: Any, path: Path, **options: Any) -> str:
        """The learned embeddings to ``path`` in the config's format (SDXL's ``clip_l`` / ``clip_g`` file on SDXL),
        with their metadata; returns the format written. ``options``: ``progress`` for the notes on loading it."""
        from lorax import dtypes
        from lorax.formats import save_embeddings

        session, progress = self.session, options["progress"]
        config = session.config
        stored = {
            t: {c: v.to(dtypes.torch_dtype(config.save_dtype)) for c, v in per.items()}
            for t, per in session.tokens.embeddings().items()
        }
        fmt = self.format
        if fmt != "diffusers-embedding" and path.suffix == ".safetensors" and path.stem != config.tokens[0]:
            progress.log(
                f"note: A1111 and ComfyUI trigger .safetensors embeddings by their file name: '{path.stem}'; "
                f"lorax generate --embedding {path.name} reads the trained token '{config.tokens[0]}' from its "
                "header"
            )
        if fmt == "diffusers-embedding" and len(config.tokens) > 1:
            progress.log(
                f"note: diffusers' load_textual_inversion takes one token per file; load {path.name}'s tokens "
                "with load_textual_inversion(list(tensors.values()), token=list(tensors)), tensors = "
                "safetensors.torch.load_file(...)"
            )
        save_embeddings(
            stored,
            path,
            format=fmt,
            force=config.force,
            metadata=inversion_metadata(session, loop.state.global_step, loop.state.seconds),
        )
        return fmt


def build_inversion(session: Session, *, max_steps: int, info: dict[str, Any], progress: Progress) -> Any:
    """Phase 1 ready to run: ``(loop, prediction type)`` of an ``InversionRecipe`` set up."""
    recipe = InversionRecipe(session, info)
    return recipe.setup(max_steps, progress), recipe.prediction_type


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


def norms(embeddings: dict[str, dict[str, Any]], component: str = "text_encoder") -> dict[str, list[float]]:
    return {
        t: [round(float(n), 4) for n in v[component].float().norm(dim=-1)]
        for t, v in embeddings.items()
        if component in v
    }
