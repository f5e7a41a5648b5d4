"""``lorax merge``: fold LoRAs into a model checkpoint (streaming), or merge LoRAs with each other.

Model merges stream: the base's header gives the output plan; tensors no LoRA touches are copied as raw bytes (bit
for bit), each targeted tensor is read, merged in fp32 (``W' = W0 + alpha·(lora_alpha/r)·up@down``) and cast back,
one at a time, into a temporary file renamed into place at the end. The single-file path never imports diffusers.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax import dtypes
from lorax.errors import ConfigError, FormatError, InputError, MismatchError
from lorax.io.atomic import FILE, MODEL_FOLDER, atomic_path, check_output, scratch_dir
from lorax.io.checkpoint import (
    DiffusersCheckpoint,
    PickleSource,
    SafetensorsSource,
    SingleFileCheckpoint,
    is_model_checkpoint,
    model_skeleton,
    open_checkpoint,
    open_source,
    weight_files,
)
from lorax.io.keymaps import part_shapes
from lorax.io.model_layout import (
    DTYPES,
    FLOAT_DTYPES,
    copy_tree_files,
    out_dtype,
    st_to_torch,
    write_diffusers_folder,
    write_single_file,
)
from lorax.io.safetensors_io import StreamingWriter
from lorax.progress import NullProgress, Progress, Task
from lorax.services import flux_merge

if TYPE_CHECKING:
    import torch

    from lorax.adapters.state import DeltaModule, LoraModule, LoraState

MODES = ("concat", "seed-blend", "seed-join")
MODEL_LAYOUTS = ("diffusers", "single-file")
LORA_FORMATS = ("kohya", "diffusers", "lora_diffusion")
DTYPE_NAMES = tuple(DTYPES)


@dataclass
class LoraSpec:
    path: Path
    alpha: float | None = None

    def __post_init__(self) -> None:
        from lorax.adapters.finite import check_scale

        check_scale(self.alpha, self.path)  # one rule for every scale a user or recipe gives

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``FILE`` or ``FILE:ALPHA`` (a path that exists as written wins over the split)."""
        if Path(text).exists() or ":" not in text:
            return cls(Path(text))
        head, _, tail = text.rpartition(":")
        try:
            return cls(Path(head), float(tail))
        except ValueError:
            return cls(Path(text))

    def __str__(self) -> str:
        return f"{self.path}" + ("" if self.alpha is None else f":{self.alpha:g}")


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
        if self.dtype is not None and self.dtype not in DTYPES:
            problems.append(f"--dtype must be one of {', '.join(DTYPES)} (got {self.dtype!r})")
        if self.to is not None and self.to not in (*MODEL_LAYOUTS, *LORA_FORMATS):
            problems.append(
                f"--to must be one of {', '.join(dict.fromkeys((*MODEL_LAYOUTS, *LORA_FORMATS)))}"
            )
        if self.mode is not None and self.mode not in MODES:
            problems.append(f"--mode must be one of {', '.join(MODES)} (got {self.mode!r})")
        if self.rank is not None and self.rank < 1:
            problems.append(f"--rank must be at least 1 (got {self.rank})")
        for name, value in (("--alpha", self.alpha), ("--alpha-text", self.alpha_text)):
            if value is not None and not math.isfinite(value):
                problems.append(f"{name} must be a finite number")
        if problems:
            raise ConfigError("; ".join(problems))


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
# Planning: which tensor (and slice) each LoRA module lands in


@dataclass
class Contribution:
    module_name: str
    module: LoraModule | DeltaModule
    weight: float
    part: int = 0
    parts: int = 1
    lora: str = ""  # the file it comes from, for messages


@dataclass
class Slot:
    """Where a module's weight lives: a tensor key in one file, a row slice of it, and the slice's shape."""

    key: str
    part: int
    parts: int
    shape: tuple[int, ...]


Locator = Callable[[str, str], Slot | None]


def _delta_shape(module: LoraModule | DeltaModule) -> tuple[int, ...]:
    shape = getattr(module, "delta_shape", None)
    if callable(shape):
        return tuple(shape())
    lora_delta = getattr(module, "lora_delta", None)  # DoRA: the delta proper needs the base weight
    if callable(lora_delta):
        return tuple(lora_delta().shape)
    return tuple(module.delta().shape)


