"""Images → VAE latents (the latent distribution's mean, scaled), optionally cached per distinct image."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def vae_encode(vae: Any, pixels: Any) -> Any:
    """Scaled latents of ``pixels`` (``[-1, 1]``): the posterior mean, so a cached latent equals a fresh one."""
    import torch

    with torch.no_grad():
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        latents = dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * vae.config.scaling_factor).float()


class LatentCache:
    """Latents by image key, computed once up front (so the VAE can leave the accelerator afterwards)."""

    def __init__(self) -> None:
        self._latents: dict[Any, Any] = {}

    def fill(
        self,
        vae: Any,
        keys: Sequence[Any],
        load: Callable[[Any], Any],
        *,
        batch_size: int = 4,
        advance: Callable[[int], None] | None = None,
    ) -> None:
        import torch

        todo = []
        for k in keys:
            if k in self._latents:
                continue
            if self._read(k):
                if advance is not None:
                    advance(1)
                continue
            todo.append(k)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            by_size: dict[Any, list[Any]] = {}
            for k in chunk:
                by_size.setdefault(k.size, []).append(k)
            for group in by_size.values():
                latents = vae_encode(vae, torch.stack([load(k) for k in group]))
                for k, lat in zip(group, latents, strict=True):
                    self._latents[k] = lat.cpu()
            if advance is not None:
                advance(len(chunk))
        self._written(todo)

    def _read(self, key: Any) -> bool:
        """Whether ``key``'s latents were found stored (a disk cache's); then they are in the cache."""
        return False

    def _written(self, keys: Sequence[Any]) -> None:
        """After ``keys``' latents were encoded (a disk cache stores them)."""

    def __contains__(self, key: Any) -> bool:
        return key in self._latents

    def __len__(self) -> int:
        return len(self._latents)

    def get(self, keys: Sequence[Any], device: torch.device) -> Any:
        import torch

        return torch.stack([self._latents[k] for k in keys]).to(device)
