"""``lorax generate``: images from a model with any number of LoRAs and learned tokens applied (no file changes).

One call: read every LoRA, embedding and init image first (bad input fails before the model loads), plan every output
name (existing files need ``force``), load the pipeline, register tokens, apply the LoRAs, then for each prompt
generate a batch of ``n`` images — once, or once per ``sweep`` scale — and write each as a PNG whose ``parameters``
text chunk (A1111's convention) records how it was made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import random
import re
import struct
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorax import __version__
from lorax.adapters.state import LoraState
from lorax.errors import ConfigError, InputError, OutputExistsError
from lorax.gen.xy import XYAxis
from lorax.models.defaults import model_defaults
from lorax.progress import NullProgress, Progress

# --scheduler NAME → (diffusers class, A1111 sampler name, extra config)
SCHEDULERS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", "DDIM", {}),
    "pndm": ("PNDMScheduler", "PLMS", {}),
    "euler": ("EulerDiscreteScheduler", "Euler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", "Euler a", {}),
    "heun": ("HeunDiscreteScheduler", "Heun", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", "DPM++ 2M", {}),
    "dpm++2m-karras": ("DPMSolverMultistepScheduler", "DPM++ 2M Karras", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", "UniPC", {}),
    "ddpm": ("DDPMScheduler", "DDPM", {}),
}
DTYPES = ("auto", "fp16", "bf16", "fp32", "float16", "bfloat16", "float32")  # one vocabulary; long names kept
_DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
DEVICES = ("auto", "cpu", "cuda", "gpu", "mps")
DEFAULT_OUT = Path("lorax-images")


@dataclass
class LoraSpec:
    """One ``--lora FILE[:SCALE[:TEXT_SCALE]]``; library callers may pass an in-memory ``state`` instead of a file."""

    path: Path | None = None
    scale: float = 1.0
    text_scale: float | None = None
    state: LoraState | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        from lorax.adapters.finite import check_scale

        where = f"<lora:{self.name}>" if self.name else self.path
        check_scale(self.scale, where)  # the one rule for every scale: finite, or one line naming the LoRA
        check_scale(self.text_scale, where, "text scale")

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return self.path.stem if self.path is not None else "lora"


def parse_lora_arg(value: str) -> LoraSpec:
    """``FILE``, ``FILE:SCALE`` or ``FILE:SCALE:TEXT_SCALE`` (a path that exists as written is taken whole)."""
    if Path(value).exists():
        return LoraSpec(Path(value))
    head, numbers = value, list[float]()
    for _ in range(2):
        rest, sep, tail = head.rpartition(":")
        if not sep or not rest:
            break
        try:
            numbers.insert(0, float(tail))
        except ValueError:
            break
        head = rest
    if not numbers:
        return LoraSpec(Path(value))
    return LoraSpec(Path(head), numbers[0], numbers[1] if len(numbers) > 1 else None)


def parse_size(value: str) -> tuple[int, int]:
    """``WxH`` (or a single number for a square) → ``(width, height)``."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", value)
    if not match:
        raise ConfigError(f"--size {value!r} is not WIDTHxHEIGHT, e.g. 512x512")
    width = int(match.group(1))
    return width, int(match.group(2) or width)


def parse_scales(value: str) -> list[float]:
    """``0,0.25,0.5`` → floats (``--sweep-scale``)."""
    try:
        scales = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--sweep-scale {value!r} is not a comma-separated list of numbers") from None
    if not scales:
        raise ConfigError("--sweep-scale is empty; give scales such as 0,0.5,1")
    from lorax.adapters.finite import is_finite_scale

    bad = [s for s in scales if not is_finite_scale(s)]
    if bad:
        raise ConfigError(f"--sweep-scale {bad[0]!r} is not a finite number in float32 range")
    return scales


def expand_lora_tokens(prompt: str, lora_tokens: dict[int, list[str]]) -> str:
    """``<N>`` in a prompt → the learned tokens bundled in the N-th ``--lora`` file (the seed's LoRAManager)."""
    for number, tokens in lora_tokens.items():
        prompt = prompt.replace(f"<{number}>", " ".join(tokens))
    return prompt


