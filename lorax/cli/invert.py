"""``lorax invert``: textual inversion (new token embeddings) on a folder of images."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from lorax.cli import training_options as opts
from lorax.cli import training_run as run
from lorax.cli.common import with_flags

_invert_output = opts.token_output_flags(
    output_help="The embedding to write: .pt (A1111 string_to_param) or .safetensors (A1111 emb_params, or "
    "diffusers learned_embeds with --format diffusers; SDXL models: clip_l + clip_g, .safetensors only).",
    format_help="a1111 (one token; .safetensors files are named by their file; on SDXL the clip_l/clip_g "
    "embedding A1111 and ComfyUI load) or diffusers ({token: vectors}; SD1/SD2).",
    format_default="a1111",
)


def _invert_optimisation(
    learning_rate: Annotated[
        float, opts.in_optim("--learning-rate", "--lr", help="Embedding learning rate.")
    ] = 5e-3,
    lr_scheduler: opts.SchedulerOpt = "constant",
    warmup_steps: opts.WarmupOpt = 0,
    steps: Annotated[int | None, opts.steps_option("Optimizer steps (default 1000 unless --epochs).")] = None,
) -> None:
    """The embedding's learning rate and steps."""


@with_flags(
    _invert_output, opts.token_flags, opts.token_image_flags, _invert_optimisation, opts.token_run_flags
)
def invert_command(ctx: typer.Context, **flags: Any) -> None:
    """Learn new token embeddings (textual inversion); everything else in the model stays as it was.

    On SDXL the token is learned in both text encoders (clip_l and clip_g, one .safetensors file).

    Writes OUTPUT, its loss curve (OUTPUT's stem + .loss.csv / .loss.png) and the resolved config (.toml) beside
    it. Every option can also come from --config (TOML; any `lorax train` data/optimisation key works too).

    Example: lorax invert ./purple-squares --token '<s1>' --token-at-data 'purple|<s1>' -o s1.pt
    """
    from lorax.services.invert import invert
    from lorax.training.pivot_config import InvertConfig

    ran = run.run_service(ctx, flags, _INVERT_PARAMS, InvertConfig, invert)
    if ran is None:
        return
    cfg, result = ran
    norms = ", ".join(f"{t} |v| {'/'.join(f'{n:.3f}' for n in ns)}" for t, ns in result.norms.items())
    if result.norms_2:  # SDXL: clip_l's norms above, clip_g's here
        norms += "; clip_g " + ", ".join(
            f"{t} |v| {'/'.join(f'{n:.3f}' for n in ns)}" for t, ns in result.norms_2.items()
        )
    run.print_summary(result, f"{result.steps} steps, {result.num_images} images; {norms}", cfg.model)


_INVERT_PARAMS = run.config_params(invert_command)


def register(app: typer.Typer) -> None:
    app.command(name="invert")(invert_command)
