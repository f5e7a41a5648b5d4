"""Flux.1 in ``lorax generate``: ``FluxPipeline`` / ``FluxImg2ImgPipeline`` and their defaults, decided by the model.

dev carries a guidance embedding (``transformer.config.guidance_embeds``): its distilled guidance defaults to 3.5 and
28 steps, T5 reads up to 512 tokens. schnell has none: 4 steps, the guidance is ignored, T5 reads 256 tokens (the
defaults of diffusers' pipelines and of BFL's model cards). A model's own ``lorax.json`` defaults still win, and the
flags over both. Flux is guidance-distilled: no negative prompt and no classifier-free guidance, so the PNG info says
``CFG scale: 1`` and the guidance as ``Distilled CFG Scale`` (Forge's infotext key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorax.errors import ConfigError
from lorax.gen.config import GenerateConfig
from lorax.models.defaults import ModelDefaults

DEV_STEPS, SCHNELL_STEPS = 28, 4
DEV_GUIDANCE = 3.5
DEV_MAX_SEQUENCE, SCHNELL_MAX_SEQUENCE = 512, 256
T5_MAX_SEQUENCE = 512  # FluxPipeline refuses more


def is_flux(pipe: Any) -> bool:
    """Whether ``pipe`` is a Flux pipeline (its denoiser a ``FluxTransformer2DModel``)."""
    from lorax.adapters.apply import pipeline_family

    return getattr(pipe, "unet", None) is None and pipeline_family(pipe) == "flux"


def has_guidance(pipe: Any) -> bool:
    """dev (and its finetunes) embed the guidance; schnell does not."""
    return bool(getattr(pipe.transformer.config, "guidance_embeds", False))


@dataclass(frozen=True)
class Sampling:
    """How a run samples: steps and guidance (the flags, else the model's, else the family's), and what else the
    pipeline call takes. ``guidance_key``: how the PNG info names the guidance (``CFG scale``; Flux dev's
    ``Distilled CFG Scale``; None for schnell, which has none)."""

    steps: int
    guidance: float
    call: dict[str, Any]
    guidance_key: str | None = "CFG scale"

    def guidance_fields(self, guidance: float) -> dict[str, object]:
        if self.guidance_key == "CFG scale":
            return {"CFG scale": f"{guidance:g}"}
        fields: dict[str, object] = {"CFG scale": "1"}
        if self.guidance_key is not None:
            fields[self.guidance_key] = f"{guidance:g}"
        return fields


def refuse_flags(config: GenerateConfig) -> None:
    """The flags Flux has no meaning for, all named at once."""
    problems = []
    if config.negative:
        problems.append("--negative: Flux is guidance-distilled and takes no negative prompt")
    if config.scheduler is not None:
        problems.append("--scheduler: Flux samples with its own flow-matching Euler scheduler")
    if config.mask_image is not None:
        problems.append("--mask-image: inpainting is not supported for Flux yet (img2img is: --init-image)")
    if config.clip_skip is not None and config.clip_skip > 1:
        problems.append(
            "--clip-skip: Flux conditions on T5 and CLIP-L's pooled output, which have no clip skip"
        )
    if config.blocks is not None:
        problems.append("--blocks names UNet blocks (down/mid/up), which Flux's transformer does not have")
    if config.embeddings:
        problems.append("--embedding: learned tokens are not supported for Flux yet")
    if problems:
        raise ConfigError("; ".join(problems))


def sampling(config: GenerateConfig, defaults: ModelDefaults, pipe: Any) -> Sampling:
    """The run's steps, guidance and extra call arguments for ``pipe`` (any family)."""
    own = defaults.generate
    if not is_flux(pipe):
        if config.max_sequence_length is not None:
            raise ConfigError("--max-sequence-length is for Flux's T5 encoder; this model has none")
        steps, guidance = defaults.sampling
        return Sampling(
            config.steps if config.steps is not None else steps,
            config.guidance if config.guidance is not None else guidance,
            {},
        )
    refuse_flags(config)
    dev = has_guidance(pipe)
    steps = (
        config.steps
        if config.steps is not None
        else int(own.get("steps", DEV_STEPS if dev else SCHNELL_STEPS))
    )
    guidance = config.guidance if config.guidance is not None else float(own.get("guidance", DEV_GUIDANCE))
    length = config.max_sequence_length or int(
        own.get("max_sequence_length", DEV_MAX_SEQUENCE if dev else SCHNELL_MAX_SEQUENCE)
    )
    return Sampling(steps, guidance, {"max_sequence_length": length}, "Distilled CFG Scale" if dev else None)


def schnell_note(config: GenerateConfig, pipe: Any) -> str | None:
    """A note when --guidance is given to a model without a guidance embedding (it changes nothing)."""
    if config.guidance is not None and is_flux(pipe) and not has_guidance(pipe):
        return "this Flux model has no guidance embedding (schnell): --guidance is ignored"
    return None


def img2img_pipeline(pipe: Any) -> Any:
    """``FluxImg2ImgPipeline`` sharing ``pipe``'s components (and the LoRAs on them)."""
    import diffusers

    from lorax.models import families

    cls = getattr(diffusers, families.get("flux").pipelines["img2img"])
    runner = cls.from_pipe(pipe)
    runner.set_progress_bar_config(disable=True)
    return runner


def default_size(pipe: Any) -> tuple[int, int]:
    """FluxPipeline's own default: ``default_sample_size`` latent pixels (1024 × 1024 on the full-size VAE)."""
    side = int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
    return side, side


def round_size(pipe: Any, size: tuple[int, int]) -> tuple[int, int]:
    """An init image's size rounded down to what Flux packs (multiples of twice the VAE's scale factor)."""
    step = 2 * int(pipe.vae_scale_factor)
    return max(step, size[0] // step * step), max(step, size[1] // step * step)


def check_size(pipe: Any, size: tuple[int, int]) -> None:
    """Flux packs 2 × 2 latent patches: both sides must be multiples of twice the VAE's scale factor (16)."""
    step = 2 * int(pipe.vae_scale_factor)
    if size[0] % step or size[1] % step:
        raise ConfigError(f"--size {size[0]}x{size[1]}: Flux needs both sides a multiple of {step}")
