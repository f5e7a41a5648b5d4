"""lorax's one dtype vocabulary: ``fp16``, ``bf16``, ``fp32`` on the command line, in configs and in headers.

``SAFETENSORS`` names them the way safetensors headers do; ``torch_dtype`` gives the torch dtype (torch imported
only then).
"""

from __future__ import annotations

from typing import Any

NAMES = ("fp16", "bf16", "fp32")
SAFETENSORS = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
LONG_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def torch_dtype(name: str) -> Any:
    """``fp16`` / ``bf16`` / ``fp32`` → the torch dtype (a ``KeyError`` for any other name)."""
    import torch

    return getattr(torch, LONG_NAMES[name])


def torch_dtype_or_none(name: str | None) -> Any:
    """The torch dtype of ``name``, or ``None`` for ``None`` or a name outside ``NAMES``."""
    return torch_dtype(name) if name in LONG_NAMES else None
