"""``lorax mix``: the weighted sum of several LoRAs as one LoRA."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorax.cli.common import ForceOption, JsonOption, run_and_report, table_report, to_option


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
        to_option("Output format: kohya, diffusers, bfl (Flux) or lora_diffusion (default: the first's)."),
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
    run_and_report(lambda progress: mix(config, progress), json_out=json_out, render=render)


def render(result: Any) -> None:
    mode = "exact (ranks concatenated)" if result.exact else f"SVD to rank {result.rank}"
    lines = [
        f"modules: {result.modules}   {mode}   output ranks: {','.join(map(str, result.ranks))}   "
        f"time: {result.seconds:.2f} s"
    ]
    if result.errors:
        lines.append(
            f"mean kept energy {result.mean_energy:.4f}; worst relative error {result.worst.error:.4f} "
            f"({result.worst.module})"
        )
    table_report(
        result.output,
        f"mixed → {result.output} ({result.format})",
        ("LoRA", "format", "weight", "modules", "ranks"),
        ("LoRA", "format"),
        [
            (i.path, i.format, f"{i.weight:g}", str(i.modules), ",".join(map(str, i.ranks)))
            for i in result.inputs
        ],
        *lines,
    )


def register(app: typer.Typer) -> None:
    app.command(name="mix")(mix_command)
