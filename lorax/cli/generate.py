"""``lorax generate``: images with any number of LoRAs and learned tokens (options only; the work is in the service)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from lorax.cli.common import ForceOption, JsonOption, cli_progress, model_option, option
from lorax.cli.common import config_from as config_of  # `config_from` is also --config-from's parameter
from lorax.errors import InputError


def generate(
    prompt: Annotated[
        str | None,
        typer.Argument(
            help="The prompt; A1111's <lora:NAME:WEIGHT> (or <lora:NAME:TE_WEIGHT:UNET_WEIGHT>) tags apply "
            "LoRA files from --lora-dir. `-` reads prompts from stdin, one per line.",
            show_default=False,
        ),
    ] = None,
    model: Annotated[
        str,
        model_option("Built-in name (shapes), diffusers folder, Hub id in the cache, or single file."),
    ] = "shapes",
    config_from: Annotated[
        str | None,
        option(
            "--config-from",
            help="With a single file that holds only part of a pipeline (Flux's BFL transformer file, as "
            "ComfyUI users keep it): a diffusers folder (or Hub id in the local cache) of the same family to take "
            "the other parts and their configs from (VAE, text encoders, tokenizers, scheduler).",
        ),
    ] = None,
    lora: Annotated[
        list[str] | None,
        option(
            "--lora",
            "-l",
            help="A LoRA in any format lorax reads, as FILE, FILE:SCALE or FILE:SCALE:TEXT_SCALE. Repeat for more.",
        ),
    ] = None,
    lora_dir: Annotated[
        Path | None,
        option(
            "--lora-dir",
            help="Where <lora:NAME:…> prompt tags find NAME.safetensors (sub-folders too; default: the "
            "current folder).",
        ),
    ] = None,
    text_scale: Annotated[
        float | None,
        option(
            "--text-scale",
            help="Text-encoder scale for every LoRA without its own (default: the LoRA's UNet scale).",
        ),
    ] = None,
    blocks: Annotated[
        str | None,
        option(
            "--blocks",
            help="UNet block weights for every LoRA, e.g. down=0.5,mid=1,up=1 (down.N / up.N for one block).",
        ),
    ] = None,
    embedding: Annotated[
        list[Path] | None,
        option(
            "--embedding",
            "-e",
            help="Learned tokens (A1111, diffusers or SDXL embedding, or a LoRA bundling tokens). Repeatable.",
        ),
    ] = None,
    prompts_file: Annotated[
        str | None,
        option(
            "--prompts",
            help="A file of prompts, one per line (`-` for stdin; # comments).",
        ),
    ] = None,
    count: Annotated[
        int, typer.Option("-n", "--count", help="Images per prompt (seeds SEED, SEED+1, …).")
    ] = 1,
    seed: Annotated[
        int | None, typer.Option("--seed", "-s", help="First seed (default: random, recorded in each PNG).")
    ] = None,
    steps: Annotated[
        int | None,
        option(
            "--steps",
            help="Denoising steps (default: the model's; 20 for most; Flux: 28 dev, 4 schnell).",
        ),
    ] = None,
    clip_skip: Annotated[
        int | None,
        option(
            "--clip-skip",
            help="Condition on the N-th text-encoder layer from the end (A1111's and kohya's clip skip: 2 is the "
            "penultimate; SD1/SD2). Default: the LoRA's ss_clip_skip, else 1.",
        ),
    ] = None,
    guidance: Annotated[
        float | None,
        option(
            "--guidance",
            "-g",
            help="Classifier-free guidance scale (default: the model's; 7.5 for most, 5 for shapes). Flux dev: "
            "its distilled guidance (default 3.5); schnell has none and ignores it.",
        ),
    ] = None,
    max_sequence_length: Annotated[
        int | None,
        option(
            "--max-sequence-length",
            help="Flux: how many T5 tokens of the prompt are read, 1..512 (default: 512 dev, 256 schnell).",
        ),
    ] = None,
    negative: Annotated[str, typer.Option("--negative", help="Negative prompt.")] = "",
    scheduler: Annotated[
        str | None,
        option(
            "--scheduler",
            help="Sampler: ddim, pndm, euler, euler-a, heun, dpm++2m, dpm++2m-karras, unipc, ddpm "
            "(default: the model's own).",
        ),
    ] = None,
    size: Annotated[
        str | None,
        option(
            "--size",
            help="WIDTHxHEIGHT, multiples of 8 (default: the model's native size).",
        ),
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the PNGs.")] = Path(
        "lorax-images"
    ),
    init_image: Annotated[
        Path | None, typer.Option("--init-image", help="img2img: start from this image.", show_default=False)
    ] = None,
    mask_image: Annotated[
        Path | None,
        option(
            "--mask-image",
            help="Inpainting, with --init-image: repaint where this mask is white (inpainting checkpoints and "
            "ordinary models alike).",
        ),
    ] = None,
    strength: Annotated[
        float, typer.Option("--strength", help="img2img: how much of the init image to repaint, in (0, 1].")
    ] = 0.75,
    sweep_scale: Annotated[
        str | None,
        option(
            "--sweep-scale",
            help="Generate once per scale factor, e.g. 0,0.25,0.5,0.75,1 (same seeds), plus one labelled sheet per "
            "prompt (a column per scale, a row per seed, the prompt on top).",
        ),
    ] = None,
    grid: Annotated[
        bool,
        typer.Option(
            "--grid",
            help="Also write a contact sheet of each prompt's batch (with --sweep-scale: of each scale's).",
        ),
    ] = False,
    xy: Annotated[
        list[str] | None,
        option(
            "--xy",
            help="An X/Y plot axis, KIND=V1,V2,… (A1111's X/Y plot): the first --xy gives the columns, a second the "
            "rows. KIND: prompt (search/replace: the first value is searched for, each value replaces it), scale "
            "(times every --lora's strength), lora (one LoRA per value: a name in --lora-dir or a path; none for "
            "the model alone), seed, steps, guidance. Writes one labelled PNG per prompt.",
        ),
    ] = None,
    scale_schedule: Annotated[
        str | None,
        option(
            "--scale-schedule",
            help="Vary the LoRAs' UNet scale over the steps: linear:A:B, cosine:A:B, step:F[:A:B] or a list A,B,….",
        ),
    ] = None,
    fuse: Annotated[bool, typer.Option("--fuse", help="Merge the LoRAs into the weights for speed.")] = False,
    device: Annotated[
        str, typer.Option("--device", help="auto, cuda (or gpu), mps or cpu; cuda without a GPU is an error.")
    ] = "auto",
    dtype: Annotated[
        str, typer.Option("--dtype", help="auto (fp16 on GPUs, fp32 on CPU), fp16, bf16 or fp32.")
    ] = "auto",
    force: ForceOption = False,
    json_out: JsonOption = False,
) -> None:
    """Generate images with any number of LoRAs and learned tokens applied (no file is changed).

    Each PNG records how it was made in a "parameters" text chunk (AUTOMATIC1111's convention) and its path is printed on stdout (with --json, one JSON object per image). Files are named PROMPT-SEED.png and are never overwritten without --force.

    Example: lorax generate "a red circle on a white background" --lora red.safetensors:0.8 -n 4 --seed 1 --grid

    X/Y plot: lorax generate "a red circle on a white background" --lora red.safetensors --xy scale=0,0.5,1 --xy prompt=circle,square --seed 1
    """
    flags = dict(locals())
    from lorax.adapters.apply import parse_blocks
    from lorax.cli.common import to_json
    from lorax.gen.xy import parse_xy
    from lorax.services.generate import (
        GenerateConfig,
        GeneratedImage,
        parse_lora_arg,
        parse_scales,
        parse_size,
        read_prompts,
    )
    from lorax.services.generate import (
        generate as run_generate,
    )

    prompts: list[str] = []
    if prompt == "-" or prompts_file == "-":
        prompts += read_prompts(sys.stdin.read())
    if prompt is not None and prompt != "-":
        prompts.append(prompt)
    if prompts_file is not None and prompts_file != "-":
        path = Path(prompts_file)
        try:
            prompts += read_prompts(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"cannot read the prompts file ({err.__class__.__name__})", path=path) from None

    config = config_of(
        GenerateConfig,
        flags,
        prompts=prompts,
        loras=[parse_lora_arg(v) for v in lora or []],
        embeddings=list(embedding or []),
        n=count,
        size=parse_size(size) if size is not None else None,
        out_dir=output,
        sweep=parse_scales(sweep_scale) if sweep_scale is not None else None,
        schedule=scale_schedule,
        blocks=parse_blocks(blocks) if blocks is not None else None,
        xy=[parse_xy(v) for v in xy or []],
    )

    def show(image: GeneratedImage) -> None:
        if json_out:
            record = {
                "path": str(image.path),
                "kind": image.kind,
                "prompt": image.prompt,
                "seed": image.seed,
                "scale": image.scale,
                "width": image.width,
                "height": image.height,
            }
            sys.stdout.write(to_json(record) + "\n")
        else:
            sys.stdout.write(f"{image.path}\n")
        sys.stdout.flush()

    with cli_progress() as progress:
        result = run_generate(config, progress, on_image=show)
        progress.log(
            f"{len(result.images)} file(s) in {result.seconds:.1f} s "
            f"({result.seconds_per_image:.2f} s per image on {result.device}, {result.dtype})"
        )


def register(app: typer.Typer) -> None:
    app.command(name="generate")(generate)
