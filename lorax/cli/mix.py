"""``lorax mix``: the weighted sum of several LoRAs as one LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorax.cli.app import STATE
from lorax.cli.common import (
    ForceOption,
    JsonOption,
    cli_progress,
    print_json,
    stderr_console,
    stdout_console,
)


def mix_command(
    loras: Annotated[
        list[str] | None,
        typer.Argument(
            help="LoRA files in any format lorax reads, each optionally FILE:WEIGHT (default weight 1)."
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Where to write the mixed LoRA (or `output` in the recipe)."),
    ] = None,
    rank: Annotated[
        int | None,
        typer.Option(
            help="Compress to this rank by SVD and report each module's error (default: exact, ranks add up)."
        ),
    ] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(
            help="A TOML recipe: [[lora]] entries with path and weight; optional output, rank, format."
        ),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="Output format: kohya, diffusers, bfl (Flux) or lora_diffusion (default: the first's).",
        ),
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="Output precision: fp16, bf16 or fp32.")] = None,
    force: ForceOption = False,
    json_out: JsonOption = False,
) -> None:
    """Mix LoRAs: one LoRA whose delta is the weighted sum of theirs, sum_i w_i * (alpha_i / r_i) * up_i @ down_i.

    Any formats, ranks, alphas and components mix. Without --rank the result is exact (ranks concatenated); with
    --rank it is the best rank-R approximation of the sum, with each module's kept energy and relative error reported.

    Example: lorax mix style.safetensors:0.7 subject.safetensors:1.0 -o mixed.safetensors --rank 16
    """
    from lorax.services.mix import MixConfig, mix

    config = MixConfig(list(loras or []), output, rank, recipe, to, dtype, force)
    with cli_progress() as progress:
        result = mix(config, progress)
    if json_out:
        print_json(result)
        return
    render(result)


def render(result: Any) -> None:
    from rich.table import Table

    stdout_console().print(str(result.output), markup=False, highlight=False)
    if STATE.quiet:
        return
    console = stderr_console()  # the output's path alone on stdout; the table for people on stderr
    table = Table(title=f"mixed → {result.output} ({result.format})")
    for col in ("LoRA", "format", "weight", "modules", "ranks"):
        table.add_column(col, justify="left" if col in ("LoRA", "format") else "right")
    for i in result.inputs:
        table.add_row(i.path, i.format, f"{i.weight:g}", str(i.modules), ",".join(map(str, i.ranks)))
    console.print(table)
    mode = "exact (ranks concatenated)" if result.exact else f"SVD to rank {result.rank}"
    console.print(
        f"modules: {result.modules}   {mode}   output ranks: {','.join(map(str, result.ranks))}   "
        f"time: {result.seconds:.2f} s",
        markup=False,
        highlight=False,
    )
    if result.errors:
        console.print(
            f"mean kept energy {result.mean_energy:.4f}; worst relative error {result.worst.error:.4f} "
            f"({result.worst.module})",
            markup=False,
            highlight=False,
        )


def register(app: typer.Typer) -> None:
    app.command(name="mix")(mix_command)
