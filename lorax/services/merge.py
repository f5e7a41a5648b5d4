"""``lorax merge``: fold LoRAs into a model checkpoint (streaming), or merge LoRAs with each other.

Model merges stream: the base's header gives the output plan; tensors no LoRA touches are copied as raw bytes (bit
for bit), each targeted tensor is read, merged in fp32 (``W' = W0 + alpha·(lora_alpha/r)·up@down``) and cast back,
one at a time, into a temporary file renamed into place at the end. The single-file path never imports diffusers.
This module orchestrates: the merge math is ``lorax.adapters.merge``, reading LoRAs against the base
``lorax.adapters.merge_inputs``, the streaming rewrite ``lorax.io.rewrite``, LoRA with LoRA ``lorax.services.mix``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax import dtypes
from lorax.adapters import flux_merge
from lorax.adapters.merge import (
    Contribution,
    Locator,
    by_component,
    check_plan,
    folder_locator,
    merge_tensor_file,
    plan_targets,
    single_file_locator,
)
from lorax.adapters.merge_inputs import (  # refuse_unmergeable stays importable from here
    refuse_unmergeable,  # noqa: F401
)
from lorax.adapters.merged_tokens import add_embeddings_to_folder, write_embeddings_beside
from lorax.errors import ConfigError
from lorax.io.atomic import FILE, MODEL_FOLDER, atomic_path, check_output, scratch_dir
from lorax.io.checkpoint import (
    Checkpoint,
    DiffusersCheckpoint,
    SingleFileCheckpoint,
    is_model_checkpoint,
    open_checkpoint,
    open_source,
)
from lorax.io.checkpoint_sources import all_weight_files
from lorax.io.model_layout import DTYPES, copy_tree_files, write_diffusers_folder, write_single_file
from lorax.progress import NullProgress, Progress
from lorax.services.common import MODEL_DEFAULTS, LoraSpec, dtype_problem, rank_problem, refuse
from lorax.services.merge_read import Loras, load_array_loras, load_loras

if TYPE_CHECKING:
    pass


MODES = ("concat", "seed-blend", "seed-join")
MODEL_LAYOUTS = ("diffusers", "single-file")
LORA_FORMATS = ("kohya", "diffusers", "lora_diffusion")
DTYPE_NAMES = tuple(DTYPES)


@dataclass
class MergeConfig:
    base: str
    loras: list[str]
    output: Path
    alpha: float | None = None
    alpha_text: float | None = None
    to: str | None = None
    dtype: str | None = None
    force: bool = False
    allow_unmatched: bool = False
    rank: int | None = None
    mode: str | None = None  # LoRA+LoRA only; None: concat
    config_from: str | None = None

    def validate(self) -> None:
        problems = []
        if not self.loras:
            problems.append("give at least one LoRA to merge")
        problems += dtype_problem(self.dtype, DTYPES)
        if self.to is not None and self.to not in (*MODEL_LAYOUTS, *LORA_FORMATS):
            problems.append(
                f"--to must be one of {', '.join(dict.fromkeys((*MODEL_LAYOUTS, *LORA_FORMATS)))}"
            )
        if self.mode is not None and self.mode not in MODES:
            problems.append(f"--mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        problems += rank_problem(self.rank)
        for name, value in (("--alpha", self.alpha), ("--alpha-text", self.alpha_text)):
            if value is not None and not math.isfinite(value):
                problems.append(f"{name} must be a finite number")
        refuse(problems)


@dataclass
class LoraUsed:
    path: str
    format: str
    alpha: float
    alpha_text: float
    modules: int
    matched: int


@dataclass
class MergeResult:
    output: Path
    kind: str  # "single-file" | "diffusers" | "lora"
    family: str | None
    loras: list[LoraUsed] = field(default_factory=list)
    modules_merged: int = 0
    unmatched: list[str] = field(default_factory=list)
    tensors_merged: int = 0
    tensors_copied: int = 0
    embeddings: list[str] = field(default_factory=list)
    embedding_files: list[str] = field(default_factory=list)
    dtype: str | None = None
    seconds: float = 0.0
    output_bytes: int = 0
    worst_energy: float | None = None
    mean_energy: float | None = None


# ---------------------------------------------------------------------------------------------------------------
# Into a model, in the base's own layout


@dataclass
class _Job:
    """One merge into a model: the LoRAs, the request, the result being filled, the progress shown."""

    loras: Loras
    config: MergeConfig
    result: MergeResult
    progress: Progress


def merge_into(ckpt: Checkpoint, job: _Job, out: Path) -> None:
    """Merge into ``ckpt`` written at ``out`` in its own layout: the one place that picks a layout's merge."""
    if isinstance(ckpt, SingleFileCheckpoint):
        merge_single_file(ckpt, job, out)
    else:
        merge_folder(ckpt, job, out)


def _plan(
    ckpt: Checkpoint, job: _Job, locate: Locator
) -> tuple[dict[str, list[Contribution]], list[str], dict[str, int]]:
    """Targets by tensor key, unmatched module names and matched count per LoRA; a plan that does not fit raises."""
    targets, unmatched, mismatches, matched = plan_targets(
        [(p, s, a, at) for p, s, a, at, _ in job.loras], locate
    )
    check_plan(unmatched, mismatches, ckpt.family, str(ckpt.path), job.config.allow_unmatched)
    return targets, unmatched, matched


