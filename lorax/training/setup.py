"""What every training run (``train``, ``invert``, ``pivot``) does to the base pipeline before its own job starts:
freeze it, place it on the device in the run's precision, build the family's objective, cache latents, assemble the
family's batches and a sampling pipeline over the live modules for validation images (``lorax.training.family_hooks``).

Each command adds only what is its own: ``train`` injects LoRA layers between ``freeze`` and ``place`` (so their
initialisation does not depend on the device), ``invert`` makes its embedding rows trainable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from lorax.data.dataset import TrainData
from lorax.progress import Progress

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from lorax.training.config import TrainConfig


def text_encoders(pipe: Any, family: str) -> list[Any]:
    """The text encoders that condition the UNet: the family's (SDXL's two, else one)."""
    from lorax.models import families

    found = (getattr(pipe, c, None) for c in families.get(family).text_components())
    return [m for m in found if m is not None]


def weight_dtype(mixed_precision: str) -> Any:
    """The dtype frozen weights take under ``--mixed-precision`` (trainable ones stay fp32)."""
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def freeze(unet: Any, vae: Any, encoders: Sequence[Any], *, sdpa: bool) -> None:
    """No gradients anywhere yet, and the UNet's attention processor: PyTorch SDPA or the plain one (a transformer,
    Flux's, keeps its own processors, which use SDPA)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    for module in (unet, vae, *encoders):
        module.requires_grad_(False)
    if type(unet).__name__.startswith("UNet"):
        unet.set_attn_processor(AttnProcessor2_0() if sdpa else AttnProcessor())


def place(
    unet: Any,
    vae: Any,
    encoders: Sequence[Any],
    device: torch.device,
    mixed_precision: str,
    *,
    unet_device: Any = None,
) -> None:
    """Models on ``device`` in the run's precision; the VAE stays fp32 under fp16 (its decoder overflows).
    ``unet_device``: where the UNet goes instead (the CPU, when FSDP moves only its shards to the device)."""
    import torch

    dtype = weight_dtype(mixed_precision)
    unet.to(device if unet_device is None else unet_device, dtype=dtype)
    vae.to(device, dtype=torch.float32 if mixed_precision == "fp16" else dtype)
    for encoder in encoders:
        encoder.to(device, dtype=dtype)


def objective_for(pipe: Any, config: TrainConfig, family: str) -> Any:
    """The family's training objective for ``config`` (``TrainingHooks.objective``: today epsilon or v-prediction,
    min-SNR-γ and noise offset on the model's scheduler)."""
    from lorax.training.family_hooks import hooks_for

    return hooks_for(family, text_encoders(pipe, family)).objective(pipe, config)


def cache_latents(vae: Any, data: TrainData, progress: Progress) -> Any:
    """Every image's latents encoded once; the VAE then leaves the device (needed again only for samples)."""
    from lorax.training.latents import LatentCache

    cache = LatentCache()
    keys = data.all_keys()
    with progress.task("caching latents", total=len(keys)) as task:
        cache.fill(vae, keys, data.load, advance=task.advance)
    vae.to("cpu")
    return cache


def diffusion_batches(
    pipe: Any,
    data: TrainData,
    config: TrainConfig,
    *,
    family: str,
    unet: Any,
    vae: Any,
    encoders: Sequence[Any],
    device: torch.device,
    latent_cache: Any,
    cache_text: bool,
    clip_skip: int = 1,
    text_to_disk: bool = False,
    objective: Any = None,
    **encoder_options: Any,
) -> Any:
    """The run's batches, the family's (``TrainingHooks.batches``: SD's over one text encoder, SDXL's with both
    encoders' context, pooled embeddings and size/crop ids), with ``config``'s objective (``objective``, built
    before the latents are cached so that a bad objective flag fails first, or ``objective_for``; then the batches'
    ``objective``) and prior weight. ``cache_text``: encode each distinct prompt once (frozen
    encoders); ``encoder_options``: the family's own prompt-encoder options (Flux's T5 length)."""
    from lorax.training.family_hooks import hooks_for

    hooks = hooks_for(family, encoders)
    prompts = hooks.prompt_encoder(
        pipe, encoders, device, cache=cache_text, clip_skip=clip_skip, **encoder_options
    )
    if text_to_disk:  # --cache-text-to-disk (lorax.training.text_cache)
        from lorax.training.text_cache import attach_disk_cache

        attach_disk_cache(prompts)
    return hooks.batches()(
        data=data,
        vae=vae,
        unet=unet,
        prompts=prompts,
        objective=objective if objective is not None else objective_for(pipe, config, family),
        device=device,
        prior_weight=config.prior_weight,
        latent_cache=latent_cache,
    )


def sampling_pipeline(
    pipe: Any, accelerator: Accelerator, unet: Any, encoders: Sequence[Any], family: str
) -> Callable[[], Any]:
    """A factory of sampling pipelines over the live (training) modules, for validation images (the family's
    pipeline class, ``TrainingHooks.sampler``)."""
    from lorax.training.family_hooks import hooks_for

    hooks = hooks_for(family, encoders)

    def factory() -> Any:
        live = [accelerator.unwrap_model(m) for m in encoders]
        pipe.vae.to(accelerator.device)
        common = dict(
            vae=pipe.vae,
            text_encoder=live[0],
            tokenizer=pipe.tokenizer,
            unet=accelerator.unwrap_model(unet),
            scheduler=pipe.scheduler,
        )
        sample_pipe = hooks.sampler(common, pipe, live)
        sample_pipe.set_progress_bar_config(disable=True)
        return sample_pipe

    return factory
