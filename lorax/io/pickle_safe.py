"""Pickle checkpoints (``.ckpt``, ``.pt``, ``.bin``) are only ever loaded with ``weights_only=True``."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

from lorax.errors import FormatError, UnsafeFileError
from lorax.io.safetensors_io import check_readable_file, pickle_named_safetensors


def load_pickle(path: str | Path) -> Any:
    """Load a torch pickle with ``weights_only=True``; anything that needs more is refused and never runs."""
    import torch

    p = check_readable_file(path)
    if (
        p.suffix.lower() == ".safetensors"
    ):  # torch.load would hand it to safetensors, which calls it "too large"
        raise pickle_named_safetensors(p)
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=_is_zip(p))
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unsupported content"
        if "Weights only load failed" in str(err) or "weights_only" in str(err):
            lines = [ln.strip() for ln in str(err).splitlines()]
            detail = next(
                (ln.rstrip(".") for ln in lines if "unsupported" in ln.lower()), "unsupported content"
            )
            raise UnsafeFileError(
                f"refused: this pickle needs more than plain tensors to load ({detail}); "
                "its code was not run. Convert it to .safetensors with a tool you trust",
                path=p,
            ) from None
        raise FormatError(f"not a readable torch checkpoint ({first})", path=p) from None
    except Exception as err:  # EOFError, RuntimeError, BadZipFile, ValueError, OSError, a library's own error
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FormatError(f"not a readable torch checkpoint ({first})", path=p) from None


def _is_zip(p: Path) -> bool:
    return zipfile.is_zipfile(p)
