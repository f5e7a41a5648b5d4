"""``lorax pivot``: pivotal tuning (textual inversion, then LoRA around the learned tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorax.cli.common import ForceOption, JsonOption, cli_progress, print_json
from lorax.cli.invert import (
    OPTIM,
    OUT,
    PRIOR,
    TOKENS,
    AccumOpt,
    AutoMaskOpt,
    BatchOpt,
    CacheLatentsOpt,
    CheckpointDirOpt,
    CheckpointEveryOpt,
    CheckpointingOpt,
    ConfigOpt,
    DataDirArg,
    DeviceOpt,
    EpochsOpt,
    FlipOpt,
    InitOpt,
    InstancePromptOpt,
    MaskDirOpt,
    MaskTempOpt,
    ModelOpt,
    NormDecayOpt,
    NormTargetOpt,
    OverwriteOpt,
    PrecisionOpt,
    RepeatsOpt,
    ResolutionOpt,
    ResumeOpt,
    SaveDtypeOpt,
    SchedulerOpt,
    SeedOpt,
    TemplateOpt,
    TokenAtDataOpt,
    TokenOpt,
    ValidationEveryOpt,
    ValidationPromptOpt,
    VectorsOpt,
    WarmupOpt,
    config_params,
    given_flags,
    print_summary,
)

LORA = "LoRA (phase 2)"


def pivot_command(
    ctx: typer.Context,
    data_dir: DataDirArg = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="The LoRA file to write (.safetensors), tokens included.",
            rich_help_panel=OUT,
        ),
    ] = None,
    config: ConfigOpt = None,
    model: ModelOpt = "shapes",
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="kohya (tokens bundled as bundle_emb.<token>.string_to_param.*, on SDXL .clip_l/.clip_g) or "
            "lora_diffusion (the seed's; SD1/SD2).",
            rich_help_panel=OUT,
        ),
    ] = "kohya",
    token: TokenOpt = "<s1>",
    vectors: VectorsOpt = 1,
    init_token: InitOpt = None,
    overwrite_token: OverwriteOpt = False,
    token_at_data: TokenAtDataOpt = None,
    norm_decay: NormDecayOpt = True,
    norm_target: NormTargetOpt = 0.4,
    ti_steps: Annotated[
        int, typer.Option(help="Phase 1 (inversion) steps; 0 skips it.", rich_help_panel=TOKENS)
    ] = 300,
    ti_learning_rate: Annotated[
        float, typer.Option(help="Phase 1 embedding learning rate.", rich_help_panel=TOKENS)
    ] = 5e-3,
    continue_inversion: Annotated[
        bool,
        typer.Option(
            "--continue-inversion",
            help="Keep training the tokens in phase 2 (small lr).",
            rich_help_panel=TOKENS,
        ),
    ] = False,
    continue_ti_learning_rate: Annotated[
        float | None,
        typer.Option(
            help="Embedding learning rate in phase 2 (default: --ti-learning-rate / 10).",
            rich_help_panel=TOKENS,
        ),
    ] = None,
    instance_prompt: InstancePromptOpt = None,
    template: TemplateOpt = None,
    resolution: ResolutionOpt = None,
    flip: FlipOpt = False,
    repeats: RepeatsOpt = 1,
    mask_dir: MaskDirOpt = None,
    auto_mask: AutoMaskOpt = False,
    mask_temperature: MaskTempOpt = 1.0,
    class_prompt: Annotated[
        str | None,
        typer.Option(
            help="Turns on prior preservation with this class prompt, e.g. 'a shape'.", rich_help_panel=PRIOR
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
    rank: Annotated[int, typer.Option(help="LoRA rank.", rich_help_panel=LORA)] = 4,
    alpha: Annotated[
        float | None,
        typer.Option(help="LoRA alpha (scale alpha/rank; default: the rank).", rich_help_panel=LORA),
    ] = None,
    targets: Annotated[
        str,
        typer.Option(
            help="attn, attn-ff, all, or comma-separated module globs (as lorax train).", rich_help_panel=LORA
        ),
    ] = "attn",
    train_text: Annotated[
        bool,
        typer.Option(
            "--train-text/--no-train-text", help="Train a text-encoder LoRA too.", rich_help_panel=LORA
        ),
    ] = True,
    learning_rate: Annotated[
        float, typer.Option("--learning-rate", "--lr", help="UNet LoRA learning rate.", rich_help_panel=OPTIM)
    ] = 1e-4,
    text_learning_rate: Annotated[
        float | None, typer.Option(help="Text-encoder LoRA learning rate.", rich_help_panel=OPTIM)
    ] = 1e-5,
    lr_scheduler: SchedulerOpt = "linear",
    warmup_steps: WarmupOpt = 0,
    steps: Annotated[
        int | None,
        typer.Option(help="Phase 2 (LoRA) steps (default 300 unless --epochs).", rich_help_panel=OPTIM),
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
    """Pivotal tuning: learn new tokens (phase 1), then a LoRA around them (phase 2), saved in one file.

    On SDXL the tokens are learned in both text encoders and --train-text trains LoRA on both.

    Steps count on across the phases, so one folder of checkpoints and one loss curve (OUTPUT's stem +
    .loss.csv / .loss.png) cover the run; the resolved config (.toml) goes beside OUTPUT. Every option can also come
    from --config (TOML; any `lorax train` key works too).

    Example: lorax pivot ./purple-stars --token-at-data 'purple star|<s1>' --auto-mask -o s1.safetensors
    """
    given = given_flags(ctx, locals(), _PIVOT_PARAMS)

    from lorax.services.pivot import pivot
    from lorax.training.pivot_config import PivotConfig

    cfg = PivotConfig.from_sources(given, config)
    assert isinstance(cfg, PivotConfig)
    with cli_progress() as progress:
        result = pivot(cfg, progress)
    if json_out:
        print_json(result)
        return
    print_summary(
        result,
        f"{result.ti_steps} inversion + {result.steps} LoRA steps, {result.num_images} images, "
        f"tokens {' '.join(result.tokens)}",
    )


_PIVOT_PARAMS = config_params(pivot_command)


def register(app: typer.Typer) -> None:
    app.command(name="pivot")(pivot_command)