@dataclass
class _BiasDelta:
    """A bias difference as a delta module (LyCORIS ``diff_b``)."""

    diff_b: torch.Tensor
    kind = "bias"

    @property
    def out_features(self) -> int:
        return int(self.diff_b.shape[0])

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.diff_b if dtype is None else self.diff_b.to(dtype)


def _fits(delta: tuple[int, ...], slot: tuple[int, ...]) -> bool:
    if delta == slot:
        return True
    strip = lambda s: tuple(s[: len(s) - next((i for i, d in enumerate(reversed(s)) if d != 1), 0)])  # noqa: E731
    return math.prod(delta) == math.prod(slot) and strip(delta) == strip(slot)


def module_fits(module: LoraModule | DeltaModule, slot: tuple[int, ...]) -> bool:
    """Whether a module's delta lands on a weight of shape ``slot`` (modules that scale or re-normalise the base
    weight, IA3 and DoRA, say so themselves: ``fits``)."""
    fits = getattr(module, "fits", None)
    if callable(fits):
        return bool(fits(slot))
    return _fits(_delta_shape(module), slot)


def _described_shape(module: LoraModule | DeltaModule) -> str:
    if getattr(module, "kind", None) == "ia3":
        side = "input columns" if getattr(module, "on_input", False) else "output rows"
        return f"IA3 over {module.out_features} {side}"
    return str(list(_delta_shape(module)))


def plan_targets(
    loras: list[tuple[str, LoraState, float, float]], locate: Locator
) -> tuple[dict[str, list[Contribution]], list[str], list[str], dict[str, int]]:
    """targets by tensor key, unmatched module names, shape mismatches, matched count per LoRA."""
    targets: dict[str, list[Contribution]] = {}
    unmatched: list[str] = []
    mismatches: list[str] = []
    matched: dict[str, int] = {}
    for label, state, alpha, alpha_text in loras:
        matched[label] = 0
        for name, module in state.modules.items():
            component, _, path = name.partition(".")
            slot = locate(component, path + ".weight")
            if slot is None:
                unmatched.append(name)
                continue
            if not module_fits(module, slot.shape):
                shape = _described_shape(module)
                mismatches.append(f"{name} (LoRA {shape}, model {list(slot.shape)})")
                continue
            weight = alpha_text if component.startswith("text_encoder") else alpha
            targets.setdefault(slot.key, []).append(
                Contribution(name, module, weight, slot.part, slot.parts, label)
            )
            matched[label] += 1
            bias = getattr(module, "diff_b", None)  # LyCORIS full-difference modules may carry a bias delta
            if bias is not None:
                bias_slot = locate(component, path + ".bias")
                if bias_slot is None or math.prod(bias_slot.shape) != bias.numel():
                    mismatches.append(f"{name} bias (LoRA {list(bias.shape)}, model has no matching bias)")
                    continue
                targets.setdefault(bias_slot.key, []).append(
                    Contribution(
                        name + ".bias", _BiasDelta(bias), weight, bias_slot.part, bias_slot.parts, label
                    )
                )
    return targets, unmatched, mismatches, matched


def apply_contributions(weight: torch.Tensor, contributions: list[Contribution]) -> torch.Tensor:
    """``W0 + Σ alpha·delta`` in fp32, each delta into its row slice (OpenCLIP's fused q;k;v)."""
    import torch

    from lorax.adapters.state import LoraModule

    w = weight.to(torch.float32)
    if w.data_ptr() == weight.data_ptr():
        w = w.clone()
    for c in contributions:
        rows = w.shape[0] // c.parts
        view = w.narrow(0, c.part * rows, rows)
        apply = getattr(c.module, "apply", None)
        if callable(apply):  # DoRA and IA3: W0 + weight·(W'(W0) − W0), they need W0 itself
            view.copy_(apply(view, c.weight).to(torch.float32).reshape(view.shape))
        elif isinstance(c.module, LoraModule):  # W += alpha·scale·up@down in one fused pass, no delta tensor
            up = c.module.up.to(torch.float32).reshape(c.module.up.shape[0], -1)
            down = c.module.down.to(torch.float32).reshape(c.module.rank, -1)
            flat = view.view(view.shape[0], -1)
            if flat.shape != (up.shape[0], down.shape[1]):
                flat = view.view(up.shape[0], down.shape[1])
            flat.addmm_(up, down, alpha=c.weight * c.module.scale)
        else:
            view.add_(c.module.delta(torch.float32).reshape(view.shape), alpha=c.weight)
    if not bool(
        torch.isfinite(w).all()
    ):  # one cheap pass over the merged weight (a sum could overflow alone)
        raise MismatchError(
            _not_finite(contributions, "weights that are not finite (lower the LoRA's scale)")
        )
    return w


