"""``lorax extract``: a LoRA from the difference of two models by truncated SVD (the seed's ``lora_distill``).

Streamed module by module: each weight pair is read, differenced and decomposed, then dropped. For Flux the unit is
the BFL module: the parts diffusers splits and BFL fuses (``qkv``, ``linear1``) are decomposed together, as one
fused delta, and split back with a shared down (exact), so a kohya / BFL file written from them holds one rank-r
module per fused tensor, as kohya's own Flux LoRAs do; a fused module is extracted whole when any part is targeted.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from lorax import dtypes
from lorax.errors import MismatchError
from lorax.io.atomic import check_output
from lorax.io.checkpoint import Checkpoint, _shape_of, open_checkpoint
from lorax.io.model_layout import DTYPES
from lorax.models import families
from lorax.progress import NullProgress, Progress
from lorax.services.common import dtype_problem, refuse

if TYPE_CHECKING:
    from lorax.adapters.state import LoraModule

TARGETS = ("attn", "attn-ff", "all")
_ATTN = re.compile(
    r"(attn\d\.(to_q|to_k|to_v|to_out\.0)|self_attn\.(q_proj|k_proj|v_proj|out_proj)"
    r"|attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out))\.weight$"  # Flux's attn.
)
_FF = re.compile(
    r"(ff\.net\.0\.proj|ff\.net\.2|mlp\.fc1|mlp\.fc2|ff_context\.net\.0\.proj|ff_context\.net\.2|proj_mlp"
    r"|single_transformer_blocks\.\d+\.proj_out)\.weight$"
)
_SKIP = re.compile(
    r"(embedding|embeddings)\.|norm(?!\w*\.linear\.)"
)  # Flux's AdaLN ``norm1.linear`` are linears


def _groups(
    family: str, component: str, keys: list[str], ndim: Callable[[str], int], config: ExtractConfig
) -> Iterator[list[str]]:
    """The targeted weights, one list per module extracted together (Flux: a BFL fused module's parts, in rows
    order; otherwise one key each). A key is read for its ``ndim`` only when the name does not decide."""
    from lorax.io.keymaps.flux import bfl_parts, to_bfl

    keyset = set(keys)
    done: set[str] = set()
    for key in keys:
        if key in done:
            continue
        fused = to_bfl(key[: -len(".weight")]) if family == "flux" and component == "transformer" else None
        group = [key]
        if fused is not None and fused[2] > 1:
            group = [p + ".weight" for p in bfl_parts(fused[0]) or ()]
            if not all(k in keyset for k in group):
                group = [key]
        done.update(group)
        if any(targeted(k, config.targets, ndim(k)) for k in group):
            yield group


def _ndim(ckpt: Checkpoint, component: str, key: str) -> int:
    return len(_shape_of(ckpt, component, key))  # from the header: no tensor read


def _fused_name(part: str) -> str:
    """``transformer.<BFL module>`` of a Flux part's name, for reports."""
    from lorax.io.keymaps.flux import to_bfl

    component, _, path = part.partition(".")
    found = to_bfl(path)
    return f"{component}.{found[0]}" if found else part


def _split(label: str, module: LoraModule, names: list[str]) -> list[LoraModule]:
    """A fused module → one module per part: the shared down, each part its rows of the up (exact)."""
    from lorax.formats.flux_fuse import split

    return split(label, module.down, module.up, module.alpha, tuple(names))


def targeted(key: str, targets: str, ndim: int) -> bool:
    """Whether a weight is extracted under ``--targets`` (attn; attn-ff; all = every linear and conv weight)."""
    if _ATTN.search(key):
        return True
    if targets in ("attn-ff", "all") and _FF.search(key):
        return True
    return targets == "all" and key.endswith(".weight") and ndim in (2, 4) and not _SKIP.search(key)


@dataclass
class ExtractConfig:
    base: str
    tuned: str
    output: Path
    rank: int = 4
    targets: str = "attn"
    clamp_quantile: float | None = None
    to: str = "kohya"
    dtype: str | None = None
    force: bool = False
    threshold: float = 0.0

    def validate(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"--rank must be at least 1 (got {self.rank})")
        if self.targets not in TARGETS:
            problems.append(f"--targets must be one of {', '.join(TARGETS)} (got {self.targets!r})")
        if self.clamp_quantile is not None and not 0.0 < self.clamp_quantile <= 1.0:
            problems.append(f"--clamp-quantile must be in (0, 1] (got {self.clamp_quantile})")
        refuse(problems + dtype_problem(self.dtype, DTYPES, got=False))


