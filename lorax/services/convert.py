"""``lorax convert``: LoRAs between formats (with optional SVD rank resize), embeddings between formats, and model
layouts (diffusers folder ⇄ single file, ``.ckpt`` → ``.safetensors``), all written atomically.

LoRA conversions take ``model`` (``--model``): the model the LoRA belongs to, as a built-in name, diffusers folder,
Hub id or single file. Its weightless skeleton (``lorax.models.skeleton``) resolves names exactly and gives the
lora_diffusion format its index order; without it the family's full-size tables do, and a LoRA that does not fit them
is refused with a message naming ``--model``. A diffusers LoRA holds no token embeddings, so bundled ones are written
beside it, one file per token (``embedding_paths``).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lorax import dtypes
from lorax.adapters.reports import SvdReport as ModuleReport  # one SVD report for every command
from lorax.errors import ConfigError, FormatError, MismatchError
from lorax.io.atomic import FILE, MODEL_FOLDER, atomic_path, check_output, check_outputs
from lorax.io.checkpoint import (
    DiffusersCheckpoint,
    SingleFileCheckpoint,
    is_model_checkpoint,
    open_checkpoint,
)
from lorax.io.model_layout import DTYPES, write_diffusers_folder, write_single_file
from lorax.progress import NullProgress, Progress
from lorax.services.common import MODEL_DEFAULTS, dtype_problem, rank_problem, refuse

if TYPE_CHECKING:
    import torch

    from lorax.adapters.state import DeltaModule, LoraModule, LoraState
    from lorax.models.skeleton import Skeleton

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
    model: str | None = None

    def validate(self) -> None:
        refuse(dtype_problem(self.dtype, DTYPES) + rank_problem(self.rank))


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
    model: str | None = None
    outputs: list[Path] = field(default_factory=list)  # every file written, the main output first
    embedding_files: dict[str, Path] = field(
        default_factory=dict
    )  # token → file written beside a diffusers LoRA


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
        if config.model is not None:
            raise ConfigError("--model applies to LoRA conversions; the input is a model")
        result = convert_model(config, progress)
    else:
        from lorax.formats import EMBEDDING_FORMATS, detect_format

        fmt = detect_format(config.input)
        if fmt in EMBEDDING_FORMATS:
            if config.model is not None:
                raise ConfigError("--model applies to LoRA conversions; the input is an embedding")
            result = convert_embeddings(config, fmt, progress)
        else:
            result = convert_lora(config, fmt, progress)
    if not result.outputs:
        result.outputs = [result.output]
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
    check_output(out, config.force, FILE if to == "single-file" else MODEL_FOLDER)
    result = ConvertResult(out, "model", ckpt.kind, to, ckpt.family, dtype=config.dtype)
    if to == "single-file":
        with atomic_path(out, config.force) as tmp:
            if isinstance(ckpt, DiffusersCheckpoint):
                result.tensors = write_single_file(
                    ckpt, tmp, dtype=config.dtype, progress=progress, carry=MODEL_DEFAULTS
                )
            else:
                result.tensors = _resave_single(ckpt, tmp, config.dtype, progress)
        if ckpt.kind == "single-file" and not ckpt.is_safetensors:  # type: ignore[union-attr]
            result.input_format = "single-file (pickle)"
    else:
        if isinstance(ckpt, DiffusersCheckpoint):
            raise ConfigError(f"{ckpt.path} is already a diffusers folder; use --to single-file")
        with atomic_path(out, config.force, directory=True) as tmp:
            counts = write_diffusers_folder(
                ckpt,
                tmp,
                dtype=config.dtype,
                config_from=config.config_from,
                progress=progress,
                carry=MODEL_DEFAULTS,
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
    from lorax.io.checkpoint import META_FAMILY, without_stated_family
    from lorax.io.rewrite import rewrite_tensor_file

    meta = {**without_stated_family(ckpt.metadata), META_FAMILY: ckpt.family}
    with progress.task(f"writing {out.name}", total=len(ckpt.keys())) as task:
        merged, copied = rewrite_tensor_file(
            ckpt.source, out, dtype=DTYPES[dtype] if dtype else None, metadata=meta, task=task
        )
    return merged + copied


def _torch_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None

    return dtypes.torch_dtype(name)


def embedding_paths(output: str | Path, tokens: list[str]) -> dict[str, Path]:
    """Where the tokens of a diffusers LoRA ``output`` go: ``<output stem>.<token>.safetensors`` beside it, the token
    reduced to letters, digits, ``-`` and ``_`` (``<s1>`` → ``s1``), numbered when two tokens reduce alike."""
    out = Path(output)
    stem = out.name[: -len(out.suffix)] if out.suffix else out.name
    paths: dict[str, Path] = {}
    taken: set[str] = set()
    for i, token in enumerate(tokens):
        name = re.sub(r"[^A-Za-z0-9_-]+", "_", token).strip("_-") or f"token{i}"
        unique, n = name, 1
        while unique.lower() in taken:
            n += 1
            unique = f"{name}-{n}"
        taken.add(unique.lower())
        paths[token] = out.with_name(f"{stem}.{unique}.safetensors")
    return paths


def _shape_of(module: LoraModule | DeltaModule) -> tuple[int, ...] | None:
    from lorax.adapters.state import LoraModule

    if not isinstance(module, LoraModule):
        return None
    return (int(module.up.shape[0]), *(int(d) for d in module.down.shape[1:]))


def _full_size_misfit(state: LoraState) -> str | None:
    """Why ``state`` does not fit its family's full-size model (``None`` when every module does)."""
    from lorax.models import families

    family = state.family
    if family is None or family not in families.FAMILIES:
        return "its model family is unknown"
    for name, module in state.modules.items():
        component, _, path = name.partition(".")
        if component not in families.FAMILIES[family]:
            return f"the full-size {family} model has no {component}"
        want = families.module_table(family, component).get(path)
        if want is None:
            return f"the full-size {family} model has no module {name}"
        shape = _shape_of(module)
        if shape is not None and shape != tuple(want):
            return f"{name} is {list(shape)}, the full-size {family} model's {list(want)}"
    return None


