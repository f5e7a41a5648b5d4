"""lorax's on-disk caches of computed tensors (latents, text-encoder outputs): one safetensors file an entry.

A cache file is only ever a shortcut: one that is missing or unreadable reads as ``None`` and its entry is computed
again and rewritten; writes are atomic, so a killed run leaves no half-written entry behind.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lorax.io.atomic import atomic_path

if TYPE_CHECKING:
    import torch


def read_cached(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """The tensors and metadata of cache file ``path``; ``None`` when it is missing or unreadable."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})  # noqa: SIM118
    except (SafetensorError, OSError):
        return None


def write_cached(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """``tensors`` (contiguous) and ``metadata`` as cache file ``path``, atomically (its folder made if need be)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, force=True) as tmp:
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp), metadata=metadata)
