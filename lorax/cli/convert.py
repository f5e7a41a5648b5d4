"""``lorax convert``: LoRAs, embeddings and model layouts between formats."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorax.cli.common import (
    ForceOption,
    JsonOption,
    config_from_option,
    dtype_option,
    model_option,
    path_then_console,
    print_lines,
    run_and_report,
    to_option,
)
from lorax.cli.common import config_from as build_config  # --config-from takes the name


def convert_command(
    input: Annotated[
        str,
        typer.Argument(
            help="A LoRA or embedding file, or a model: diffusers folder, single file (.safetensors, .ckpt), "
            "Hub id or built-in name."
        ),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the result.")],
    to: Annotated[
        str | None,
        to_option(
            "LoRA: kohya, diffusers, bfl (Flux only) or lora_diffusion (default: the input's). Embedding: a1111, sdxl-embedding "
            "or diffusers (default: from OUT's name). Model: diffusers or single-file (default: single-file when OUT "
            "ends in .safetensors)."
        ),
    ] = None,
    dtype: Annotated[str | None, dtype_option("the input's")] = None,
    rank: Annotated[
        int | None,
        typer.Option(help="LoRA only: resize every module to this rank by SVD, reporting the kept energy."),
    ] = None,
    config_from: Annotated[
        str | None,
        config_from_option(
            "Single file → diffusers for a file lorax did not write: a diffusers folder (or Hub id in the "
            "local cache) of the same family to take configs and tokenizer from."
        ),
    ] = None,
    model: Annotated[
        str | None,
        model_option(
            "LoRA only: the model it belongs to (built-in name such as shapes, diffusers folder, Hub id in the "
            "cache, or single file). Resolves names exactly and gives lora_diffusion files their module order; "
            "needed for lora_diffusion with any model but full-size SD1/SD2/SDXL. Only its configs are read.",
            show_default=False,
        ),
    ] = None,
    force: ForceOption = False,
    json_out: JsonOption = False,
) -> None:
    """Convert a LoRA between formats (optionally resized by SVD), an embedding between A1111 and diffusers, or a
    model between a diffusers folder and a single-file checkpoint (SD1, SD2; .ckpt → .safetensors too).

    Model conversions stream tensor by tensor and are exact: single file → diffusers → single file gives back every
    tensor bit for bit. A LoRA with bundled token embeddings (lorax pivot) converted to diffusers gets its tokens
    written beside it, one file per token: OUT_STEM.TOKEN.safetensors.

    Example: lorax convert lora.safetensors --to diffusers -o pytorch_lora_weights.safetensors

    Example: lorax convert pivot.safetensors --to lora_diffusion --model shapes -o pivot.ld.safetensors
    """
    flags = dict(locals())
    from lorax.services.convert import ConvertConfig, convert

    config = build_config(ConvertConfig, flags)
    run_and_report(lambda progress: convert(config, progress), json_out=json_out, render=render)


def render(result: Any) -> None:
    console = path_then_console(result.output, *result.embedding_files.values())
    if console is None:
        return
    lines = [
        f"{result.kind}: {result.input_format} → {result.output_format}",
        f"output: {result.output}",
    ]
    lines += [f"embedding: {path}   token: {token}" for token, path in result.embedding_files.items()]
    if result.kind == "model":
        lines.append(f"family: {result.family}   tensors: {result.tensors}   time: {result.seconds:.2f} s")
    elif result.kind == "lora":
        lines.append(f"modules: {result.modules}   family: {result.family or 'unknown'}")
        if result.model:
            lines.append(f"model: {result.model}")
    if result.tokens:
        lines.append("tokens: " + ", ".join(result.tokens))
    print_lines(console, *lines)
    if result.resized:
        from rich.table import Table

        table = Table(title=f"SVD resize to rank {result.rank}: the 5 modules that kept the least energy")
        for col in ("module", "rank", "kept energy", "rel. error"):
            table.add_column(col, justify="left" if col == "module" else "right")
        for r in sorted(result.resized, key=lambda r: r.energy)[:5]:
            table.add_row(r.module, f"{r.rank_in}→{r.rank_out}", f"{r.energy:.4f}", f"{r.error:.4f}")
        console.print(table)
        print_lines(console, f"mean kept energy: {result.mean_energy:.4f}")


def register(app: typer.Typer) -> None:
    app.command(name="convert")(convert_command)
