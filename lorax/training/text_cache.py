"""``--cache-text-to-disk``: the frozen text encoders' outputs kept as safetensors files and reused by later runs
(kohya's ``cache_text_encoder_outputs_to_disk``), for encoders as large as Flux's T5-XXL.

A prompt encoder that caches (``PromptEncoder``, ``SdxlPromptEncoder``, any with ``cache_enabled`` and a ``_cache``
mapping of prompt → tensor or tuple of tensors) gets a ``DiskTextCache`` as that mapping: a prompt found on disk is
read, never encoded; a new one is encoded once and written. The files live in ``$LORAX_CACHE/text`` (default
``~/.cache/lorax/text``), one folder per encoder identity: the prompt encoder's kind and clip skip, each text
encoder's config and a fingerprint of its weights (shape, dtype, sum and first values of every tensor, as the latent
cache fingerprints a VAE) and each tokenizer's class, length and vocabulary. Another model, dtype or tokenizer gets
another folder, never a stale embedding. A file also stores its prompt, and is used only for that prompt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

CACHE_VERSION = "1"


def module_fingerprint(module: Any) -> str:
    """A short hash of a module's config and weights (cheap at full size: a sum and 16 values per tensor)."""
    import torch

    h = hashlib.sha256(type(module).__qualname__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        h.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in module.state_dict().items():
            flat = t.detach().flatten().cpu()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}:{float(flat.double().sum())!r}".encode())
            h.update(flat[:16].float().numpy().tobytes())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256(type(tokenizer).__qualname__.encode())
    h.update(f"{getattr(tokenizer, 'model_max_length', None)}:{len(tokenizer)}".encode())
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    h.update(json.dumps(sorted(vocab.items()), default=str).encode())
    return h.hexdigest()[:16]


def encoder_identity(prompts: Any) -> str:
    """The identity of a prompt encoder's outputs: its kind, clip skip, encoders and tokenizers."""
    import torch

    parts = [type(prompts).__qualname__, f"clip_skip={getattr(prompts, 'clip_skip', 1)}"]
    for name, value in sorted(vars(prompts).items()):
        for item in value if isinstance(value, list | tuple) else [value]:
            if isinstance(item, torch.nn.Module):
                parts.append(f"{name}:{module_fingerprint(getattr(item, 'module', item))}")
            elif "tokenizer" in name and item is not None:
                parts.append(f"{name}:{tokenizer_fingerprint(item)}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class DiskTextCache(MutableMapping[str, Any]):
    """Prompt → encoder output (a tensor or a tuple of tensors), in memory and as one safetensors file a prompt."""

    def __init__(self, folder: Path, device: torch.device | None = None) -> None:
        self.folder = Path(folder)
        self.device = device
        self.hits = 0
        self.written = 0
        self._memory: dict[str, Any] = {}

    def file_for(self, prompt: str) -> Path:
        return self.folder / f"{hashlib.sha256(prompt.encode()).hexdigest()[:32]}.safetensors"

    def _load(self, prompt: str) -> bool:
        from lorax.io.cache_files import read_cached

        cached = read_cached(self.file_for(prompt))
        if cached is None:
            return False  # missing or unreadable: encoded again and rewritten
        stored, meta = cached
        if meta.get("prompt") != prompt or meta.get("lorax_cache") != CACHE_VERSION:
            return False
        try:
            tensors = [stored[str(i)] for i in range(int(meta["parts"]))]
        except (KeyError, ValueError):
            return False
        if self.device is not None:
            tensors = [t.to(self.device) for t in tensors]
        self._memory[prompt] = tensors[0] if meta.get("kind") == "tensor" else tuple(tensors)
        self.hits += 1
        return True

    def __contains__(self, prompt: object) -> bool:
        return isinstance(prompt, str) and (prompt in self._memory or self._load(prompt))

    def __getitem__(self, prompt: str) -> Any:
        if prompt not in self:
            raise KeyError(prompt)
        return self._memory[prompt]

    def __setitem__(self, prompt: str, value: Any) -> None:
        import torch

        from lorax.errors import ConfigError
        from lorax.io.cache_files import write_cached

        parts = [value] if isinstance(value, torch.Tensor) else list(value)
        tensors = {str(i): t.detach().cpu().contiguous() for i, t in enumerate(parts)}
        if not all(bool(torch.isfinite(t).all()) for t in tensors.values()):
            raise ConfigError(f"--cache-text-to-disk: the text encoder gave non-finite values for {prompt!r}")
        self._memory[prompt] = value
        meta = {
            "lorax_cache": CACHE_VERSION,
            "prompt": prompt,
            "parts": str(len(parts)),
            "kind": "tensor" if isinstance(value, torch.Tensor) else "tuple",
        }
        write_cached(self.file_for(prompt), tensors, meta)
        self.written += 1

    def __delitem__(self, prompt: str) -> None:
        del self._memory[prompt]

    def __iter__(self) -> Iterator[str]:
        return iter(self._memory)

    def __len__(self) -> int:
        return len(self._memory)


def text_cache_folder(prompts: Any) -> Path:
    from lorax.data.prior import cache_root

    return cache_root() / "text" / f"v{CACHE_VERSION}-{encoder_identity(prompts)}"


def attach_disk_cache(prompts: Any) -> DiskTextCache:
    """Give the caching prompt encoder ``prompts`` a disk-backed cache (its encoders must be frozen)."""
    from lorax.errors import ConfigError

    if not getattr(prompts, "cache_enabled", False) or not hasattr(prompts, "_cache"):
        raise ConfigError(
            "--cache-text-to-disk: the text encoders' outputs are not cached in this run "
            "(drop --train-text and --no-cache-text)"
        )
    cache = DiskTextCache(text_cache_folder(prompts), getattr(prompts, "device", None))
    prompts._cache = cache
    return cache
