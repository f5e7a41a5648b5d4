"""Every pipeline call and every file name of a ``lorax generate`` run, planned before the model loads.

A :class:`Job` is one pipeline call (a prompt, its seeds, what a sweep frame or an X/Y cell changes); a :class:`Sheet`
is one grid file made of the jobs' images. ``<lora:NAME:W>`` prompt tags and ``--xy lora`` values resolve to files
here, and the planned names are checked against existing files (``--force``) before anything runs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lorax.errors import ConfigError, InputError, OutputExistsError
from lorax.gen.config import GenerateConfig, LoraSpec


def slugify(prompt: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:limit].rstrip("-") or "image"


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


@dataclass
class Job:
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
class Sheet:
    """One grid file: ``cells[row][col]`` = (job index, image index in that job's batch)."""

    path: Path
    kind: str  # "grid" (a batch's plain contact sheet), "sweep-grid" or "xy-grid" (labelled)
    prompt_index: int
    cells: list[list[tuple[int, int]]]
    col_labels: list[str] = field(default_factory=list)
    row_labels: list[str] | None = None
    factor: float | None = None
    extra: dict[str, str] = field(default_factory=dict)


def file_stem(config: GenerateConfig, index: int) -> str:
    stem = slugify(config.prompts[index])
    return f"{index + 1:03d}-{stem}" if len(config.prompts) > 1 else stem


def plan(config: GenerateConfig, seed: int) -> tuple[list[Job], list[Sheet]]:
    """Every pipeline call and every file name, before anything runs."""
    from lorax.gen.xy import search_replace

    out = config.out_dir
    jobs: list[Job] = []
    sheets: list[Sheet] = []
    seeds = [seed + i for i in range(config.n)]
    for index, prompt in enumerate(config.prompts):
        stem = file_stem(config, index)
        if config.xy:
            x_axis = config.xy[0]
            y_axis = config.xy[1] if len(config.xy) > 1 else None
            rows: list[list[tuple[int, int]]] = []
            for r in range(len(y_axis.values) if y_axis is not None else 1):
                row: list[tuple[int, int]] = []
                for c in range(len(x_axis.values)):
                    cell = [(x_axis, c)] + ([(y_axis, r)] if y_axis is not None else [])
                    job = Job(index, prompt, config.negative, [seed], None, [], kind="xy")
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
                            job.lora = -1 if is_no_lora(value) else i
                    tags = "-".join(axis.file_tag(i) for axis, i in cell if axis.kind != "seed")
                    job.names = [out / ("-".join(p for p in (stem, str(job.seeds[0]), tags) if p) + ".png")]
                    row.append((len(jobs), 0))
                    jobs.append(job)
                rows.append(row)
            extra = {"X Type": x_axis.label, "X Values": ",".join(x_axis.values)}
            if y_axis is not None:
                extra |= {"Y Type": y_axis.label, "Y Values": ",".join(y_axis.values)}
            sheets.append(
                Sheet(
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
            jobs.append(Job(index, prompt, config.negative, seeds, factor, names, kind=kind))
            if config.grid:
                cells = [[(len(jobs) - 1, i) for i in range(len(seeds))]]
                sheets.append(
                    Sheet(out / f"{stem}-{seed}{tag}-grid.png", "grid", index, cells, factor=factor)
                )
        if config.sweep is not None:  # rows are seeds, columns are scales
            sheets.append(
                Sheet(
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


def is_no_lora(value: str) -> bool:
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
        if is_no_lora(value):
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


def check_outputs(paths: Sequence[Path], force: bool) -> None:
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
