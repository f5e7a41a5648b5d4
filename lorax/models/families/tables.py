"""A family's full-size configs, module tables and text-encoder path conventions.

The built-in configs ship as small JSON files in ``lorax/models/configs/`` (a ``Component.config`` stem), and so do the
module tables (``lorax/models/tables/``: every Linear/Conv2d path and weight shape, in traversal order), read off the
full-size model built on the meta device and checked against it by a test.

Path conventions (DESIGN.md): lorax keys text-encoder modules the on-disk way, ``text_model.encoder.layers.0…``.
transformers ≥ 5 builds ``CLIPTextModel`` without the ``text_model`` level (live path ``encoder.layers.0…``) but
``CLIPTextModelWithProjection`` with it; ``disk_to_live`` / ``live_to_disk`` map between the two.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.models.families.base import ComponentsView, all_families, all_text_components, any_component, get

if TYPE_CHECKING:
    from torch import nn

# ``{family: its LoRA-able components}``, live over the registry.
FAMILIES = ComponentsView()
# Leading names of a CLIP text transformer's children below ``text_model``.
_TEXT_MODEL_CHILDREN = ("embeddings", "encoder", "final_layer_norm")


def _check(family: str, component: str | None = None) -> None:
    found = get(family)
    if component is not None:
        found.component(component)


@cache
def _config_text(stem: str) -> str:
    return (resources.files("lorax.models") / "configs" / f"{stem}.json").read_text()


def family_config(family: str, component: str) -> dict[str, Any]:
    """The full-size config of one component (a fresh dict; ``_class_name`` names the model class)."""
    config = get(family).component(component).config
    if isinstance(config, str):
        return dict(json.loads(_config_text(config)))
    return json.loads(json.dumps(config))


def _build(config: dict[str, Any]) -> nn.Module:
    import torch

    config = dict(config)
    cls_name = config.pop("_class_name")
    config.pop("architectures", None)
    with torch.device("meta"):
        if cls_name in ("UNet2DConditionModel", "FluxTransformer2DModel"):
            import diffusers

            return getattr(diffusers, cls_name)(**config)  # type: ignore[no-any-return]
        import transformers

        cls = getattr(transformers, cls_name)
        config_cls = transformers.T5Config if cls_name.startswith("T5") else transformers.CLIPTextConfig
        return cls(config_cls(**config))  # type: ignore[no-any-return]


@cache
def meta_model(family: str, component: str) -> nn.Module:
    """The full-size component built on the meta device (shapes and structure only), cached."""
    _check(family, component)
    return _build(family_config(family, component))


def has_text_model(model: nn.Module | None) -> bool:
    """Whether a live text encoder keeps the ``text_model`` level (transformers < 5, or ``…WithProjection``)."""
    return hasattr(model, "text_model")


def class_keeps_text_model(component: str) -> bool:
    """Whether the component's model class keeps the ``text_model`` level under transformers ≥ 5 (only
    ``CLIPTextModelWithProjection`` does; ``CLIPTextModel`` drops it)."""
    spec = any_component(component)
    return spec is not None and spec.model_class == "CLIPTextModelWithProjection"


def live_to_disk(component: str, path: str) -> str:
    """A live module path → lorax's on-disk convention (text encoders gain ``text_model.``)."""
    if component in all_text_components() and path.split(".", 1)[0] in _TEXT_MODEL_CHILDREN:
        return "text_model." + path
    return path


def disk_to_live(
    component: str, path: str, model: nn.Module | None = None, *, text_model: bool | None = None
) -> str:
    """An on-disk module path → the path inside the live ``model`` (or as ``text_model`` says)."""
    if component not in all_text_components():
        return path
    keep = has_text_model(model) if text_model is None else text_model
    if not keep and path.startswith("text_model."):
        return path[len("text_model.") :]
    if keep and path.split(".", 1)[0] in _TEXT_MODEL_CHILDREN:
        return "text_model." + path
    return path


def weight_table(model: nn.Module, component: str) -> dict[str, tuple[int, ...]]:
    """``{on-disk path: weight shape}`` of every ``nn.Linear`` and ``nn.Conv2d`` in ``model``, in traversal order
    (a ``lorax.io.checkpoint.PathSkeleton`` gives its own, without torch)."""
    shapes = getattr(model, "weight_shapes", None)
    if isinstance(shapes, dict):
        return dict(shapes)
    from torch import nn

    table: dict[str, tuple[int, ...]] = {}
    clip = type(model).__name__.startswith(
        "CLIP"
    )  # only CLIP text encoders have the ``text_model.`` convention
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            table[live_to_disk(component, name) if clip else name] = tuple(module.weight.shape)
    return table


@cache
def module_table(family: str, component: str) -> dict[str, tuple[int, ...]]:
    """``{on-disk path: weight shape}`` of the full-size model's Linear/Conv2d modules (cached; do not mutate).

    Read from the table shipped in ``lorax/models/tables/`` (written by ``write_module_tables``; a test checks it
    against the meta model), so that naming a kohya LoRA's modules needs neither diffusers nor transformers: their
    import and the meta model cost seconds on every ``convert``, ``mix``, ``extract`` and ``merge``.
    """
    stem = get(family).component(component).table
    if stem is not None:
        shipped = resources.files("lorax.models") / "tables" / f"{stem}.json"
        return {k: tuple(v) for k, v in json.loads(shipped.read_text()).items()}
    return weight_table(meta_model(family, component), component)


def write_module_tables(folder: Path) -> list[Path]:
    """Write every shipped module table (``{path: shape}`` in traversal order) as JSON into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for family in all_families():
        for component in family.components:
            if component.table is None:
                continue
            table = weight_table(meta_model(family.name, component.name), component.name)
            path = folder / f"{component.table}.json"
            path.write_text(json.dumps({k: list(v) for k, v in table.items()}, indent=0) + "\n")
            written.append(path)
    return written


def module_paths(family: str, component: str) -> frozenset[str]:
    """The on-disk paths of the full-size model's Linear/Conv2d modules."""
    return frozenset(module_table(family, component))


# ---------------------------------------------------------------------------------------------------------------
# What a module is, from its path

TARGET_KINDS = ("attention", "ff", "conv", "other")


def target_kind(path: str) -> str:
    """``attention`` (q/k/v/out, proj_in/out), ``ff`` (feed-forward / MLP), ``conv`` (resnets, samplers, conv_in/out)
    or ``other`` (time embeddings …), from a module path in diffusers naming."""
    parts = path.split(".")
    if "ff" in parts or "mlp" in parts:
        return "ff"
    if "proj_mlp" in parts:  # Flux's single-block MLP input
        return "ff"
    if any(p in ("attn1", "attn2", "attn", "self_attn", "attentions") for p in parts):
        return "attention"
    if any(p in ("resnets", "downsamplers", "upsamplers", "conv_in", "conv_out") for p in parts):
        return "conv" if parts[-1] != "time_emb_proj" else "other"
    return "other"


def target_kinds(paths: Iterable[str]) -> list[str]:
    """The kinds present among ``paths``, in the order of ``TARGET_KINDS``."""
    found = {target_kind(p) for p in paths}
    return [k for k in TARGET_KINDS if k in found]
