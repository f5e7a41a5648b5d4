"""Training jobs on Stable Diffusion: ``DiffusionBatches`` (data → latents + text conditioning + per-example loss)
and ``LoraJob`` (UNet / text-encoder LoRA through PEFT). ``invert`` and ``pivot`` build their own jobs on
``DiffusionBatches`` and run them through the same ``TrainingLoop``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.data.dataset import TrainData, derive_seed
from lorax.training.latents import LatentCache, vae_encode
from lorax.training.lora import load_lora_tensors, lora_parameters, lora_tensors
from lorax.training.objective import LossInputs, Objective
from lorax.training.text import PromptEncoder

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator


@dataclass
class DiffusionBatches:
    """Micro-batch ``m`` → the loss of the UNet on it (instance mean + ``prior_weight`` × class mean)."""

    data: TrainData
    vae: Any
    unet: Any
    prompts: PromptEncoder
    objective: Objective
    device: torch.device
    prior_weight: float = 1.0
    latent_cache: LatentCache | None = None
    _plans: dict[int, list[list[int]]] = field(default_factory=dict)

    @property
    def batches_per_epoch(self) -> int:
        return self.data.batches_per_epoch()

    def position(self, micro_step: int) -> tuple[int, list[int]]:
        epoch, index = divmod(micro_step, self.batches_per_epoch)
        if epoch not in self._plans:
            self._plans = {epoch: self.data.epoch_plan(epoch)}
        return epoch, self._plans[epoch][index]

    def epoch_of(self, micro_step: int) -> int:
        return micro_step // self.batches_per_epoch

    def latents(self, epoch: int, indices: list[int]) -> tuple[Any, list[str], int]:
        import torch

        keys, captions, rngs = self.data.batch_keys(epoch, indices)
        if self.latent_cache is not None:
            latents = self.latent_cache.get(keys, self.device)
        else:
            pixels = torch.stack([self.data.load(k, r) for k, r in zip(keys, rngs, strict=True)])
            latents = vae_encode(self.vae, pixels.to(self.device))
        return latents, captions, len(indices)

    def conditioning(self, epoch: int, indices: list[int], captions: list[str]) -> Any:
        """The UNet's text conditioning for a batch (``SdxlBatches`` adds its size/crop ids)."""
        return self.prompts(captions)

    def loss_weight(self, epoch: int, indices: list[int], latents: torch.Tensor) -> Any:
        """Per-pixel loss weights broadcastable to ``latents`` (``MaskedBatches``), or ``None``: plain MSE."""
        return None

    def loss(self, micro_step: int, generator: torch.Generator, unet: Any | None = None) -> Any:
        epoch, indices = self.position(micro_step)
        latents, captions, n = self.latents(epoch, indices)
        cond = self.conditioning(epoch, indices, captions)
        step = LossInputs(latents, cond, weight=self.loss_weight(epoch, indices, latents))
        per_example = self.objective.loss(unet or self.unet, step, generator)
        if per_example.shape[0] == n:
            return per_example.mean()
        return per_example[:n].mean() + self.prior_weight * per_example[n:].mean()


