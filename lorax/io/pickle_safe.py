"""Pickle checkpoints (``.ckpt``, ``.pt``, ``.bin``) are only ever loaded with ``weights_only=True``."""

from __future__ import annotations

import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

from lorax.errors import FormatError, UnsafeFileError
from lorax.io.safetensors_io import check_readable_file, pickle_named_safetensors


def load_pickle(path: str | Path) -> Any:
    """Load a torch pickle with ``weights_only=True``; anything that needs more is refused and never runs."""
    import torch

    p = check_readable_file(path)
    if p.suffix.lower() == ".safetensors":  # torch.load would hand it to safetensors ("header too large")
        raise pickle_named_safetensors(p)
    try:
        with warnings.catch_warnings():  # torch's notes (legacy format, storage types) are not for the user
            warnings.simplefilter("ignore")
            return torch.load(p, map_location="cpu", weights_only=True, mmap=_is_zip(p))
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else "unsupported content"
        detail = weights_only_detail(err)
        if detail is not None:
            raise refusal(p, detail) from None
        raise FormatError(f"not a readable torch checkpoint ({first})", path=p) from None
    except Exception as err:  # EOFError, RuntimeError, BadZipFile, ValueError, OSError, a library's own error
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise FormatError(f"not a readable torch checkpoint ({first})", path=p) from None


def _is_zip(p: Path) -> bool:
    return zipfile.is_zipfile(p)


PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def weights_only_detail(err: BaseException) -> str | None:
    """What torch's weights-only unpickler refused (``GLOBAL posix.system …``), or None for another error."""
    text = str(err)
    if "Weights only load failed" not in text and "weights_only" not in text:
        return None
    lines = [ln.strip() for ln in text.splitlines()]
    found = next((ln for ln in lines if "unsupported" in ln.lower()), None)
    if found is None:  # torch's one-paragraph form: keep the sentence that names what was refused
        found = next((s for s in text.split(". ") if "unsupported" in s.lower()), "unsupported content")
    return found.strip().rstrip(".")


def refusal(path: str | Path, detail: str) -> UnsafeFileError:
    """The one refusal of a pickle that needs more than plain tensors: why, and how to convert it if trusted."""
    p = Path(path)
    out = p.with_name(_safetensors_name(p.name))
    return UnsafeFileError(
        f"refused: it is a pickle, and a pickle can hold code ({detail}); lorax never runs it. If you trust the "
        f'file, convert it to safetensors in a sandbox (a throwaway container or VM), e.g. python -c "import torch, '
        f"safetensors.torch as st; sd = torch.load('{p}', weights_only=False); "
        f"st.save_file(sd.get('state_dict', sd), '{out}')\"",
        path=p,
    )


def _safetensors_name(name: str) -> str:
    """The safetensors file that diffusers and transformers look for in place of a pickle."""
    known = {
        "pytorch_model.bin": "model.safetensors",
        "diffusion_pytorch_model.bin": "diffusion_pytorch_model.safetensors",
    }
    return known.get(name, Path(name).stem + ".safetensors")