def _not_finite(contributions: list[Contribution], what: str) -> str:
    """Names the LoRA file(s) and the module whose merge gives non-finite weights."""
    files = ", ".join(dict.fromkeys(c.lora for c in contributions if c.lora))
    modules = ", ".join(dict.fromkeys(c.module_name for c in contributions))
    return (
        f"{files}: merging module {modules} gives {what}"
        if files
        else f"merging module {modules} gives {what}"
    )


class CopyingWriter(StreamingWriter):
    """A ``StreamingWriter`` that can also copy a tensor's bytes from another file inside the kernel
    (``copy_file_range``): no Python buffer, no resident memory, close to ``cp``."""

    def copy_from(self, name: str, src_fd: int, offset: int) -> None:
        expected, n = self._order[self._next]
        if name != expected:
            raise RuntimeError(f"CopyingWriter: expected tensor {expected!r}, got {name!r}")
        self._f.flush()
        out_fd = self._f.fileno()
        start = os.lseek(out_fd, 0, os.SEEK_CUR)
        done = 0
        try:
            while done < n:
                step = os.copy_file_range(src_fd, out_fd, n - done, offset + done)
                if step <= 0:
                    raise OSError("copy_file_range made no progress")
                done += step
        except (OSError, AttributeError):  # another OS or file system: plain reads and writes
            os.lseek(out_fd, start, os.SEEK_SET)
            view = memoryview(os.pread(src_fd, n, offset))
            while view:
                view = view[os.write(out_fd, view) :]
        self._next += 1


@contextmanager
def single_thread() -> Iterator[None]:
    """Elementwise merges of one tensor gain nothing from threads, and on a busy machine torch's thread pool
    spins: one thread is many times faster there."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_owned(source: SafetensorsSource | PickleSource, name: str, handles: dict[Path, int]) -> torch.Tensor:
    """A float tensor read with ``pread`` into memory of its own, not memory-mapped: the mapped pages of a
    multi-GB checkpoint stay resident and count against the merge's peak memory (SDXL: 2.6 GB mapped vs 0.4 GB)."""
    if not isinstance(source, SafetensorsSource) or source.dtype(name) not in (
        *FLOAT_DTYPES,
        *flux_merge.FP8,
    ):
        return source.get(name)
    import torch

    f = source.file_of(name)
    info = f.info(name)
    if info.nbytes == 0:
        return source.get(name)
    if f.path not in handles:
        handles[f.path] = os.open(f.path, os.O_RDONLY)
    buf = bytearray(info.nbytes)
    view, done = memoryview(buf), 0
    while done < info.nbytes:
        n = os.preadv(handles[f.path], [view[done:]], info.start + done)
        if n <= 0:
            raise FormatError(f"tensor {name} ends past the end of the file", path=f.path)
        done += n
    return torch.frombuffer(buf, dtype=st_to_torch(info.dtype)).reshape(info.shape)


