"""``lorax mix``: the weighted sum of N LoRAs' deltas, exact by rank concatenation or SVD-compressed to a rank."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax import dtypes
from lorax.adapters.reports import SvdReport
from lorax.errors import ConfigError, InputError
from lorax.io.atomic import check_output
from lorax.io.model_layout import DTYPES
from lorax.progress import NullProgress, Progress
from lorax.services.common import LoraSpec, dtype_problem, rank_problem, refuse

if TYPE_CHECKING:
    from lorax.adapters.state import LoraState


@dataclass
class MixConfig:
    inputs: list[str] = field(default_factory=list)  # FILE or FILE:WEIGHT
    output: Path | None = None
    rank: int | None = None
    recipe: Path | None = None
    to: str | None = None
    dtype: str | None = None
    force: bool = False

    def resolved(self) -> tuple[list[LoraSpec], Path, int | None, str | None]:
        """Inputs, output, rank and format from flags and ``--recipe`` (flags win); every problem in one error."""
        specs = [LoraSpec.parse(t) for t in self.inputs]
        output, rank, fmt = self.output, self.rank, self.to
        problems = []
        if self.recipe is not None:
            recipe = load_recipe(self.recipe)
            specs = recipe["loras"] + specs
            output = output or recipe.get("output")
            rank = rank if rank is not None else recipe.get("rank")
            fmt = fmt or recipe.get("format")
        if len(specs) < 1:
            problems.append("give LoRAs to mix (A[:W] B[:W] …) or a --recipe listing them")
        if output is None:
            problems.append("give an output with -o (or `output` in the recipe)")
        refuse(problems + rank_problem(rank) + dtype_problem(self.dtype, DTYPES, got=False))
        assert output is not None
        return specs, Path(output), rank, fmt


def load_recipe(path: Path) -> dict[str, Any]:
    """A mix recipe (TOML): ``[[lora]] path = …, weight = …`` entries, optional ``output``, ``rank``, ``format``.

    Relative paths are taken from the recipe's folder.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    p = Path(path)
    if not p.is_file():
        raise InputError("no such recipe file", path=p)
    try:
        doc = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{p}: not valid TOML ({err})") from None
    unknown = set(doc) - {"lora", "output", "rank", "format"}
    if unknown:
        raise ConfigError(f"{p}: unknown recipe keys {sorted(unknown)} (known: lora, output, rank, format)")
    loras = []
    for i, entry in enumerate(doc.get("lora", [])):
        if not isinstance(entry, dict) or "path" not in entry:
            raise ConfigError(f"{p}: [[lora]] entry {i + 1} needs a path")
        extra = set(entry) - {"path", "weight"}
        if extra:
            raise ConfigError(f"{p}: [[lora]] entry {i + 1} has unknown keys {sorted(extra)}")
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, int | float):
            raise ConfigError(f"{p}: [[lora]] entry {i + 1}: weight must be a number")
        loras.append(LoraSpec(p.parent / entry["path"], float(weight)))
    out: dict[str, Any] = {"loras": loras}
    if "output" in doc:
        out["output"] = p.parent / doc["output"]
    if "rank" in doc:
        out["rank"] = int(doc["rank"])
    if "format" in doc:
        out["format"] = str(doc["format"])
    return out


@dataclass
class MixInput:
    path: str
    format: str
    weight: float
    modules: int
    ranks: list[int]


@dataclass
class MixResult:
    output: Path
    format: str
    family: str | None
    inputs: list[MixInput] = field(default_factory=list)
    modules: int = 0
    exact: bool = True
    rank: int | None = None
    ranks: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    mean_energy: float | None = None
    worst: SvdReport | None = None
    errors: list[SvdReport] = field(default_factory=list)
    seconds: float = 0.0


def read_loras(
    specs: Sequence[LoraSpec], weight: Callable[[int, LoraSpec], float]
) -> tuple[list[LoraState], list[MixInput]]:
    """Each LoRA read in turn (``merge`` reads its LoRA+LoRA inputs here too), with its weight ``weight(i, spec)``."""
    from lorax.formats import detect_format, load_lora

    states, inputs = [], []
    for i, spec in enumerate(specs):
        if not spec.path.exists():
            raise InputError("no such file", path=spec.path)
        fmt = detect_format(spec.path)
        state = load_lora(spec.path)
        w = weight(i, spec)
        states.append(state)
        inputs.append(MixInput(str(spec.path), fmt, w, len(state.modules), state.ranks()))
    return states, inputs


def output_format(to: str | None, first: str, writes: str) -> str:
    """``--to``, else the first input's format when lorax writes it, else kohya; ``writes`` says what may be
    written (``{formats}``: the choices) when ``--to`` names a format lorax does not write."""
    from lorax.formats import LORA_WRITE_FORMATS

    fmt = to or (first if first in LORA_WRITE_FORMATS else "kohya")
    if fmt not in LORA_WRITE_FORMATS:
        raise ConfigError(f"--to {fmt}: " + writes.format(formats=", ".join(LORA_WRITE_FORMATS)))
    return fmt


def mix(config: MixConfig, progress: Progress | None = None) -> MixResult:
    """``Σ wᵢ·ΔWᵢ`` over the inputs, written as one LoRA; see docs/mix.md."""

    from lorax.adapters.svd import mix_states
    from lorax.formats import save_lora

    progress = progress or NullProgress()
    start = time.perf_counter()
    specs, output, rank, fmt = config.resolved()
    check_output(output, config.force)
    states, inputs = read_loras(specs, lambda _, spec: 1.0 if spec.alpha is None else spec.alpha)
    fmt = output_format(fmt, inputs[0].format, "mix writes {formats}")
    with progress.task("mixing", total=None):
        mixed, reports = mix_states(list(zip(states, [i.weight for i in inputs], strict=True)), rank)
    dtype = dtypes.torch_dtype_or_none(config.dtype)
    save_lora(mixed, output, format=fmt, dtype=dtype, force=config.force)
    result = MixResult(
        output, fmt, mixed.family, inputs, len(mixed.modules), rank is None, rank, mixed.ranks()
    )
    result.tokens = sorted(mixed.embeddings)
    result.errors = list(reports)
    if result.errors:
        result.worst = max(result.errors, key=lambda e: e.error)
        result.mean_energy = sum(e.energy for e in result.errors) / len(result.errors)
    result.seconds = time.perf_counter() - start
    return result
