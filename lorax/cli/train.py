"""``lorax train``: LoRA fine-tuning and DreamBooth on a folder of images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lorax.cli import memory_options as mem
from lorax.cli import train_flux_options as flux
from lorax.cli import training_options as opts
from lorax.cli import training_run as run
from lorax.cli.common import ForceOption, JsonOption, cli_progress, print_json, stdout_console, with_flags

LORA = opts.LORA


def _train_inputs(
    data_dir: Annotated[
        Path | None,
        typer.Argument(
            help="Folder of training images; captions from <image>.txt beside each image or metadata.jsonl, "
            "else --instance-prompt. kohya's layout works too: sub-folders named '10_sks dog' train 10 "
            "times each, captioned 'sks dog' where an image has no caption file. May come from --config instead.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None, opts.in_output("--output", "-o", help="The LoRA file to write (.safetensors).")
    ] = None,
    config: opts.ConfigOpt = None,
    concept: Annotated[
        list[str] | None,
        typer.Option(
            metavar="DIR:PROMPT[:REPEATS]",
            help="One concept (repeatable, instead of DATA_DIR): its folder, the caption of its images without a "
            "caption file, and how often each trains per epoch (default 1). [[concepts]] tables (dir, prompt, "
            "repeats) in --config do the same, and alone take each concept's own class images (class_prompt, "
            "class_dir, num_class_images); on the command line, class images are run-wide (--class-prompt, or "
            "a --class-dir in kohya's '<repeats>_<class>' layout).",
            show_default=False,
        ),
    ] = None,
    dataset_config: Annotated[
        Path | None,
        opts.in_data(
            "--dataset-config",
            "--dataset_config",
            help="kohya's dataset TOML ([general], [[datasets]], [[datasets.subsets]] with image_dir, "
            "num_repeats, class_tokens, is_reg …) instead of DATA_DIR.",
            show_default=False,
        ),
    ] = None,
    model: opts.ModelOpt = None,
    format: Annotated[
        str, opts.in_output("--format", help="Output format: kohya (A1111/ComfyUI) or diffusers.")
    ] = "kohya",
    instance_prompt: Annotated[
        str | None, opts.in_data(help="Caption for images without their own, e.g. 'a sks star'.")
    ] = None,
    template: opts.TemplateOpt = None,
    resolution: opts.ResolutionOpt = None,
    random_crop: Annotated[
        bool, opts.in_data("--random-crop", help="Random instead of centre crops.")
    ] = False,
    flip: opts.FlipOpt = False,
    buckets: Annotated[
        bool, opts.in_data("--buckets", help="Aspect-ratio bucketing: keep each image's shape.")
    ] = False,
    repeats: opts.RepeatsOpt = 1,
    caption_shuffle: Annotated[
        bool, opts.in_data("--caption-shuffle", help="Shuffle comma-separated caption tags.")
    ] = False,
    keep_tokens: Annotated[int, opts.in_data(help="Leading tags that --caption-shuffle keeps in place.")] = 1,
    caption_dropout: Annotated[
        float, opts.in_data(help="Probability of training on an empty caption.")
    ] = 0.0,
    strict: Annotated[
        bool, opts.in_data("--strict", help="Stop on an unreadable image instead of skipping it.")
    ] = False,
    recursive: Annotated[bool, opts.in_data("--recursive", help="Include images in sub-folders.")] = False,
    mask_dir: Annotated[
        Path | None,
        opts.in_masks(
            help="Folder of loss masks named like the images (NAME.png or NAME.mask.png; white = train, black = "
            "ignore); every image needs one. Without it, a NAME.mask.png beside an image is its mask."
        ),
    ] = None,
    auto_mask: opts.AutoMaskOpt = False,
) -> None:
    """DATA_DIR or what stands for it, OUTPUT, the model, and the images and their captions and masks."""


_train_prior = opts.prior_flags("a star")


def _train_run(
    sample_steps: Annotated[
        int,
        opts.in_prior(
            "--sample-steps",
            help="Denoising steps for class and validation images (generate's --steps; train's --steps counts "
            "optimizer steps).",
        ),
    ] = 20,
    guidance_scale: Annotated[
        float,
        opts.in_prior(
            "--guidance",
            "--guidance-scale",
            help="Classifier-free guidance for class and validation images (as generate's --guidance).",
        ),
    ] = 7.5,
    rank: Annotated[int, opts.rank_option(LORA)] = 4,
    alpha: Annotated[float | None, opts.alpha_option(LORA)] = None,
    targets: Annotated[
        str,
        opts.in_lora(
            help="attn (attention projections), attn-ff (+ feed-forward), all (+ convs: LoCon; on Flux: + the "
            "modulations), or comma-separated module globs ('*attn2.to_k,*attn2.to_v')."
        ),
    ] = "attn",
    train_text: Annotated[
        bool,
        opts.in_lora(
            "--train-text",
            "--train-text-encoder",
            help="Train a text-encoder LoRA too (Flux: CLIP-L; diffusers' train_text_encoder).",
        ),
    ] = False,
    lora_dropout: Annotated[float, opts.in_lora(help="Dropout on the LoRA path.")] = 0.0,
    dora: Annotated[bool, opts.in_lora("--dora", help="DoRA (weight-decomposed LoRA, via PEFT).")] = False,
    algo: Annotated[
        str,
        opts.in_lora(
            help="Adapter: lora, locon (LoRA + the UNet's convs), loha, lokr (LyCORIS' keys, via PEFT), dora "
            "(= --dora)."
        ),
    ] = "lora",
    conv_rank: Annotated[
        int | None,
        opts.in_lora(
            help="locon/loha/lokr: the convs' rank (kohya's conv_dim; default --rank).", show_default=False
        ),
    ] = None,
    conv_alpha: Annotated[
        float | None,
        opts.in_lora(
            help="locon/loha/lokr: the convs' alpha (kohya's conv_alpha; default --alpha, or the conv rank with "
            "--conv-rank).",
            show_default=False,
        ),
    ] = None,
    block_dims: opts.BlockDimsOpt = None,
    init_lora: opts.InitLoraOpt = None,
    timestep_sampling: flux.TimestepSamplingOpt = None,
    discrete_flow_shift: flux.DiscreteFlowShiftOpt = None,
    sigmoid_scale: flux.SigmoidScaleOpt = None,
    logit_mean: flux.LogitMeanOpt = None,
    logit_std: flux.LogitStdOpt = None,
    weighting_scheme: flux.WeightingSchemeOpt = None,
    guidance: flux.GuidanceOpt = None,
    max_sequence_length: flux.MaxSequenceLengthOpt = None,
    train_blocks: flux.TrainBlocksOpt = None,
    train_t5: flux.TrainT5Opt = False,
    optimizer: Annotated[
        str, opts.in_optim(help="adamw, adamw8bit (bitsandbytes) or prodigy (prodigyopt).")
    ] = "adamw",
    learning_rate: opts.UnetLearningRateOpt = 1e-4,
    text_learning_rate: Annotated[
        float | None,
        opts.in_optim(
            "--text-learning-rate",
            "--text-lr",
            help="Text-encoder LoRA learning rate (default: --learning-rate).",
        ),
    ] = None,
    weight_decay: Annotated[float, opts.in_optim(help="AdamW weight decay.")] = 1e-2,
    lr_scheduler: opts.SchedulerOpt = "constant",
    warmup_steps: opts.WarmupOpt = 0,
    warmup_ratio: opts.WarmupRatioOpt = 0.0,
    lr_cycles: opts.LrCyclesOpt = 1,
    lr_power: opts.LrPowerOpt = 1.0,
    block_lr: opts.BlockLrOpt = None,
    loraplus_ratio: opts.LoraplusRatioOpt = None,
    ema_decay: opts.EmaDecayOpt = None,
    clip_skip: opts.ClipSkipOpt = None,
    steps: Annotated[int | None, opts.steps_option("Optimizer steps (default 500 unless --epochs).")] = None,
    epochs: opts.EpochsOpt = None,
    batch_size: opts.BatchOpt = 1,
    grad_accum: opts.AccumOpt = 1,
    max_grad_norm: Annotated[float, opts.in_optim(help="Gradient-norm clipping (0: off).")] = 1.0,
    snr_gamma: Annotated[float | None, opts.in_optim(help="Min-SNR-γ loss weighting (5 is common).")] = None,
    noise_offset: Annotated[float, opts.in_optim(help="Noise offset (e.g. 0.05).")] = 0.0,
    prediction_type: Annotated[
        str | None, opts.in_optim(help="epsilon or v_prediction (default: the model's scheduler).")
    ] = None,
    seed: opts.SeedOpt = 0,
    mixed_precision: opts.PrecisionOpt = "no",
    gradient_checkpointing: opts.CheckpointingOpt = False,
    sdpa: Annotated[
        bool, opts.in_speed("--sdpa/--no-sdpa", help="PyTorch scaled-dot-product attention.")
    ] = True,
    cache_latents: opts.CacheLatentsOpt = False,
    cache_text: Annotated[
        bool,
        opts.in_speed(
            "--cache-text/--no-cache-text", help="Encode each caption once while the text encoder is frozen."
        ),
    ] = True,
    compile: Annotated[
        bool, opts.in_speed("--compile", help="torch.compile the UNet (slow first steps).")
    ] = False,
    channels_last: Annotated[
        bool, opts.in_speed("--channels-last", help="UNet in channels_last memory format.")
    ] = False,
    cache_latents_to_disk: Annotated[
        bool,
        opts.in_speed(
            "--cache-latents-to-disk",
            help="--cache-latents kept as safetensors in the lorax cache (by image, size and VAE), reused by "
            "later runs.",
        ),
    ] = False,
    fp8_base: mem.Fp8BaseOpt = False,
    blocks_to_swap: mem.BlocksToSwapOpt = 0,
    cache_text_to_disk: mem.CacheTextToDiskOpt = False,
    device: opts.DeviceOpt = None,
    checkpoint_every: opts.CheckpointEveryOpt = 0,
    checkpoint_dir: opts.CheckpointDirOpt = None,
    resume: opts.ResumeOpt = None,
    validation_prompt: Annotated[
        list[str] | None, opts.in_during(help="Prompt to sample during training (repeatable).")
    ] = None,
    validation_every: Annotated[
        int,
        opts.in_during(
            "--validation-every",
            "--sample-every",
            help="Sample the validation prompts (and the --val-split loss) every N steps.",
        ),
    ] = 0,
    sample_prompts: Annotated[
        Path | None,
        opts.in_during(
            help="kohya's prompt file: one prompt a line, with --n negative, --s steps, --l guidance, --d seed, "
            "--w width, --h height ('#' comments)."
        ),
    ] = None,
    val_split: Annotated[
        float,
        opts.in_during(
            help="Hold out this share of the images (fixed by --seed) for a validation loss at fixed timesteps "
            "and noise, in the loss CSV and plot."
        ),
    ] = 0.0,
    save_every: opts.SaveEveryOpt = 0,
    save_every_epochs: opts.SaveEveryEpochsOpt = 0,
    save_last: opts.SaveLastOpt = 0,
    log_with: Annotated[
        str | None,
        opts.in_during(
            help="Tracker for loss, lr, grad norm and samples: tensorboard, wandb (offline without a network) "
            "or csv."
        ),
    ] = None,
    logging_dir: Annotated[
        Path | None, opts.in_during(help="Tracker folder (default: OUTPUT's stem + .logs).")
    ] = None,
    save_dtype: opts.SaveDtypeOpt = "fp16",
    output_name: Annotated[
        str | None, opts.in_output(help="Name recorded as ss_output_name (default: OUTPUT's stem).")
    ] = None,
    force: ForceOption = False,
    json_out: JsonOption = False,
) -> None:
    """Class and validation images' sampling, the LoRA, Flux, optimisation, memory and speed, what happens during
    training, the output's precision and name."""