def merge_tensor_file(
    source: SafetensorsSource | PickleSource,
    out: Path,
    targets: dict[str, list[Contribution]],
    *,
    dtype: str | None = None,
    metadata: dict[str, str] | None = None,
    replacements: dict[str, torch.Tensor] | None = None,
    task: Task | None = None,
) -> tuple[int, int]:
    """Write ``source`` to ``out`` with ``targets`` merged; every other tensor copied byte for byte when its dtype
    stays. Returns (tensors merged, tensors copied)."""
    from lorax.io.safetensors_io import st_dtype

    replacements = replacements or {}
    keys = source.keys()
    specs = []
    for k in keys:
        if k in replacements:
            t = replacements[k]
            specs.append((k, out_dtype(st_dtype(t), dtype), tuple(t.shape)))
        else:
            specs.append((k, out_dtype(source.dtype(k), dtype), source.shape(k)))
    merged = copied = 0
    handles: dict[Path, int] = {}
    try:
        writer = CopyingWriter(out, specs, metadata)
        with writer, single_thread():
            for k, dt, _ in specs:
                if k in replacements:
                    t = replacements[k]
                    writer.write(k, t.to(st_to_torch(dt)) if dt in FLOAT_DTYPES else t)
                elif k in targets:
                    w = apply_contributions(read_owned(source, k, handles), targets[k]).to(st_to_torch(dt))
                    if not math.isfinite(
                        float(w.float().sum())
                    ):  # after the cast: fp16 overflows to inf here
                        raise MismatchError(
                            _not_finite(
                                targets[k],
                                f"weights that are not finite in {dt} in {k} "
                                "(lower the LoRA's scale or merge to a wider --dtype)",
                            )
                        )
                    writer.write(k, w)
                    merged += 1
                elif source.dtype(k) == dt:
                    if isinstance(source, SafetensorsSource):
                        f = source.file_of(k)
                        if f.path not in handles:
                            handles[f.path] = os.open(f.path, os.O_RDONLY)
                        writer.copy_from(k, handles[f.path], f.info(k).start)
                    else:
                        writer.write(k, source.raw(k))
                    copied += 1
                else:
                    writer.write(k, source.get(k).to(st_to_torch(dt)))
                    copied += 1
                if task is not None:
                    task.advance()
    finally:
        for fd in handles.values():
            os.close(fd)
    return merged, copied


# ---------------------------------------------------------------------------------------------------------------
# Loading the LoRAs


def base_index_model(base: str | Path) -> Callable[[], dict[str, Any]]:
    """A lazy ``{component: meta module}`` of BASE with its real classes, for lora_diffusion's index order (built once,
    only when an index file is merged; ``{}`` when a single file carries no configs and none is cached)."""
    from functools import cache

    from lorax.errors import ModelNotFoundError

    @cache
    def build() -> dict[str, Any]:
        from lorax.models.skeleton import load_skeleton

        try:
            return load_skeleton(base)[0]
        except ModelNotFoundError:
            return {}

    return build


def _read_index_file(path: Path, model: dict[str, Any], family: str | None, base: str) -> LoraState:
    from lorax.formats import load_lora

    try:
        return load_lora(path, model=model, family=family)
    except MismatchError as err:
        text = str(err)
        if err.path is not None:
            text = text.removeprefix(f"{err.path}: ")
        raise MismatchError(f"does not fit the base {base}: {text}", path=path) from None


def load_loras(
    config: MergeConfig,
    family: str | None,
    progress: Progress,
    skeleton: dict[str, Any] | None = None,
    index_model: Callable[[], dict[str, Any]] | None = None,
) -> list[tuple[str, LoraState, float, float, str]]:
    """Read every LoRA. Names resolve against ``skeleton`` (the base's own module paths) when given; a LoRA with
    modules the base lacks is read again by the family's tables, so that the plan can name what does not match.
    lora_diffusion files (modules by index) resolve against ``index_model()``, BASE built with its real classes."""
    from lorax.errors import MismatchError as _Mismatch
    from lorax.formats import detect_format, load_lora

    default_alpha = 1.0 if config.alpha is None else config.alpha
    out = []
    for text in config.loras:
        spec = LoraSpec.parse(text)
        if not spec.path.exists():
            raise InputError("no such file", path=spec.path)
        fmt = detect_format(spec.path)
        refuse_unmergeable(spec.path)
        declared = declared_family(spec.path)
        if family and declared and declared != family:
            raise MismatchError(f"is a {declared} LoRA but the base model is {family}", path=spec.path)
        state = None
        if skeleton and fmt != "lora_diffusion":
            try:
                state = load_lora(spec.path, model=skeleton, family=family)
            except _Mismatch:
                state = None
        elif fmt == "lora_diffusion" and index_model is not None:
            model = index_model()
            if model:  # indices resolve against BASE's own modules, in BASE's own order
                state = _read_index_file(spec.path, model, family, str(config.base))
        if state is None:
            state = load_lora(spec.path, family=family)
        state.family = state.family or declared or family
        if family and state.family and state.family != family:
            raise MismatchError(f"is a {state.family} LoRA but the base model is {family}", path=spec.path)
        alpha = default_alpha if spec.alpha is None else spec.alpha
        alpha_text = alpha if config.alpha_text is None else config.alpha_text
        progress.log(
            f"{spec.path}: {fmt}, {len(state.modules)} modules"
            + (f", {len(state.embeddings)} tokens" if state.embeddings else "")
        )
        out.append((str(spec.path), state, alpha, alpha_text, fmt))
    return out