def merge_single_file(ckpt: SingleFileCheckpoint, job: _Job, out: Path) -> None:
    targets, unmatched, matched = _plan(ckpt, job, single_file_locator(ckpt))
    meta = dict(ckpt.metadata)
    meta["lorax.merged"] = json.dumps(
        [{"lora": p, "alpha": a, "alpha_text": at} for p, _, a, at, _ in job.loras]
    )
    target = DTYPES[job.config.dtype] if job.config.dtype else None
    written = targets
    slicing = flux_merge.needs_slicing(
        ckpt, targets
    )  # Flux's unequal slices and swapped halves, fp8 to requantise
    arrays = _holds_arrays(job.loras)
    if slicing and arrays:
        raise _needs_torch()
    if slicing:
        written = flux_merge.sliced_targets(ckpt, targets)
    with job.progress.task(f"merging into {out.name}", total=len(ckpt.keys())) as task:
        if arrays:  # no torch: lorax.adapters.array_merge, the same bytes
            from lorax.adapters.array_merge import merge_file

            merged, copied = merge_file(ckpt.source, out, written, metadata=meta, task=task)  # type: ignore[arg-type]
        else:
            merged, copied = merge_tensor_file(
                ckpt.source, out, written, dtype=target, metadata=meta, task=task
            )
    _fill(job, targets, unmatched, matched, merged, copied)


def _holds_arrays(loras: Loras) -> bool:
    from lorax.adapters.array_merge import ArrayState

    return any(isinstance(state, ArrayState) for _, state, *_ in loras)


def _needs_torch() -> Exception:
    from lorax.adapters.array_merge import NeedsTorch

    return NeedsTorch()


def merge_folder(ckpt: DiffusersCheckpoint, job: _Job, out: Path) -> None:
    """Merge into every weight file of every component (variants too); copy everything else."""
    copy_tree_files(ckpt.path, out, skip_suffixes=(".safetensors", ".bin"))
    targets, unmatched, matched = _plan(ckpt, job, folder_locator(ckpt))
    planned = by_component(targets)
    target = DTYPES[job.config.dtype] if job.config.dtype else None
    merged = copied = 0
    for component in sorted(p.name for p in ckpt.path.iterdir() if p.is_dir() and all_weight_files(p)):
        for f in all_weight_files(ckpt.path / component):
            src = open_source(f)
            comp_targets = planned.get(component, {})
            file_targets = {k: v for k, v in comp_targets.items() if k in set(src.keys())}
            name = f.name if f.suffix == ".safetensors" else f.with_suffix(".safetensors").name
            meta = dict(getattr(src, "metadata", {}) or {}) or {"format": "pt"}
            with job.progress.task(f"merging {component}/{name}", total=len(src.keys())) as task:
                m, c = merge_tensor_file(
                    src, out / component / name, file_targets, dtype=target, metadata=meta, task=task
                )
            merged += m
            copied += c
    _fill(job, targets, unmatched, matched, merged, copied)


def _fill(
    job: _Job,
    targets: dict[str, list[Contribution]],
    unmatched: list[str],
    matched: dict[str, int],
    merged: int,
    copied: int,
) -> None:
    result = job.result
    result.loras = [
        LoraUsed(p, fmt, a, at, len(s.modules), matched.get(p, 0)) for p, s, a, at, fmt in job.loras
    ]
    result.modules_merged += sum(len(v) for v in targets.values())
    result.unmatched += unmatched
    result.tensors_merged += merged
    result.tensors_copied += copied


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def merge(config: MergeConfig, progress: Progress | None = None) -> MergeResult:
    """Merge LoRAs into a model (or, when BASE is a LoRA, LoRAs into one LoRA); see docs/merge.md."""
    progress = progress or NullProgress()
    config.validate()
    start = time.perf_counter()
    base_path = Path(config.base)
    flux_merge.refuse_unrequantisable(base_path)
    if base_path.is_file() and not is_model_checkpoint(base_path):
        result = merge_loras(config, progress)
    else:
        from lorax.adapters.array_merge import NeedsTorch

        try:  # without torch where the merge needs none (lorax.adapters.array_inputs)
            result = merge_model(config, progress, arrays=True)
        except NeedsTorch:
            result = merge_model(config, progress)
    result.seconds = time.perf_counter() - start
    result.output_bytes = _size(result.output)
    return result


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


def _layout_from_name(out: Path, base_kind: str) -> str:
    """Without --to the output's name decides, as in convert: OUT.safetensors one file, OUT (no suffix) a folder."""
    if out.suffix.lower() == ".safetensors":
        return "single-file"
    if not out.suffix:
        return "diffusers"
    return base_kind