@with_flags(_train_inputs, _train_prior, _train_run)
def train_command(ctx: typer.Context, **flags: Any) -> None:
    """Train a LoRA on a folder of images (DreamBooth with --class-prompt).

    Writes OUTPUT (kohya format by default), its loss curve (OUTPUT's stem + .loss.csv / .loss.png) and the
    resolved config (.toml) beside it. Multi-GPU: accelerate launch -m lorax train … runs this same command.

    Example: lorax train ./star-photos --instance-prompt "a sks star" --steps 300 -o sks-star.safetensors
    """
    given = run.given_flags(ctx, flags, _TRAIN_PARAMS)
    config = flags["config"]

    from lorax.services.train import train
    from lorax.training.config import TrainConfig

    cfg = TrainConfig.from_sources(given, config)
    with cli_progress() as bars:
        progress = run.announce_model(bars, given, config, cfg)
        result = train(cfg, progress)
        progress.flush()
    if not result.main_process:
        return
    if flags["json_out"]:
        print_json(result)
        return
    console = stdout_console()
    console.print(str(result.output), markup=False, highlight=False)
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "-"
    summary = (
        f"{result.steps} steps, {result.epochs:g} epochs, {result.num_images} images, model {cfg.model}, "
        f"final loss {loss}, "
        f"{result.seconds:.1f}s; {result.file_bytes / 1e6:.2f} MB ({100 * result.file_bytes / result.base_model_bytes:.2f}% "
        f"of the base model); loss curve {result.loss_png}"
    )
    if result.samples_png is not None:
        summary += f"; samples sheet {result.samples_png}"
    from lorax.cli.app import STATE
    from lorax.cli.common import stderr_console

    if not STATE.quiet:
        stderr_console().print(summary, markup=False, highlight=False)


_TRAIN_PARAMS = run.config_params(train_command)


def register(app: typer.Typer) -> None:
    app.command(name="train")(train_command)