def _read_lora(config: ConvertConfig, fmt: str, skeleton: Skeleton | None, family: str | None) -> LoraState:
    from lorax.formats import load_lora

    if skeleton is None:
        try:
            return load_lora(config.input)
        except MismatchError as err:
            if fmt != "lora_diffusion":
                raise
            raise MismatchError(
                "a lora_diffusion file names modules by index and fits no full-size model; pass --model with the "
                "model it was trained for",
                path=config.input,
            ) from err
    try:
        state = load_lora(config.input, model=skeleton, family=family)
    except MismatchError as err:
        text = str(err)
        if err.path is not None:
            text = text.removeprefix(f"{err.path}: ")
        raise MismatchError(f"does not fit --model {config.model}: {text}", path=config.input) from None
    if family and state.family and state.family != family:
        raise MismatchError(f"is a {state.family} LoRA but --model is {family}", path=config.input)
    state.family = state.family or family
    return state


def _drop_zero_pairs(state: LoraState) -> int:
    """Remove modules whose ``up`` or ``down`` is all zeros (no effect): an index file fills every target module the
    LoRA lacked with such pairs, and they would otherwise turn up as extra modules in kohya or diffusers files."""
    from lorax.adapters.state import LoraModule

    zero = [
        name
        for name, m in state.modules.items()
        if isinstance(m, LoraModule) and (not m.up.any() or not m.down.any())
    ]
    for name in zero:
        del state.modules[name]
    return len(zero)


def convert_lora(config: ConvertConfig, fmt: str, progress: Progress) -> ConvertResult:
    from lorax.adapters.svd import resize_state
    from lorax.formats import LORA_WRITE_FORMATS

    target = config.to or fmt
    if target not in LORA_WRITE_FORMATS:
        raise ConfigError(f"--to {target}: a LoRA converts to {', '.join(LORA_WRITE_FORMATS)}")
    check_output(config.output, config.force)
    skeleton, family = None, None
    if config.model is not None:
        from lorax.models.skeleton import load_skeleton

        with progress.task(f"reading {config.model}'s configs", total=None):
            skeleton, family = load_skeleton(config.model, config.config_from)
    state = _read_lora(config, fmt, skeleton, family)
    if fmt == "lora_diffusion":
        dropped = _drop_zero_pairs(state)
        if dropped:
            progress.log(
                f"left out {dropped} zero pairs (lora_diffusion's fill for target modules the LoRA lacks)"
            )
    result = ConvertResult(Path(config.output), "lora", fmt, target, state.family, dtype=config.dtype)
    result.model = config.model
    if target == "lora_diffusion" and skeleton is None:
        misfit = _full_size_misfit(state)
        if misfit is not None:
            raise MismatchError(
                f"lora_diffusion orders modules by the model, and this LoRA does not fit the full-size table "
                f"({misfit}); pass --model with the model it was trained for",
                path=config.input,
            )
    if config.rank is not None:
        with progress.task("resizing by SVD", total=None):
            if state.family == "flux" and target in ("kohya", "bfl"):  # fused qkv / linear1 compressed whole
                from lorax.formats.flux_fuse import resize_fused

                state, reports = resize_fused(state, config.rank)
            else:
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
    dtype = _torch_dtype(config.dtype)
    try:
        if target == "diffusers" and state.embeddings:
            result.embedding_files = _save_diffusers_with_embeddings(
                state, Path(config.output), dtype, config.force
            )
            result.outputs = [Path(config.output), *result.embedding_files.values()]
        else:
            from lorax.formats import save_lora

            save_lora(state, config.output, format=target, dtype=dtype, force=config.force, model=skeleton)
    except FormatError as err:  # what the target format cannot hold: said of the input that holds it
        if err.path is not None:
            raise
        raise FormatError(str(err), path=config.input) from None
    result.modules = len(state.modules)
    result.tokens = sorted(state.embeddings)
    return result


def _save_diffusers_with_embeddings(
    state: LoraState, output: Path, dtype: torch.dtype | None, force: bool
) -> dict[str, Path]:
    """The LoRA as diffusers/PEFT at ``output`` and each token beside it (``embedding_paths``): diffusers'
    ``learned_embeds`` ``{token: [n, dim]}`` for one text encoder, ``clip_l``/``clip_g`` for SDXL's two. Every path is
    checked before anything is written, and all files appear together or none does."""
    from contextlib import ExitStack
    from dataclasses import replace

    from lorax.formats import save_embeddings, save_lora

    paths = embedding_paths(output, list(state.embeddings))
    check_outputs([output, *paths.values()], force)
    lora_only = replace(state, embeddings={})
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(output, force))
        beside = json.dumps({token: path.name for token, path in paths.items()})
        save_lora(
            lora_only,
            tmp,
            format="diffusers",
            dtype=dtype,
            force=True,
            metadata={"lorax_embedding_files": beside},
        )
        for token, path in paths.items():
            per = state.embeddings[token]
            if dtype is not None:
                per = {c: v.to(dtype) for c, v in per.items()}
            fmt = "sdxl-embedding" if "text_encoder_2" in per else "diffusers-embedding"
            save_embeddings(
                {token: per},
                stack.enter_context(atomic_path(path, force)),
                format=fmt,
                force=True,
                metadata={"lorax_token": token, "lorax_lora": output.name},
            )
    return paths


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
