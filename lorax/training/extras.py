"""Checks of the training options issue 19 added (loss masks, trackers, speed knobs), kept apart from
``TrainConfig.problems`` so that each feature's rules live beside each other."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorax.training.config import TrainConfig

TRACKERS = ("tensorboard", "wandb", "csv")
# Fields only `lorax train` has flags for (invert and pivot take them from a --config file or the Python API).
TRAIN_ONLY_EXTRAS = frozenset(
    {
        "log_with",
        "logging_dir",
        "compile",
        "channels_last",
        "cache_latents_to_disk",
        "fp8_base",
        "blocks_to_swap",
        "cache_text_to_disk",
    }
)


def extra_problems(config: TrainConfig) -> list[str]:
    p: list[str] = []
    opt = config.option_name
    if config.COMMAND == "train" and config.mask_dir is not None and config.auto_mask:
        p.append(f"{opt('mask_dir')} and {opt('auto_mask')} are exclusive: pass one")
    if config.log_with is not None and config.log_with not in TRACKERS:
        p.append(f"{opt('log_with')} must be one of {', '.join(TRACKERS)} (got {config.log_with!r})")
    if config.COMMAND != "train" and config.log_with is not None:
        p.append(f"{opt('log_with')} is an option of lorax train only")
    if config.logging_dir is not None and config.log_with is None:
        p.append(f"{opt('logging_dir')} needs {opt('log_with')}")
    if config.cache_latents_to_disk and config.random_crop:
        p.append(
            f"{opt('cache_latents_to_disk')} and {opt('random_crop')} are exclusive (a random crop changes the "
            "latents every step)"
        )
    p += memory_problems(config)
    return p


def memory_problems(config: TrainConfig) -> list[str]:
    """--fp8-base, --blocks-to-swap and --cache-text-to-disk (issue 17)."""
    p: list[str] = []
    opt = config.option_name
    if config.blocks_to_swap < 0:
        p.append(f"{opt('blocks_to_swap')} must be 0 (off) or more (got {config.blocks_to_swap})")
    elif config.blocks_to_swap and not config.gradient_checkpointing:
        p.append(
            f"{opt('blocks_to_swap')} needs {opt('gradient_checkpointing')} (without it the backward pass keeps "
            "every block's weights on the device)"
        )
    if config.cache_text_to_disk and (config.train_text or not config.cache_text):
        p.append(
            f"{opt('cache_text_to_disk')} caches frozen text encoders: not with {opt('train_text')} or "
            f"{opt('cache_text').replace('--cache-text', '--no-cache-text')}"
        )
    return p
