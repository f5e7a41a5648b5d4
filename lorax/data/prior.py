"""Prior-preservation class images: generated with the base model once, then reused from a cache folder."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorax.data.images import find_images


def cache_root() -> Path:
    """``$LORAX_CACHE`` or ``~/.cache/lorax``."""
    env = os.environ.get("LORAX_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "lorax"


def class_cache_dir(model: str, prompt: str, resolution: int, steps: int, guidance: float) -> Path:
    """Where generated class images of this model, prompt and sampling setting are cached."""
    key = repr((str(model), prompt, resolution, steps, float(guidance))).encode("utf-8")
    slug = "".join(c if c.isalnum() else "-" for c in prompt)[:40].strip("-")
    return cache_root() / "class-images" / f"{slug}-{hashlib.sha256(key).hexdigest()[:12]}"


def ensure_class_images(
    folder: Path,
    count: int,
    generate: Callable[[int], Any],
    *,
    advance: Callable[[int], None] | None = None,
) -> int:
    """Make sure ``folder`` holds at least ``count`` images, generating image ``i`` with ``generate(i)``.

    Each image is written to a temporary name and renamed, so an interrupted run leaves no half file.
    Returns how many were generated.
    """
    folder.mkdir(parents=True, exist_ok=True)
    have = len(find_images(folder))
    made = 0
    index = 0
    while have + made < count:
        out = folder / f"class-{index:05d}.png"
        index += 1
        if out.exists():
            continue
        image = generate(index - 1)
        tmp = out.with_name(f".{out.name}.tmp")
        image.save(tmp, format="PNG")
        os.replace(tmp, out)
        made += 1
        if advance is not None:
            advance(1)
    return made