@dataclass
class ExtractedModule:
    module: str
    rank: int
    energy: float
    error: float


@dataclass
class ExtractResult:
    output: Path
    family: str
    format: str
    rank: int
    targets: str
    modules: int = 0
    unchanged: int = 0
    mean_energy: float | None = None
    worst: ExtractedModule | None = None
    extracted: list[ExtractedModule] = field(default_factory=list)
    seconds: float = 0.0


def extract(config: ExtractConfig, progress: Progress | None = None) -> ExtractResult:
    """Truncated SVD of ``W_tuned − W_base`` per targeted weight; see docs/extract.md."""
    import torch

    from lorax.adapters.state import LoraState
    from lorax.adapters.svd import extract_module
    from lorax.formats import save_lora

    progress = progress or NullProgress()
    config.validate()
    start = time.perf_counter()
    check_output(config.output, config.force)
    base, tuned = open_checkpoint(config.base), open_checkpoint(config.tuned)
    if base.family != tuned.family:
        raise MismatchError(f"the models are different families: base {base.family}, tuned {tuned.family}")
    modules: dict[str, LoraModule] = {}
    result = ExtractResult(config.output, base.family, config.to, config.rank, config.targets)
    components = [c for c in families.get(base.family).component_names() if c in base.components()]
    missing = [c for c in components if c not in tuned.components()]
    if missing and len(missing) == len(components):
        raise MismatchError(f"the tuned model lacks {', '.join(missing)}")
    if missing:  # a BFL file holds the transformer alone: extract what both models hold
        components = [c for c in components if c not in missing]
        progress.log(f"the tuned model has no {', '.join(missing)}: extracting {', '.join(components)} only")
    for component in components:
        tuned_keys = set(tuned.component_keys(component))
        keys = [k for k in base.component_keys(component) if k.endswith(".weight")]
        with progress.task(f"extracting {component}", total=len(keys)) as task:
            for group in _groups(base.family, component, keys, partial(_ndim, base, component), config):
                task.advance(len(group))
                deltas = []
                for key in group:
                    if key not in tuned_keys:
                        raise MismatchError(f"the tuned model has no {component}.{key}")
                    w0, w1 = base.tensor(component, key), tuned.tensor(component, key)
                    if w1.shape != w0.shape:
                        raise MismatchError(
                            f"{component}.{key}: shapes differ (base {list(w0.shape)}, tuned {list(w1.shape)})"
                        )
                    deltas.append(w1.to(torch.float32) - w0.to(torch.float32))
                delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas)
                if float(delta.abs().max()) <= config.threshold:
                    result.unchanged += len(group)
                    continue
                names = [f"{component}.{key[: -len('.weight')]}" for key in group]
                label = names[0] if len(names) == 1 else _fused_name(names[0])
                module, report = extract_module(label, delta, config.rank, config.clamp_quantile)
                parts = [module] if len(names) == 1 else _split(label, module, names)
                modules.update(zip(names, parts, strict=True))
                result.extracted.append(ExtractedModule(label, module.rank, report.energy, report.error))
    if not modules:
        raise MismatchError(
            f"no targeted weight differs between {config.base} and {config.tuned} (targets: {config.targets})"
        )
    state = LoraState(dict(modules), family=base.family)  # type: ignore[arg-type]
    meta = {
        "lorax_extracted_from": f"{config.tuned} - {config.base}",
        "lorax_extract_targets": config.targets,
    }
    dtype = dtypes.torch_dtype_or_none(config.dtype)
    save_lora(state, config.output, format=config.to, dtype=dtype, force=config.force, metadata=meta)
    result.modules = len(modules)
    result.mean_energy = sum(m.energy for m in result.extracted) / len(result.extracted)
    result.worst = min(result.extracted, key=lambda m: m.energy)
    progress.log(
        f"extracted {len(modules)} modules at rank {config.rank}: mean kept energy {result.mean_energy:.4f}, "
        f"worst {result.worst.energy:.4f} ({result.worst.module})"
    )
    result.seconds = time.perf_counter() - start
    return result
