"""``lorax train``: LoRA fine-tuning and DreamBooth on a folder of images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorax.cli.common import ForceOption, JsonOption, cli_progress, print_json, stdout_console

DATA, PRIOR, LORA, OPTIM, SPEED, DURING, OUT = (
    "Data",
    "Prior preservation (DreamBooth)",
    "LoRA",
    "Optimisation",
    "Memory and speed",
    "During training",
    "Output",
)


def train_command(
    ctx: typer.Context,
    data_dir: Annotated[
        Path | None,
        typer.Argument(
            help="Folder of training images; captions from <image>.txt beside each image or metadata.jsonl, "
            "else --instance-prompt. May come from --config instead.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="The LoRA file to write (.safetensors).", rich_help_panel=OUT),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="A TOML file with the same keys as these flags (flags given here win)."
        ),
    ] = None,
    model: Annotated[
        str,
        typer.Option(help="Base model: shapes (built in), a diffusers folder, a Hub id or a single file."),
    ] = "shapes",
    format: Annotated[
        str,
        typer.Option(
            "--format", help="Output format: kohya (A1111/ComfyUI) or diffusers.", rich_help_panel=OUT
        ),
    ] = "kohya",
    instance_prompt: Annotated[
        str | None,
        typer.Option(help="Caption for images without their own, e.g. 'a sks star'.", rich_help_panel=DATA),
    ] = None,
    template: Annotated[
        str | None,
        typer.Option(
            help="Wrap each caption in a random template: object ('a photo of a {}') or style.",
            rich_help_panel=DATA,
        ),
    ] = None,
    resolution: Annotated[
        int | None,
        typer.Option(
            help="Training size in pixels, a multiple of 8 (default: the model's).", rich_help_panel=DATA
        ),
    ] = None,
    random_crop: Annotated[
        bool, typer.Option("--random-crop", help="Random instead of centre crops.", rich_help_panel=DATA)
    ] = False,
    flip: Annotated[
        bool, typer.Option("--flip", help="Random horizontal flips.", rich_help_panel=DATA)
    ] = False,
    buckets: Annotated[
        bool,
        typer.Option(
            "--buckets", help="Aspect-ratio bucketing: keep each image's shape.", rich_help_panel=DATA
        ),
    ] = False,
    repeats: Annotated[
        int, typer.Option(help="Times each image appears per epoch.", rich_help_panel=DATA)
    ] = 1,
    caption_shuffle: Annotated[
        bool,
        typer.Option("--caption-shuffle", help="Shuffle comma-separated caption tags.", rich_help_panel=DATA),
    ] = False,
    keep_tokens: Annotated[
        int, typer.Option(help="Leading tags that --caption-shuffle keeps in place.", rich_help_panel=DATA)
    ] = 1,
    caption_dropout: Annotated[
        float, typer.Option(help="Probability of training on an empty caption.", rich_help_panel=DATA)
    ] = 0.0,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="Stop on an unreadable image instead of skipping it.", rich_help_panel=DATA
        ),
    ] = False,
    recursive: Annotated[
        bool, typer.Option("--recursive", help="Include images in sub-folders.", rich_help_panel=DATA)
    ] = False,
    class_prompt: Annotated[
        str | None,
        typer.Option(
            help="Turns on prior preservation with this class prompt, e.g. 'a star'.", rich_help_panel=PRIOR
        ),
    ] = None,
    class_dir: Annotated[
        Path | None,
        typer.Option(
            help="Class images folder (missing ones are generated; default: a cache folder).",
            rich_help_panel=PRIOR,
        ),
    ] = None,
    num_class_images: Annotated[
        int, typer.Option(help="Class images to use (generated if missing).", rich_help_panel=PRIOR)
    ] = 100,
    prior_weight: Annotated[
        float, typer.Option(help="Weight of the class-image loss.", rich_help_panel=PRIOR)
    ] = 1.0,
    sample_steps: Annotated[
        int, typer.Option(help="Denoising steps for class and validation images.", rich_help_panel=PRIOR)
    ] = 20,
    guidance_scale: Annotated[
        float,
        typer.Option(help="Classifier-free guidance for class and validation images.", rich_help_panel=PRIOR),
    ] = 7.5,
    rank: Annotated[int, typer.Option(help="LoRA rank.", rich_help_panel=LORA)] = 4,
    alpha: Annotated[
        float | None,
        typer.Option(help="LoRA alpha (scale alpha/rank; default: the rank).", rich_help_panel=LORA),
    ] = None,
    targets: Annotated[
        str,
        typer.Option(
            help="attn (attention projections), attn-ff (+ feed-forward), all (+ convs: LoCon), or comma-separated "
            "module globs ('*attn2.to_k,*attn2.to_v').",
            rich_help_panel=LORA,
        ),
    ] = "attn",
    train_text: Annotated[
        bool, typer.Option("--train-text", help="Train a text-encoder LoRA too.", rich_help_panel=LORA)
    ] = False,
    lora_dropout: Annotated[
        float, typer.Option(help="Dropout on the LoRA path.", rich_help_panel=LORA)
    ] = 0.0,
    dora: Annotated[
        bool, typer.Option("--dora", help="DoRA (weight-decomposed LoRA, via PEFT).", rich_help_panel=LORA)
    ] = False,
    optimizer: Annotated[
        str,
        typer.Option(help="adamw, adamw8bit (bitsandbytes) or prodigy (prodigyopt).", rich_help_panel=OPTIM),
    ] = "adamw",
    learning_rate: Annotated[
        float, typer.Option("--learning-rate", "--lr", help="UNet LoRA learning rate.", rich_help_panel=OPTIM)
    ] = 1e-4,
    text_learning_rate: Annotated[
        float | None,
        typer.Option(
            help="Text-encoder LoRA learning rate (default: --learning-rate).", rich_help_panel=OPTIM
        ),
    ] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.", rich_help_panel=OPTIM)] = 1e-2,
    lr_scheduler: Annotated[
        str, typer.Option(help="constant, linear or cosine (after --warmup-steps).", rich_help_panel=OPTIM)
    ] = "constant",
    warmup_steps: Annotated[
        int, typer.Option(help="Linear learning-rate warm-up steps.", rich_help_panel=OPTIM)
    ] = 0,
    steps: Annotated[
        int | None, typer.Option(help="Optimizer steps (default 500 unless --epochs).", rich_help_panel=OPTIM)
    ] = None,
    epochs: Annotated[
        int | None, typer.Option(help="Train for whole epochs instead.", rich_help_panel=OPTIM)
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per micro-batch.", rich_help_panel=OPTIM)] = 1,
    grad_accum: Annotated[
        int,
        typer.Option(help="Micro-batches per optimizer step (gradient accumulation).", rich_help_panel=OPTIM),
    ] = 1,
    max_grad_norm: Annotated[
        float, typer.Option(help="Gradient-norm clipping (0: off).", rich_help_panel=OPTIM)
    ] = 1.0,
    snr_gamma: Annotated[
        float | None, typer.Option(help="Min-SNR-γ loss weighting (5 is common).", rich_help_panel=OPTIM)
    ] = None,
    noise_offset: Annotated[
        float, typer.Option(help="Noise offset (e.g. 0.05).", rich_help_panel=OPTIM)
    ] = 0.0,
    prediction_type: Annotated[
        str | None,
        typer.Option(help="epsilon or v_prediction (default: the model's scheduler).", rich_help_panel=OPTIM),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of every random choice.", rich_help_panel=OPTIM)] = 0,
    mixed_precision: Annotated[
        str, typer.Option(help="no, fp16 or bf16 (through accelerate).", rich_help_panel=SPEED)
    ] = "no",
    gradient_checkpointing: Annotated[
        bool,
        typer.Option(
            "--gradient-checkpointing",
            help="Recompute activations: less memory, slower.",
            rich_help_panel=SPEED,
        ),
    ] = False,
    sdpa: Annotated[
        bool,
        typer.Option("--sdpa/--no-sdpa", help="PyTorch scaled-dot-product attention.", rich_help_panel=SPEED),
    ] = True,
    cache_latents: Annotated[
        bool,
        typer.Option(
            "--cache-latents",
            help="Encode images once; the VAE then leaves the device.",
            rich_help_panel=SPEED,
        ),
    ] = False,
    cache_text: Annotated[
        bool,
        typer.Option(
            "--cache-text/--no-cache-text",
            help="Encode each caption once while the text encoder is frozen.",
            rich_help_panel=SPEED,
        ),
    ] = True,
    device: Annotated[
        str | None,
        typer.Option(help="cpu to force the CPU (default: the accelerator's choice).", rich_help_panel=SPEED),
    ] = None,
    checkpoint_every: Annotated[
        int,
        typer.Option(help="Save a resumable checkpoint every N steps (0: never).", rich_help_panel=DURING),
    ] = 0,
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option(
            help="Where checkpoints go (default: OUTPUT's stem + .checkpoints).", rich_help_panel=DURING
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue from a checkpoint folder (or the latest in a folder of them).",
            rich_help_panel=DURING,
        ),
    ] = None,
    validation_prompt: Annotated[
        list[str] | None,
        typer.Option(help="Prompt to sample during training (repeatable).", rich_help_panel=DURING),
    ] = None,
    validation_every: Annotated[
        int, typer.Option(help="Sample the validation prompts every N steps.", rich_help_panel=DURING)
    ] = 0,
    save_dtype: Annotated[
        str, typer.Option(help="Output precision: fp16, bf16 or fp32.", rich_help_panel=OUT)
    ] = "fp16",
    output_name: Annotated[
        str | None,
        typer.Option(help="Name recorded as ss_output_name (default: OUTPUT's stem).", rich_help_panel=OUT),
    ] = None,
    force: ForceOption = False,
    json_out: JsonOption = False,
) -> None:
    """Train a LoRA on a folder of images (DreamBooth with --class-prompt).

    Writes OUTPUT (kohya format by default), its loss curve (OUTPUT's stem + .loss.csv / .loss.png) and the
    resolved config (.toml) beside it. Multi-GPU: accelerate launch -m lorax train … runs this same command.

    Example: lorax train ./star-photos --instance-prompt "a sks star" --steps 300 -o sks-star.safetensors
    """
    given: dict[str, Any] = {}
    local = locals()
    for name in _CONFIG_PARAMS:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT"):
            given[name] = local[name]
    if given.get("validation_prompt") is None:
        given.pop("validation_prompt", None)

    from lorax.services.train import train
    from lorax.training.config import TrainConfig

    cfg = TrainConfig.from_sources(given, config)
    with cli_progress() as progress:
        result = train(cfg, progress)
    if not result.main_process:
        return
    if json_out:
        print_json(result)
        return
    console = stdout_console()
    console.print(str(result.output), markup=False, highlight=False)
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "-"
    summary = (
        f"{result.steps} steps, {result.epochs:g} epochs, {result.num_images} images, final loss {loss}, "
        f"{result.seconds:.1f}s; {result.file_bytes / 1e6:.2f} MB ({100 * result.file_bytes / result.base_model_bytes:.2f}% "
        f"of the base model); loss curve {result.loss_png}"
    )
    from lorax.cli.app import STATE
    from lorax.cli.common import stderr_console

    if not STATE.quiet:
        stderr_console().print(summary, markup=False, highlight=False)


_CONFIG_PARAMS = [
    n
    for n in train_command.__code__.co_varnames[: train_command.__code__.co_argcount]
    if n not in ("ctx", "config", "json_out")
]


def register(app: typer.Typer) -> None:
    app.command(name="train")(train_command)