def take_prompt_loras(config: GenerateConfig) -> GenerateConfig:
    """``<lora:NAME:W>`` tags out of the prompts and into ``config.loras``, resolved against ``config.lora_dir``.

    LoRAs apply to a whole run, so every prompt of one run must carry the same tags.
    """
    from lorax.gen.prompt_loras import resolve_name, split_prompt

    split = [split_prompt(p) for p in config.prompts]
    tag_sets = {tuple(tags) for _, tags in split}
    if not any(tags for tags in tag_sets):
        return config
    if len(tag_sets) > 1:
        raise ConfigError(
            "the prompts carry different <lora:…> tags; LoRAs apply to a whole run, so run them separately"
        )
    folder = config.lora_dir if config.lora_dir is not None else Path.cwd()
    specs = [
        LoraSpec(resolve_name(tag.name, folder), tag.unet_scale, tag.text_scale, name=tag.name)
        for tag in split[0][1]
    ]
    return dataclasses.replace(config, prompts=[p for p, _ in split], loras=[*config.loras, *specs])


def read_prompts(text: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@dataclass
class GenerateConfig:
    """Everything ``lorax generate`` needs; :meth:`validate` names every bad flag at once."""

    prompts: list[str]
    model: str = "shapes"
    loras: list[LoraSpec] = field(default_factory=list)
    text_scale: float | None = None
    embeddings: list[Path] = field(default_factory=list)
    n: int = 1
    seed: int | None = None
    steps: int | None = None  # None: the model's own default (see sampling_defaults)
    guidance: float | None = None
    negative: str = ""
    scheduler: str | None = None
    size: tuple[int, int] | None = None
    out_dir: Path = DEFAULT_OUT
    init_image: Path | None = None
    mask_image: Path | None = None  # inpainting (with init_image): white = repaint; see lorax.gen.inpaint
    strength: float = 0.75
    sweep: list[float] | None = None
    grid: bool = False
    schedule: str | None = None
    blocks: dict[str, float] | None = None
    fuse: bool = False
    device: str = "auto"
    dtype: str = "auto"
    force: bool = False
    lora_dir: Path | None = None  # where <lora:NAME:W> prompt tags are looked up (None: the current folder)
    xy: list[XYAxis] = field(default_factory=list)  # --xy axes: X (columns), then Y (rows)
    clip_skip: int | None = None  # None: the LoRAs' ss_clip_skip, else 1 (the last layer)

    def validate(self) -> None:
        problems: list[str] = []
        if not self.prompts:
            problems.append("no prompt: give PROMPT, --prompts FILE, or - to read prompts from stdin")
        if self.n < 1:
            problems.append(f"-n must be at least 1 (got {self.n})")
        if self.steps is not None and self.steps < 1:
            problems.append(f"--steps must be at least 1 (got {self.steps})")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            problems.append(f"--seed must be a non-negative integer (got {self.seed})")
        if self.scheduler is not None and self.scheduler.lower() not in SCHEDULERS:
            problems.append(
                f"--scheduler {self.scheduler!r} is unknown; choose one of {', '.join(SCHEDULERS)}"
            )
        if self.size is not None and (min(self.size) < 8 or self.size[0] % 8 or self.size[1] % 8):
            problems.append(f"--size {self.size[0]}x{self.size[1]}: both sides must be multiples of 8")
        if self.mask_image is not None and self.init_image is None:
            problems.append("--mask-image needs --init-image (the picture to inpaint)")
        if self.init_image is None and self.strength != 0.75:
            problems.append("--strength only applies with --init-image")
        if not 0.0 < self.strength <= 1.0:
            problems.append(f"--strength must be in (0, 1] (got {self.strength})")
        if self.sweep is not None and not self.loras:
            problems.append("--sweep-scale needs at least one --lora")
        if self.schedule is not None and not self.loras:
            problems.append("--scale-schedule needs at least one --lora")
        if self.blocks is not None and not self.loras:
            problems.append("--blocks needs at least one --lora")
        if self.fuse and self.sweep is not None:
            problems.append("--fuse fixes the LoRA scales: it cannot be combined with --sweep-scale")
        if self.fuse and self.schedule is not None:
            problems.append("--fuse fixes the LoRA scales: it cannot be combined with --scale-schedule")
        if self.device not in DEVICES:
            problems.append(f"--device {self.device!r} is unknown; choose one of {', '.join(DEVICES)}")
        if self.dtype not in DTYPES:
            problems.append(f"--dtype {self.dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
        problems += self._xy_problems()
        if self.clip_skip is not None and self.clip_skip < 1:
            problems.append(f"--clip-skip must be ≥ 1 (got {self.clip_skip}; 2 is the penultimate layer)")
        if problems:
            raise ConfigError("; ".join(problems))

    def _xy_problems(self) -> list[str]:
        if not self.xy:
            return []
        problems: list[str] = []
        kinds = [axis.kind for axis in self.xy]
        if len(self.xy) > 2:
            problems.append("--xy is given more than twice; an X/Y plot has two axes (X: columns, Y: rows)")
        if len(set(kinds)) < len(kinds):
            problems.append(f"--xy {kinds[-1]} is given twice; give each kind once, with all its values")
        if self.sweep is not None:
            problems.append("--sweep-scale and --xy both make a sheet: use --xy scale=… as one of the axes")
        if self.n != 1:
            problems.append("--xy makes one image per cell (-n 1); vary seeds with --xy seed=1,2,3")
        if self.grid:
            problems.append("--xy writes its own labelled grid; leave out --grid")
        if "scale" in kinds and not self.loras and "lora" not in kinds:
            problems.append("--xy scale needs at least one --lora (or an --xy lora axis)")
        if self.fuse and ("scale" in kinds or "lora" in kinds):
            problems.append(
                "--fuse fixes the LoRAs and their scales: it cannot be combined with --xy scale or lora"
            )
        for axis in self.xy:
            if axis.kind == "prompt":
                search = axis.values[0]
                missing = [p for p in self.prompts if search not in p and search not in self.negative]
                if missing:
                    problems.append(
                        f"--xy prompt: the search text {search!r} (the first value) is not in the prompt "
                        f"{missing[0]!r} nor in the negative prompt"
                    )
        return problems


@dataclass
class GeneratedImage:
    """One written file. ``kind``: ``image``, ``sweep`` (one frame of a sweep), ``xy`` (one cell of an X/Y plot),
    ``grid`` (a batch's contact sheet), ``sweep-grid`` or ``xy-grid`` (the labelled sheets)."""

    path: Path
    kind: str
    prompt: str
    seed: int
    width: int
    height: int
    scale: float | None = None
    parameters: str = ""


@dataclass
class GenerateResult:
    images: list[GeneratedImage]
    device: str
    dtype: str
    seconds: float
    seconds_per_image: float


# ---- small helpers ------------------------------------------------------------------------------------------


def slugify(prompt: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:limit].rstrip("-") or "image"


def file_hash(path: Path, length: int = 12, *, lora: bool = False) -> str:
    """The short SHA-256 A1111 prints for LoRA and embedding files.

    A LoRA ``.safetensors`` is hashed after its header (A1111's ``addnet_hash_safetensors``, the header's
    ``sshs_model_hash``), so editing its metadata keeps its hash; other files whole.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if lora and path.suffix.lower() == ".safetensors":
            (n,) = struct.unpack("<Q", fh.read(8))
            fh.seek(8 + n)
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


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
    return getattr(torch, _DTYPE_NAMES.get(name, name))


def load_model(spec: str, dtype: Any = None, device: str | None = None) -> Any:
    """A diffusers pipeline for ``spec``: a built-in name (``shapes``), a diffusers folder, a Hub id in the local
    cache, or a single ``.safetensors`` / ``.ckpt`` file (the models layer's ``load_pipeline``)."""
    from lorax.models.pipeline import load_pipeline

    return load_pipeline(spec, dtype=dtype, device=device)


def _model_label(spec: str) -> str:
    path = Path(spec)
    return path.stem if path.suffix in (".safetensors", ".ckpt") else (path.name or spec)


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
    sample = pipe.unet.config.sample_size
    factor = getattr(pipe, "vae_scale_factor", 8)
    if isinstance(sample, (list, tuple)):
        return int(sample[1]) * factor, int(sample[0]) * factor
    return int(sample) * factor, int(sample) * factor


def read_init_image(path: Path) -> Any:
    from lorax.data.images import read_image_file

    return read_image_file(path, "--init-image")


def _check_input_file(path: Path, flag: str) -> None:
    """Exists and has a format lorax reads (header only: cheap, before the model loads)."""
    from lorax.formats import detect_format

    if not path.exists():
        raise InputError(f"no such file ({flag})", path=path)
    detect_format(path)


def _load_lora_file(path: Path, pipe: Any) -> LoraState:
    from lorax.formats import load_lora
    from lorax.services.merge import refuse_unmergeable

    refuse_unmergeable(path)
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


def _load_embedding_file(path: Path) -> dict[str, dict[str, Any]]:
    from lorax.formats import load_embeddings

    loaded = load_embeddings(path)
    embeddings = loaded.embeddings if isinstance(loaded, LoraState) else loaded
    if not embeddings:
        raise InputError("holds no learned token embeddings (--embedding)", path=path)
    return dict(embeddings)


@dataclass
class _Job:
    """One pipeline call: a prompt, its seeds, and what a sweep or an X/Y cell changes."""

    prompt_index: int
    prompt: str  # as typed (after an --xy prompt replacement); learned-token tags expand at run time
    negative: str
    seeds: list[int]
    factor: float | None  # the LoRA scale factor of a sweep frame or an --xy scale cell
    names: list[Path]
    steps: int | None = None  # an --xy steps / guidance cell's own value (None: the run's)
    guidance: float | None = None
    lora: int | None = (
        None  # an --xy lora cell: which of the axis's LoRAs is on (-1: none); None: no such axis
    )
    kind: str = "image"


@dataclass
class _Sheet:
    """One grid file: ``cells[row][col]`` = (job index, image index in that job's batch)."""

    path: Path
    kind: str  # "grid" (a batch's plain contact sheet), "sweep-grid" or "xy-grid" (labelled)
    prompt_index: int
    cells: list[list[tuple[int, int]]]
    col_labels: list[str] = field(default_factory=list)
    row_labels: list[str] | None = None
    factor: float | None = None
    extra: dict[str, str] = field(default_factory=dict)


def _stem(config: GenerateConfig, index: int) -> str:
    stem = slugify(config.prompts[index])
    return f"{index + 1:03d}-{stem}" if len(config.prompts) > 1 else stem


def _plan(config: GenerateConfig, seed: int) -> tuple[list[_Job], list[_Sheet]]:
    """Every pipeline call and every file name, before anything runs."""
    from lorax.gen.xy import search_replace

    out = config.out_dir
    jobs: list[_Job] = []
    sheets: list[_Sheet] = []
    seeds = [seed + i for i in range(config.n)]
    for index, prompt in enumerate(config.prompts):
        stem = _stem(config, index)
        if config.xy:
            x_axis = config.xy[0]
            y_axis = config.xy[1] if len(config.xy) > 1 else None
            rows: list[list[tuple[int, int]]] = []
            for r in range(len(y_axis.values) if y_axis is not None else 1):
                row: list[tuple[int, int]] = []
                for c in range(len(x_axis.values)):
                    cell = [(x_axis, c)] + ([(y_axis, r)] if y_axis is not None else [])
                    job = _Job(index, prompt, config.negative, [seed], None, [], kind="xy")
                    for axis, i in cell:
                        value = axis.values[i]
                        if axis.kind == "prompt":
                            job.prompt = search_replace(job.prompt, axis.values[0], value)
                            job.negative = search_replace(job.negative, axis.values[0], value)
                        elif axis.kind == "scale":
                            job.factor = float(value)
                        elif axis.kind == "seed":
                            job.seeds = [int(float(value))]
                        elif axis.kind == "steps":
                            job.steps = int(float(value))
                        elif axis.kind == "guidance":
                            job.guidance = float(value)
                        elif axis.kind == "lora":
                            job.lora = -1 if _is_no_lora(value) else i
                    tags = "-".join(axis.file_tag(i) for axis, i in cell if axis.kind != "seed")
                    job.names = [out / ("-".join(p for p in (stem, str(job.seeds[0]), tags) if p) + ".png")]
                    row.append((len(jobs), 0))
                    jobs.append(job)
                rows.append(row)
            extra = {"X Type": x_axis.label, "X Values": ",".join(x_axis.values)}
            if y_axis is not None:
                extra |= {"Y Type": y_axis.label, "Y Values": ",".join(y_axis.values)}
            sheets.append(
                _Sheet(
                    out / f"{stem}-{seed}-xy.png",
                    "xy-grid",
                    index,
                    rows,
                    [x_axis.cell_label(c) for c in range(len(x_axis.values))],
                    [y_axis.cell_label(r) for r in range(len(y_axis.values))] if y_axis is not None else None,
                    extra=extra,
                )
            )
            continue
        factors: list[float | None] = list(config.sweep) if config.sweep is not None else [None]
        first = len(jobs)
        for factor in factors:
            tag = "" if factor is None else f"-s{factor:g}"
            names = [out / f"{stem}-{s}{tag}.png" for s in seeds]
            kind = "image" if factor is None else "sweep"
            jobs.append(_Job(index, prompt, config.negative, seeds, factor, names, kind=kind))
            if config.grid:
                cells = [[(len(jobs) - 1, i) for i in range(len(seeds))]]
                sheets.append(
                    _Sheet(out / f"{stem}-{seed}{tag}-grid.png", "grid", index, cells, factor=factor)
                )
        if config.sweep is not None:  # rows are seeds, columns are scales
            sheets.append(
                _Sheet(
                    out / f"{stem}-{seed}-sweep.png",
                    "sweep-grid",
                    index,
                    [[(first + c, r) for c in range(len(factors))] for r in range(len(seeds))],
                    [f"scale {f:g}" for f in config.sweep],
                    [f"seed {s}" for s in seeds] if len(seeds) > 1 else None,
                    extra={"Lora sweep": ",".join(f"{f:g}" for f in config.sweep)},
                )
            )
    return jobs, sheets


def _is_no_lora(value: str) -> bool:
    from lorax.gen.xy import NO_LORA

    return value.strip().lower() == NO_LORA and not Path(value).exists()


def xy_lora_specs(config: GenerateConfig) -> list[LoraSpec | None]:
    """The files of an ``--xy lora`` axis, one per value (None for ``none``): a path as given, else a name looked up in
    ``--lora-dir`` (default: the current folder) as ``<lora:NAME:…>`` tags are."""
    from lorax.gen.prompt_loras import resolve_name

    axis = next((a for a in config.xy if a.kind == "lora"), None)
    if axis is None:
        return []
    folder = config.lora_dir if config.lora_dir is not None else Path.cwd()
    specs: list[LoraSpec | None] = []
    for value in axis.values:
        if _is_no_lora(value):
            specs.append(None)
            continue
        path = Path(value)
        if not path.is_file():
            try:
                path = resolve_name(value, folder)
            except InputError:
                raise InputError(
                    f"--xy lora: {value!r} is neither a file nor the name of a LoRA file in this folder; "
                    "pass --lora-dir or a path",
                    path=folder,
                ) from None
        specs.append(LoraSpec(path, name=path.stem))
    return specs


def _check_outputs(paths: Sequence[Path], force: bool) -> None:
    seen: set[Path] = set()
    for path in paths:
        if path in seen:
            raise ConfigError(f"two images would share the name {path}; give distinct prompts")
        seen.add(path)
    if force:
        return
    existing = [p for p in paths if p.exists()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OutputExistsError(
            f"already exists{more}; pass --force to overwrite, or choose another -o folder", path=existing[0]
        )


# ---- the service --------------------------------------------------------------------------------------------


def generate(
    config: GenerateConfig,
    progress: Progress | None = None,
    *,
    on_image: Callable[[GeneratedImage], None] | None = None,
    pipe: Any = None,
) -> GenerateResult:
    """Generate and write the images ``config`` asks for; ``on_image`` is called as each file lands.

    ``pipe`` (a loaded diffusers pipeline) skips model loading; it is used as given and its LoRAs are taken off
    again before returning.

    Raises:
        ConfigError, InputError, MismatchError, OutputExistsError, ModelNotFoundError: one line each.
    """
    import torch

    from lorax.adapters.apply import (
        LoraRequest,
        apply_loras,
        check_prompt_tokens,
        quiet_libraries,
        register_tokens,
    )
    from lorax.gen.grid import make_grid, xy_grid
    from lorax.gen.params import format_parameters, save_png
    from lorax.gen.prompt_loras import format_tag, with_tags
    from lorax.gen.schedule import parse_schedule
    from lorax.io.atomic import atomic_path

    progress = progress or NullProgress()
    config = take_prompt_loras(config)
    config.validate()
    defaults = model_defaults(config.model)
    default_steps, default_guidance = defaults.sampling
    steps = config.steps if config.steps is not None else default_steps
    guidance = config.guidance if config.guidance is not None else default_guidance
    schedule = parse_schedule(config.schedule) if config.schedule is not None else None
    seed = config.seed if config.seed is not None else random.randrange(2**32)

    # Check every input before the (slow) model load, so bad input fails fast.
    axis_specs = xy_lora_specs(
        config
    )  # an --xy lora axis: its files go on after the --lora ones, all at once
    specs = [*config.loras, *[spec for spec in axis_specs if spec is not None]]
    axis_request: list[int | None] = []  # axis value → index of its request (None: the model alone)
    for spec in axis_specs:
        axis_request.append(
            None if spec is None else len(config.loras) + sum(i is not None for i in axis_request)
        )
    for spec in specs:
        if spec.state is None:
            if spec.path is None:
                raise ConfigError("a LoRA needs a file or an in-memory state")
            _check_input_file(spec.path, "--lora" if spec in config.loras else "--xy lora")
    for path in config.embeddings:
        _check_input_file(path, "--embedding")
    embeddings = [(path, _load_embedding_file(path)) for path in config.embeddings]
    for path, embedding in embeddings:
        note = trigger_note(path, list(embedding))
        if note:
            progress.log(note)
    init = read_init_image(config.init_image) if config.init_image is not None else None
    from lorax.gen import inpaint

    mask = inpaint.read_mask_image(config.mask_image) if config.mask_image is not None else None
    jobs, sheets = _plan(config, seed)
    _check_outputs([p for job in jobs for p in job.names] + [sheet.path for sheet in sheets], config.force)

    own_pipe = pipe is None
    if own_pipe:
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        # diffusers' load reports and deprecation notes are not the user's business
        from lorax.models.pipeline import load_is_slow

        announce = progress.task(f"loading model {config.model}") if load_is_slow(config.model) else None
        with announce or contextlib.nullcontext(), quiet_libraries(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            pipe = load_model(config.model, dtype=dtype, device=device)
    else:  # a pipeline the caller holds keeps its device and precision
        device, dtype = str(pipe.device.type), pipe.unet.dtype
    pipe.set_progress_bar_config(disable=True)
    # kohya names and lora_diffusion indices resolve exactly against the live model
    states = [
        spec.state if spec.state is not None else _load_lora_file(spec.path, pipe)  # type: ignore[arg-type]
        for spec in specs
    ]
    if config.scheduler:
        set_scheduler(pipe, config.scheduler)
    clip_skip = _clip_skip(config, pipe, specs, states, progress)

    taken: set[str] = set()
    for path, embedding in embeddings:
        taken |= set(register_tokens(pipe, embedding, source=path))
    lora_tokens: dict[int, list[str]] = {}
    for number, (spec, state) in enumerate(zip(specs, states, strict=True), start=1):
        if not state.embeddings:
            continue
        bundled = dict(state.embeddings)
        if taken & set(bundled):  # the seed's LoRAManager naming: file N's j-th token becomes <sN-j>
            bundled = {f"<s{number}-{j}>": vectors for j, vectors in enumerate(bundled.values())}
        taken |= set(register_tokens(pipe, bundled, source=spec.path or spec.label))
        lora_tokens[number] = list(bundled)
    prompts = [expand_lora_tokens(p, lora_tokens) for p in config.prompts]
    negative = expand_lora_tokens(config.negative, lora_tokens)
    job_prompts = [expand_lora_tokens(job.prompt, lora_tokens) for job in jobs]
    job_negatives = [expand_lora_tokens(job.negative, lora_tokens) for job in jobs]
    check_prompt_tokens(pipe, [*prompts, negative, *job_prompts, *job_negatives])

    requests = [
        LoraRequest(
            state=state,
            name=spec.label,
            unet_scale=spec.scale,
            text_scale=spec.text_scale if spec.text_scale is not None else config.text_scale,
            blocks=config.blocks,
            source=spec.path,
        )
        for spec, state in zip(specs, states, strict=True)
    ]
    applied = apply_loras(pipe, requests, fuse=config.fuse) if requests else None
    for warning in applied.warnings if applied is not None else []:
        progress.log(f"warning: {warning}")

    def active(job: _Job) -> list[int]:
        """The requests on for ``job``: every --lora, and of an --xy lora axis only the cell's own."""
        if job.lora is None:
            return list(range(len(requests)))
        chosen = axis_request[job.lora] if job.lora >= 0 else None
        return [*range(len(config.loras)), *([chosen] if chosen is not None else [])]

    def switch(job: _Job) -> None:
        """With an --xy lora axis, the LoRAs of the other cells go to scale 0 (exactly the model without them)."""
        if applied is None or not axis_specs:
            return
        on = set(active(job))
        for i, request in enumerate(requests):
            applied.requests[i] = (
                request if i in on else dataclasses.replace(request, unet_scale=0.0, text_scale=0.0)
            )

    runner = pipe
    if inpaint.is_inpainting_model(pipe) and mask is None:
        raise ConfigError(
            f"{config.model} is an inpainting model (9-channel UNet): give --init-image and --mask-image"
        )
    if mask is not None:
        runner = inpaint.inpaint_pipeline(pipe)
    elif init is not None:
        from diffusers import AutoPipelineForImage2Image

        runner = AutoPipelineForImage2Image.from_pipe(pipe)
        runner.set_progress_bar_config(disable=True)
    width, height = config.size or (
        _round8(init.size) if init is not None else (defaults.size or default_size(pipe))
    )
    if init is not None and init.size != (width, height):
        init = init.resize((width, height))
    if mask is not None:
        mask = inpaint.binary_mask(mask, (width, height))

    names = applied.names if applied is not None else []
    hashes = {
        names[i]: file_hash(spec.path, lora=True) for i, spec in enumerate(specs) if spec.path is not None
    }
    ti_hashes = {path.stem: file_hash(path) for path, _ in embeddings}
    sampler = sampler_name(pipe)
    # a sheet's own PNG info names the run-wide LoRAs (an --xy lora axis's files are in X/Y Values)
    on_all = list(range(len(config.loras) if axis_specs else len(requests)))

    def infotext_prompt(prompt: str, factor: float | None, on: list[int]) -> str:
        """The prompt with a ``<lora:…>`` tag per LoRA file, so the PNG's parameters paste into A1111."""
        f = 1.0 if factor is None else factor
        tags = [
            format_tag(names[i], f * requests[i].unet_scale, f * requests[i].effective_text_scale)
            for i in on
            if specs[i].path is not None
        ]
        return with_tags(prompt, tags) if tags else prompt

    def fields_for(
        image_seed: int, factor: float | None, on: list[int], job_steps: int, job_guidance: float
    ) -> dict[str, object]:
        fields: dict[str, object] = {
            "Steps": job_steps,
            "Sampler": sampler,
            "CFG scale": f"{job_guidance:g}",
            "Seed": image_seed,
            "Size": f"{width}x{height}",
            "Model": _model_label(config.model),
        }
        if clip_skip > 1:
            fields["Clip skip"] = clip_skip  # A1111's infotext key
        if init is not None:
            fields["Denoising strength"] = f"{config.strength:g}"
        if applied is not None and on:
            if any(names[i] in hashes for i in on):
                fields["Lora hashes"] = ", ".join(
                    f"{names[i]}: {hashes[names[i]]}" for i in on if names[i] in hashes
                )
            f = 1.0 if factor is None else factor
            fields["Lora scales"] = ", ".join(
                f"{names[i]}: {f * requests[i].unet_scale:g}/{f * requests[i].effective_text_scale:g}"
                for i in on
            )
            if config.blocks:
                fields["Lora blocks"] = ",".join(f"{k}={v:g}" for k, v in config.blocks.items())
            if schedule is not None:
                fields["Lora schedule"] = schedule.spec
            if config.fuse:
                fields["Lora fused"] = "true"
        if ti_hashes:
            fields["TI hashes"] = ", ".join(f"{k}: {v}" for k, v in ti_hashes.items())
        fields["Version"] = f"lorax {__version__}"
        return fields

    def calls_steps(job_steps: int) -> int:
        return job_steps if init is None else max(1, min(int(job_steps * config.strength), job_steps))

    written: list[GeneratedImage] = []
    held: dict[int, list[Any]] = {}  # job index → its images, only for jobs a sheet shows
    shown = {j for sheet in sheets for row in sheet.cells for j, _ in row}
    started = time.perf_counter()
    n_images = 0

    def emit(record: GeneratedImage) -> None:
        written.append(record)
        if on_image is not None:
            on_image(record)

    try:
        total = sum(calls_steps(job.steps or steps) for job in jobs)
        with progress.task("generating", total=total) as task:
            for j, job in enumerate(jobs):
                factor = 1.0 if job.factor is None else job.factor
                job_steps = job.steps or steps
                job_guidance = guidance if job.guidance is None else job.guidance
                steps_per_call = calls_steps(job_steps)

                def on_step_end(
                    p: Any,
                    step: int,
                    timestep: Any,
                    kwargs: dict[str, Any],
                    factor: float = factor,
                    steps_per_call: int = steps_per_call,
                ) -> dict[str, Any]:
                    if schedule is not None and applied is not None:
                        total = int(getattr(p, "num_timesteps", 0) or steps_per_call)
                        applied.set_scales(factor * schedule.for_step(step + 1, total), factor)
                    task.advance()
                    return kwargs

                switch(job)
                if applied is not None and not applied.fused:
                    first = schedule.for_step(0, steps_per_call) if schedule is not None else 1.0
                    applied.set_scales(factor * first, factor)
                generators = [torch.Generator("cpu").manual_seed(s) for s in job.seeds]
                kwargs: dict[str, Any] = {
                    "prompt": job_prompts[j],
                    "negative_prompt": job_negatives[j] or None,
                    "num_inference_steps": job_steps,
                    "guidance_scale": job_guidance,
                    "num_images_per_prompt": len(job.seeds),
                    "generator": generators,
                    "callback_on_step_end": on_step_end,
                    "output_type": "pil",
                }
                if clip_skip > 1:  # the embeddings of the skipped layers, through the current LoRA scales
                    from lorax.training.text import clip_skip_embeds

                    with torch.inference_mode():
                        kwargs.update(
                            clip_skip_embeds(
                                runner, kwargs.pop("prompt"), kwargs.pop("negative_prompt"), clip_skip
                            )
                        )
                if mask is not None:
                    kwargs.update(
                        image=init, mask_image=mask, strength=config.strength, width=width, height=height
                    )
                elif init is not None:
                    kwargs.update(image=init, strength=config.strength)
                else:
                    kwargs.update(width=width, height=height)
                with torch.inference_mode():
                    images = runner(**kwargs).images
                if mask is not None:
                    images = inpaint.paste_unmasked(images, init, mask)
                n_images += len(images)
                if j in shown:  # hold images only for the sheets asked for
                    held[j] = images
                on = active(job)
                for image, image_seed, path in zip(images, job.seeds, job.names, strict=True):
                    text = format_parameters(
                        infotext_prompt(job_prompts[j], job.factor, on),
                        job_negatives[j],
                        fields_for(image_seed, job.factor, on, job_steps, job_guidance),
                    )
                    with atomic_path(path, config.force) as tmp:
                        save_png(image, tmp, text)
                    emit(
                        GeneratedImage(
                            path=path,
                            kind=job.kind,
                            prompt=job_prompts[j],
                            seed=image_seed,
                            width=image.width,
                            height=image.height,
                            scale=job.factor,
                            parameters=text,
                        )
                    )
        elapsed = time.perf_counter() - started
        for sheet in sheets:
            prompt = prompts[sheet.prompt_index]
            cells = [[held[j][i] for j, i in row] for row in sheet.cells]
            if sheet.kind == "grid":
                flat = [image for row in cells for image in row]
                picture = make_grid(flat, math.ceil(math.sqrt(len(flat))))
            else:
                picture = xy_grid(
                    cells, col_labels=sheet.col_labels, row_labels=sheet.row_labels, title=prompt
                )
            text = format_parameters(
                infotext_prompt(prompt, sheet.factor, on_all),
                negative,
                {**fields_for(seed, sheet.factor, on_all, steps, guidance), **sheet.extra},
            )
            with atomic_path(sheet.path, config.force) as tmp:
                save_png(picture, tmp, text)
            emit(
                GeneratedImage(
                    sheet.path, sheet.kind, prompt, seed, picture.width, picture.height, sheet.factor, text
                )
            )
    finally:
        if applied is not None and not own_pipe:
            applied.requests[:] = requests
            applied.remove()
    return GenerateResult(
        images=written,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        seconds=elapsed,
        seconds_per_image=elapsed / max(1, n_images),
    )


def _round8(size: tuple[int, int]) -> tuple[int, int]:
    return max(8, size[0] // 8 * 8), max(8, size[1] // 8 * 8)


def _clip_skip(
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
