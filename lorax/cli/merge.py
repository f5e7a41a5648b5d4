"""``lorax merge``: fold LoRAs into a model checkpoint, or merge LoRAs with each other."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorax.cli.common import (
    ForceOption,
    JsonOption,
    config_from_option,
    dtype_option,
    path_then_console,
    print_lines,
    run_and_report,
    to_option,
)
from lorax.cli.common import config_from as build_config  # --config-from takes the name


def merge_command(
    base: Annotated[
        str,
        typer.Argument(
            help="The model: a diffusers folder, a Hub id, a built-in name (shapes), or a single-file checkpoint "
            "(.safetensors, .ckpt). A LoRA file here merges LoRAs with each other."
        ),
    ],
    loras: Annotated[
        list[str],
        typer.Argument(
            help="LoRA files in any format lorax reads, each optionally FILE:SCALE (style.safetensors:0.8)."
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the merged model or LoRA.")],
    alpha: Annotated[
        float | None,
        typer.Option(
            "--scale",
            "--alpha",
            help="Strength for LoRAs without their own :SCALE (0 = base, 1 = fully added; default 1). "
            "LoRA+LoRA: BASE's weight (default 0.5), the other gets 1 - scale.",
        ),
    ] = None,
    alpha_text: Annotated[
        float | None,
        typer.Option(
            "--text-scale",
            "--alpha-text",
            help="Strength for the text encoder(s) (default: the LoRA's scale).",
        ),
    ] = None,
    to: Annotated[
        str | None,
        to_option(
            "Output layout: diffusers or single-file for models (default: OUTPUT's name decides, as in "
            "convert: OUT.safetensors one file, OUT or OUT/ a folder); kohya, diffusers, "
            "bfl (Flux) or lora_diffusion for LoRA+LoRA (default: BASE's format)."
        ),
    ] = None,
    dtype: Annotated[str | None, dtype_option("BASE's")] = None,
    rank: Annotated[
        int | None,
        typer.Option(help="LoRA+LoRA: compress the result to this rank by SVD (reports the kept energy)."),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            help="LoRA+LoRA: concat (exact, ranks add up), seed-blend (the seed's lpl: up and down blended "
            "separately) or seed-join (the seed's ljl: concat, tokens renamed <s{i}-{j}>). Default: concat."
        ),
    ] = None,
    allow_unmatched: Annotated[
        bool,
        typer.Option(
            "--allow-unmatched", help="Merge what matches and count LoRA modules that match no weight."
        ),
    ] = False,
    config_from: Annotated[
        str | None,
        config_from_option(
            "With --to diffusers from a single file lorax did not write: a diffusers folder of the same family "
            "to take configs and tokenizer from."
        ),
    ] = None,
    force: ForceOption = False,
    json_out: JsonOption = False,
) -> None:
    """Merge LoRAs into a model: W' = W0 + scale * (lora_alpha / r) * up @ down for every targeted weight.

    Single files stream: untouched tensors are copied byte for byte, merged ones computed one at a time, so memory
    stays bounded whatever the checkpoint's size. Token embeddings in a LoRA go into a diffusers output's tokenizer
    and text encoder, or beside a single-file output as A1111 embeddings.

    Example: lorax merge base.safetensors style.safetensors:0.8 -o merged.safetensors
    """
    flags = dict(locals())
    from lorax.services.merge import MergeConfig, merge

    config = build_config(MergeConfig, flags, loras=list(loras))
    run_and_report(lambda progress: merge(config, progress), json_out=json_out, render=render)


def render(result: Any) -> None:
    from rich.table import Table

    table = Table(title=f"merged → {result.output}", show_header=True)
    table.add_column("LoRA")
    table.add_column("format")
    table.add_column("scale", justify="right")
    table.add_column("text scale", justify="right")
    table.add_column("modules", justify="right")
    table.add_column("matched", justify="right")
    for lora in result.loras:
        table.add_row(
            lora.path,
            lora.format,
            f"{lora.alpha:g}",
            f"{lora.alpha_text:g}",
            str(lora.modules),
            str(lora.matched),
        )
    console = path_then_console(result.output, *result.embedding_files)
    if console is None:
        return
    console.print(table)
    lines = [
        f"output: {result.output} ({result.kind}, {result.family or 'unknown family'}, {_size(result.output_bytes)})",
        f"modules merged: {result.modules_merged}   unmatched: {len(result.unmatched)}   "
        f"tensors merged/copied: {result.tensors_merged}/{result.tensors_copied}   time: {result.seconds:.2f} s",
    ]
    if result.worst_energy is not None:
        lines.append(f"SVD kept energy: worst {result.worst_energy:.4f}, mean {result.mean_energy:.4f}")
    if result.embeddings:
        lines.append("tokens: " + ", ".join(result.embeddings))
    for path in result.embedding_files:
        lines.append(f"embedding written beside the output: {path}")
    print_lines(console, *lines)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{n} B"
        value /= 1024
    return f"{n} B"


def register(app: typer.Typer) -> None:
    app.command(name="merge")(merge_command)
