"""Caption augmentation: tag shuffling (keeping the first tags in place) and caption dropout."""

from __future__ import annotations

import random


def augment_caption(
    caption: str,
    rng: random.Random,
    *,
    shuffle: bool = False,
    keep_tokens: int = 1,
    dropout: float = 0.0,
) -> str:
    """Shuffle a caption's comma-separated tags after the first ``keep_tokens``; drop it to ``""`` with ``dropout``.

    The random draws happen in a fixed order whatever the options, so a run is reproducible from its seed.
    """
    drop = rng.random() < dropout
    if shuffle:
        tags = [t.strip() for t in caption.split(",")]
        head, tail = tags[:keep_tokens], tags[keep_tokens:]
        rng.shuffle(tail)
        caption = ", ".join(t for t in head + tail if t)
    return "" if drop else caption
