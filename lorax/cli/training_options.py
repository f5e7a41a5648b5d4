"""The options ``lorax train``, ``lorax invert`` and ``lorax pivot`` share, defined once as ``Annotated`` aliases.

Each alias carries the flag's help and help panel; the default stays at the command's parameter, so commands may
differ in it (``--lr-scheduler`` is constant for invert, linear for pivot). ``--rank`` and ``--alpha`` are factories
taking the command's LoRA panel. Options whose help differs between the commands (OUTPUT, ``--format``,
``--steps``, the example in ``--instance-prompt`` / ``--class-prompt``, ``--targets``, ...) stay in their command.
Runs of flags that invert and pivot share, defaults included, are one flag group each (``token_flags``,
``token_image_flags``, ``token_run_flags``): a function whose parameters declare them once;
``lorax.cli.common.with_flags`` gives a command the parameters of its groups and of its own parts, in order.
``token_output_flags`` builds the group whose help differs by command (what OUTPUT is, the formats); its
annotations are evaluated where it is defined, so this module does without ``from __future__ import annotations``.
The helpers that turn a command's flags into its config and print its summary: ``lorax.cli.training_run``.
"""

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from lorax.cli.common import ForceOption, JsonOption

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
LORA = "LoRA"


def in_panel(panel: str, **settings: Any) -> Callable[..., Any]:
    """``typer.Option`` with its help panel (and any other ``settings``) fixed, the one way these commands declare a
    flag: ``in_data("--flip", help="Random horizontal flips.")``."""
    return functools.partial(typer.Option, rich_help_panel=panel, **settings)


in_data, in_tokens, in_prior, in_optim, in_masks, in_speed, in_during, in_output, in_lora = (
    in_panel(panel) for panel in (DATA, TOKENS, PRIOR, OPTIM, MASKS, SPEED, DURING, OUT, LORA)
)

# --- all three commands -------------------------------------------------------------------------------------

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="A TOML file with the same keys as these flags (flags given here win)."
    ),
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        help="Base model: a diffusers folder, a Hub id, a single file or a built-in name. Default: LORAX_MODEL, "
        "else model in ~/.config/lorax/config.toml, else shapes (the built-in 32×32 toy). Its lorax.json "
        "defaults apply to the flags not given.",
        show_default=False,
    ),
]
TemplateOpt = Annotated[
    str | None, in_data(help="Wrap each caption in a random template: object ('a photo of a {}') or style.")
]
ResolutionOpt = Annotated[
    int | None, in_data(help="Training size in pixels, a multiple of 8 (default: the model's).")
]
FlipOpt = Annotated[bool, in_data("--flip", help="Random horizontal flips.")]
RepeatsOpt = Annotated[int, in_data(help="Times each image appears per epoch.")]
SchedulerOpt = Annotated[
    str,
    in_optim(
        help="constant, linear, cosine (after --warmup-steps), or (lorax train) cosine_with_restarts and "
        "polynomial through diffusers' get_scheduler."
    ),
]
WarmupOpt = Annotated[int, in_optim(help="Linear learning-rate warm-up steps.")]
EpochsOpt = Annotated[int | None, in_optim(help="Train for whole epochs instead.")]
BatchOpt = Annotated[int, in_optim(help="Images per micro-batch.")]
AccumOpt = Annotated[int, in_optim(help="Micro-batches per optimizer step (gradient accumulation).")]
SeedOpt = Annotated[int, in_optim(help="Seed of every random choice.")]
PrecisionOpt = Annotated[str, in_speed(help="no, fp16 or bf16 (through accelerate).")]
CheckpointingOpt = Annotated[
    bool, in_speed("--gradient-checkpointing", help="Recompute activations: less memory, slower.")
]
CacheLatentsOpt = Annotated[
    bool, in_speed("--cache-latents", help="Encode images once; the VAE then leaves the device.")
]
DeviceOpt = Annotated[
    str | None,
    in_speed(help="cpu, cuda (or gpu; an error without one) or auto (default: a GPU when there is one)."),
]
CheckpointEveryOpt = Annotated[int, in_during(help="Save a resumable checkpoint every N steps (0: never).")]
CheckpointDirOpt = Annotated[
    Path | None, in_during(help="Where checkpoints go (default: OUTPUT's stem + .checkpoints).")
]
ResumeOpt = Annotated[
    Path | None, in_during(help="Continue from a checkpoint folder (or the latest in a folder of them).")
]
ValidationEveryOpt = Annotated[int, in_during(help="Sample the validation prompts every N steps.")]
SaveDtypeOpt = Annotated[str, in_output(help="Output precision: fp16, bf16 or fp32.")]

