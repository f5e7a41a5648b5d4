"""``LoraRecipe``: LoRA (and LoCon/LoHa/LoKr/DoRA) layers trained on the UNet and, with ``--train-text``, the text
encoders: ``lorax train``'s recipe, and ``lorax pivot``'s second phase (``PivotRecipe`` overrides its job and save).

``setup`` freezes the base model, injects the layers (before placing it on the device, so their initialisation does
not depend on it), builds the optimizer (LoRA+, block learning rates), schedule, the family's batches and objective,
loss masks, the validation sampler and the ``Job`` (``make_job``, averaged with ``--ema-decay``); ``save`` writes the
LoRA with its kohya metadata.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax import dtypes
from lorax.data.dataset import TrainData, derive_seed
from lorax.data.images import ImageItem
from lorax.errors import ConfigError
from lorax.progress import Progress
from lorax.training.config import TrainConfig
from lorax.training.recipe import Recipe, make_loop

if TYPE_CHECKING:
    from accelerate import Accelerator

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
    "train_blocks",  # Flux: which blocks, T5, and how σ is drawn
    "train_t5",
    "timestep_sampling",
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


@dataclass
class LoraRecipe(Recipe):
    """LoRA training on ``pipe`` over ``data``; after ``setup``: ``job``, ``loop``, ``modules`` (trained modules per
    component), ``prediction_type`` and ``alpha_patterns`` (per-module alphas: --block-dims, locon's convs)."""

    config: TrainConfig
    pipe: Any
    data: TrainData
    accelerator: Accelerator
    resolution: int
    family: str
    job: Any = None
    loop: Any = None
    modules: dict[str, int] = field(default_factory=dict)
    prediction_type: str = "epsilon"
    objective: Any = None  # the family's; one with ``metadata(config, header)`` adds its keys to the header
    alpha_patterns: dict[str, dict[str, float]] = field(default_factory=dict)

    def setup(self, max_steps: int, progress: Progress) -> Any:
        """Models on the device, LoRA injected, caches filled, optimizer and loop ready."""
        from lorax.training import setup
        from lorax.training.algo_setup import inject_unet
        from lorax.training.optim import build_optimizer, build_scheduler, warmup_steps_of
        from lorax.training.targets import resolve_targets

        config, pipe, family, accelerator = self.config, self.pipe, self.family, self.accelerator
        device = accelerator.device
        from lorax.training.base import denoiser

        unet, vae = denoiser(pipe), pipe.vae  # the UNet, or Flux's transformer
        # SDXL: the second text encoder conditions (and, with --train-text, trains) alongside the first
        encoders = setup.text_encoders(pipe, family)
        text_encoder, text_encoder_2 = encoders[0], (encoders[1] if len(encoders) == 2 else None)
        setup.freeze(unet, vae, encoders, sdpa=config.sdpa)
        if config.fp8_base:  # before the LoRA wraps the layers (lorax.training.quantized_base)
            from lorax.training.quantized_base import quantize_linears

            progress.log(f"fp8 base: {quantize_linears(unet)} linear layers stored in float8_e4m3fn")

        if config.clip_skip and config.clip_skip > 1 and family == "sdxl":
            raise ConfigError(
                f"--clip-skip {config.clip_skip}: SDXL already conditions on its text encoders' penultimate layers "
                "(kohya's SDXL trainer has no clip skip either); drop it"
            )
        from lorax.training.family_hooks import hooks_for

        # --train-text trains SDXL's second encoder too; Flux's T5 only with its own flag (--train-t5)
        text_2_flag = hooks_for(family, encoders).text_2_flag
        train_2 = config.train_text and (text_2_flag is None or bool(getattr(config, text_2_flag)))
        targets = resolve_targets(
            unet, text_encoder if config.train_text else None, config.targets, blocks=config.train_blocks
        )
        if text_encoder_2 is not None and train_2:
            from lorax.training.targets import find_targets

            targets["text_encoder_2"] = find_targets(text_encoder_2, config.targets, "text_encoder_2")
        blocks = self._block_plan(targets["unet"], unet)
        if blocks is not None:
            targets["unet"] = blocks.targets
        modules = {k: len(v) for k, v in targets.items()}
        initial = self._initial_lora(targets, progress)
        lora_kwargs: dict[str, Any] = dict(
            rank=config.rank, alpha=config.lora_alpha, dropout=config.lora_dropout, dora=config.dora
        )
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
            for tag, encoder in (("te", text_encoder), ("te2", text_encoder_2 if train_2 else None)):
                if encoder is not None:
                    component = "text_encoder" if tag == "te" else "text_encoder_2"
                    seed = derive_seed(config.seed, "init", tag)
                    params = inject_lora(encoder, targets[component], seed=seed, **lora_kwargs)
                    groups.append({"params": params, "lr": config.text_lr})
        if initial is not None:
            from lorax.training.lora import load_lora_tensors

            live = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
            for component, tensors in initial.items():
                load_lora_tensors(live[component], tensors)
        from lorax.training import distributed
        from lorax.training.block_swap import swap_for

        shard = distributed.plan_for(config, accelerator, progress.log)  # FSDP: the frozen UNet sharded
        if shard and config.blocks_to_swap:
            raise ConfigError("--blocks-to-swap: the frozen denoiser is sharded (FSDP); use one or the other")
        if not shard:
            swap_for(config, unet, device, setup.weight_dtype(config.mixed_precision), progress.log)
        setup.place(unet, vae, encoders, device, config.mixed_precision, unet_device="cpu" if shard else None)
        for group in groups:  # trainable LoRA weights stay fp32 under mixed precision
            for p in group["params"]:
                p.data = p.data.float()
        if config.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if config.train_text:
                for encoder in (text_encoder, text_encoder_2 if train_2 else None):
                    if encoder is not None:
                        encoder.gradient_checkpointing_enable(
                            gradient_checkpointing_kwargs={"use_reentrant": False}
                        )

        if config.loraplus_ratio is not None:
            from lorax.training.optim import loraplus_groups

            groups = loraplus_groups(groups, [unet, text_encoder, text_encoder_2], config.loraplus_ratio)

        from lorax.training.speed import apply_unet_knobs, cache_latents

        apply_unet_knobs(unet, config, progress.log)
        optimizer = build_optimizer(config.optimizer, groups, weight_decay=config.weight_decay)
        scheduler = build_scheduler(
            config.lr_scheduler,
            optimizer,
            warmup_steps=warmup_steps_of(config.warmup_steps, config.warmup_ratio, max_steps),
            total_steps=max_steps,
            cycles=config.lr_cycles,
            power=config.lr_power,
        )
        second = text_encoder_2 if train_2 else None
        trained = [m for m in (text_encoder, second) if m is not None] if config.train_text else []
        unet, trained, optimizer = distributed.prepare(
            accelerator, unet, trained, optimizer, shard, progress.log
        )
        if config.train_text:
            text_encoder = trained[0]
            if len(trained) == 2:
                text_encoder_2 = trained[1]
        live_encoders = [m for m in (text_encoder, text_encoder_2) if m is not None]  # accelerate's wrappers

        objective = setup.objective_for(pipe, config, family)  # bad objective flags fail before caching
        cache = cache_latents(config, vae, self.data, progress)
        batches = setup.diffusion_batches(
            pipe,
            self.data,
            config,
            family=family,
            unet=unet,
            vae=vae,
            encoders=live_encoders,
            device=device,
            latent_cache=cache,
            cache_text=config.cache_text and not config.train_text,
            text_to_disk=config.cache_text_to_disk,
            objective=objective,
            **({"clip_skip": config.clip_skip} if config.clip_skip else {}),
            **({"max_sequence_length": config.max_sequence_length} if config.max_sequence_length else {}),
        )
        from lorax.training.mask_batches import with_train_masks

        batches = with_train_masks(batches, config, progress.log)
        sampler = self._sampler(unet, live_encoders, vae, cache)
        self.job = self.make_job(
            batches,
            unet=unet,
            text_encoder=text_encoder if config.train_text else None,
            text_encoder_2=text_encoder_2 if train_2 else None,
            sampler=sampler,
        )
        from lorax.training.trackers import make_tracker

        settings = {
            "info": {"family": family, **resume_identity(config)},
            "tracker": make_tracker(config, accelerator, progress.log),
        }
        self.loop = make_loop(
            self.job, config, accelerator, optimizer, scheduler, max_steps, progress, **settings
        )
        self.modules = modules
        self.prediction_type = objective.prediction_type
        self.objective = objective
        self.alpha_patterns = {"unet": unet_alphas} if unet_alphas else {}
        return self.loop

    def make_job(self, batches: Any, **models: Any) -> Any:
        """The ``Job`` whose step the loop runs: ``LoraJob`` over ``batches`` (averaged with ``--ema-decay``)."""
        from lorax.training.job import LoraJob

        job: Any = LoraJob(batches, accelerator=self.accelerator, **models)
        if self.config.ema_decay is not None:
            from lorax.training.ema import EmaJob

            job = EmaJob(job, self.config.ema_decay)  # the job, its weights also averaged
        return job

    def _sampler(self, unet: Any, encoders: list[Any], vae: Any, cache: Any) -> Any:
        """Validation images (``--validation-prompt``, kohya's ``--sample-prompts``) every N steps, or ``None``."""
        from lorax.training.recipe import validation_sampler
        from lorax.training.sample_prompts import run_prompts

        config = self.config
        prompts = list(run_prompts(config.validation_prompt, config.sample_prompts))
        return validation_sampler(
            config, self.pipe, self.accelerator, self.family, self.resolution, unet, encoders, vae, cache, prompts,
            clip_skip=config.clip_skip or 1,
        )  # fmt: skip

    # ---------------------------------------------------------------------------------------------------------
    def lora_state(self) -> Any:
        """The ``LoraState`` trained so far (the EMA average with ``--ema-decay``)."""
        from lorax.models import families
        from lorax.training.algos import LYCORIS_ALGOS, lycoris_state
        from lorax.training.ema import averaged_weights
        from lorax.training.lora import trained_state

        config = self.config
        # the job's "unet" is the family's denoiser component (Flux's "transformer")
        name = families.get(self.family).components[0].name
        with averaged_weights(self.job):  # --ema-decay: the average is the output
            components = {name if k == "unet" else k: m for k, m in self.job.components().items()}
            if config.algo in LYCORIS_ALGOS:
                return lycoris_state(components, self.family)
            return trained_state(
                components,
                rank=config.rank,
                alpha=config.lora_alpha,
                family=self.family,
                alpha_patterns={name if k == "unet" else k: v for k, v in self.alpha_patterns.items()},
            )

    def metadata(
        self,
        images: Any,
        class_items: list[ImageItem],
        started_at: float,
        max_steps: int | None = None,
        items: list[ImageItem] | None = None,
        config: TrainConfig | None = None,
    ) -> dict[str, str]:
        """The LoRA's header: kohya's ``ss_*`` keys, modelspec's, lorax's (of ``config``, else the recipe's)."""
        from lorax.training.metadata import training_metadata

        state = self.loop.state
        header = training_metadata(
            config or self.config,
            family=self.family,
            prediction_type=self.prediction_type,
            resolution=self.resolution,
            num_images=len(items if items is not None else self.data.items),
            num_class_images=len(class_items),
            steps=state.global_step,
            epoch=state.epoch,
            batches_per_epoch=self.data.batches_per_epoch(),
            started_at=started_at,
            finished_at=time.time(),
            seconds=state.seconds,
            modules=self.modules,
            images=images,
            num_examples=len(self.data),
            max_steps=max_steps,
        )
        own = getattr(self.objective, "metadata", None)  # Flux's: kohya's flow keys, networks.lora_flux
        if own is None:
            return header
        merged = {**header, **own(config or self.config, header)}  # None: a key the family drops
        return {k: v for k, v in merged.items() if v is not None}

    def save(  # type: ignore[override]
        self,
        loop: Any,
        path: Path,
        *,
        images: Any,
        class_items: list[ImageItem],
        started_at: float,
        max_steps: int | None = None,
        finite_only: bool = False,
    ) -> bool:
        """Write the LoRA as it stands to ``path`` (the output, or a snapshot at ``max_steps``' run) with its
        metadata; with ``finite_only`` nothing is written (False) when a weight is not finite."""
        import torch

        from lorax.formats import save_lora

        if finite_only and not all(bool(torch.isfinite(t).all()) for t in self.job.state_tensors().values()):
            return False
        state = self.lora_state()
        metadata = self.metadata(images, class_items, started_at, max_steps)
        config = self.config
        dtype = dtypes.torch_dtype(config.save_dtype)
        save_lora(state, path, format=config.format, dtype=dtype, force=config.force, metadata=metadata)
        return True

    # ---------------------------------------------------------------------------------------------------------
    def _initial_lora(
        self, targets: dict[str, list[str]], progress: Progress
    ) -> dict[str, dict[str, Any]] | None:
        """``--init-lora``'s weights per component, checked against the run (not when resuming: the checkpoint
        wins)."""
        config = self.config
        if config.init_lora is None or config.resume is not None:
            return None
        from lorax.training.init_lora import initial_lora

        return initial_lora(
            Path(config.init_lora),
            self.pipe,
            targets,
            rank=config.rank,
            alpha=config.lora_alpha,
            family=self.family,
            log=progress.log,
        )

    def _block_plan(self, targets: list[str], unet: Any) -> Any:
        """``--block-dims`` / ``--block-lr`` over kohya's UNet blocks, or ``None`` without them."""
        config = self.config
        if config.block_dims is None and config.block_lr is None:
            return None
        from lorax.training.blocks import BlockPlan

        return BlockPlan(
            targets,
            self.family,
            unet.config,
            rank=config.rank,
            alpha=config.alpha,
            block_dims=config.block_dims,
            block_lr=config.block_lr,
        )
