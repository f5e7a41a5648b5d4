"""The trained file's self-description: kohya's ``ss_*`` names where one matches, ``lorax_*`` for the rest."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from lorax.training.base import base_model_version
from lorax.training.config import TrainConfig

if TYPE_CHECKING:
    from lorax.data.training_images import TrainingImages


def training_metadata(
    config: TrainConfig,
    *,
    family: str,
    prediction_type: str,
    resolution: int,
    num_images: int,
    num_class_images: int,
    steps: int,
    epoch: int,
    batches_per_epoch: int,
    started_at: float,
    finished_at: float,
    seconds: float,
    modules: dict[str, int],
    images: TrainingImages | None = None,
    num_examples: int | None = None,
    max_steps: int | None = None,
) -> dict[str, str]:
    """Header metadata of a trained LoRA (all values strings, as safetensors requires).

    ``max_steps``: the run's planned steps when they differ from ``steps`` (a snapshot during the run).
    ``images`` adds kohya's dataset keys (``ss_dataset_dirs``, ``ss_reg_dataset_dirs``, ``ss_tag_frequency``) and
    the trigger words (``modelspec.trigger_phrase``); ``num_examples`` is one epoch's examples (images × repeats).
    """
    from lorax.formats.modelspec import modelspec

    network_args: dict[str, Any] = {}
    if config.targets == "all":
        network_args.update(conv_dim=config.rank, conv_alpha=config.lora_alpha)
    if config.dora:
        network_args["dora_wd"] = True
    if config.lora_dropout:
        network_args["module_dropout"] = 0
    if config.block_dims or config.block_lr:  # kohya: network_args block_dims, down/mid/up_lr_weight
        from lorax.training.blocks import block_network_args

        network_args.update(block_network_args(config.block_dims, config.block_lr, family))
    if config.loraplus_ratio is not None:  # kohya: network_args loraplus_lr_ratio=R
        network_args["loraplus_lr_ratio"] = config.loraplus_ratio
    from lorax.training.algos import algo_metadata

    module, algo_args = algo_metadata(config)  # --algo: LyCORIS' module and network_args
    network_args.update(algo_args)
    meta: dict[str, Any] = {
        "ss_network_module": module,
        "ss_network_dim": config.rank,
        "ss_network_alpha": f"{config.lora_alpha:g}",
        "ss_network_dropout": config.lora_dropout,
        "ss_network_args": json.dumps(network_args) if network_args else None,
        "ss_base_model_version": base_model_version(family, prediction_type),
        "ss_v2": family == "sd2",
        "ss_v_parameterization": prediction_type == "v_prediction",
        "ss_sd_model_name": config.model,
        "ss_output_name": config.output_name or (config.output.stem if config.output else None),
        "ss_steps": steps,
        "ss_max_train_steps": max_steps if max_steps is not None else steps,
        "ss_epoch": epoch,
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_learning_rate": config.learning_rate,
        "ss_unet_lr": config.learning_rate,
        "ss_text_encoder_lr": config.text_lr if config.train_text else None,
        "ss_network_train_unet_only": not config.train_text,
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_enable_bucket": config.buckets,
        "ss_seed": config.seed,
        "ss_num_train_images": num_examples if num_examples is not None else num_images * config.repeats,
        "ss_num_reg_images": num_class_images,
        "ss_prior_loss_weight": config.prior_weight if num_class_images else None,
        "ss_training_started_at": f"{started_at:.3f}",
        "ss_training_finished_at": f"{finished_at:.3f}",
        "ss_batch_size_per_device": config.batch_size,
        "ss_gradient_accumulation_steps": config.grad_accum,
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_lr_warmup_steps": config.warmup_steps or int(config.warmup_ratio * (max_steps or steps)),
        "ss_lr_scheduler_num_cycles": config.lr_cycles
        if config.lr_scheduler == "cosine_with_restarts"
        else None,
        "ss_lr_scheduler_power": config.lr_power if config.lr_scheduler == "polynomial" else None,
        "ss_optimizer": config.optimizer,
        "ss_mixed_precision": config.mixed_precision,
        "ss_max_grad_norm": config.max_grad_norm,
        "ss_noise_offset": config.noise_offset or None,
        "ss_min_snr_gamma": config.snr_gamma,
        "ss_gradient_checkpointing": config.gradient_checkpointing,
        "ss_cache_latents": config.cache_latents,
        "ss_flip_aug": config.flip,
        "ss_random_crop": config.random_crop,
        "ss_shuffle_caption": config.caption_shuffle,
        "ss_keep_tokens": config.keep_tokens if config.caption_shuffle else None,
        "ss_caption_dropout_rate": config.caption_dropout,
        "ss_clip_skip": config.clip_skip,
        "lorax_base_model": config.model,
        "lorax_prediction_type": prediction_type,
        "lorax_training_seconds": f"{seconds:.1f}",
        "lorax_instance_prompt": config.instance_prompt,
        "lorax_class_prompt": config.class_prompt,
        "lorax_target_preset": config.targets,
        "lorax_modules": json.dumps(modules),
        "lorax_dora": config.dora or None,
        "lorax_ema_decay": config.ema_decay,
        "lorax_init_lora": config.init_lora.name if config.init_lora is not None else None,
    }
    output_name = meta["ss_output_name"] or "LoRA"
    trigger = ", ".join(images.summary.trigger_words) if images is not None else config.instance_prompt
    if images is not None:
        meta.update(images.summary.metadata())
        meta["lorax_trigger_words"] = json.dumps(images.summary.trigger_words, ensure_ascii=False)
        if images.spec is not None and images.spec.path is not None:
            meta["lorax_dataset_config"] = str(images.spec.path)
    meta.update(
        modelspec(
            family,
            title=output_name,
            v_prediction=prediction_type == "v_prediction",
            resolution=resolution,
            trigger_phrase=trigger,
            timestamp=finished_at,
        )
    )
    return {k: _text(v) for k, v in meta.items() if v is not None}


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
