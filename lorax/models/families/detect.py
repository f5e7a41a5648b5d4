"""``detect``: the one function that names a model family from any evidence (a header, a LoRA's keys, a single
file's keys, a folder's configs, a live pipeline), asking the registered ``Family`` objects (``base``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lorax.io import checkpoint_layouts
from lorax.models.families.base import Family, all_families, names


def detect(
    *,
    metadata: Mapping[str, str] | None = None,
    lora_keys: Iterable[str] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    single_keys: list[str] | None = None,
    shape_of: Callable[[str], Sequence[int] | None] | None = None,
    model_index: Mapping[str, Any] | None = None,
    text_config: Mapping[str, Any] | None = None,
    unet_config: Mapping[str, Any] | None = None,
    pipeline: Any = None,
    path: Path | None = None,
) -> str | None:
    """The family the evidence names, strongest first; ``None`` when LoRA evidence tells nothing.

    - ``metadata``: a header's ``lorax_family`` / ``lorax.family``, or kohya's ``ss_base_model_version``;
    - ``single_keys`` (+ ``shape_of``): a single-file checkpoint's keys (raises when no family fits);
    - ``model_index`` (+ ``text_config``, ``unet_config``): a diffusers folder's configs (raises likewise);
    - ``pipeline``: a live pipeline (its ``lorax_family`` label, else its components and UNet config);
    - ``lora_keys`` (+ ``shapes``): a LoRA's keys in any format, and their shapes.
    """
    if metadata:
        found = _from_metadata(metadata)
        if found:
            return found
    if single_keys is not None:
        return checkpoint_layouts.family_from_single_keys(single_keys, shape_of, path=path)
    if model_index is not None:
        return checkpoint_layouts.family_from_configs(model_index, text_config, unet_config, path=path)
    if pipeline is not None:
        return _from_pipeline(pipeline)
    if lora_keys is not None:
        return _from_lora_keys(lora_keys, shapes)
    return None


META_KEYS = checkpoint_layouts.META_FAMILY_KEYS


def _from_metadata(metadata: Mapping[str, str]) -> str | None:
    for key in META_KEYS:
        if metadata.get(key) in names():
            return metadata[key]
    base = metadata.get("ss_base_model_version", "")
    for f in all_families():
        if any(base.startswith(v) for v in f.kohya_versions):
            return f.name
    return None


def _from_pipeline(pipe: Any) -> str:
    label = getattr(pipe, "lorax_family", None) or getattr(
        getattr(pipe, "config", None), "lorax_family", None
    )
    if isinstance(label, str):
        return label
    families = list(all_families())
    for (
        f
    ) in families:  # a family with a component of its own (SDXL's second text encoder) beside its own UNet
        own = [c for c in f.checkpoint.folder_markers if _module(pipe, c) is not None]
        if own and _module(pipe, f.unet().name) is not None:
            return f.name
    config = getattr(_module(pipe, "unet"), "config", None)
    for f in families:
        if f.conditioning == "text_time" and getattr(config, "addition_embed_type", None) == "text_time":
            return f.name
    plain = [f for f in families if not f.checkpoint.folder_markers]
    width = getattr(config, "cross_attention_dim", None)
    for f in plain:  # a family told by its linear projections (SD2) or its cross-attention width
        if f.checkpoint.linear_projection and (
            f.cross_attention_dim == width or getattr(config, "use_linear_projection", False)
        ):
            return f.name
    return next((f for f in plain if f.cross_attention_dim == width), plain[0]).name


def _module(pipe: Any, name: str) -> Any:
    import torch

    model = getattr(pipe, name, None)
    return model if isinstance(model, torch.nn.Module) else None


_SGM_BLOCKS = re.compile(r"(^|_)(input_blocks|output_blocks|middle_block)_\d")


def _from_lora_keys(keys: Iterable[str], shapes: Mapping[str, Sequence[int]] | None) -> str | None:
    """Evidence, strongest first: a component or a naming only one family has (a second text encoder, kohya's SGM
    block names); the cross-attention key input width; the text encoder's width."""
    keys = list(keys)
    shapes = shapes or {}
    flat = {k: k.replace(".", "_") for k in keys}
    families = list(all_families())
    for fam in families:  # module names only one family has (Flux's double / single blocks)
        markers = [re.compile(m) for m in fam.lora_markers]
        if any(m.search(k) for m in markers for k in keys):
            return fam.name
    for f in flat.values():
        for fam in families:
            if _only_this_family(f, fam, families):
                return fam.name
    for k, f in flat.items():
        shape = shapes.get(k)
        if not shape or len(shape) < 2:
            continue
        if re.search(r"attn2_(to_k|to_v|processor_to_k|processor_to_v)", f) and re.search(
            r"(down|lora_A|lora_down)", f
        ):
            width = int(shape[-1] if len(shape) == 2 else shape[1])
            found = next((fam for fam in families if fam.cross_attention_dim == width), None)
            if found:
                return found.name
    for k, f in flat.items():
        shape = shapes.get(k)
        if not shape or len(shape) != 2:
            continue
        if re.search(r"self_attn_(q|k|v)_proj", f) and re.search(r"(down|lora_A)", f):
            found = next((fam for fam in families if int(shape[1]) in _text_widths(fam)), None)
            if found:
                return found.name
    return None


def _text_widths(family: Family) -> set[int]:
    return {c.width for c in family.components if c.kind == "text" and c.width}


def _only_this_family(flat_key: str, family: Family, families: list[Family]) -> bool:
    """Whether a flattened LoRA key names something only ``family`` has: a component name or kohya prefix no
    other family uses, or (kohya's SDXL trainer) SGM block names / deep transformer blocks."""
    others = [f for f in families if f is not family]
    for c in family.components:
        if any(o.has(c.name) for o in others):
            continue
        if flat_key.startswith(c.name + "_"):
            return True
    for c in family.components:
        if any(c.kohya_prefix == oc.kohya_prefix for o in others for oc in o.components):
            continue
        if flat_key.startswith(c.kohya_prefix):
            return True
    if family.kohya_unet_names == "sgm":
        if _SGM_BLOCKS.search(flat_key):
            return True
        if re.search(r"transformer_blocks_[1-9]", flat_key) and "unet" in flat_key:
            return True
    return False
