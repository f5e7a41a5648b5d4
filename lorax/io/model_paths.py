"""A model spec → a local path: an existing file or folder, a built-in model name (a diffusers folder shipped inside
the package, ``BUILTIN_MODELS``), or a Hub id through the Hugging Face cache. Standard library only (the Hub client
loads when a Hub id is asked for), so the CLI can resolve names cheaply; ``lorax.models.registry`` re-exports the
built-in names.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from lorax.errors import InputError, ModelNotFoundError
from lorax.io.checkpoint_sources import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES

_ZOO = Path(__file__).resolve().parent.parent / "zoo"

BUILTIN_MODELS: dict[str, Path] = {
    "shapes": _ZOO / "shapes" / "model",
    "shapes-flux": _ZOO / "shapes_flux" / "model",
}
# How each built-in model is rebuilt (the Makefile's targets), for the message when its folder is missing.
_REBUILD = {"shapes": "make shapes-model", "shapes-flux": "make shapes-flux-model"}
_HUB_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "*/*_config.json",
    "*/*.txt",
    "*/tokenizer*.json",
    "*/vocab.json",
    "*/special_tokens_map.json",
    "*/diffusion_pytorch_model.safetensors",
    "*/model.safetensors",
    "*/*.safetensors.index.json",
]


def resolve_builtin(name: str) -> Path | None:
    """The packaged diffusers folder for a built-in model name, or ``None`` if ``name`` is not a built-in name.

    Raises:
        ModelNotFoundError: the name is built in but its folder is missing (an install without package data).
    """
    folder = BUILTIN_MODELS.get(name)
    if folder is None:
        return None
    if not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"the built-in model {name!r} is missing from this install (no model_index.json); "
            f"reinstall lorax, or rebuild it with `{_REBUILD.get(name, 'make shapes-model')}`",
            path=folder,
        )
    return folder


def resolve_model(spec: str | Path) -> Path:
    """A model spec → a local path: an existing file or folder, a built-in name, or a Hub id from the HF cache."""
    p = Path(spec).expanduser()
    if p.exists():
        return p
    text = str(spec)
    builtin = _resolve_builtin(text)
    if builtin is not None:
        return builtin
    if p.suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES or text.startswith((".", "/", "~")):
        raise InputError("no such file", path=p)
    if text.count("/") == 1 and all(text.split("/")):
        return _local_or_hub(text, p)
    raise ModelNotFoundError(f"{text!r} is not a file, a folder, a built-in model or a Hub id (owner/name)")


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def _local_or_hub(text: str, p: Path) -> Path:
    """``owner/name`` that is no local path: a path that looks local (its first folder exists here, or no Hub id
    could be spelled so) is reported missing without asking the Hub; else the Hub's cache (or the Hub itself)."""
    first = Path(text.split("/")[0]).expanduser()
    if first.is_dir():
        raise InputError(f"no such file or folder ({first}/ exists, {p.name} is not in it)", path=p)
    if not _HUB_ID.fullmatch(text):
        raise InputError("no such file or folder", path=p)
    try:
        return hub_snapshot(text)
    except ModelNotFoundError as err:
        if hub_offline():
            raise ModelNotFoundError(
                "neither a local path (no such file or folder) nor a Hub model in the local Hugging Face cache "
                "(the hub is offline: HF_HUB_OFFLINE); pass a local path (a diffusers folder or a single-file "
                "checkpoint) or a cached Hub id",
                path=p,
            ) from None
        raise ModelNotFoundError(
            f"{p}: neither a local path (no such file or folder) nor a Hub model lorax can fetch ({err})"
        ) from None


def _resolve_builtin(name: str) -> Path | None:
    try:
        found = resolve_builtin(name)
    except KeyError:
        return None
    return None if found is None else Path(found)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_snapshot(repo_id: str, patterns: list[str] | None = None) -> Path:
    """A Hub repo's files through the normal Hugging Face cache (no download when offline)."""
    try:
        from huggingface_hub import snapshot_download

        offline = hub_offline()
        folder = snapshot_download(
            repo_id, allow_patterns=patterns or _HUB_PATTERNS, local_files_only=offline
        )
    except Exception as err:  # the hub client's many error types: all mean "not available here"
        if hub_offline():
            raise ModelNotFoundError(
                f"{repo_id!r} is not in the local Hugging Face cache and the hub is offline "
                "(HF_HUB_OFFLINE); pass a local path: a diffusers folder or a single-file checkpoint"
            ) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({first}); pass a local path instead"
        ) from None
    return Path(folder)
