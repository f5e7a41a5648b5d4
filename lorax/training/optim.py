"""Optimizers (AdamW; 8-bit AdamW via bitsandbytes and Prodigy when installed) and learning-rate schedules."""

from __future__ import annotations

import importlib.util
from typing import Any

from lorax.errors import ConfigError


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


def build_scheduler(name: str, optimizer: Any, *, warmup_steps: int, total_steps: int) -> Any:
    """A ``LambdaLR``: linear warm-up over ``warmup_steps``, then ``constant``, ``linear`` decay to 0, or ``cosine``."""
    import math

    import torch

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
        raise ConfigError(f"--lr-scheduler must be constant, linear or cosine (got {name!r})")

    factor(warmup_steps)  # fail now on a bad name, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
