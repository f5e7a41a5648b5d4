"""``lorax inspect``: describe LoRA, embedding and model files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorax.cli.common import JsonOption, cli_progress, print_json, stdout_console


def inspect_command(
    files: Annotated[
        list[Path],
        typer.Argument(
            help="LoRA files (kohya, LyCORIS, diffusers/PEFT, lora_diffusion), embeddings (A1111 .pt/.safetensors, "
            "SDXL, diffusers learned_embeds), model checkpoints (single files, diffusers folders), PNGs from "
            "lorax generate or A1111 (their parameters).",
            show_default=False,
        ),
    ],
    metadata: Annotated[
        bool, typer.Option("--metadata", "-m", help="Also print every header metadata key (long values cut).")
    ] = False,
    json_out: JsonOption = False,
) -> None:
    """Show what a file holds: format, family, components, ranks, alphas, modules, targets, dtype, size, tokens,
    and training metadata (kohya's ss_* keys, decoded).

    Safetensors files are read from their header alone, so inspecting a multi-GB file is instant. A PNG prints its
    "parameters" text (prompt, Negative prompt, Steps/Sampler/CFG scale/Seed/Size/Model line) as A1111's PNG Info
    shows it. With --json the result is a JSON list with one object per file.
    """
    from lorax.services.inspect import InspectConfig, inspect_files

    with cli_progress() as progress:
        reports = inspect_files(InspectConfig(paths=list(files)), progress)
    if json_out:
        print_json(reports)
        return
    console = stdout_console()
    for i, report in enumerate(reports):
        if i:
            console.print()
        _render(console, report, metadata, titled=len(reports) > 1)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _join(values: list[Any]) -> str:
    return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values) or "-"


def _render(console: Any, report: Any, show_metadata: bool, titled: bool = False) -> None:
    from rich.table import Table

    if report.kind == "image":
        if titled:
            console.print(report.path, markup=False, highlight=False)
        console.print(report.parameters["text"], markup=False, highlight=False)
        return

    table = Table(show_header=False, box=None, pad_edge=False, title=report.path, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    table.add_row("kind", report.kind)
    table.add_row("format", report.format)
    table.add_row("family", report.family or "unknown")
    if report.layout:
        table.add_row("layout", report.layout)
    table.add_row("components", _join(report.components))
    if report.kind == "lora":
        table.add_row("modules", f"{report.modules} ({_join(report.algorithms)})")
        table.add_row("rank", _join(report.ranks))
        table.add_row("alpha", _join(report.alphas))
        table.add_row("targets", _join(report.targets))
        for line in report.blocks:
            table.add_row("blocks", line)
    table.add_row("dtype", _join(report.dtypes))
    table.add_row("size", f"{_size(report.size_bytes)} ({report.tensors} tensors)")
    if report.tokens:
        table.add_row(
            "tokens",
            ", ".join(
                f"{t} ({v['vectors']} × {'/'.join(str(d) for d in v['dims'].values())})"
                for t, v in report.tokens.items()
            ),
        )
    lorax_meta = {k: v for k, v in report.metadata.items() if k.startswith("lorax_")}
    if "lorax_version" in lorax_meta:
        table.add_row("written by", f"lorax {lorax_meta['lorax_version']}")
    for key, value in report.training.items():
        text = value if isinstance(value, str) else _short(value)
        table.add_row(f"training.{key}", text)
    if show_metadata:
        for key, value in report.metadata.items():
            table.add_row(f"meta.{key}", value if len(value) <= 200 else value[:200] + " …")
    console.print(table)


def _short(value: Any) -> str:
    import json

    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 160 else text[:160] + " …"


def register(app: typer.Typer) -> None:
    app.command(name="inspect")(inspect_command)
