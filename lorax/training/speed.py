"""Speed knobs of ``lorax train``: ``--compile`` (``torch.compile`` of the UNet, in place), ``--channels-last`` (the
UNet's memory format) and ``--cache-latents-to-disk`` (``--cache-latents`` kept as safetensors files and reused by
later runs). SDPA attention (diffusers' ``AttnProcessor2_0``) is on by default (``--no-sdpa`` turns it off).

The disk cache lives in ``$LORAX_CACHE/latents`` (default ``~/.cache/lorax``), one folder per VAE (a fingerprint of
its config and weights) and one file per (image content, target size, flip): a changed image, size or VAE gets a new
file, never a stale latent. Files are written atomically, so an interrupted run leaves none half written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.progress import Progress
from lorax.training.latents import LatentCache

if TYPE_CHECKING:
    from lorax.training.config import TrainConfig

CACHE_VERSION = "1"  # bump when the latents' definition changes (vae_encode)


def apply_unet_knobs(unet: Any, config: TrainConfig, log: Callable[[str], None]) -> None:
    """``--channels-last`` and ``--compile`` on the (placed, LoRA-injected) UNet."""
    import torch

    if config.channels_last:
        unet.to(memory_format=torch.channels_last)
    if config.compile:
        unet.compile()  # in place: parameter names (and so checkpoints and the saved LoRA) stay as they are
        log("compiling the UNet (torch.compile): the first steps are slow")


def vae_fingerprint(vae: Any) -> str:
    """A short hash of the VAE's config and weights (each tensor's shape, sum and first values): cheap even at full
    size, and different for any other VAE."""
    import torch

    h = hashlib.sha256()
    config = dict(getattr(vae, "config", {}) or {})
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in vae.state_dict().items():
            flat = t.detach().flatten().float().cpu()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{float(flat.double().sum())!r}".encode())
            h.update(flat[:16].numpy().tobytes())
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DiskLatentCache(LatentCache):
    """``LatentCache`` backed by safetensors files: latents found on disk are read, the others encoded and written."""

    def __init__(self, folder: Path, path_of: Callable[[Any], Path], *, dtype: str = "float32") -> None:
        super().__init__()
        self.folder = Path(folder)
        self.path_of = path_of  # image key → its image file
        self.dtype = dtype
        self.hits = 0
        self.written = 0
        self._digests: dict[Path, str] = {}

    def file_for(self, key: Any) -> Path:
        image = self.path_of(key)
        if image not in self._digests:
            self._digests[image] = file_digest(image)
        w, h = key.size
        name = f"{self._digests[image][:32]}-{w}x{h}-{'flip' if key.flip else 'noflip'}-{self.dtype}"
        return self.folder / f"{name}.safetensors"

    def _read(self, key: Any) -> bool:
        from lorax.io.cache_files import read_cached

        cached = read_cached(self.file_for(key))
        if cached is None or "latents" not in cached[0]:
            return False  # missing or unreadable: encoded again and rewritten
        self._latents[key] = cached[0]["latents"]
        self.hits += 1
        return True

    def _written(self, keys: Sequence[Any]) -> None:
        from lorax.io.cache_files import write_cached

        for k in keys:
            write_cached(self.file_for(k), {"latents": self._latents[k]}, {"lorax_cache": CACHE_VERSION})
            self.written += 1


def latent_cache_folder(vae: Any) -> Path:
    from lorax.data.prior import cache_root

    return cache_root() / "latents" / f"v{CACHE_VERSION}-{vae_fingerprint(vae)}"


def cache_latents(config: TrainConfig, vae: Any, data: Any, progress: Progress) -> LatentCache | None:
    """The run's latent cache: none, in memory (``--cache-latents``) or on disk (``--cache-latents-to-disk``)."""
    from lorax.training import setup

    if config.cache_latents_to_disk:

        def path_of(key: Any) -> Path:
            items = data.items if key.source == "instance" else data.class_items
            return Path(items[key.item].path)

        cache = DiskLatentCache(latent_cache_folder(vae), path_of)
        keys = data.all_keys()
        with progress.task("caching latents", total=len(keys)) as task:
            cache.fill(vae, keys, data.load, advance=task.advance)
        vae.to("cpu")
        progress.log(f"latent cache: {cache.hits} read, {cache.written} written in {cache.folder}")
        return cache
    if config.cache_latents:
        return setup.cache_latents(vae, data, progress)
    return None
