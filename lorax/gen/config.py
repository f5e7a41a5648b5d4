"""What ``lorax generate`` is asked for: the LoRA specs, the config and its checks, and what a run returns.

The grammar of ``--lora FILE[:SCALE[:TEXT_SCALE]]``, ``--size`` and ``--sweep-scale``; :class:`GenerateConfig`, whose
:meth:`~GenerateConfig.validate` names every bad flag at once; :class:`GeneratedImage` and :class:`GenerateResult`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorax.adapters.state import LoraState
from lorax.errors import ConfigError
from lorax.gen.xy import XYAxis
from lorax.specs import split_numbers

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
    path, numbers = split_numbers(value, 2)
    if not numbers:
        return LoraSpec(path)
    return LoraSpec(path, numbers[0], numbers[1] if len(numbers) > 1 else None)


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


def read_prompts(text: str) -> list[str]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@dataclass
class GenerateConfig:
    """Everything ``lorax generate`` needs; :meth:`validate` names every bad flag at once."""

    prompts: list[str]
    model: str = "shapes"
    config_from: str | None = None  # the rest of a partial single file's pipeline (a diffusers folder)
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
    max_sequence_length: int | None = None  # Flux's T5 prompt length (None: 512 for dev, 256 for schnell)

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
        if self.max_sequence_length is not None and not 1 <= self.max_sequence_length <= 512:
            problems.append(f"--max-sequence-length must be in 1..512 (got {self.max_sequence_length})")
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
