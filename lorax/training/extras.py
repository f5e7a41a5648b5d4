"""Checks of the training options issue 19 added (loss masks, trackers, speed knobs), kept apart from
``TrainConfig.problems`` so that each feature's rules live beside each other."""

from __future__ import annotations

from typing import Any

# Fields only `lorax train` has flags for (invert and pivot take them from a --config file or the Python API).
TRAIN_ONLY_EXTRAS: frozenset[str] = frozenset()


def extra_problems(config: Any) -> list[str]:
    p: list[str] = []
    opt = config.option_name
    if config.COMMAND == "train" and config.mask_dir is not None and config.auto_mask:
        p.append(f"{opt('mask_dir')} and {opt('auto_mask')} are exclusive: pass one")
    return p