# --- train and pivot (LoRA, prior preservation) -------------------------------------------------------------

ClassDirOpt = Annotated[
    Path | None, in_prior(help="Class images folder (missing ones are generated; default: a cache folder).")
]
NumClassImagesOpt = Annotated[int, in_prior(help="Class images to use (generated if missing).")]
PriorWeightOpt = Annotated[float, in_prior(help="Weight of the class-image loss.")]
UnetLearningRateOpt = Annotated[float, in_optim("--learning-rate", "--lr", help="UNet LoRA learning rate.")]


def rank_option(panel: str) -> Any:
    """``--rank`` in the command's LoRA help panel (train's "LoRA", pivot's "LoRA (phase 2)")."""
    return typer.Option(help="LoRA rank.", rich_help_panel=panel)


def steps_option(help: str) -> Any:
    """``--steps``, its help naming the command's default."""
    return in_optim(help=help)


def alpha_option(panel: str) -> Any:
    """``--network-alpha`` (kohya's name; ``--alpha`` still works) in the command's LoRA help panel."""
    return typer.Option(
        "--network-alpha",
        "--alpha",
        help="LoRA alpha (scale alpha/rank; default: the rank), kohya's --network_alpha.",
        rich_help_panel=panel,
    )


# --- invert and pivot (new tokens) --------------------------------------------------------------------------

TokenDataDirArg = Annotated[
    Path | None,
    typer.Argument(
        help="Folder of training images; captions from <image>.txt or metadata.jsonl (see --token-at-data), "
        "else the token itself. May come from --config instead.",
        show_default=False,
    ),
]
TokenOpt = Annotated[str, in_tokens(help="The new token(s) to learn; several as '<s1>|<s2>'.")]
VectorsOpt = Annotated[int, in_tokens(help="Embedding vectors per token (tok, tok_1, … in the tokenizer).")]
InitOpt = Annotated[
    str | None,
    in_tokens(
        help="Start from a word (any length: its tokens' mean; as many tokens as --vectors: one each), "
        "rand / <rand-σ> (noise, σ 0.017) or zero; one per token as 'red|shape'. Default: rand."
    ),
]
OverwriteOpt = Annotated[
    bool, in_tokens("--overwrite-token", help="Train a token that already exists in the vocabulary.")
]
TokenAtDataOpt = Annotated[
    str | None,
    in_tokens(help="Replace a caption word by the token(s): 'purple|<s1>' (several: comma-separated)."),
]
NormDecayOpt = Annotated[
    bool,
    in_tokens(
        "--norm-decay/--no-norm-decay",
        help="Pull the new vectors' norms toward --norm-target each step (λ = min(1, 100·lr)).",
    ),
]
NormTargetOpt = Annotated[float, in_tokens(help="Target norm of --norm-decay.")]
TokenInstancePromptOpt = Annotated[
    str | None, in_data(help="Caption for images without their own, e.g. '<s1>'.")
]
MaskDirOpt = Annotated[
    Path | None,
    in_masks(help="Folder of loss masks named like the images (white = subject); every image needs one."),
]
IgnoreMasksOpt = Annotated[
    bool,
    in_masks(
        "--ignore-masks",
        help="Train on whole images even when NAME.mask.png loss masks lie beside them (used by default).",
    ),
]
AutoMaskOpt = Annotated[
    bool, in_masks("--auto-mask", help="Foreground masks computed from plain backgrounds (the shapes world).")
]
MaskTempOpt = Annotated[float, in_masks(help="Mask weight (m + 0.01)^T, T this temperature.")]
TokenValidationPromptOpt = Annotated[
    list[str] | None, in_during(help="Prompt to sample during training, e.g. 'a <s1> square' (repeatable).")
]


# --- train only: usable snapshots (lorax.training.snapshots) ------------------------------------------------

SaveEveryOpt = Annotated[
    int,
    in_during(
        help="Write a usable LoRA every N steps: OUTPUT's stem + -step00000200 at step 200 (kohya's naming; 0: "
        "never)."
    ),
]
SaveEveryEpochsOpt = Annotated[
    int,
    in_during(
        help="Write a usable LoRA every N epochs: OUTPUT's stem + -000002 after epoch 2 (kohya's naming; 0: never)."
    ),
]
SaveLastOpt = Annotated[int, in_during(help="Keep only the K newest snapshots this run wrote (0: keep all).")]

InitLoraOpt = Annotated[
    Path | None,
    in_lora(
        help="Start from this LoRA (kohya's network_weights; any format lorax reads); its rank and modules "
        "must match --rank, --targets and --train-text.",
        show_default=False,
    ),
]


# --- train only: learning rates ------------------------------------------------------------------------------

