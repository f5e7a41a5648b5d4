"""What training needs to know of a model family, in one place: its batches, conditioning, objective and sampling
pipeline (``TrainingHooks``, one registered per family).

The recipes (``lorax.training.recipe`` and the three commands' recipes) and the loop never name a family: they ask
``hooks_for(family)`` for

* ``prompt_encoder(pipe, encoders, device, cache=, clip_skip=)``: captions → the denoiser's conditioning;
* ``batches`` / ``masked_batches``: the ``DiffusionBatches`` class turning a micro-batch into latents, conditioning
  and loss (SDXL's adds its size/crop ids), and the same with loss masks;
* ``objective(pipe, config)``: the loss the denoiser is trained on, a ``lorax.training.objective.Objective``
  (``DiffusionObjective``: epsilon or v-prediction on the model's DDPM schedule);
* ``sampling_pipeline``: the diffusers pipeline class that draws validation images from the live modules.

A new family trains by registering one ``TrainingHooks`` (a flow-matching model: its own ``objective`` and
``batches``), without an edit to the loop or the recipes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from lorax.training.config import TrainConfig


def _clip_prompts(
    pipe: Any, encoders: Sequence[Any], device: torch.device, *, cache: bool, clip_skip: int
) -> Any:
    from lorax.training.text import PromptEncoder

    return PromptEncoder(pipe.tokenizer, encoders[0], device, cache=cache, clip_skip=clip_skip)


def _sdxl_prompts(
    pipe: Any, encoders: Sequence[Any], device: torch.device, *, cache: bool, clip_skip: int
) -> Any:
    from lorax.training.sdxl import SdxlPromptEncoder

    return SdxlPromptEncoder([pipe.tokenizer, pipe.tokenizer_2], encoders, device, cache=cache)


def diffusion_objective(pipe: Any, config: TrainConfig) -> Any:
    """``config``'s denoising objective (prediction type, min-SNR-γ, noise offset) on the model's scheduler."""
    from lorax.training.objective import DiffusionObjective

    return DiffusionObjective(
        pipe.scheduler.config,
        prediction_type=config.prediction_type,
        snr_gamma=config.snr_gamma,
        noise_offset=config.noise_offset,
    )


def _sd_sampler(common: dict[str, Any], pipe: Any, live: Sequence[Any]) -> Any:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        **common, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )


def _sdxl_sampler(common: dict[str, Any], pipe: Any, live: Sequence[Any]) -> Any:
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(**common, text_encoder_2=live[1], tokenizer_2=pipe.tokenizer_2)


def _flux_prompts(pipe: Any, encoders: Sequence[Any], device: torch.device, **options: Any) -> Any:
    from lorax.training.flux_train import flux_prompts

    return flux_prompts(pipe, encoders, device, **options)


def _flux_objective(pipe: Any, config: TrainConfig) -> Any:
    from lorax.training.flux_train import flux_objective

    return flux_objective(pipe, config)


def _flux_sampler(common: dict[str, Any], pipe: Any, live: Sequence[Any]) -> Any:
    from lorax.training.flux_train import flux_sampler

    return flux_sampler(common, pipe, live)


def _batches(name: str) -> Callable[[], type]:
    def load() -> type:
        if name == "sdxl":
            from lorax.training.sdxl import SdxlBatches

            return SdxlBatches
        from lorax.training.job import DiffusionBatches

        return DiffusionBatches

    return load


def _masked(name: str) -> Callable[[], type]:
    def load() -> type:
        from lorax.training.masks import MaskedBatches, MaskedSdxlBatches

        return MaskedSdxlBatches if name == "sdxl" else MaskedBatches

    return load


@dataclass(frozen=True)
class TrainingHooks:
    """How one family trains. The classes load lazily (``batches()``), so this module imports no torch."""

    name: str
    prompt_encoder: Callable[..., Any]
    batches: Callable[[], type]
    masked_batches: Callable[[], type]
    objective: Callable[[Any, Any], Any] = diffusion_objective
    sampler: Callable[[dict[str, Any], Any, Sequence[Any]], Any] = _sd_sampler
    # the config field that (with --train-text) trains the second text encoder too; None: --train-text trains both
    text_2_flag: str | None = None


CLIP = TrainingHooks("clip", _clip_prompts, _batches("clip"), _masked("clip"))
SDXL = TrainingHooks("sdxl", _sdxl_prompts, _batches("sdxl"), _masked("sdxl"), sampler=_sdxl_sampler)

# Flux: SD's batches (latents and the prompt encoder's conditioning); the flow objective packs the latents and builds
# the position ids (lorax.training.flux_train)
FLUX = TrainingHooks(
    "flux",
    _flux_prompts,
    _batches("flux"),
    _masked("flux"),
    objective=_flux_objective,
    sampler=_flux_sampler,
    text_2_flag="train_t5",
)

_HOOKS: dict[str, TrainingHooks] = {"sd1": CLIP, "sd2": CLIP, "sdxl": SDXL, "flux": FLUX}


def register(family: str, hooks: TrainingHooks) -> TrainingHooks:
    """Train ``family`` models with ``hooks`` (a new family's one registration)."""
    _HOOKS[family] = hooks
    return hooks


def hooks_for(family: str, encoders: Sequence[Any] = ()) -> TrainingHooks:
    """The family's hooks; a family without its own trains as the UNet families do, by its text encoders (two: SDXL's
    conditioning, one: SD's)."""
    found = _HOOKS.get(family)
    if found is not None:
        return found
    return SDXL if len(encoders) == 2 else CLIP


def hooks_of_batches(batches: Any) -> TrainingHooks:
    """The hooks whose (unmasked) batches class ``batches`` is an instance of, the most derived first."""
    candidates = {id(h): h for h in _HOOKS.values()}.values()
    matching = [h for h in candidates if isinstance(batches, h.batches())]
    matching.sort(key=lambda h: len(h.batches().__mro__), reverse=True)
    return matching[0] if matching else CLIP
