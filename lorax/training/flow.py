"""Flux.1's training objective: rectified flow (flow matching), as kohya's and diffusers' Flux trainers compute it.

Flux objective (library, not yet a command). One step, for clean latents ``x0`` (``[B, 16, h, w]``, the VAE's
output after its shift and scaling factor) and noise ``ε ~ N(0, 1)``:

1. draw ``σ ∈ [0, 1]`` per example (``sample_sigmas``, from a ``torch.Generator``, so a seed reproduces a run):
   ``uniform``, ``sigmoid`` (``sigmoid(scale · n)``, x-flux and kohya), ``logit-normal`` (``sigmoid(N(mean, std))``,
   SD3 and diffusers), ``mode`` (diffusers' mode density), ``shift`` (kohya's ``discrete_flow_shift`` applied to a
   sigmoid draw: ``s·t / (1 + (s − 1)·t)``), ``flux-shift`` (Flux's resolution-dependent shift of FluxPipeline and
   kohya's ``flux_shift``: ``e^μ / (e^μ + 1/t − 1)``, ``μ`` linear in the packed sequence length from 0.5 at 256
   tokens to 1.15 at 4096). ``discrete`` snaps the draw to the training scheduler's table of 1000 sigmas first, as
   diffusers' ``train_dreambooth_lora_flux.py`` and kohya's ``timestep_sampling sigma`` do;
2. ``x_t = (1 − σ)·x0 + σ·ε``; the model predicts the velocity, target ``ε − x0``;
3. the Flux transformer takes ``x_t`` packed into 2×2 patches (``[B, h/2 · w/2, 64]``, ``pack_latents``), the image
   and text position ids of FluxPipeline, the guidance value of a guidance-distilled (dev) model (1.0 by default,
   kohya's recommendation for LoRA training; diffusers' script defaults to 3.5; ``None`` for schnell, whose
   ``guidance_embeds`` is false), and as its ``timestep`` the value ``σ·1000 / 1000``: the scheduler's timestep
   ``σ·1000`` divided by 1000, the round trip both scripts make (``timestep=timesteps / 1000``), because
   ``FluxTransformer2DModel`` (and BFL's model) multiplies its timestep and guidance by 1000 before the sinusoidal
   embedding. It is σ up to float32 rounding;
4. the loss is the per-example mean of ``w(σ)·(v̂ − (ε − x0))²`` with ``w`` one of SD3's weightings (``none``,
   ``sigma_sqrt``: ``σ⁻²``, ``cosmap``: ``2 / (π(1 − 2σ + 2σ²))``).

The model output is used raw, as diffusers does and kohya recommends (``model_prediction_type raw``);
kohya's ``sigma_scaled`` and ``additive`` turn it into ``x_t − σ·v̂`` or ``x_t + v̂`` yet compare that with the
same ``ε − x0``, so lorax does not offer them. Torch only; the transformer is passed in, diffusers is never imported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lorax.errors import ConfigError, MismatchError

SAMPLINGS = ("uniform", "sigmoid", "logit-normal", "mode", "shift", "flux-shift")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")
TIMESTEP_SCALE = 1000.0  # FluxTransformer2DModel multiplies its `timestep` (and `guidance`) by this


@dataclass(frozen=True)
class FlowConfig:
    """How σ is drawn and the loss weighted (kohya's and diffusers' flag names in brackets).

    Attributes:
        sampling: one of ``SAMPLINGS`` (``timestep_sampling``; diffusers' density ``weighting_scheme``).
        sigmoid_scale: ``n`` is scaled by it before the sigmoid of ``sigmoid``, ``shift``, ``flux-shift``
            (``sigmoid_scale``).
        logit_mean, logit_std: the normal of ``logit-normal`` (``logit_mean``, ``logit_std``).
        mode_scale: the scale of ``mode`` (``mode_scale``).
        shift: the fixed shift ``s`` of ``shift`` (``discrete_flow_shift``, kohya's default 3.0).
        base_shift, max_shift, base_seq_len, max_seq_len: ``μ`` of ``flux-shift`` runs linearly from ``base_shift``
            at ``base_seq_len`` packed tokens to ``max_shift`` at ``max_seq_len`` (the Flux scheduler's config).
        discrete: snap the draw ``u`` to the scheduler's table first: ``t = (T − ⌊u·T⌋) / T`` (so ``t ≈ 1 − u``).
        num_train_timesteps: ``T`` of the table.
        weighting: one of ``WEIGHTINGS`` (diffusers' loss ``weighting_scheme``).
        guidance: the guidance value a guidance-distilled model is trained with (``guidance_scale``).
    """

    sampling: str = "flux-shift"
    sigmoid_scale: float = 1.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 3.0
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    discrete: bool = False
    num_train_timesteps: int = 1000
    weighting: str = "none"
    guidance: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        if self.sampling not in SAMPLINGS:
            problems.append(f"sampling: {self.sampling!r} is not one of {', '.join(SAMPLINGS)}")
        if self.weighting not in WEIGHTINGS:
            problems.append(f"weighting: {self.weighting!r} is not one of {', '.join(WEIGHTINGS)}")
        for name in ("sigmoid_scale", "logit_std", "shift"):
            if not getattr(self, name) > 0:
                problems.append(f"{name}: must be > 0 (got {getattr(self, name)!r})")
        if self.num_train_timesteps < 1:
            problems.append(f"num_train_timesteps: must be ≥ 1 (got {self.num_train_timesteps!r})")
        if not self.max_seq_len > self.base_seq_len:
            problems.append(
                f"max_seq_len: must be > base_seq_len (got {self.max_seq_len} ≤ {self.base_seq_len})"
            )
        if problems:
            raise ConfigError("; ".join(problems))


def flux_mu(image_seq_len: int, config: FlowConfig = FlowConfig()) -> float:
    """The resolution-dependent shift ``μ`` for ``image_seq_len`` packed tokens (FluxPipeline's calculate_shift)."""
    m = (config.max_shift - config.base_shift) / (config.max_seq_len - config.base_seq_len)
    b = config.base_shift - m * config.base_seq_len
    return image_seq_len * m + b


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """Flux's exponential time shift ``e^μ / (e^μ + (1/t − 1))`` (σ = 1 in BFL's and diffusers' formula)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)


def shift_sigmas(t: torch.Tensor, config: FlowConfig, image_seq_len: int | None = None) -> torch.Tensor:
    """Apply the sampling's shift to ``t ∈ (0, 1]``: fixed (``shift``), by resolution (``flux-shift``), or none."""
    if config.sampling == "shift":
        s = config.shift
        return (t * s) / (1 + (s - 1) * t)
    if config.sampling == "flux-shift":
        if image_seq_len is None:
            raise ValueError("flux-shift needs the packed image sequence length")
        return time_shift(flux_mu(image_seq_len, config), t)
    return t


def sigma_table(config: FlowConfig) -> torch.Tensor:
    """The training scheduler's sigmas, ``1`` down to ``1/T`` (FlowMatchEulerDiscreteScheduler's before any shift)."""
    T = config.num_train_timesteps
    return torch.arange(T, 0, -1, dtype=torch.float32) / T


def sample_sigmas(
    config: FlowConfig,
    batch_size: int,
    generator: torch.Generator | None,
    *,
    image_seq_len: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[B]`` float32 sigmas drawn from ``generator`` (the draws follow diffusers' and kohya's, call for call).

    ``image_seq_len`` (the packed token count ``h/2 · w/2``) is needed by ``flux-shift`` only.
    """
    size = (batch_size,)
    if config.sampling == "uniform":
        u = torch.rand(size=size, device=device, generator=generator)
    elif config.sampling == "logit-normal":
        u = torch.normal(
            mean=config.logit_mean, std=config.logit_std, size=size, device=device, generator=generator
        )
        u = torch.sigmoid(u)
    elif config.sampling == "mode":
        u = torch.rand(size=size, device=device, generator=generator)
        u = 1 - u - config.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    else:  # sigmoid, shift, flux-shift: kohya's sigmoid of a scaled normal
        u = torch.sigmoid(config.sigmoid_scale * torch.randn(size, device=device, generator=generator))
    if config.discrete:
        # u = 1 (a saturated sigmoid, or `mode` at a draw of 0) would index one past the table's end
        index = (u * config.num_train_timesteps).long().clamp(max=config.num_train_timesteps - 1)
        u = sigma_table(config).to(device)[index]
    return shift_sigmas(u, config, image_seq_len).float()


def flux_timesteps(sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps, model_timesteps)``: the scheduler's ``σ·1000``, and that ``/ 1000`` for the transformer."""
    timesteps = sigmas * TIMESTEP_SCALE
    return timesteps, timesteps / TIMESTEP_SCALE


def loss_weighting(weighting: str, sigmas: torch.Tensor) -> torch.Tensor:
    """SD3's loss weights ``w(σ)``: ``none`` → 1, ``sigma_sqrt`` → ``σ⁻²``, ``cosmap`` → ``2 / (π(1 − 2σ + 2σ²))``.

    ``σ⁻²`` grows without bound as σ → 0; diffusers draws σ from the discrete table (``σ ≥ 1/T``) with it.
    """
    if weighting == "sigma_sqrt":
        return (sigmas**-2.0).float()
    if weighting == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    return torch.ones_like(sigmas)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """``[B, C, h, w]`` → ``[B, h/2 · w/2, 4C]``: 2×2 patches, channel-major within a patch (FluxPipeline's)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise MismatchError(f"Flux latents need an even height and width to pack 2×2 patches (got {h}×{w})")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents`` for latents of ``height`` × ``width`` (latent pixels, not image pixels)."""
    b, n, c4 = packed.shape
    if height % 2 or width % 2 or n != (height // 2) * (width // 2) or c4 % 4:
        raise MismatchError(
            f"{n} packed tokens of {c4} channels are not {height}×{width} latents in 2×2 patches"
        )
    x = packed.view(b, height // 2, width // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def image_ids(
    height: int, width: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``[h·w, 3]`` position ids of the packed image tokens (``h``, ``w``: the packed grid): ``(0, row, column)``."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width)[None, :]
    return ids.reshape(height * width, 3).to(device=device, dtype=dtype)


def text_ids(
    seq_len: int, device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``[seq_len, 3]`` zeros: FluxPipeline gives every T5 token the position ``(0, 0, 0)``."""
    return torch.zeros(seq_len, 3).to(device=device, dtype=dtype)


def guidance_vector(
    guidance_embeds: bool, batch_size: int, value: float = 1.0, device: torch.device | None = None
) -> torch.Tensor | None:
    """``[B]`` float32 of ``value`` for a guidance-distilled model (dev); ``None`` for one without (schnell)."""
    if not guidance_embeds:
        return None
    return torch.full((batch_size,), float(value), device=device, dtype=torch.float32)


@dataclass(frozen=True)
class FlowSample:
    """One noised batch: everything the transformer call and the loss need, in the latents' layout."""

    noise: torch.Tensor
    sigmas: torch.Tensor  # [B]
    timesteps: torch.Tensor  # [B], σ·1000
    model_timesteps: torch.Tensor  # [B], what the transformer takes
    noisy: torch.Tensor  # x_t
    target: torch.Tensor  # ε − x0
    weighting: torch.Tensor  # [B, 1, 1, 1]


def noisy_sample(
    latents: torch.Tensor,
    config: FlowConfig,
    generator: torch.Generator | None,
    sigmas: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> FlowSample:
    """Draw the noise, then σ (that order, as both scripts), and build ``x_t`` and the target in float32.

    ``sigmas`` (``[B]``) and ``noise`` (the latents' shape): fixed ones instead of drawn ones (a validation loss).
    """
    x0 = latents.float()
    b, _, h, w = x0.shape
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
    noise = noise.float().to(x0.device)
    if sigmas is None:
        sigmas = sample_sigmas(config, b, generator, image_seq_len=(h // 2) * (w // 2), device=x0.device)
    sigmas = sigmas.float().to(x0.device)
    timesteps, model_timesteps = flux_timesteps(sigmas)
    s = sigmas.view(-1, 1, 1, 1)
    return FlowSample(
        noise=noise,
        sigmas=sigmas,
        timesteps=timesteps,
        model_timesteps=model_timesteps,
        noisy=(1.0 - s) * x0 + s * noise,
        target=noise - x0,
        weighting=loss_weighting(config.weighting, s),
    )


def weighted_mse(pred: torch.Tensor, sample: FlowSample, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example ``mean(w(σ)·(pred − target)²)`` ``[B]``; ``weight`` (a mask) multiplies pred and target first."""
    pred, target = pred.float(), sample.target
    if weight is not None:
        pred, target = pred * weight, target * weight
    return (sample.weighting * (pred - target) ** 2).reshape(pred.shape[0], -1).mean(1)


@dataclass(frozen=True)
class FluxCond:
    """The text conditioning of a Flux batch: T5 embeddings ``[B, S, 4096]`` and CLIP's pooled ``[B, 768]``."""

    prompt_embeds: torch.Tensor
    pooled_projections: torch.Tensor


def predict(
    transformer: Any, sample: FlowSample, cond: FluxCond, guidance: float, guidance_embeds: bool | None = None
) -> torch.Tensor:
    """The transformer's velocity for ``sample.noisy``, unpacked back to ``[B, C, h, w]`` (float32).

    ``guidance_embeds``: whether the model takes a guidance value (``None``: its config says; a DDP wrapper has none).
    """
    first = next(transformer.parameters())
    dtype, device = first.dtype, first.device
    b, _, h, w = sample.noisy.shape
    if guidance_embeds is None:
        guidance_embeds = bool(getattr(transformer.config, "guidance_embeds", False))
    g = guidance_vector(guidance_embeds, b, guidance, device)
    out = transformer(
        hidden_states=pack_latents(sample.noisy.to(dtype)),
        timestep=sample.model_timesteps.to(dtype),
        guidance=g,
        pooled_projections=cond.pooled_projections.to(dtype),
        encoder_hidden_states=cond.prompt_embeds.to(dtype),
        txt_ids=text_ids(cond.prompt_embeds.shape[1], device, dtype),
        img_ids=image_ids(h // 2, w // 2, device, dtype),
        return_dict=False,
    )[0]
    return unpack_latents(out, h, w).float()


class FlowObjective:
    """``loss(transformer, latents, cond, generator)`` → per-example flow-matching loss ``[B]`` (float32)."""

    def __init__(self, config: FlowConfig = FlowConfig()) -> None:
        self.config = config

    def loss(
        self,
        transformer: Any,
        latents: torch.Tensor,
        cond: FluxCond,
        generator: torch.Generator | None,
        weight: torch.Tensor | None = None,
        sigmas: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Draw from ``generator``, noise ``latents`` (``[B, 16, h, w]``), predict, weight; ``weight``: a mask."""
        sample = noisy_sample(latents, self.config, generator, sigmas)
        return weighted_mse(predict(transformer, sample, cond, self.config.guidance), sample, weight)