def refuse_unmergeable(path: Path) -> None:
    """One line for a LoRA of a family whose LoRAs lorax cannot apply to a model yet (``Family.mergeable``: Flux)."""
    from lorax.errors import ConfigError
    from lorax.formats import is_safetensors
    from lorax.io.safetensors_io import read_header
    from lorax.models import families

    if not is_safetensors(path):
        return
    header = read_header(path)
    family = families.detect(metadata=header.metadata) or families.detect(lora_keys=list(header.tensors))
    found = families.find(family)
    if found is not None and not found.mergeable:
        raise ConfigError(f"merging {found.label} LoRAs into a model is not supported yet", path=path)


def declared_family(path: Path) -> str | None:
    """The family a LoRA file's header declares (lorax's ``lorax_family`` or kohya's ``ss_base_model_version``)."""
    from lorax.io.safetensors_io import read_header
    from lorax.models import families

    if path.is_dir() or path.suffix.lower() != ".safetensors":
        return None
    meta = read_header(path).metadata
    if meta.get("lorax_family"):
        return meta["lorax_family"]
    return families.detect(metadata=meta)


def _check_plan(
    config: MergeConfig, unmatched: list[str], mismatches: list[str], family: str | None, base: str
) -> None:
    if mismatches:
        shown = "; ".join(mismatches[:3])
        raise MismatchError(
            f"{len(mismatches)} LoRA modules do not fit the {family} base {base}: {shown}"
            + (" …" if len(mismatches) > 3 else "")
        )
    if unmatched and not config.allow_unmatched:
        shown = ", ".join(unmatched[:3])
        raise MismatchError(
            f"{len(unmatched)} LoRA modules match no weight of the base {base}: {shown}"
            + (" …" if len(unmatched) > 3 else "")
            + "; is the LoRA for this model? pass --allow-unmatched to merge the rest"
        )


# ---------------------------------------------------------------------------------------------------------------
# Single-file base


def single_file_locator(ckpt: SingleFileCheckpoint) -> Locator:
    keymap = ckpt.keymap
    src = ckpt.source

    def locate(component: str, key: str) -> Slot | None:
        found = keymap.locate(component, key)
        if found is None:
            return None
        entry, i = found
        if entry.reshape == "transpose":
            return None
        shape = src.shape(entry.single)
        if len(entry.parts) > 1:
            rows = part_shapes(entry, shape)[i][0]
            return Slot(entry.single, i, len(entry.parts), (rows, *shape[1:]))
        return Slot(entry.single, 0, 1, shape)

    return locate


def merge_single_file(
    ckpt: SingleFileCheckpoint,
    loras: list[tuple[str, LoraState, float, float, str]],
    out: Path,
    config: MergeConfig,
    result: MergeResult,
    progress: Progress,
) -> None:
    targets, unmatched, mismatches, matched = plan_targets(
        [(p, s, a, at) for p, s, a, at, _ in loras], single_file_locator(ckpt)
    )
    _check_plan(config, unmatched, mismatches, ckpt.family, str(ckpt.path))
    written = targets
    # Flux's unequal fused slices and swapped halves, fp8 weights to requantise: lorax.services.flux_merge
    if flux_merge.needs_slicing(ckpt, targets):
        written = flux_merge.sliced_targets(ckpt, targets)
    meta = dict(ckpt.metadata)
    meta["lorax.merged"] = json.dumps([{"lora": p, "alpha": a, "alpha_text": at} for p, _, a, at, _ in loras])
    target = DTYPES[config.dtype] if config.dtype else None
    with progress.task(f"merging into {out.name}", total=len(ckpt.keys())) as task:
        merged, copied = merge_tensor_file(ckpt.source, out, written, dtype=target, metadata=meta, task=task)
    _fill(result, loras, targets, unmatched, matched, merged, copied)


