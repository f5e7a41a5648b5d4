"""``lorax invert``: textual inversion (new token embeddings) on a folder of images.

The options shared with ``lorax pivot`` are defined here once, as ``Annotated`` aliases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorax.cli.common import ForceOption, JsonOption, cli_progress, print_json, stdout_console

DATA, TOKENS, PRIOR, OPTIM, MASKS, SPEED, DURING, OUT = (
    "Data",
    "Tokens",
    "Prior preservation (DreamBooth)",
    "Optimisation",
    "Loss masks",
    "Memory and speed",
    "During training",
    "Output",
)

DataDirArg = Annotated[
    Path | None,
    typer.Argument(
        help="Folder of training images; captions from <image>.txt or metadata.jsonl (see --token-at-data), "
        "else the token itself. May come from --config instead.",
        show_default=False,
    ),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="A TOML file with the same keys as these flags (flags given here win)."
    ),
]
ModelOpt = Annotated[
    str, typer.Option(help="Base model: shapes (built in), a diffusers folder, a Hub id or a single file.")
]
TokenOpt = Annotated[
    str, typer.Option(help="The new token(s) to learn; several as '<s1>|<s2>'.", rich_help_panel=TOKENS)
]
VectorsOpt = Annotated[
    int,
    typer.Option(
        help="Embedding vectors per token (tok, tok_1, … in the tokenizer).", rich_help_panel=TOKENS
    ),
]
InitOpt = Annotated[
    str | None,
    typer.Option(
        help="Start from a word (any length: its tokens' mean; as many tokens as --vectors: one each), "
        "rand / <rand-σ> (noise, σ 0.017) or zero; one per token as 'red|shape'. Default: rand.",
        rich_help_panel=TOKENS,
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite-token",
        help="Train a token that already exists in the vocabulary.",
        rich_help_panel=TOKENS,
    ),
]
TokenAtDataOpt = Annotated[
    str | None,
    typer.Option(
        help="Replace a caption word by the token(s): 'purple|<s1>' (several: comma-separated).",
        rich_help_panel=TOKENS,
    ),
]
NormDecayOpt = Annotated[
    bool,
    typer.Option(
        "--norm-decay/--no-norm-decay",
        help="Pull the new vectors' norms toward --norm-target each step (λ = min(1, 100·lr)).",
        rich_help_panel=TOKENS,
    ),
]
NormTargetOpt = Annotated[float, typer.Option(help="Target norm of --norm-decay.", rich_help_panel=TOKENS)]
InstancePromptOpt = Annotated[
    str | None,
    typer.Option(help="Caption for images without their own, e.g. '<s1>'.", rich_help_panel=DATA),
]
TemplateOpt = Annotated[
    str | None,
    typer.Option(
        help="Wrap each caption in a random template: object ('a photo of a {}') or style.",
        rich_help_panel=DATA,
    ),
]
ResolutionOpt = Annotated[
    int | None,
    typer.Option(
        help="Training size in pixels, a multiple of 8 (default: the model's).", rich_help_panel=DATA
    ),
]
FlipOpt = Annotated[bool, typer.Option("--flip", help="Random horizontal flips.", rich_help_panel=DATA)]
RepeatsOpt = Annotated[int, typer.Option(help="Times each image appears per epoch.", rich_help_panel=DATA)]
MaskDirOpt = Annotated[
    Path | None,
    typer.Option(
        help="Folder of loss masks named like the images (white = subject); every image needs one.",
        rich_help_panel=MASKS,
    ),
]
AutoMaskOpt = Annotated[
    bool,
    typer.Option(
        "--auto-mask",
        help="Foreground masks computed from plain backgrounds (the shapes world).",
        rich_help_panel=MASKS,
    ),
]
MaskTempOpt = Annotated[
    float, typer.Option(help="Mask weight (m + 0.01)^T, T this temperature.", rich_help_panel=MASKS)
]
SchedulerOpt = Annotated[
    str, typer.Option(help="constant, linear or cosine (after --warmup-steps).", rich_help_panel=OPTIM)
]
WarmupOpt = Annotated[int, typer.Option(help="Linear learning-rate warm-up steps.", rich_help_panel=OPTIM)]
EpochsOpt = Annotated[int | None, typer.Option(help="Train for whole epochs instead.", rich_help_panel=OPTIM)]
BatchOpt = Annotated[int, typer.Option(help="Images per micro-batch.", rich_help_panel=OPTIM)]
AccumOpt = Annotated[
    int, typer.Option(help="Micro-batches per optimizer step (gradient accumulation).", rich_help_panel=OPTIM)
]
SeedOpt = Annotated[int, typer.Option(help="Seed of every random choice.", rich_help_panel=OPTIM)]
PrecisionOpt = Annotated[
    str, typer.Option(help="no, fp16 or bf16 (through accelerate).", rich_help_panel=SPEED)
]
CheckpointingOpt = Annotated[
    bool,
    typer.Option(
        "--gradient-checkpointing", help="Recompute activations: less memory, slower.", rich_help_panel=SPEED
    ),
]
CacheLatentsOpt = Annotated[
    bool,
    typer.Option("--cache-latents", help="Encode images once with the VAE.", rich_help_panel=SPEED),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option(help="cpu to force the CPU (default: the accelerator's choice).", rich_help_panel=SPEED),
]
CheckpointEveryOpt = Annotated[
    int, typer.Option(help="Save a resumable checkpoint every N steps (0: never).", rich_help_panel=DURING)
]
CheckpointDirOpt = Annotated[
    Path | None,
    typer.Option(
        help="Where checkpoints go (default: OUTPUT's stem + .checkpoints).", rich_help_panel=DURING
    ),
]
ResumeOpt = Annotated[
    Path | None,
    typer.Option(
        help="Continue from a checkpoint folder (or the latest in a folder of them).", rich_help_panel=DURING
    ),
]
ValidationPromptOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="Prompt to sample during training, e.g. 'a <s1> square' (repeatable).", rich_help_panel=DURING
    ),
]
ValidationEveryOpt = Annotated[
    int, typer.Option(help="Sample the validation prompts every N steps.", rich_help_panel=DURING)
]
SaveDtypeOpt = Annotated[str, typer.Option(help="Output precision: fp16, bf16 or fp32.", rich_help_panel=OUT)]


def given_flags(ctx: typer.Context, values: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The options the user actually gave (so a --config file's values are not overridden by defaults)."""
    given: dict[str, Any] = {}
    for name in names:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT"):
            given[name] = values[name]
    if given.get("validation_prompt") is None:
        given.pop("validation_prompt", None)
    return given


