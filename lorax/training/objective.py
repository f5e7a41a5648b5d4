"""The training objectives: what a family's denoiser is trained to predict (``Objective``), and the denoising one
the UNet families share (``DiffusionObjective``: noise, timesteps, epsilon or v-prediction target, min-SNR-γ
weighting). A family picks its objective in its ``lorax.training.family_hooks.TrainingHooks``; the batches and the
validation loss only call ``loss``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LossInputs:
    """One loss call's batch: clean ``latents``, their conditioning ``cond``; ``weight``: a loss mask broadcastable
    to the latents (``None``: plain MSE); ``timesteps``: fixed ones instead of drawn ones (``None``: drawn)."""

    latents: torch.Tensor
    cond: Any
    weight: torch.Tensor | None = None
    timesteps: torch.Tensor | None = None


class Objective(Protocol):
    """What the batches (``DiffusionBatches.loss``) and the held-out loss (``lorax.training.val_loss``) ask of a
    family's objective. A flow-matching objective implements the same three members."""

    prediction_type: str  # recorded in the output's metadata (kohya's ss_base_model_version, lorax's)
    num_timesteps: int  # the range the held-out loss spreads its fixed timesteps over

    def loss(self, unet: Any, step: LossInputs, generator: torch.Generator) -> torch.Tensor:
        """Per-example loss ``[B]`` (float32) of the denoiser ``unet`` on ``step``'s latents under its
        conditioning, randomness drawn from ``generator``."""
        ...


class DiffusionObjective:
    """``loss(unet, LossInputs(latents, cond), generator)`` → per-example MSE between the UNet's prediction and its target.

    Args:
        noise_scheduler: a diffusers scheduler config source (the model's scheduler); a DDPM scheduler is built from it.
        prediction_type: ``epsilon`` or ``v_prediction`` (``None``: the model's own).
        snr_gamma: min-SNR-γ loss weighting (Hang et al. 2023), ``None`` for plain MSE.
        noise_offset: adds ``offset · N(0, 1)`` per channel to the noise (brighter darks and lighter lights).
    """

    def __init__(
        self,
        scheduler_config: Any,
        *,
        prediction_type: str | None = None,
        snr_gamma: float | None = None,
        noise_offset: float = 0.0,
    ) -> None:
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = prediction_type or self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            from lorax.errors import ConfigError

            raise ConfigError(
                f"the model predicts {self.prediction_type!r}; lorax trains epsilon and v_prediction models "
                "(pass --prediction-type)"
            )
        self.snr_gamma = snr_gamma
        self.noise_offset = noise_offset
        self.num_timesteps = int(self.scheduler.config.num_train_timesteps)

    def snr(self, timesteps: torch.Tensor) -> Any:
        alphas_cumprod = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        return alphas_cumprod / (1.0 - alphas_cumprod)

    def loss(self, unet: Any, step: LossInputs, generator: torch.Generator) -> torch.Tensor:
        """Per-example loss ``[B]`` (float32), drawing noise and timesteps from ``generator``.

        ``step.weight`` (broadcastable to the latents, e.g. ``[B, 1, h, w]``): a loss mask; prediction and target are
        both multiplied by it (the seed's ``lora_pti`` masks). ``step.timesteps`` (``[B]``): fixed ones instead of
        drawn ones (the validation loss, ``lorax.training.val_loss``).
        """
        import torch
        import torch.nn.functional as F

        latents, cond, weight, timesteps = step.latents, step.cond, step.weight, step.timesteps

        bsz = latents.shape[0]
        device = latents.device
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=torch.float32)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn(
                (bsz, latents.shape[1], 1, 1), generator=generator, device=device, dtype=torch.float32
            )
        if timesteps is None:
            timesteps = torch.randint(
                0, self.num_timesteps, (bsz,), generator=generator, device=device
            ).long()
        latents = latents.float()
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        if self.prediction_type == "epsilon":
            target = noise
        else:
            target = self.scheduler.get_velocity(latents, noise, timesteps)
        dtype = next(unet.parameters()).dtype
        added = getattr(cond, "added_cond_kwargs", None)  # SDXL: pooled text embeddings and size/crop ids
        if added is not None:
            added = {k: v.to(dtype) for k, v in added.items()}
            pred = unet(
                noisy.to(dtype), timesteps, cond.to(dtype), added_cond_kwargs=added, return_dict=False
            )[0].float()
        else:
            pred = unet(noisy.to(dtype), timesteps, cond.to(dtype), return_dict=False)[0].float()
        target = target.float()
        if weight is not None:
            pred, target = pred * weight, target * weight
        per_example = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        if self.snr_gamma is not None:
            snr = self.snr(timesteps)
            weight = torch.clamp(snr, max=self.snr_gamma)
            weight = weight / snr if self.prediction_type == "epsilon" else weight / (snr + 1)
            per_example = per_example * weight
        return per_example