def _fill(
    result: MergeResult,
    loras: list[tuple[str, LoraState, float, float, str]],
    targets: dict[str, list[Contribution]],
    unmatched: list[str],
    matched: dict[str, int],
    merged: int,
    copied: int,
) -> None:
    result.loras = [LoraUsed(p, fmt, a, at, len(s.modules), matched.get(p, 0)) for p, s, a, at, fmt in loras]
    result.modules_merged += sum(len(v) for v in targets.values())
    result.unmatched += unmatched
    result.tensors_merged += merged
    result.tensors_copied += copied


# ---------------------------------------------------------------------------------------------------------------
# diffusers-folder base


def folder_locator(component: str, source: SafetensorsSource | PickleSource) -> Callable[[str], Slot | None]:
    keys = set(source.keys())

    def locate(key: str) -> Slot | None:
        disk = key
        if disk not in keys and component.startswith("text_encoder") and disk.startswith("text_model."):
            disk = disk[len("text_model.") :]
        if disk not in keys:
            return None
        return Slot(disk, 0, 1, source.shape(disk))

    return locate


def merge_folder(
    ckpt: DiffusersCheckpoint,
    loras: list[tuple[str, LoraState, float, float, str]],
    out: Path,
    config: MergeConfig,
    result: MergeResult,
    progress: Progress,
) -> None:
    """Merge into every weight file of every component (variants too); copy everything else."""
    copy_tree_files(ckpt.path, out, skip_suffixes=(".safetensors", ".bin"))
    sources = {c: ckpt.source(c) for c in ckpt.components()}
    locators = {c: folder_locator(c, s) for c, s in sources.items()}

    def locate(component: str, key: str) -> Slot | None:
        loc = locators.get(component)
        slot = loc(key) if loc else None
        return None if slot is None else Slot(f"{component}/{slot.key}", 0, 1, slot.shape)

    targets, unmatched, mismatches, matched = plan_targets(
        [(p, s, a, at) for p, s, a, at, _ in loras], locate
    )
    _check_plan(config, unmatched, mismatches, ckpt.family, str(ckpt.path))
    by_component: dict[str, dict[str, list[Contribution]]] = {}
    for key, contributions in targets.items():
        component, _, disk = key.partition("/")
        by_component.setdefault(component, {})[disk] = contributions
    target = DTYPES[config.dtype] if config.dtype else None
    merged = copied = 0
    for component in _component_dirs(ckpt.path):
        files = _all_weight_files(ckpt.path / component)
        for f in files:
            src = open_source(f)
            comp_targets = by_component.get(component, {})
            file_targets = {k: v for k, v in comp_targets.items() if k in set(src.keys())}
            name = f.name if f.suffix == ".safetensors" else f.with_suffix(".safetensors").name
            meta = dict(getattr(src, "metadata", {}) or {}) or {"format": "pt"}
            with progress.task(f"merging {component}/{name}", total=len(src.keys())) as task:
                m, c = merge_tensor_file(
                    src, out / component / name, file_targets, dtype=target, metadata=meta, task=task
                )
            merged += m
            copied += c
    _fill(result, loras, targets, unmatched, matched, merged, copied)


def _component_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _all_weight_files(p))


def _all_weight_files(folder: Path) -> list[Path]:
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return st
    return weight_files(folder)


# ---------------------------------------------------------------------------------------------------------------
# Token embeddings