@dataclass
class Sampler:
    """Validation images: the current models through a diffusers pipeline, one seeded generator per prompt."""

    pipeline_factory: Any  # () -> a StableDiffusionPipeline sharing the training modules
    prompts: list[Any]  # str, or a SamplePrompt (lorax.training.sample_prompts) with its own options
    folder: Path
    resolution: int
    steps: int
    guidance: float
    seed: int
    is_main: bool = True
    release: Any = None  # called after sampling (e.g. to move the VAE off the device again)
    clip_skip: int = 1  # kohya's / A1111's: 2 conditions on the penultimate text-encoder layer
    call: dict[str, Any] = field(
        default_factory=dict
    )  # the family's extra pipeline arguments (Flux: T5 length)

    def __call__(self, step: int, autocast: Any) -> list[Path]:
        import torch

        if not self.is_main:
            return []
        pipe = self.pipeline_factory()
        self.folder.mkdir(parents=True, exist_ok=True)
        paths: list[Path] = []
        from lorax.gen.params import save_png
        from lorax.training.sample_prompts import SamplePrompt, sample_settings

        for i, entry in enumerate(self.prompts):
            spec = entry if isinstance(entry, SamplePrompt) else SamplePrompt(str(entry))
            run = sample_settings(
                spec, self.steps, self.guidance, self.resolution, derive_seed(self.seed, "validation", i)
            )
            generator = torch.Generator(device="cpu").manual_seed(run.seed)
            prompt_kwargs: dict[str, Any] = {"prompt": spec.prompt, "negative_prompt": spec.negative}
            if self.clip_skip > 1:
                from lorax.training.text import clip_skip_embeds

                with torch.no_grad():
                    prompt_kwargs = clip_skip_embeds(pipe, spec.prompt, spec.negative, self.clip_skip)
            with autocast():
                image = pipe(
                    **prompt_kwargs,
                    num_inference_steps=run.steps,
                    guidance_scale=run.guidance,
                    height=run.height,
                    width=run.width,
                    generator=generator,
                    **self.call,
                ).images[0]
            path = self.folder / f"step-{step:06d}-{i}.png"
            save_png(image, path, run.parameters(spec, step, self.clip_skip))
            paths.append(path)
        if self.release is not None:
            self.release()
        return paths


class LoraJob:
    """LoRA on the UNet (and the text encoder with ``train_text``): the ``Job`` the training loop runs."""

    def __init__(
        self,
        batches: DiffusionBatches,
        *,
        unet: Any,
        text_encoder: Any | None,
        accelerator: Accelerator,
        sampler: Sampler | None = None,
        text_encoder_2: Any | None = None,
    ) -> None:
        self.batches = batches
        self.text_encoder_2 = text_encoder_2  # SDXL's second text encoder, prepared, or None
        self.unet = unet  # prepared (maybe DDP-wrapped)
        self.text_encoder = text_encoder  # prepared, or None when frozen
        self.accelerator = accelerator
        self.sampler = sampler

    def components(self) -> dict[str, Any]:
        """The unwrapped trained modules by component name."""
        out = {"unet": self.accelerator.unwrap_model(self.unet)}
        if self.text_encoder is not None:
            out["text_encoder"] = self.accelerator.unwrap_model(self.text_encoder)
        if self.text_encoder_2 is not None:
            out["text_encoder_2"] = self.accelerator.unwrap_model(self.text_encoder_2)
        return out

    def trainable_models(self) -> list[Any]:
        return [m for m in (self.unet, self.text_encoder, self.text_encoder_2) if m is not None]

    def parameters(self) -> list[Any]:
        return [p for m in self.components().values() for p in lora_parameters(m)]

    def loss(self, micro_step: int, generator: torch.Generator) -> Any:
        return self.batches.loss(micro_step, generator, unet=self.unet)

    def epoch_of(self, micro_step: int) -> int:
        return self.batches.epoch_of(micro_step)

    def after_step(self, step: int) -> None:
        return None

    def state_tensors(self) -> dict[str, Any]:
        return {
            f"{name}.{key}": t
            for name, model in self.components().items()
            for key, t in lora_tensors(model).items()
        }

    def load_state_tensors(self, tensors: dict[str, Any]) -> None:
        for name, model in self.components().items():
            prefix = name + "."
            load_lora_tensors(
                model, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
        unknown = [k for k in tensors if k.split(".", 1)[0] not in self.components()]
        if unknown:
            from lorax.errors import MismatchError

            raise MismatchError(
                f"the checkpoint trains {sorted({k.split('.', 1)[0] for k in unknown})} too: resume with --train-text"
            )

    def validate(self, step: int) -> list[Path]:
        if self.sampler is None:
            return []
        return self.sampler(step, self.accelerator.autocast)