def _refuse_options(config: MergeConfig, into_model: bool) -> None:
    """Options of the other kind of merge are refused, not ignored."""
    if into_model:
        given = [f for f, v in (("--rank", config.rank), ("--mode", config.mode)) if v is not None]
        if given:
            raise ConfigError(
                f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} only when BASE is a LoRA (LoRAs merged with each other); {config.base} is a "
                "model, into which LoRAs merge exactly: leave them out"
            )
        return
    given = [
        f
        for f, v in (
            ("--config-from", config.config_from),
            ("--allow-unmatched", config.allow_unmatched or None),
        )
        if v is not None
    ]
    if given:
        raise ConfigError(
            f"{' and '.join(given)} {'apply' if len(given) > 1 else 'applies'} only when merging into a model; {config.base} is a LoRA (LoRAs merged with each "
            "other): leave them out"
        )


def merge_model(config: MergeConfig, progress: Progress, arrays: bool = False) -> MergeResult:
    """``arrays``: read the LoRAs as numpy arrays and merge without torch when the merge needs none."""
    _refuse_options(config, into_model=True)
    ckpt = open_checkpoint(config.base)
    layout = config.to or _layout_from_name(Path(config.output), ckpt.kind)
    if layout not in MODEL_LAYOUTS:
        raise ConfigError(f"--to {config.to} is a LoRA format; a model merge writes diffusers or single-file")
    out = Path(config.output)
    if layout == "single-file" and out.suffix.lower() != ".safetensors":
        raise ConfigError(f"{out}: a single-file output is written as .safetensors; name it OUT.safetensors")
    check_output(out, config.force, FILE if layout == "single-file" else MODEL_FOLDER)
    fast = arrays and layout == ckpt.kind == "single-file"
    loras = (load_array_loras(config, ckpt, progress) if fast else None) or load_loras(config, ckpt, progress)
    result = MergeResult(out, layout, ckpt.family, dtype=config.dtype)
    embeddings: dict[str, dict[str, Any]] = {}
    for _, state, *_ in loras:
        embeddings.update(state.embeddings)
    job = _Job(loras, config, result, progress)
    folder = layout == "diffusers"
    with atomic_path(out, config.force, directory=folder) as tmp:
        if layout == ckpt.kind:
            merge_into(ckpt, job, tmp)
        else:  # merged in the base's layout beside the output, then converted
            with scratch_dir(out) as work:
                merged = work / ("merged.safetensors" if ckpt.kind == "single-file" else "merged")
                merge_into(ckpt, job, merged)
                merged_ckpt = open_checkpoint(merged)
                if isinstance(merged_ckpt, SingleFileCheckpoint):
                    write_diffusers_folder(
                        merged_ckpt,
                        tmp,
                        config_from=config.config_from,
                        progress=progress,
                        carry=MODEL_DEFAULTS,
                    )
                else:
                    write_single_file(merged_ckpt, tmp, progress=progress, carry=MODEL_DEFAULTS)
        if embeddings and folder:
            add_embeddings_to_folder(tmp, embeddings, progress)
    if embeddings and not folder:
        result.embedding_files = write_embeddings_beside(out, embeddings, ckpt.family, config.force, progress)
    result.embeddings = sorted(embeddings)
    return result


def merge_loras(config: MergeConfig, progress: Progress) -> MergeResult:
    """LoRA with LoRA: BASE gets ``alpha`` (default 0.5), a second LoRA ``1 − alpha`` unless given as FILE:W; read
    and written as ``lorax mix`` does (``lorax.services.mix``), combined by ``--mode``."""
    from lorax.adapters.svd import combine_states
    from lorax.formats import save_lora
    from lorax.services.mix import output_format, read_loras

    _refuse_options(config, into_model=False)
    alpha = 0.5 if config.alpha is None else config.alpha
    specs = [LoraSpec(Path(config.base))] + [LoraSpec.parse(t) for t in config.loras]

    def weight(i: int, spec: LoraSpec) -> float:
        if i == 0:
            return alpha
        if spec.alpha is not None:
            return spec.alpha
        if len(specs) == 2:
            return 1.0 - alpha
        raise ConfigError(f"with several LoRAs give each a weight (FILE:W); {spec.path} (#{i + 1}) has none")

    states, inputs = read_loras(specs, weight)
    fmt = output_format(config.to, inputs[0].format, "merging LoRAs writes a LoRA format ({formats})")
    weights = [i.weight for i in inputs]
    merged, reports = combine_states(
        list(zip(states, weights, strict=True)), config.rank, config.mode or "concat"
    )
    dtype = dtypes.torch_dtype_or_none(config.dtype)
    out = save_lora(merged, config.output, format=fmt, dtype=dtype, force=config.force)
    result = MergeResult(out, "lora", merged.family, dtype=config.dtype)
    paths = [config.base] + [i.path for i in inputs[1:]]  # BASE as given
    result.loras = [
        LoraUsed(p, i.format, i.weight, i.weight, i.modules, i.modules)
        for p, i in zip(paths, inputs, strict=True)
    ]
    result.modules_merged = len(merged.modules)
    result.embeddings = sorted(merged.embeddings)
    if reports:
        result.worst_energy = min(r.energy for r in reports)
        result.mean_energy = sum(r.energy for r in reports) / len(reports)
    return result