def add_embeddings_to_folder(
    folder: Path, embeddings: dict[str, dict[str, torch.Tensor]], progress: Progress
) -> list[str]:
    """Add tokens to a diffusers folder's tokenizer(s) and text encoder(s) (multi-vector: ``tok``, ``tok_1`` …)."""
    import torch
    from transformers import CLIPTokenizer

    added: list[str] = []
    from lorax.models import families
    from lorax.models.tokens import taken, vector_names

    text = {
        (c.name, c.tokenizer or ""): None
        for f in families.all_families()
        for c in f.components
        if c.tokenizer
    }
    for component, tok_dir in text:
        wanted = {t: e[component] for t, e in embeddings.items() if component in e}
        if not wanted:
            continue
        if not (folder / tok_dir).is_dir() or not (folder / component).is_dir():
            raise MismatchError(f"the embeddings are for {component}, which the model does not have")
        tokenizer = CLIPTokenizer.from_pretrained(folder / tok_dir)
        files = _all_weight_files(folder / component)
        names_by_token = {t: vector_names(t, e.reshape(-1, e.shape[-1]).shape[0]) for t, e in wanted.items()}
        clash = taken(tokenizer, [n for names in names_by_token.values() for n in names])
        if clash:
            raise MismatchError(
                f"token {clash[0]} is already in the model's {tok_dir}; rename the token in the LoRA "
                "rather than overwrite a token the model knows"
            )
        tokenizer.add_tokens([n for names in names_by_token.values() for n in names])
        for f in files:
            src = SafetensorsSource([f])
            key = next((k for k in src if k.endswith("embeddings.token_embedding.weight")), None)
            if key is None:
                raise FormatError("the text encoder has no token embedding", path=f)
            table = src.get(key).clone()
            need = len(tokenizer)
            if table.shape[0] < need:
                table = torch.cat([table, table.new_zeros(need - table.shape[0], table.shape[1])])
            for token, emb in wanted.items():
                vectors = emb.reshape(-1, emb.shape[-1])
                if vectors.shape[1] != table.shape[1]:
                    raise MismatchError(
                        f"token {token}: embedding width {vectors.shape[1]} does not fit {component} "
                        f"(width {table.shape[1]})"
                    )
                ids = tokenizer.convert_tokens_to_ids(names_by_token[token])
                table[ids] = vectors.to(table.dtype)
            tmp = f.with_name(f.name + ".tmp")
            merge_tensor_file(
                src, tmp, {}, metadata=src.metadata or {"format": "pt"}, replacements={key: table}
            )
            tmp.replace(f)
        cfg_path = folder / component / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["vocab_size"] = len(tokenizer)
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        shutil.rmtree(folder / tok_dir)
        tokenizer.save_pretrained(folder / tok_dir)
        added += [t for t in wanted if t not in added]
    progress.log(f"added tokens {', '.join(added)} to the output's tokenizer and text encoder")
    return added


def write_embeddings_beside(
    out: Path, embeddings: dict[str, dict[str, torch.Tensor]], family: str, force: bool, progress: Progress
) -> list[str]:
    """A1111 embedding files next to a single-file output (A1111 uses the file name as the prompt word)."""
    from lorax.formats import save_embeddings
    from lorax.models import families

    written = []
    for token, comps in embeddings.items():
        word = "".join(ch for ch in token if ch.isalnum() or ch in "-_") or "token"
        path = out.parent / f"{out.stem}.{word}.safetensors"
        found = families.find(family)
        fmt = found.embedding_format if found else "a1111-embedding"
        save_embeddings({token: comps}, path, format=fmt, force=force)
        progress.log(
            f"token {token}: a single file cannot hold new tokens; wrote an A1111 embedding to {path} "
            f"(copy it to the embeddings folder and write {path.stem} in prompts)"
        )
        written.append(str(path))
    return written


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
        result = merge_model(config, progress)
    result.seconds = time.perf_counter() - start
    result.output_bytes = _size(result.output)
    return result


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size if path.exists() else 0


@contextmanager
def _work_dir(out: Path) -> Iterator[Path]:
    """A scratch folder beside the output (same disk), removed on success, error and signal alike."""
    with scratch_dir(out) as work:
        yield work


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


