"""What Flux.1 trains with (its ``lorax.training.family_hooks.TrainingHooks``): CLIP-L's pooled output and T5's
sequence as the conditioning (``FluxPromptEncoder``), the rectified-flow objective of ``lorax.training.flow`` behind
the ``Objective`` protocol (``FluxObjective``), and ``FluxPipeline`` over the live modules for validation images.

The batches are SD's ``DiffusionBatches``: the VAE latents (``vae_encode`` applies the Flux VAE's ``shift_factor``
and ``scaling_factor``) and the prompt encoder's ``FluxCond``; the objective packs the latents into 2×2 patches and
builds the image and text position ids as ``FluxPipeline`` does (``lorax.training.flow.pack_latents``,
``image_ids``, ``text_ids``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lorax.training.flow import FlowConfig, FluxCond

if TYPE_CHECKING:
    import torch

    from lorax.training.config import TrainConfig
    from lorax.training.objective import LossInputs

DEV_MAX_SEQUENCE, SCHNELL_MAX_SEQUENCE = 512, 256  # T5 tokens: FluxPipeline's and kohya's defaults
DEV_GUIDANCE = 1.0  # the guidance a dev LoRA trains with (kohya's recommendation; lorax.training.flow)


def has_guidance(transformer: Any) -> bool:
    """dev (and its finetunes) embed the guidance; schnell does not."""
    model = getattr(transformer, "module", transformer)  # DDP
    return bool(getattr(model.config, "guidance_embeds", False))


def encode_flux(
    tokenizers: Sequence[Any],
    encoders: Sequence[Any],
    prompts: Sequence[str],
    device: torch.device,
    max_sequence_length: int,
) -> FluxCond:
    """FluxPipeline's ``encode_prompt``: CLIP-L's pooled output (77 tokens) and T5's last hidden state
    (``max_sequence_length`` tokens, padded)."""
    clip_tok, t5_tok = tokenizers
    clip, t5 = encoders
    clip_ids = clip_tok(
        list(prompts), padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids  # fmt: skip
    pooled = clip(clip_ids.to(device), output_hidden_states=False).pooler_output
    t5_ids = t5_tok(
        list(prompts),
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    hidden = t5(t5_ids.to(device), output_hidden_states=False)[0]
    return FluxCond(prompt_embeds=hidden, pooled_projections=pooled)


class FluxPromptEncoder:
    """Prompts → ``FluxCond``; with ``cache=True`` (frozen text encoders) each distinct prompt is encoded once."""

    def __init__(
        self,
        tokenizers: Sequence[Any],
        encoders: Sequence[Any],
        device: torch.device,
        *,
        cache: bool,
        max_sequence_length: int,
    ) -> None:
        self.tokenizers = list(tokenizers)
        self.encoders = list(encoders)
        self.device = device
        self.cache_enabled = cache
        self.max_sequence_length = max_sequence_length
        self._cache: dict[str, tuple[Any, Any]] = {}

    def __call__(self, prompts: Sequence[str]) -> FluxCond:
        import torch

        if not self.cache_enabled:
            return encode_flux(self.tokenizers, self.encoders, prompts, self.device, self.max_sequence_length)
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            with torch.no_grad():
                cond = encode_flux(
                    self.tokenizers, self.encoders, missing, self.device, self.max_sequence_length
                )
            for i, prompt in enumerate(missing):
                self._cache[prompt] = (cond.prompt_embeds[i], cond.pooled_projections[i])
        return FluxCond(
            torch.stack([self._cache[p][0] for p in prompts]),
            torch.stack([self._cache[p][1] for p in prompts]),
        )


def default_max_sequence(transformer: Any) -> int:
    return DEV_MAX_SEQUENCE if has_guidance(transformer) else SCHNELL_MAX_SEQUENCE


def flux_prompts(
    pipe: Any, encoders: Sequence[Any], device: torch.device, *, cache: bool, clip_skip: int = 1,
    max_sequence_length: int | None = None,
) -> FluxPromptEncoder:  # fmt: skip
    """The Flux ``prompt_encoder`` hook (clip skip has no meaning for a pooled output; the config refuses it)."""
    length = max_sequence_length or default_max_sequence(pipe.transformer)
    return FluxPromptEncoder(
        [pipe.tokenizer, pipe.tokenizer_2], encoders, device, cache=cache, max_sequence_length=length
    )


class FluxObjective:
    """``lorax.training.flow``'s rectified flow behind the ``Objective`` protocol: σ drawn per ``FlowConfig``,
    ``x_t = (1 − σ)·x0 + σ·ε``, the transformer's velocity against ``ε − x0``, weighted by ``w(σ)``.

    ``guidance``: the value a guidance-distilled (dev) transformer is given, ``None`` for one without (schnell);
    decided once from the unwrapped model, so a DDP-wrapped transformer is called as it is.
    """

    prediction_type = (
        "flow"  # recorded in the metadata (lorax_prediction_type); kohya's version is flux1 either way
    )

    def __init__(self, config: FlowConfig, guidance: float | None) -> None:
        self.config = config
        self.guidance = guidance
        self.num_timesteps = int(config.num_train_timesteps)

    def sample(
        self, latents: torch.Tensor, generator: torch.Generator, timesteps: torch.Tensor | None = None
    ) -> Any:
        """The noised batch (``lorax.training.flow.FlowSample``); ``timesteps`` (``[B]`` in ``[0, T)``, the
        held-out loss's fixed ones) give ``σ = (t + 1) / T`` instead of drawn ones."""
        from lorax.training.flow import noisy_sample

        sigmas = None if timesteps is None else (timesteps.float() + 1.0) / self.num_timesteps
        return noisy_sample(latents, self.config, generator, sigmas)

    def predict(self, transformer: Any, sample: Any, cond: FluxCond) -> Any:
        """The velocity for ``sample.noisy`` (``[B, C, h, w]``, float32): ``flow.predict`` with this objective's
        guidance."""
        from lorax.training.flow import predict

        return predict(
            transformer, sample, cond, self.guidance or 0.0, guidance_embeds=self.guidance is not None
        )

    def metadata(self, config: TrainConfig, header: dict[str, str]) -> dict[str, str | None]:
        """The header keys kohya's ``flux_train_network.py`` writes (``networks.lora_flux``, its ``network_args``
        ``train_blocks`` / ``train_t5xxl``, ``ss_timestep_sampling`` …, in kohya's spellings), and lorax's exact
        flow settings (``lorax_timestep_sampling``, ``lorax_weighting_scheme``)."""
        import json

        c = self.config
        args = {
            k: v
            for k, v in json.loads(header.get("ss_network_args", "{}")).items()
            if not k.startswith("conv_")
        }
        if config.train_blocks is not None:
            args["train_blocks"] = config.train_blocks
        if config.train_t5:
            args["train_t5xxl"] = "True"
        density = {"logit-normal": "logit_normal", "mode": "mode"}.get(
            c.sampling
        )  # kohya: sigma + the density
        out: dict[str, str | None] = {
            "ss_network_module": "networks.lora_flux",
            "ss_timestep_sampling": "sigma" if density else c.sampling.replace("-", "_"),
            "ss_weighting_scheme": density or c.weighting,
            "ss_sigmoid_scale": f"{c.sigmoid_scale:g}",
            "ss_discrete_flow_shift": f"{c.shift:g}",
            "ss_logit_mean": f"{c.logit_mean:g}",
            "ss_logit_std": f"{c.logit_std:g}",
            "ss_mode_scale": f"{c.mode_scale:g}",
            "ss_model_prediction_type": "raw",
            "lorax_timestep_sampling": c.sampling,
            "lorax_weighting_scheme": c.weighting,
        }
        if self.guidance is not None:
            out["ss_guidance_scale"] = f"{self.guidance:g}"
        out["ss_network_args"] = json.dumps(args) if args else None
        return out

    def loss(self, unet: Any, step: LossInputs, generator: torch.Generator) -> torch.Tensor:
        """Per-example ``mean(w(σ)·(v̂ − (ε − x0))²)`` ``[B]`` (float32); ``step.weight``: a loss mask."""
        from lorax.training.flow import weighted_mse

        sample = self.sample(step.latents, generator, step.timesteps)
        return weighted_mse(self.predict(unet, sample, step.cond), sample, step.weight)


def flow_config(config: TrainConfig) -> Any:
    """The run's ``FlowConfig`` from its flags (kohya's and diffusers' names: docs/train.md)."""
    from lorax.training.flow import FlowConfig

    given: dict[str, Any] = {
        "sampling": config.timestep_sampling,
        "shift": config.discrete_flow_shift,
        "sigmoid_scale": config.sigmoid_scale,
        "logit_mean": config.logit_mean,
        "logit_std": config.logit_std,
        "weighting": config.weighting_scheme,
    }
    return FlowConfig(**{k: v for k, v in given.items() if v is not None})


def flux_objective(pipe: Any, config: TrainConfig) -> FluxObjective:
    """The Flux ``objective`` hook: ``--guidance`` (default 1.0) for dev, none for schnell."""
    guidance = None
    if has_guidance(pipe.transformer):
        guidance = DEV_GUIDANCE if config.guidance is None else float(config.guidance)
    elif config.guidance is not None:
        from lorax.errors import ConfigError

        raise ConfigError(
            f"--guidance {config.guidance:g}: {config.model} has no guidance embedding (a schnell model); drop it"
        )
    return FluxObjective(flow_config(config), guidance)


def flux_sampling(config: TrainConfig, pipe: Any) -> tuple[int, float]:
    """Steps and distilled guidance of class and validation images on a Flux model: ``--sample-steps`` /
    ``--guidance-scale``, else the model's ``lorax.json``, else ``lorax generate``'s Flux defaults (dev: 28 steps,
    guidance 3.5; schnell: 4 steps, its guidance unused)."""
    from lorax.gen.flux import DEV_GUIDANCE, DEV_STEPS, SCHNELL_STEPS
    from lorax.models.defaults import model_defaults

    own = model_defaults(config.model).generate
    steps = DEV_STEPS if has_guidance(pipe.transformer) else SCHNELL_STEPS
    return (
        config.sample_steps if config.sample_steps is not None else int(own.get("steps", steps)),
        config.guidance_scale
        if config.guidance_scale is not None
        else float(own.get("guidance", DEV_GUIDANCE)),
    )


def flux_sampler(common: dict[str, Any], pipe: Any, live: Sequence[Any]) -> Any:
    """The Flux ``sampler`` hook: ``FluxPipeline`` over the live transformer and text encoders."""
    from diffusers import FluxPipeline

    return FluxPipeline(
        scheduler=common["scheduler"],
        vae=common["vae"],
        text_encoder=live[0],
        tokenizer=common["tokenizer"],
        text_encoder_2=live[1],
        tokenizer_2=pipe.tokenizer_2,
        transformer=common["unet"],
    )
