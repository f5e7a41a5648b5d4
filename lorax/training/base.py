"""The base model a run trains on: pipeline loading, family, default resolution, memory settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorax.errors import ModelNotFoundError
from lorax.libraries import silence_libraries as quiet_libraries  # training keeps them silent for good


def load_base_pipeline(spec: str) -> Any:
    """A ``StableDiffusionPipeline`` (fp32, CPU) for ``spec``: a built-in name, a diffusers folder, a Hub id or a single file."""
    quiet_libraries()
    try:
        from lorax.models.pipeline import load_pipeline
    except ImportError:
        return _load_folder(spec)
    return load_pipeline(spec)


def _load_folder(spec: str) -> Any:
    import torch
    from diffusers import StableDiffusionPipeline

    from lorax.models.registry import resolve_builtin

    path = resolve_builtin(spec) or Path(spec)
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(f"--model {spec}: not a diffusers model folder (no model_index.json)")
    return StableDiffusionPipeline.from_pretrained(
        str(path),
        torch_dtype=torch.float32,
        safety_checker=None,
        requires_safety_checker=False,
        local_files_only=True,
    )


def family_of(pipeline: Any) -> str:
    """The family of a live pipeline (``lorax.models.families.detect``)."""
    from lorax.models import families

    found = families.detect(pipeline=pipeline)
    assert found is not None  # a pipeline always names a family
    return found


def denoiser(pipeline: Any) -> Any:
    """The model a LoRA trains on: the UNet, or a transformer (Flux's) where the pipeline has no UNet."""
    found = getattr(pipeline, "unet", None)
    return found if found is not None else pipeline.transformer


def check_trainable(pipeline: Any, family: str) -> None:
    from lorax.models import families

    found = families.get(family)
    names = [found.components[0].name, "vae", "text_encoder", "tokenizer", "scheduler"]
    for c in found.components:
        names += [n for n in (c.name, c.tokenizer) if n and n not in names]
    for name in names:
        if getattr(pipeline, name, None) is None:
            raise ModelNotFoundError(f"the model has no {name}; lorax trains Stable Diffusion pipelines")


def default_resolution(pipeline: Any) -> int:
    """The resolution the model was trained at: UNet sample size × the VAE's downscale factor (a transformer
    without a sample size, Flux's: the VAE's sample size)."""
    if getattr(pipeline, "unet", None) is None:
        return int(pipeline.vae.config.sample_size)
    vae_scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    return int(pipeline.unet.config.sample_size) * vae_scale


def base_model_version(family: str, prediction_type: str) -> str:
    """kohya's ``ss_base_model_version`` spelling."""
    from lorax.models import families

    found = families.find(family)
    return found.base_model_version(prediction_type) if found else family


def count_parameters(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def model_bytes(pipeline: Any, dtype_bytes: int = 2) -> int:
    """The base model's size in ``dtype_bytes`` per weight (UNet + VAE + text encoder)."""
    models = (denoiser(pipeline), pipeline.vae, pipeline.text_encoder)
    return dtype_bytes * sum(count_parameters(m) for m in models)
