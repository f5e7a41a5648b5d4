"""Optimizers (AdamW; 8-bit AdamW via bitsandbytes and Prodigy when installed) and learning-rate schedules."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from lorax.errors import ConfigError

if TYPE_CHECKING:
    import torch


def build_optimizer(name: str, param_groups: list[dict[str, Any]], *, weight_decay: float) -> Any:
    """An optimizer over ``param_groups`` (each ``{"params": [...], "lr": float}``)."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    if name == "adamw8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(
                "--optimizer adamw8bit needs bitsandbytes: `pip install bitsandbytes` (CUDA), or use --optimizer adamw"
            )
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, weight_decay=weight_decay)
    if name == "prodigy":
        if importlib.util.find_spec("prodigyopt") is None:
            raise ConfigError(
                "--optimizer prodigy needs prodigyopt: `pip install prodigyopt`, or use --optimizer adamw"
            )
        from prodigyopt import Prodigy

        # Prodigy finds the step size itself: lr is a multiplier, 1.0 by its authors' advice.
        return Prodigy(param_groups, weight_decay=weight_decay)
    raise ConfigError(f"--optimizer must be adamw, adamw8bit or prodigy (got {name!r})")


# Schedules diffusers' get_scheduler builds (with its own warm-up, from 0: lr · step / warmup).
DIFFUSERS_SCHEDULERS = ("cosine_with_restarts", "polynomial")


def build_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    total_steps: int,
    cycles: int = 1,
    power: float = 1.0,
) -> Any:
    """A ``LambdaLR``: linear warm-up over ``warmup_steps``, then ``constant``, ``linear`` decay to 0, or ``cosine``;
    ``cosine_with_restarts`` (``cycles`` hard restarts) and ``polynomial`` (decay to 1e-7 with ``power``) come from
    diffusers' ``get_scheduler``."""
    import math

    import torch

    if name in DIFFUSERS_SCHEDULERS:
        from diffusers.optimization import get_scheduler

        return get_scheduler(
            name,
            optimizer,
            num_warmup_steps=warmup_steps,
            num_training_steps=total_steps,
            num_cycles=cycles,
            power=power,
        )

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if name == "linear":
            return max(0.0, 1.0 - progress)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        raise ConfigError(
            "--lr-scheduler must be constant, linear, cosine, cosine_with_restarts or polynomial "
            f"(got {name!r})"
        )

    factor(warmup_steps)  # fail now on a bad name, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loraplus_groups(groups: list[dict[str, Any]], models: list[Any], ratio: float) -> list[dict[str, Any]]:
    """LoRA+ (Hayou et al. 2024; kohya's ``loraplus_lr_ratio``, PEFT's ``create_loraplus_optimizer``): each group
    split in two, its ``lora_B`` (up) parameters at ``ratio`` × the group's lr, the rest at the group's lr."""
    up = {id(p) for m in models if m is not None for n, p in m.named_parameters() if ".lora_B." in n}
    out: list[dict[str, Any]] = []
    for group in groups:
        a = [p for p in group["params"] if id(p) not in up]
        b = [p for p in group["params"] if id(p) in up]
        out.append({**group, "params": a})
        if b:
            out.append({**group, "params": b, "lr": group["lr"] * ratio})
    return out


def warmup_steps_of(warmup_steps: int, warmup_ratio: float, total_steps: int) -> int:
    """``--warmup-steps``, or ``--warmup-ratio`` of the run's steps (rounded down, as kohya does for a ratio)."""
    return warmup_steps if not warmup_ratio else int(warmup_ratio * total_steps)