def merge_model(config: MergeConfig, progress: Progress) -> MergeResult:
    _refuse_options(config, into_model=True)
    ckpt = open_checkpoint(config.base)
    layout = config.to or _layout_from_name(Path(config.output), ckpt.kind)
    if layout not in MODEL_LAYOUTS:
        raise ConfigError(f"--to {config.to} is a LoRA format; a model merge writes diffusers or single-file")
    out = Path(config.output)
    if layout == "single-file" and out.suffix.lower() != ".safetensors":
        raise ConfigError(f"{out}: a single-file output is written as .safetensors; name it OUT.safetensors")
    check_output(out, config.force, FILE if layout == "single-file" else MODEL_FOLDER)
    loras = load_loras(config, ckpt.family, progress, model_skeleton(ckpt), base_index_model(config.base))
    result = MergeResult(out, layout, ckpt.family, dtype=config.dtype)
    embeddings: dict[str, dict[str, Any]] = {}
    for _, state, *_ in loras:
        embeddings.update(state.embeddings)
    if layout == "single-file":
        with atomic_path(out, config.force) as tmp:
            if isinstance(ckpt, SingleFileCheckpoint):
                merge_single_file(ckpt, loras, tmp, config, result, progress)
            else:
                with _work_dir(out) as work:
                    merge_folder(ckpt, loras, work / "merged", config, result, progress)
                    write_single_file(open_checkpoint(work / "merged"), tmp, progress=progress)  # type: ignore[arg-type]
        if embeddings:
            result.embedding_files = write_embeddings_beside(
                out, embeddings, ckpt.family, config.force, progress
            )
    else:
        with atomic_path(out, config.force, directory=True) as tmp:
            if isinstance(ckpt, DiffusersCheckpoint):
                merge_folder(ckpt, loras, tmp, config, result, progress)
            else:
                with _work_dir(out) as work:
                    single = work / "merged.safetensors"
                    merge_single_file(ckpt, loras, single, config, result, progress)
                    merged_ckpt = open_checkpoint(single)
                    assert isinstance(merged_ckpt, SingleFileCheckpoint)
                    write_diffusers_folder(
                        merged_ckpt, tmp, config_from=config.config_from, progress=progress
                    )
            if embeddings:
                add_embeddings_to_folder(tmp, embeddings, progress)
    result.embeddings = sorted(embeddings)
    return result


def merge_loras(config: MergeConfig, progress: Progress) -> MergeResult:
    """LoRA with LoRA: BASE gets ``alpha`` (default 0.5), a second LoRA ``1 − alpha`` unless given as FILE:W."""
    from lorax.adapters.svd import blend_states, join_tokens, mix_states, resize_state
    from lorax.formats import LORA_WRITE_FORMATS, detect_format, load_lora, save_lora

    _refuse_options(config, into_model=False)
    alpha = 0.5 if config.alpha is None else config.alpha
    base_fmt = detect_format(config.base)
    states = [load_lora(config.base)]
    weights = [alpha]
    specs = [LoraSpec.parse(t) for t in config.loras]
    for i, spec in enumerate(specs):
        if not spec.path.exists():
            raise InputError("no such file", path=spec.path)
        states.append(load_lora(spec.path))
        if spec.alpha is not None:
            weights.append(spec.alpha)
        elif len(specs) == 1:
            weights.append(1.0 - alpha)
        else:
            raise ConfigError(
                f"with several LoRAs give each a weight (FILE:W); {spec.path} (#{i + 2}) has none"
            )
    fmt = config.to or (base_fmt if base_fmt in LORA_WRITE_FORMATS else "kohya")
    if fmt not in LORA_WRITE_FORMATS:
        raise ConfigError(f"--to {fmt}: merging LoRAs writes a LoRA format ({', '.join(LORA_WRITE_FORMATS)})")
    if config.mode == "seed-join":
        states = join_tokens(states)
    weighted = list(zip(states, weights, strict=True))
    reports: list[Any] = []
    if config.mode == "seed-blend":
        merged = blend_states(weighted)
        if config.rank is not None:
            merged, reports = resize_state(merged, config.rank)
    else:
        merged, reports = mix_states(weighted, config.rank)

    dtype = dtypes.torch_dtype_or_none(config.dtype)
    out = save_lora(merged, config.output, format=fmt, dtype=dtype, force=config.force)
    result = MergeResult(out, "lora", merged.family, dtype=config.dtype)
    result.loras = [
        LoraUsed(str(p), detect_format(p), w, w, len(s.modules), len(s.modules))
        for p, s, w in zip([config.base] + [str(s.path) for s in specs], states, weights, strict=True)
    ]
    result.modules_merged = len(merged.modules)
    result.embeddings = sorted(merged.embeddings)
    if reports:
        result.worst_energy = min(r.energy for r in reports)
        result.mean_energy = sum(r.energy for r in reports) / len(reports)
    return result
