"""``lorax invert``: textual inversion (new token embeddings) on a folder of images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lorax.cli import training_options as opts
from lorax.cli import training_run as run
from lorax.cli.common import ForceOption, JsonOption, cli_progress, print_json
from lorax.cli.training_options import OPTIM, OUT


def invert_command(
    ctx: typer.Context,
    data_dir: opts.TokenDataDirArg = None,
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
    config: opts.ConfigOpt = None,
    model: opts.ModelOpt = None,
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="a1111 (one token; .safetensors files are named by their file; on SDXL the clip_l/clip_g "
            "embedding A1111 and ComfyUI load) or diffusers ({token: vectors}; SD1/SD2).",
            rich_help_panel=OUT,
        ),
    ] = "a1111",
    token: opts.TokenOpt = "<s1>",
    vectors: opts.VectorsOpt = 1,
    init_token: opts.InitOpt = None,
    overwrite_token: opts.OverwriteOpt = False,
    token_at_data: opts.TokenAtDataOpt = None,
    norm_decay: opts.NormDecayOpt = True,
    norm_target: opts.NormTargetOpt = 0.4,
    instance_prompt: opts.TokenInstancePromptOpt = None,
    template: opts.TemplateOpt = None,
    resolution: opts.ResolutionOpt = None,
    flip: opts.FlipOpt = False,
    repeats: opts.RepeatsOpt = 1,
    mask_dir: opts.MaskDirOpt = None,
    auto_mask: opts.AutoMaskOpt = False,
    mask_temperature: opts.MaskTempOpt = 1.0,
    ignore_masks: opts.IgnoreMasksOpt = False,
    learning_rate: Annotated[
        float,
        typer.Option("--learning-rate", "--lr", help="Embedding learning rate.", rich_help_panel=OPTIM),
    ] = 5e-3,
    lr_scheduler: opts.SchedulerOpt = "constant",
    warmup_steps: opts.WarmupOpt = 0,
    steps: Annotated[
        int | None,
        typer.Option(help="Optimizer steps (default 1000 unless --epochs).", rich_help_panel=OPTIM),
    ] = None,
    epochs: opts.EpochsOpt = None,
    batch_size: opts.BatchOpt = 1,
    grad_accum: opts.AccumOpt = 1,
    seed: opts.SeedOpt = 0,
    mixed_precision: opts.PrecisionOpt = "no",
    gradient_checkpointing: opts.CheckpointingOpt = False,
    cache_latents: opts.CacheLatentsOpt = False,
    device: opts.DeviceOpt = None,
    checkpoint_every: opts.CheckpointEveryOpt = 0,
    checkpoint_dir: opts.CheckpointDirOpt = None,
    resume: opts.ResumeOpt = None,
    validation_prompt: opts.TokenValidationPromptOpt = None,
    validation_every: opts.ValidationEveryOpt = 0,
    save_dtype: opts.SaveDtypeOpt = "fp16",
    force: ForceOption = False,
    json_out: JsonOption = False,
) -> None:
    """Learn new token embeddings (textual inversion); everything else in the model stays as it was.

    On SDXL the token is learned in both text encoders (clip_l and clip_g, one .safetensors file).

    Writes OUTPUT, its loss curve (OUTPUT's stem + .loss.csv / .loss.png) and the resolved config (.toml) beside
    it. Every option can also come from --config (TOML; any `lorax train` data/optimisation key works too).

    Example: lorax invert ./purple-squares --token '<s1>' --token-at-data 'purple|<s1>' -o s1.pt
    """
    given = run.given_flags(ctx, locals(), _INVERT_PARAMS)

    from lorax.services.invert import invert
    from lorax.training.pivot_config import InvertConfig

    cfg = InvertConfig.from_sources(given, config)
    assert isinstance(cfg, InvertConfig)
    with cli_progress() as bars:
        progress = run.announce_model(bars, given, config, cfg)
        result = invert(cfg, progress)
        progress.flush()
    if json_out:
        print_json(result)
        return
    norms = ", ".join(f"{t} |v| {'/'.join(f'{n:.3f}' for n in ns)}" for t, ns in result.norms.items())
    if result.norms_2:  # SDXL: clip_l's norms above, clip_g's here
        norms += "; clip_g " + ", ".join(
            f"{t} |v| {'/'.join(f'{n:.3f}' for n in ns)}" for t, ns in result.norms_2.items()
        )
    run.print_summary(result, f"{result.steps} steps, {result.num_images} images; {norms}", cfg.model)


_INVERT_PARAMS = run.config_params(invert_command)


def register(app: typer.Typer) -> None:
    app.command(name="invert")(invert_command)