def config_params(fn: Any) -> list[str]:
    code = fn.__code__
    return [n for n in code.co_varnames[: code.co_argcount] if n not in ("ctx", "config", "json_out")]


def print_summary(result: Any, what: str) -> None:
    from lorax.cli.app import STATE
    from lorax.cli.common import stderr_console

    stdout_console().print(str(result.output), markup=False, highlight=False)
    if STATE.quiet or not result.output.exists():
        return
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "-"
    stderr_console().print(
        f"{what}; final loss {loss}, {result.seconds:.1f}s; {result.file_bytes / 1e3:.1f} kB; "
        f"loss curve {result.loss_png}",
        markup=False,
        highlight=False,
    )


def invert_command(
    ctx: typer.Context,
    data_dir: DataDirArg = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="The embedding to write: .pt (A1111 string_to_param) or .safetensors (A1111 emb_params, or "
            "diffusers learned_embeds with --format diffusers; SDXL models: clip_l + clip_g, .safetensors only).",
            rich_help_panel=OUT,
        ),
    ] = None,
    config: ConfigOpt = None,
    model: ModelOpt = "shapes",
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="a1111 (one token; .safetensors files are named by their file; on SDXL the clip_l/clip_g "
            "embedding A1111 and ComfyUI load) or diffusers ({token: vectors}; SD1/SD2).",
            rich_help_panel=OUT,
        ),
    ] = "a1111",
    token: TokenOpt = "<s1>",
    vectors: VectorsOpt = 1,
    init_token: InitOpt = None,
    overwrite_token: OverwriteOpt = False,
    token_at_data: TokenAtDataOpt = None,
    norm_decay: NormDecayOpt = True,
    norm_target: NormTargetOpt = 0.4,
    instance_prompt: InstancePromptOpt = None,
    template: TemplateOpt = None,
    resolution: ResolutionOpt = None,
    flip: FlipOpt = False,
    repeats: RepeatsOpt = 1,
    mask_dir: MaskDirOpt = None,
    auto_mask: AutoMaskOpt = False,
    mask_temperature: MaskTempOpt = 1.0,
    learning_rate: Annotated[
        float,
        typer.Option("--learning-rate", "--lr", help="Embedding learning rate.", rich_help_panel=OPTIM),
    ] = 5e-3,
    lr_scheduler: SchedulerOpt = "constant",
    warmup_steps: WarmupOpt = 0,
    steps: Annotated[
        int | None, typer.Option(help="Optimizer steps (default 300 unless --epochs).", rich_help_panel=OPTIM)
    ] = None,
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = 1,
    grad_accum: AccumOpt = 1,
    seed: SeedOpt = 0,
    mixed_precision: PrecisionOpt = "no",
    gradient_checkpointing: CheckpointingOpt = False,
    cache_latents: CacheLatentsOpt = False,
    device: DeviceOpt = None,
    checkpoint_every: CheckpointEveryOpt = 0,
    checkpoint_dir: CheckpointDirOpt = None,
    resume: ResumeOpt = None,
    validation_prompt: ValidationPromptOpt = None,
    validation_every: ValidationEveryOpt = 0,
    save_dtype: SaveDtypeOpt = "fp16",
    force: ForceOption = False,
    json_out: JsonOption = False,
) -> None:
    """Learn new token embeddings (textual inversion); everything else in the model stays as it was.

    On SDXL the token is learned in both text encoders (clip_l and clip_g, one .safetensors file).

    Writes OUTPUT, its loss curve (OUTPUT's stem + .loss.csv / .loss.png) and the resolved config (.toml) beside
    it. Every option can also come from --config (TOML; any `lorax train` data/optimisation key works too).

    Example: lorax invert ./purple-squares --token '<s1>' --token-at-data 'purple|<s1>' -o s1.pt
    """
    given = given_flags(ctx, locals(), _INVERT_PARAMS)

    from lorax.services.invert import invert
    from lorax.training.pivot_config import InvertConfig

    cfg = InvertConfig.from_sources(given, config)
    assert isinstance(cfg, InvertConfig)
    with cli_progress() as progress:
        result = invert(cfg, progress)
    if json_out:
        print_json(result)
        return
    norms = ", ".join(f"{t} |v| {'/'.join(f'{n:.3f}' for n in ns)}" for t, ns in result.norms.items())
    if result.norms_2:  # SDXL: clip_l's norms above, clip_g's here
        norms += "; clip_g " + ", ".join(
            f"{t} |v| {'/'.join(f'{n:.3f}' for n in ns)}" for t, ns in result.norms_2.items()
        )
    print_summary(result, f"{result.steps} steps, {result.num_images} images; {norms}")


_INVERT_PARAMS = config_params(invert_command)


def register(app: typer.Typer) -> None:
    app.command(name="invert")(invert_command)
