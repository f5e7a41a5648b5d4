"""What ``--algo`` / ``--conv-rank`` / ``--conv-alpha`` refuse (kept apart from config.py's other checks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lorax.training.config import TrainConfig


def algo_problems(config: TrainConfig, opt: Callable[[str], str]) -> list[str]:
    from lorax.training.algos import ALGOS, CONV_ALGOS, LYCORIS_ALGOS

    p: list[str] = []
    algo = config.algo
    if algo not in ALGOS:
        return [f"{opt('algo')} must be one of {', '.join(ALGOS)} (got {algo!r})"]
    if config.dora and algo not in ("lora", "dora"):
        p.append(f"{opt('dora')} is {opt('algo')} dora: drop it with {opt('algo')} {algo}")
    if algo not in CONV_ALGOS and (config.conv_rank is not None or config.conv_alpha is not None):
        p.append(f"{opt('conv_rank')} / {opt('conv_alpha')} need {opt('algo')} locon, loha or lokr")
    if config.conv_rank is not None and config.conv_rank < 1:
        p.append(f"{opt('conv_rank')} must be ≥ 1 (got {config.conv_rank})")
    if algo in LYCORIS_ALGOS:
        if config.format == "diffusers":
            p.append(f"{opt('algo')} {algo} files are LyCORIS' (kohya keys): drop {opt('format')} diffusers")
        for name in ("init_lora", "loraplus_ratio", "block_dims"):
            if getattr(config, name) is not None:
                p.append(f"{opt(name)} works on LoRA pairs: it does not combine with {opt('algo')} {algo}")
        if config.lora_dropout:
            p.append(f"{opt('lora_dropout')} is LoRA's: it does not combine with {opt('algo')} {algo}")
    return p
