"""``lorax prepare``: raw pictures → a training folder (options only; the work is in the service)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorax.cli.common import JsonOption, config_from, model_option, option, run_and_report, stderr_console


def prepare_command(
    raw_dir: Annotated[
        Path, typer.Argument(help="Folder of raw pictures (any size; .txt captions and NAME.mask.png kept).")
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The training folder to write (a new folder).")
    ],
    size: Annotated[
        str | None,
        option(
            "--size",
            help="Training size, N or WIDTHxHEIGHT, multiples of 8 (default: --model's training resolution, "
            "else 512).",
        ),
    ] = None,
    model: Annotated[
        str | None,
        model_option(
            "Take the default --size from this model's lorax.json (e.g. shapes).", show_default=False
        ),
    ] = None,
    buckets: Annotated[
        bool,
        typer.Option(
            "--buckets", help="Crop each image to its nearest aspect-ratio bucket of --size's area instead."
        ),
    ] = False,
    crop: Annotated[
        str,
        typer.Option(
            "--crop",
            help="center, subject (centred on the mask's bounding box) or none (resize only, aspect kept).",
        ),
    ] = "center",
    dedupe_distance: Annotated[
        int,
        typer.Option(
            "--dedupe-distance",
            help="Drop an image whose 64-bit perceptual hash is within this many bits of a kept one (-1: only "
            "exact duplicates).",
        ),
    ] = 4,
    upscaler: Annotated[
        str | None,
        typer.Option(
            "--upscaler",
            help="A Swin2SR super-resolution model (transformers), a folder or a Hub id in the local cache, for "
            "images smaller than the training size (default: Lanczos).",
            show_default=False,
        ),
    ] = None,
    captioner: Annotated[
        str | None,
        option(
            "--captioner",
            help="A transformers image-to-text model (BLIP, BLIP-2, GIT, Florence-2 …), a folder or a Hub id "
            "in the local cache, for images without a caption.",
        ),
    ] = None,
    caption_prompt: Annotated[
        str | None,
        option(
            "--caption-prompt",
            help="Text the captioner continues (BLIP: 'a photography of'; Florence-2: '<CAPTION>').",
        ),
    ] = None,
    prefix: Annotated[
        str,
        typer.Option(
            "--prefix", help='Put before every new caption, e.g. "sks dog, " (alone without --captioner).'
        ),
    ] = "",
    masker: Annotated[
        str,
        typer.Option(
            "--masker",
            help="border (offline: foreground from the border's colours), clipseg (with --mask-prompt), face "
            "(OpenCV's Haar cascade) or none.",
        ),
    ] = "border",
    mask_prompt: Annotated[
        str | None,
        typer.Option("--mask-prompt", help='What CLIPSeg masks, e.g. "a dog".', show_default=False),
    ] = None,
    mask_model: Annotated[
        str | None,
        option(
            "--mask-model",
            help="The CLIPSeg model, a folder or a Hub id in the cache (default CIDAS/clipseg-rd64-refined).",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Do everything but write: show what would be written.")
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            "-f",
            help="Replace an existing output folder; with --captioner, recaption images that have a caption; "
            "recompute raw masks.",
        ),
    ] = False,
    json_out: JsonOption = False,
) -> None:
    """Turn a folder of raw pictures into a training folder that train, invert and pivot read as it is.

    Each kept image is written as NAME.png at the training size (centre or subject crop; small images are upscaled
    by --upscaler, else with Lanczos), with NAME.txt (its caption) and NAME.mask.png (white = subject; pass
    --mask-dir DATA_DIR to invert or pivot to weight the loss by it). Unreadable files and duplicates (same pixels, or a perceptual hash
    within --dedupe-distance bits) are dropped and listed. A summary table goes to stderr; the output folder (or,
    with --json, the full report) to stdout.

    Example: lorax prepare ./photos -o ./data --model shapes --prefix "a sks shape, " --crop subject
    """
    flags = dict(locals())
    from lorax.gen.config import parse_size
    from lorax.services.prepare import PrepareConfig, prepare_folder

    config = config_from(PrepareConfig, flags, size=parse_size(size) if size is not None else None)
    run_and_report(
        lambda progress: prepare_folder(config, progress),
        json_out=json_out,
        summary=_summary,
        as_json=lambda result: result.as_dict(),
        render=None if dry_run else lambda result: typer.echo(str(result.output)),
    )


def _summary(result) -> None:  # type: ignore[no-untyped-def]
    from rich.table import Table

    console = stderr_console()
    title = f"{'would write' if result.dry_run else 'wrote'} {result.output} ({result.target[0]}x{result.target[1]}"
    title += ", buckets)" if result.buckets else ")"
    table = Table(title=title, title_justify="left")
    for column in ("image", "from", "size", "caption", "mask"):
        table.add_column(column, overflow="fold")
    for image in result.images:
        size = f"{image.source_size[0]}x{image.source_size[1]} → {image.size[0]}x{image.size[1]}"
        if image.upscaled:
            size += f" (upscaled: {image.upscaled_by})"
        caption = f"{image.caption_from}: {image.caption}" if image.caption else image.caption_from
        mask = f"{image.mask_from} {image.mask_coverage:.0%}" if image.mask_from else "-"
        table.add_row(image.name, image.source.name, size, caption, mask)
    for dropped in result.dropped:
        table.add_row("-", dropped.source.name, f"dropped: {dropped.reason}", dropped.detail, "-")
    console.print(table, markup=False, highlight=False)
    counts = ", ".join(f"{v} {k}" for k, v in result.counts.items())
    console.print(counts, markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    app.command(name="prepare")(prepare_command)
