"""A live diffusers pipeline as the adapters see it: its torch components by name, and its model family."""

from __future__ import annotations

from typing import Any

import torch


def component(pipe: Any, name: str) -> Any:
    """The component ``name`` of ``pipe`` if it is a torch module, else ``None``."""
    model = getattr(pipe, name, None)
    return model if isinstance(model, torch.nn.Module) else None


def pipeline_family(pipe: Any) -> str:
    """A pipeline's model family: its ``lorax_family`` label, else what its components show (``detect``)."""
    from lorax.models import families

    found = families.detect(pipeline=pipe)
    assert found is not None  # a pipeline always names a family
    return found
