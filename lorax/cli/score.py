"""``lorax score``: CLIP text / image alignment of images, or of a LoRA over scales (options only)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorax.cli.common import (
    ForceOption,
    JsonOption,
    config_from,
    model_option,
    option,
    run_and_report,
    stderr_console,
)


def score_command(
    images: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Images or folders of images (e.g. lorax generate's output).", show_default=False
        ),
    ] = None,
    prompt: Annotated[
        str | None,
        option(
            "--prompt",
            "-p",
            help="The text to align with (default: each PNG's recorded prompt, <lora:…> tags removed).",
        ),
    ] = None,
    reference: Annotated[
        Path | None,
        option(
            "--reference",
            "-r",
            help="A folder of reference images (the training data) for image alignment.",
        ),
    ] = None,
    clip: Annotated[
        str, typer.Option("--clip", help="The CLIP model: a folder, or a Hub id in the local cache.")
    ] = "openai/clip-vit-base-patch32",
    shapes: Annotated[
        bool | None,
        option(
            "--shapes/--no-shapes",
            help="Also the shapes world's colour/shape/background scores (default: when the images come from "
            "the built-in shapes model).",
        ),
    ] = None,
    sweep: Annotated[
        Path | None,
        option(
            "--sweep",
            help="A LoRA: generate with it at each of --scales, score each scale, plot both alignments.",
        ),
    ] = None,
    model: Annotated[str, model_option("The model --sweep generates with.")] = "shapes",
    scales: Annotated[
        str, typer.Option("--scales", help="--sweep's LoRA scales, comma-separated.")
    ] = "0,0.25,0.5,0.75,1",
    count: Annotated[int, typer.Option("-n", "--count", help="--sweep's images per scale.")] = 4,
    seed: Annotated[int, typer.Option("--seed", "-s", help="--sweep's first seed.")] = 0,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="--sweep's folder for the images and the plot.")
    ] = Path("lorax-score"),
    force: ForceOption = False,
    json_out: JsonOption = False,
) -> None:
    """Score images by CLIP: text alignment (cosine of image and prompt embeddings) and image alignment (mean
    cosine to the --reference images), per image and on average.

    On images from the built-in shapes model it adds the shapes world's scores: does each image show the colour,
    shape and background its prompt asks for. The table goes to stderr. stdout gets the means (with --sweep, the
    plot's path), or with --json the full report.

    Example: lorax score --sweep sks.safetensors --prompt "a sks circle" --reference ./data --clip ./clip
    """
    flags = dict(locals())
    from lorax.gen.config import parse_scales
    from lorax.services.score import ScoreConfig
    from lorax.services.score import score as run_score

    config = config_from(
        ScoreConfig,
        flags,
        images=list(images or []),
        scales=parse_scales(scales) if sweep is not None else [],
        n=count,
        out_dir=output,
    )
    run_and_report(
        lambda progress: run_score(config, progress), json_out=json_out, summary=_table, render=_show
    )


def _show(result) -> None:  # type: ignore[no-untyped-def]
    """The plot's path on stdout, else the mean scores."""
    typer.echo(str(result.plot) if result.plot is not None else _means(result.mean))


def _f(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _means(summary) -> str:  # type: ignore[no-untyped-def]
    parts = [f"n {summary.n}", f"text_alignment {_f(summary.text_alignment)}"]
    parts.append(f"image_alignment {_f(summary.image_alignment)}")
    for key, value in (summary.shapes or {}).items():
        parts.append(f"{key} {_f(value)}")
    return "  ".join(parts)


def _table(result) -> None:  # type: ignore[no-untyped-def]
    from rich.table import Table

    console = stderr_console()
    with_shapes = any(row.shapes for row in result.images)
    if result.sweep is not None:
        table = Table(title=f"{result.clip}: alignment against LoRA scale", title_justify="left")
        for column in ("scale", "n", "text alignment", "image alignment"):
            table.add_column(column, justify="right")
        if with_shapes:
            for column in ("colour", "shape", "background"):
                table.add_column(column, justify="right")
        for point in result.sweep:
            s = point.summary
            row = [f"{point.scale:g}", str(s.n), _f(s.text_alignment), _f(s.image_alignment)]
            if with_shapes:
                row += [_f((s.shapes or {}).get(k)) for k in ("colour", "shape", "background")]
            table.add_row(*row)
        console.print(table, markup=False, highlight=False)
        return
    table = Table(title=f"{result.clip}", title_justify="left")
    for column in ("image", "prompt", "text alignment", "image alignment"):
        table.add_column(column, overflow="fold")
    if with_shapes:
        table.add_column("shapes (seen)")
    for row in result.images:
        cells = [str(row.path), row.prompt or "-", _f(row.text_alignment), _f(row.image_alignment)]
        if with_shapes:
            seen = (row.shapes or {}).get("seen", {})
            cells.append(" ".join(str(seen.get(k, "-")) for k in ("colour", "shape", "background")))
        table.add_row(*cells)
    m = result.mean
    mean = ["mean", "", _f(m.text_alignment), _f(m.image_alignment)]
    if with_shapes:
        mean.append(" ".join(f"{k} {_f(v)}" for k, v in (m.shapes or {}).items()))
    table.add_row(*mean)
    console.print(table, markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command(name="score")(score_command)