WarmupRatioOpt = Annotated[
    float,
    in_optim(
        help="Warm-up as a fraction of the run's steps (0.1: the first 10%), instead of --warmup-steps."
    ),
]
LrCyclesOpt = Annotated[int, in_optim(help="Hard restarts of --lr-scheduler cosine_with_restarts.")]
LrPowerOpt = Annotated[float, in_optim(help="Power of --lr-scheduler polynomial (1: linear decay to 1e-7).")]
LoraplusRatioOpt = Annotated[
    float | None,
    in_optim(
        help="LoRA+: the up (B) matrices learn at this × their learning rate (16 in the paper; kohya's "
        "loraplus_lr_ratio).",
        show_default=False,
    ),
]
EmaDecayOpt = Annotated[
    float | None,
    in_optim(
        help="Keep an EMA of the LoRA weights (diffusers' EMAModel, decay ramping up to D) and write it as the "
        "output and snapshots; 0.999 is common.",
        show_default=False,
    ),
]
ClipSkipOpt = Annotated[
    int | None,
    in_optim(
        help="Condition on the N-th text-encoder layer from the end, through its final layer norm (kohya's and "
        "A1111's clip skip: 2 is the penultimate; SD1/SD2). Recorded as ss_clip_skip; lorax generate uses it.",
        show_default=False,
    ),
]
BlockDimsOpt = Annotated[
    str | None,
    in_lora(
        help="A rank per kohya UNet block, comma-separated: 25 for SD1/SD2 (IN00-IN11, MID, OUT00-OUT11), 23 "
        "for SDXL (base, IN00-IN08, MID0-2, OUT00-OUT08, out), for Flux the double then the single blocks (57 at "
        "full size); 0 leaves a block out (kohya's block_dims).",
        show_default=False,
    ),
]
BlockLrOpt = Annotated[
    str | None,
    in_optim(
        help="A --lr multiplier per kohya UNet block (as --block-dims counts them); 0 leaves a block out "
        "(kohya's down/mid/up_lr_weight).",
        show_default=False,
    ),
]


# --- flag groups: invert's and pivot's shared runs of flags --------------------------------------------------


def token_flags(
    token: TokenOpt = "<s1>",
    vectors: VectorsOpt = 1,
    init_token: InitOpt = None,
    overwrite_token: OverwriteOpt = False,
    token_at_data: TokenAtDataOpt = None,
    norm_decay: NormDecayOpt = True,
    norm_target: NormTargetOpt = 0.4,
) -> None:
    """The new tokens (invert; pivot's phase 1)."""


def token_output_flags(output_help: str, format_help: str, format_default: str) -> Callable[..., None]:
    """DATA_DIR, OUTPUT (``output_help``), --config, --model and --format (``format_help``, ``format_default``):
    invert's and pivot's first flags."""

    def flags(
        data_dir: TokenDataDirArg = None,
        output: Annotated[Path | None, in_output("--output", "-o", help=output_help)] = None,
        config: ConfigOpt = None,
        model: ModelOpt = None,
        format: Annotated[str, in_output("--format", help=format_help)] = format_default,
    ) -> None:
        """The images' folder, the file written and the model."""

    return flags


def prior_flags(example: str) -> Callable[..., None]:
    """Prior preservation: --class-prompt (its help's example class: ``example``), --class-dir,
    --num-class-images and --prior-weight (train and pivot)."""

    def flags(
        class_prompt: Annotated[
            str | None,
            in_prior(help=f"Turns on prior preservation with this class prompt, e.g. '{example}'."),
        ] = None,
        class_dir: ClassDirOpt = None,
        num_class_images: NumClassImagesOpt = 100,
        prior_weight: PriorWeightOpt = 1.0,
    ) -> None:
        """The class images and their loss."""

    return flags


def token_image_flags(
    instance_prompt: TokenInstancePromptOpt = None,
    template: TemplateOpt = None,
    resolution: ResolutionOpt = None,
    flip: FlipOpt = False,
    repeats: RepeatsOpt = 1,
    mask_dir: MaskDirOpt = None,
    auto_mask: AutoMaskOpt = False,
    mask_temperature: MaskTempOpt = 1.0,
    ignore_masks: IgnoreMasksOpt = False,
) -> None:
    """The images, their captions and loss masks."""


def token_run_flags(
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
    validation_prompt: TokenValidationPromptOpt = None,
    validation_every: ValidationEveryOpt = 0,
    save_dtype: SaveDtypeOpt = "fp16",
    force: ForceOption = False,
    json_out: JsonOption = False,
) -> None:
    """The run: batches, seed, memory and speed, checkpoints, validation samples, output precision."""
