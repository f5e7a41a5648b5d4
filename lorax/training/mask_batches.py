"""Loss masks on a run's batches: ``lorax train``'s kohya-style masks and ``masked_batches``, which gives any
batches (their family's kind, ``TrainingHooks.masked_batches``) the masks of ``lorax.training.masks``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.training.family_hooks import hooks_of_batches
from lorax.training.job import DiffusionBatches
from lorax.training.masks import MaskedBatches, find_masks, masks_beside

if TYPE_CHECKING:
    from lorax.training.config import TrainConfig


def with_train_masks(
    batches: DiffusionBatches, config: TrainConfig, log: Callable[[str], None]
) -> DiffusionBatches:
    """``lorax train``'s batches with kohya-style loss masks when the run has any: ``--auto-mask``, ``--mask-dir``
    (every image needs one), else each image's ``NAME.mask.png`` where it has one (the others count whole)."""
    items = batches.data.items
    auto = bool(config.auto_mask)
    paths: list[Path | None]
    if config.mask_dir is not None:
        paths = list(find_masks(items, config.mask_dir))
        log(f"loss masks: {len(paths)} from {config.mask_dir}")
    elif auto:
        paths = [None] * len(items)
        log("loss masks: automatic (foreground against the border colour)")
    else:
        paths = masks_beside(items)
        found = sum(p is not None for p in paths)
        if not found:
            return batches
        rest = f"; the other {len(items) - found} count whole" if found < len(items) else ""
        log(f"loss masks: {found} of {len(items)} images have NAME.mask.png{rest}")
    return masked_batches(batches, mask_paths=paths, weighting="kohya", auto=auto)


_MASK_FIELDS = {f.name for f in dataclasses.fields(MaskedBatches)} - {
    f.name for f in dataclasses.fields(DiffusionBatches)
}


def masked_batches(batches: DiffusionBatches, **masks: Any) -> DiffusionBatches:
    """``batches`` (their family's kind: ``TrainingHooks.masked_batches``) with loss masks, ``masks`` the
    ``MaskedBatches`` fields; masks ``batches`` already had (train's, in pivot's LoRA phase) give way to these."""
    values = {
        f.name: getattr(batches, f.name)
        for f in dataclasses.fields(batches)
        if f.init and f.name not in _MASK_FIELDS
    }
    return hooks_of_batches(batches).masked_batches()(**values, **masks)
