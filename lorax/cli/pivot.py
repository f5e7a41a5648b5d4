"""``lorax pivot``: pivotal tuning (textual inversion, then LoRA around the learned tokens)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from lorax.cli import training_options as opts
from lorax.cli import training_run as run
from lorax.cli.common import with_flags

LORA = "LoRA (phase 2)"
in_lora = opts.in_panel(LORA)


_pivot_output = opts.token_output_flags(
    output_help="The LoRA file to write (.safetensors), tokens included.",
    format_help="kohya (tokens bundled as bundle_emb.<token>.string_to_param.*, on SDXL .clip_l/.clip_g) or "
    "lora_diffusion (the seed's; SD1/SD2).",
    format_default="kohya",
)


def _pivot_phases(
    ti_steps: Annotated[int, opts.in_tokens(help="Phase 1 (inversion) steps; 0 skips it.")] = 1000,
    ti_learning_rate: Annotated[float, opts.in_tokens(help="Phase 1 embedding learning rate.")] = 5e-3,
    continue_inversion: Annotated[
        bool, opts.in_tokens("--continue-inversion", help="Keep training the tokens in phase 2 (small lr).")
    ] = False,
    continue_ti_learning_rate: Annotated[
        float | None,
        opts.in_tokens(help="Embedding learning rate in phase 2 (default: --ti-learning-rate / 10)."),
    ] = None,
) -> None:
    """Phase 1 (the tokens) and the tokens in phase 2."""


def _pivot_lora(
    rank: Annotated[int, opts.rank_option(LORA)] = 4,
    alpha: Annotated[float | None, opts.alpha_option(LORA)] = None,
    targets: Annotated[
        str, in_lora(help="attn, attn-ff, all, or comma-separated module globs (as lorax train).")
    ] = "attn",
    train_text: Annotated[
        bool, in_lora("--train-text/--no-train-text", help="Train a text-encoder LoRA too.")
    ] = True,
    learning_rate: opts.UnetLearningRateOpt = 1e-4,
    text_learning_rate: Annotated[
        float | None, opts.in_optim(help="Text-encoder LoRA learning rate.")
    ] = 1e-5,
    lr_scheduler: opts.SchedulerOpt = "linear",
    warmup_steps: opts.WarmupOpt = 0,
    steps: Annotated[
        int | None, opts.steps_option("Phase 2 (LoRA) steps (default 300 unless --epochs).")
    ] = None,
) -> None:
    """Phase 2's LoRA."""


@with_flags(
    _pivot_output,
    opts.token_flags,
    _pivot_phases,
    opts.token_image_flags,
    opts.prior_flags("a shape"),
    _pivot_lora,
    opts.token_run_flags,
)
def pivot_command(ctx: typer.Context, **flags: Any) -> None:
    """Pivotal tuning: learn new tokens (phase 1), then a LoRA around them (phase 2), saved in one file.

    On SDXL the tokens are learned in both text encoders and --train-text trains LoRA on both.

    Steps count on across the phases, so one folder of checkpoints and one loss curve (OUTPUT's stem +
    .loss.csv / .loss.png) cover the run; the resolved config (.toml) goes beside OUTPUT. Every option can also come
    from --config (TOML; any `lorax train` key works too).

    Example: lorax pivot ./purple-stars --token-at-data 'purple star|<s1>' --auto-mask -o s1.safetensors
    """
    from lorax.services.pivot import pivot
    from lorax.training.pivot_config import PivotConfig

    ran = run.run_service(ctx, flags, _PIVOT_PARAMS, PivotConfig, pivot)
    if ran is None:
        return
    cfg, result = ran
    run.print_summary(
        result,
        f"{result.ti_steps} inversion + {result.steps} LoRA steps, {result.num_images} images, "
        f"tokens {' '.join(result.tokens)}",
        cfg.model,
    )


_PIVOT_PARAMS = run.config_params(pivot_command)


def register(app: typer.Typer) -> None:
    app.command(name="pivot")(pivot_command)
