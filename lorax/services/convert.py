"""``lorax convert``: LoRAs between formats (with optional SVD rank resize), embeddings between formats, and model
layouts (diffusers folder ⇄ single file, ``.ckpt`` → ``.safetensors``), all written atomically."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorax.errors import ConfigError
from lorax.io.atomic import atomic_path, check_output
from lorax.io.checkpoint import (
    DiffusersCheckpoint,
    SingleFileCheckpoint,
    is_model_checkpoint,
    open_checkpoint,
)
from lorax.io.model_layout import DTYPES, write_diffusers_folder, write_single_file
from lorax.progress import NullProgress, Progress

MODEL_TARGETS = ("diffusers", "single-file")
EMBEDDING_TARGETS = {
    "a1111": "a1111-embedding",
    "a1111-embedding": "a1111-embedding",
    "sdxl-embedding": "sdxl-embedding",
    "diffusers": "diffusers-embedding",
    "diffusers-embedding": "diffusers-embedding",
}


@dataclass
class ConvertConfig:
    input: str
    output: Path
    to: str | None = None
    dtype: str | None = None
    rank: int | None = None
    force: bool = False
    config_from: str | None = None

    def validate(self) -> None:
        problems = []
        if self.dtype is not None and self.dtype not in DTYPES:
            problems.append(f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if self.rank is not None and self.rank < 1:
            problems.append(f"--rank must be at least 1 (got {self.rank})")
        if problems:
            raise ConfigError("; ".join(problems))


@dataclass
class ModuleReport:
    module: str
    rank_in: int
    rank_out: int
    energy: float
    error: float


@dataclass
class ConvertResult:
    output: Path
    kind: str  # "model" | "lora" | "embedding"
    input_format: str
    output_format: str
    family: str | None = None
    tensors: int = 0
    modules: int = 0
    tokens: list[str] = field(default_factory=list)
    dtype: str | None = None
    rank: int | None = None
    worst: ModuleReport | None = None
    mean_energy: float | None = None
    resized: list[ModuleReport] = field(default_factory=list)
    seconds: float = 0.0


def _looks_like_model(spec: str) -> bool:
    p = Path(spec)
    if p.exists():
        return is_model_checkpoint(p)
    return True  # a Hub id or a built-in name: only models are resolved that way


def convert(config: ConvertConfig, progress: Progress | None = None) -> ConvertResult:
    """Convert a model, LoRA or embedding file; see docs/convert.md."""
    progress = progress or NullProgress()
    config.validate()
    start = time.perf_counter()
    if _looks_like_model(config.input):
        result = convert_model(config, progress)
    else:
        from lorax.formats import EMBEDDING_FORMATS, detect_format

        fmt = detect_format(config.input)
        if fmt in EMBEDDING_FORMATS:
            result = convert_embeddings(config, fmt, progress)
        else:
            result = convert_lora(config, fmt, progress)
    result.seconds = time.perf_counter() - start
    return result


def convert_model(config: ConvertConfig, progress: Progress) -> ConvertResult:
    ckpt = open_checkpoint(config.input)
    out = Path(config.output)
    to = config.to
    if to is None:
        to = "single-file" if out.suffix.lower() == ".safetensors" else "diffusers"
    if to not in MODEL_TARGETS:
        raise ConfigError(f"--to {to}: a model converts to diffusers or single-file")
    if to == "single-file" and out.suffix.lower() != ".safetensors":
        raise ConfigError(
            f"{out}: a single-file checkpoint is written as .safetensors; name it OUT.safetensors"
        )
    check_output(out, config.force)
    result = ConvertResult(out, "model", ckpt.kind, to, ckpt.family, dtype=config.dtype)
    if to == "single-file":
        with atomic_path(out, config.force) as tmp:
            if isinstance(ckpt, DiffusersCheckpoint):
                result.tensors = write_single_file(ckpt, tmp, dtype=config.dtype, progress=progress)
            else:
                result.tensors = _resave_single(ckpt, tmp, config.dtype, progress)
        if ckpt.kind == "single-file" and not ckpt.is_safetensors:  # type: ignore[union-attr]
            result.input_format = "single-file (pickle)"
    else:
        if isinstance(ckpt, DiffusersCheckpoint):
            raise ConfigError(f"{ckpt.path} is already a diffusers folder; use --to single-file")
        with atomic_path(out, config.force, directory=True) as tmp:
            counts = write_diffusers_folder(
                ckpt, tmp, dtype=config.dtype, config_from=config.config_from, progress=progress
            )
        result.tensors = sum(counts.values())
        if ckpt.keymap.extras:
            progress.log(
                f"{len(ckpt.keymap.extras)} tensors have no place in a diffusers folder and were left out "
                f"(e.g. {ckpt.keymap.extras[0]})"
            )
    return result


def _resave_single(ckpt: SingleFileCheckpoint, out: Path, dtype: str | None, progress: Progress) -> int:
    """A single file re-written as safetensors (from a pickle, or in another dtype), tensor by tensor."""
    from lorax.io.checkpoint import META_FAMILY
    from lorax.services.merge import merge_tensor_file

    meta = {**ckpt.metadata, META_FAMILY: ckpt.family}
    with progress.task(f"writing {out.name}", total=len(ckpt.keys())) as task:
        merged, copied = merge_tensor_file(
            ckpt.source, out, {}, dtype=DTYPES[dtype] if dtype else None, metadata=meta, task=task
        )
    return merged + copied


def _torch_dtype(name: str | None) -> Any:
    if name is None:
        return None
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def convert_lora(config: ConvertConfig, fmt: str, progress: Progress) -> ConvertResult:
    from lorax.adapters.svd import resize_state
    from lorax.formats import LORA_WRITE_FORMATS, load_lora, save_lora

    target = config.to or fmt
    if target not in LORA_WRITE_FORMATS:
        raise ConfigError(f"--to {target}: a LoRA converts to {', '.join(LORA_WRITE_FORMATS)}")
    check_output(config.output, config.force)
    state = load_lora(config.input)
    result = ConvertResult(Path(config.output), "lora", fmt, target, state.family, dtype=config.dtype)
    if config.rank is not None:
        with progress.task("resizing by SVD", total=None):
            state, reports = resize_state(state, config.rank)
        result.rank = config.rank
        result.resized = [ModuleReport(r.module, r.rank_in, r.rank_out, r.energy, r.error) for r in reports]
        if reports:
            worst = min(reports, key=lambda r: r.energy)
            result.worst = ModuleReport(
                worst.module, worst.rank_in, worst.rank_out, worst.energy, worst.error
            )
            result.mean_energy = sum(r.energy for r in reports) / len(reports)
            progress.log(
                f"resized {len(reports)} modules to rank {config.rank}: mean kept energy {result.mean_energy:.4f}, "
                f"worst {worst.energy:.4f} ({worst.module})"
            )
    save_lora(state, config.output, format=target, dtype=_torch_dtype(config.dtype), force=config.force)
    result.modules = len(state.modules)
    result.tokens = sorted(state.embeddings)
    return result


def convert_embeddings(config: ConvertConfig, fmt: str, progress: Progress) -> ConvertResult:
    from lorax.formats import load_embeddings, save_embeddings

    if config.rank is not None:
        raise ConfigError("--rank applies to LoRAs, not embeddings")
    target = EMBEDDING_TARGETS.get(config.to or "", config.to)
    check_output(config.output, config.force)
    embeddings = load_embeddings(config.input)
    if config.dtype is not None:
        dt = _torch_dtype(config.dtype)
        embeddings = {t: {c: v.to(dt) for c, v in comps.items()} for t, comps in embeddings.items()}
    save_embeddings(embeddings, config.output, format=target, force=config.force)
    from lorax.formats import detect_format

    return ConvertResult(
        Path(config.output), "embedding", fmt, detect_format(config.output), tokens=sorted(embeddings)
    )
