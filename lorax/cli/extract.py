"""``lorax extract``: a LoRA from the difference of two models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorax.cli.common import ForceOption, JsonOption, dtype_option, run_and_report, table_report, to_option


def extract_command(
    base: Annotated[
        str, typer.Argument(help="The original model (diffusers folder, single file, Hub id, built-in).")
    ],
    tuned: Annotated[str, typer.Argument(help="The fine-tuned model of the same family.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the extracted LoRA.")],
    rank: Annotated[int, typer.Option(help="Rank of every extracted module.")] = 4,
    targets: Annotated[
        str,
        typer.Option(
            help="attn (attention projections), attn-ff (plus feed-forward) or all (every linear and conv)."
        ),
    ] = "attn",
    clamp_quantile: Annotated[
        float | None,
        typer.Option(
            "--clamp-quantile",
            help="Clamp up and down at this quantile of their absolute values, as the seed's lora_distill did "
            "(it used 0.99; default: no clamp, the exact truncated SVD).",
        ),
    ] = None,
    to: Annotated[str, to_option("Output format: kohya, diffusers or lora_diffusion.")] = "kohya",
    dtype: Annotated[str | None, dtype_option("fp32")] = None,
    force: ForceOption = False,
    json_out: JsonOption = False,
) -> None:
    """Extract a LoRA from TUNED - BASE by truncated SVD of every targeted weight's difference (up = U*S, down = Vh).

    Reports the energy each module keeps; unchanged weights are skipped.

    Example: lorax extract v1-5.safetensors finetuned.safetensors -o extracted.safetensors --rank 16 --targets attn-ff
    """
    from lorax.services.extract import ExtractConfig, extract

    config = ExtractConfig(base, tuned, output, rank, targets, clamp_quantile, to, dtype, force)
    run_and_report(lambda progress: extract(config, progress), json_out=json_out, render=render)


def render(result: Any) -> None:
    title = f"extracted → {result.output} ({result.format}, {result.family}, rank {result.rank})"
    least = sorted(result.extracted, key=lambda m: m.energy)[:5]
    table_report(
        result.output,
        title,
        ("module", "kept energy", "rel. error"),
        ("module",),
        [(m.module, f"{m.energy:.4f}", f"{m.error:.4f}") for m in least],
        f"modules: {result.modules}   unchanged (skipped): {result.unchanged}   "
        f"mean kept energy: {result.mean_energy:.4f}   time: {result.seconds:.2f} s",
    )


def register(app: typer.Typer) -> None:
    app.command(name="extract")(extract_command)
