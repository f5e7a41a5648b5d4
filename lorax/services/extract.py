"""``lorax extract``: a LoRA from the difference of two models by truncated SVD (the seed's ``lora_distill``)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from lorax import dtypes
from lorax.errors import MismatchError
from lorax.io.atomic import check_output
from lorax.io.checkpoint import open_checkpoint
from lorax.io.model_layout import DTYPES
from lorax.models import families
from lorax.progress import NullProgress, Progress
from lorax.services.common import dtype_problem, refuse

TARGETS = ("attn", "attn-ff", "all")
_ATTN = re.compile(
    r"(attn\d\.(to_q|to_k|to_v|to_out\.0)|self_attn\.(q_proj|k_proj|v_proj|out_proj))\.weight$"
)
_FF = re.compile(r"(ff\.net\.0\.proj|ff\.net\.2|mlp\.fc1|mlp\.fc2)\.weight$")
_SKIP = re.compile(r"(embedding|embeddings)\.|norm")


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

    from lorax.adapters.state import LoraModule, LoraState
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
    if missing:
        raise MismatchError(f"the tuned model lacks {', '.join(missing)}")
    for component in components:
        tuned_keys = set(tuned.component_keys(component))
        keys = [k for k in base.component_keys(component) if k.endswith(".weight")]
        with progress.task(f"extracting {component}", total=len(keys)) as task:
            for key in keys:
                task.advance()
                w0 = base.tensor(component, key)
                if not targeted(key, config.targets, w0.dim()):
                    continue
                if key not in tuned_keys:
                    raise MismatchError(f"the tuned model has no {component}.{key}")
                w1 = tuned.tensor(component, key)
                if w1.shape != w0.shape:
                    raise MismatchError(
                        f"{component}.{key}: shapes differ (base {list(w0.shape)}, tuned {list(w1.shape)})"
                    )
                delta = w1.to(torch.float32) - w0.to(torch.float32)
                if float(delta.abs().max()) <= config.threshold:
                    result.unchanged += 1
                    continue
                name = f"{component}.{key[: -len('.weight')]}"
                module, report = extract_module(name, delta, config.rank, config.clamp_quantile)
                modules[name] = module
                result.extracted.append(ExtractedModule(name, module.rank, report.energy, report.error))
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
