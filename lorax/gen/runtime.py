"""The live pipeline of a ``lorax generate`` run: device and precision, the model, its sampler, and what goes on it.

Loading the model, choosing the scheduler and the default size, reading the LoRA, embedding and init-image files,
registering every learned token (``--embedding`` files and tokens bundled in LoRAs, under the seed's LoRAManager
naming on a clash) and the clip skip a run uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.adapters.state import LoraState
from lorax.dtypes import LONG_NAMES
from lorax.errors import ConfigError, InputError
from lorax.gen.config import SCHEDULERS, GenerateConfig, LoraSpec
from lorax.models.defaults import model_defaults
from lorax.progress import Progress

if TYPE_CHECKING:
    import torch


def sampling_defaults(model: str) -> tuple[int, float]:
    """Denoising steps and guidance scale when the flags leave them out: those the model carries (its
    ``lorax.json``; the shapes model's are those its model card was scored with), else Stable Diffusion's usual 20
    and 7.5."""
    return model_defaults(model).sampling


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if name in ("cuda", "gpu") and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA GPU is available; use --device cpu or auto")
    if name == "gpu":
        return "cuda"
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError("--device mps: Apple's MPS backend is not available; use --device cpu or auto")
    return name


def resolve_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.float16 if device in ("cuda", "mps") else torch.float32
    return getattr(torch, LONG_NAMES.get(name, name))


def load_model(
    spec: str, dtype: torch.dtype | None = None, device: str | None = None, *, config_from: str | None = None
) -> Any:
    """A diffusers pipeline for ``spec``: a built-in name (``shapes``), a diffusers folder, a Hub id in the local
    cache, or a single ``.safetensors`` / ``.ckpt`` file (the models layer's ``load_pipeline``; ``config_from``
    completes a file that holds only part of a pipeline)."""
    from lorax.models.pipeline import load_pipeline

    return load_pipeline(spec, dtype=dtype, device=device, config_from=config_from)


def sampler_name(pipe: Any) -> str:
    cls = type(pipe.scheduler).__name__
    most_specific_first = sorted(SCHEDULERS.values(), key=lambda entry: -len(entry[2]))
    for class_name, a1111, extra in most_specific_first:
        if class_name == cls and all(pipe.scheduler.config.get(k) == v for k, v in extra.items()):
            return a1111
    return cls.removesuffix("Scheduler")


def set_scheduler(pipe: Any, name: str) -> None:
    import diffusers

    class_name, _, extra = SCHEDULERS[name.lower()]
    pipe.scheduler = getattr(diffusers, class_name).from_config(pipe.scheduler.config, **extra)


def default_size(pipe: Any) -> tuple[int, int]:
    if getattr(pipe, "unet", None) is None:  # Flux: FluxPipeline's own default
        from lorax.gen.flux import default_size as flux_default_size

        return flux_default_size(pipe)
    sample = pipe.unet.config.sample_size
    factor = getattr(pipe, "vae_scale_factor", 8)
    if isinstance(sample, (list, tuple)):
        return int(sample[1]) * factor, int(sample[0]) * factor
    return int(sample) * factor, int(sample) * factor


def read_init_image(path: Path) -> Any:
    from lorax.data.images import read_image_file

    return read_image_file(path, "--init-image")


def check_input_file(path: Path, flag: str) -> None:
    """Exists and has a format lorax reads (header only: cheap, before the model loads)."""
    from lorax.formats import detect_format

    if not path.exists():
        raise InputError(f"no such file ({flag})", path=path)
    detect_format(path)


def load_lora_file(path: Path, pipe: Any) -> LoraState:
    """A LoRA file read against the live model (kohya names and lora_diffusion indices resolve exactly)."""
    from lorax.formats import load_lora

    state: LoraState = load_lora(path, model=pipe)
    return state


def trigger_note(path: Path, tokens: list[str]) -> str | None:
    """A note when a file named by its file (A1111 / SDXL ``.safetensors``) carries a trained token of another name:
    lorax honours the header's token, A1111 and ComfyUI trigger the file by its name."""
    from lorax.formats import detect_format
    from lorax.formats.embeddings import _token_from_path

    stem = _token_from_path(path)
    if (
        tokens == [stem]
        or len(tokens) != 1
        or detect_format(path) not in ("a1111-embedding", "sdxl-embedding")
    ):
        return None
    return (
        f"{path.name}: prompts here use its trained token '{tokens[0]}' (from the file's header); "
        f"A1111 and ComfyUI trigger it by its file name, '{stem}'"
    )


def load_embedding_file(path: Path) -> dict[str, dict[str, Any]]:
    from lorax.formats import load_embeddings

    loaded = load_embeddings(path)
    embeddings = loaded.embeddings if isinstance(loaded, LoraState) else loaded
    if not embeddings:
        raise InputError("holds no learned token embeddings (--embedding)", path=path)
    return dict(embeddings)


def expand_lora_tokens(prompt: str, lora_tokens: dict[int, list[str]]) -> str:
    """``<N>`` in a prompt → the learned tokens bundled in the N-th ``--lora`` file (the seed's LoRAManager)."""
    for number, tokens in lora_tokens.items():
        prompt = prompt.replace(f"<{number}>", " ".join(tokens))
    return prompt


def register_run_tokens(
    pipe: Any,
    embeddings: list[tuple[Path, dict[str, Any]]],
    specs: list[LoraSpec],
    states: list[LoraState],
) -> dict[int, list[str]]:
    """Register every ``--embedding`` file's tokens, then each LoRA's bundled ones; returns ``{N: tokens}`` of the
    N-th LoRA for :func:`expand_lora_tokens`. A bundled token whose name is taken becomes ``<sN-j>`` (the seed's
    LoRAManager naming: file N's j-th token)."""
    from lorax.adapters.apply import register_tokens

    taken: set[str] = set()
    for path, embedding in embeddings:
        taken |= set(register_tokens(pipe, embedding, source=path))
    lora_tokens: dict[int, list[str]] = {}
    for number, (spec, state) in enumerate(zip(specs, states, strict=True), start=1):
        if not state.embeddings:
            continue
        bundled = dict(state.embeddings)
        if taken & set(bundled):
            bundled = {f"<s{number}-{j}>": vectors for j, vectors in enumerate(bundled.values())}
        taken |= set(register_tokens(pipe, bundled, source=spec.path or spec.label))
        lora_tokens[number] = list(bundled)
    return lora_tokens


def round8(size: tuple[int, int]) -> tuple[int, int]:
    return max(8, size[0] // 8 * 8), max(8, size[1] // 8 * 8)


def clip_skip(
    config: GenerateConfig, pipe: Any, specs: list[Any], states: list[Any], progress: Progress
) -> int:
    """``--clip-skip``, else the first LoRA's ``ss_clip_skip`` (kohya's record of how it was trained), else 1.
    SDXL has no clip skip in kohya's or A1111's sense (it already conditions on penultimate layers)."""
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    if config.clip_skip is not None:
        if sdxl and config.clip_skip > 1:
            raise ConfigError(
                f"--clip-skip {config.clip_skip}: SDXL already conditions on its text encoders' penultimate layers; "
                "drop it"
            )
        return config.clip_skip
    found: list[tuple[int, str]] = []
    for spec, state in zip(specs, states, strict=True):
        said = str(state.metadata.get("ss_clip_skip", "")).strip()
        if said.isdigit() and int(said) > 1:
            found.append((int(said), str(spec.path.name if spec.path is not None else spec.label)))
    if not found or sdxl:
        return 1
    value, name = found[0]
    others = sorted({v for v, _ in found[1:] if v != value})
    differ = f"; other LoRAs say {', '.join(map(str, others))}" if others else ""
    progress.log(f"clip skip {value} (ss_clip_skip of {name}{differ}; --clip-skip 1 turns it off)")
    return value
