"""Model families (sd1, sd2, sdxl, flux): one ``Family`` object each, in one module each, and what is computed from them.

- ``base``: the ``Family`` / ``Component`` dataclasses and the registry (``register``, ``get``); ``detect``: the one
  function that names a family from any evidence (a header, a LoRA's keys, a single file's keys, a folder's
  configs, a live pipeline).
- ``sd1``, ``sd2``, ``sdxl``, ``flux``: the built-in families, registered by the registry itself on its first lookup
  (``base.BUILTIN``: the one place that lists them; nothing imports a family module for its side effect).
- ``tables``: full-size configs, meta models, module tables, the text encoders' ``text_model.`` path convention.
- ``sgm``: SGM ⇄ diffusers UNet module names (kohya's SDXL naming).

Adding a family is a new module here that builds and registers a ``Family``, and its name in ``base.BUILTIN``
(docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lorax.models.families.base import (
    Component,
    Family,
    all_components,
    all_families,
    all_text_components,
    any_component,
    embedding_component,
    embedding_keys,
    family_of_text_width,
    find,
    get,
    kohya_prefixes,
    names,
    register,
    unregister,
)
from lorax.models.families.detect import META_KEYS, detect
from lorax.models.families.sgm import diffusers_to_sgm, sgm_to_diffusers
from lorax.models.families.tables import (
    FAMILIES,
    TARGET_KINDS,
    class_keeps_text_model,
    disk_to_live,
    family_config,
    has_text_model,
    live_to_disk,
    meta_model,
    module_paths,
    module_table,
    target_kind,
    target_kinds,
    weight_table,
    write_module_tables,
)

__all__ = [
    "FAMILIES",
    "META_KEYS",
    "TARGET_KINDS",
    "Component",
    "Family",
    "all_components",
    "all_families",
    "all_text_components",
    "any_component",
    "class_keeps_text_model",
    "detect",
    "detect_family_from_lora_keys",
    "diffusers_to_sgm",
    "disk_to_live",
    "embedding_component",
    "embedding_keys",
    "family_config",
    "family_from_metadata",
    "family_of_text_width",
    "find",
    "get",
    "has_text_model",
    "kohya_prefixes",
    "live_to_disk",
    "meta_model",
    "module_paths",
    "module_table",
    "names",
    "register",
    "sgm_to_diffusers",
    "target_kind",
    "target_kinds",
    "unregister",
    "weight_table",
    "write_module_tables",
]


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """A family a file's header states: lorax's ``lorax_family``, or kohya's ``ss_base_model_version``."""
    return detect(metadata=metadata)


def detect_family_from_lora_keys(
    keys: Iterable[str], shapes: Mapping[str, Sequence[int]] | None = None
) -> str | None:
    """The family a LoRA's keys (any format) and, if given, their shapes tell; ``None`` when nothing tells."""
    return detect(lora_keys=keys, shapes=shapes)


def __getattr__(name: str) -> Any:
    if name == "TEXT_COMPONENTS":  # the text encoders of every registered family, live
        return all_text_components()
    raise AttributeError(name)
