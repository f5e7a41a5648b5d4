"""Model families (sd1, sd2, sdxl): their full-size configs, module tables and name conventions.

The configs ship as small JSON files in ``lorax/models/configs/`` (``<family>_<component>.json``), and so do the
module tables (``lorax/models/tables/``: every Linear/Conv2d path and weight shape, in traversal order), read off the
full-size model built on the meta device and checked against it by a test.

Path conventions (DESIGN.md): lorax keys text-encoder modules the on-disk way, ``text_model.encoder.layers.0…``.
transformers ≥ 5 builds ``CLIPTextModel`` without the ``text_model`` level (live path ``encoder.layers.0…``) but
``CLIPTextModelWithProjection`` with it; ``disk_to_live`` / ``live_to_disk`` map between the two.

Kohya's SDXL trainer names UNet modules the original (SGM) way (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``);
``diffusers_to_sgm`` / ``sgm_to_diffusers`` map whole module paths both ways from the UNet config's block layout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

FAMILIES: dict[str, tuple[str, ...]] = {
    "sd1": ("unet", "text_encoder"),
    "sd2": ("unet", "text_encoder"),
    "sdxl": ("unet", "text_encoder", "text_encoder_2"),
}
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
# Leading names of a CLIP text transformer's children below ``text_model``.
_TEXT_MODEL_CHILDREN = ("embeddings", "encoder", "final_layer_norm")


def _check(family: str, component: str | None = None) -> None:
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    if component is not None and component not in FAMILIES[family]:
        raise ConfigError(
            f"family {family} has no component {component!r}; it has {', '.join(FAMILIES[family])}"
        )


@cache
def _config_text(family: str, component: str) -> str:
    return (resources.files("lorax.models") / "configs" / f"{family}_{component}.json").read_text()


def family_config(family: str, component: str) -> dict[str, Any]:
    """The full-size config of one component (a fresh dict; ``_class_name`` names the model class)."""
    _check(family, component)
    return dict(json.loads(_config_text(family, component)))


def _build(config: dict[str, Any]) -> nn.Module:
    import torch

    config = dict(config)
    cls_name = config.pop("_class_name")
    config.pop("architectures", None)
    with torch.device("meta"):
        if cls_name == "UNet2DConditionModel":
            from diffusers import UNet2DConditionModel

            return UNet2DConditionModel(**config)  # type: ignore[no-any-return,return-value]
        import transformers

        cls = getattr(transformers, cls_name)
        return cls(transformers.CLIPTextConfig(**config))  # type: ignore[no-any-return]


@cache
def meta_model(family: str, component: str) -> nn.Module:
    """The full-size component built on the meta device (shapes and structure only), cached."""
    _check(family, component)
    return _build(family_config(family, component))


def has_text_model(model: Any) -> bool:
    """Whether a live text encoder keeps the ``text_model`` level (transformers < 5, or ``…WithProjection``)."""
    return hasattr(model, "text_model")


def live_to_disk(component: str, path: str) -> str:
    """A live module path → lorax's on-disk convention (text encoders gain ``text_model.``)."""
    if component in TEXT_COMPONENTS and path.split(".", 1)[0] in _TEXT_MODEL_CHILDREN:
        return "text_model." + path
    return path


def disk_to_live(component: str, path: str, model: Any = None, *, text_model: bool | None = None) -> str:
    """An on-disk module path → the path inside the live ``model`` (or as ``text_model`` says)."""
    if component not in TEXT_COMPONENTS:
        return path
    keep = has_text_model(model) if text_model is None else text_model
    if not keep and path.startswith("text_model."):
        return path[len("text_model.") :]
    if keep and path.split(".", 1)[0] in _TEXT_MODEL_CHILDREN:
        return "text_model." + path
    return path


def weight_table(model: nn.Module, component: str) -> dict[str, tuple[int, ...]]:
    """``{on-disk path: weight shape}`` of every ``nn.Linear`` and ``nn.Conv2d`` in ``model``, in traversal order."""
    from torch import nn

    table: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            table[live_to_disk(component, name)] = tuple(module.weight.shape)
    return table


@cache
def module_table(family: str, component: str) -> dict[str, tuple[int, ...]]:
    """``{on-disk path: weight shape}`` of the full-size model's Linear/Conv2d modules (cached; do not mutate).

    Read from the table shipped in ``lorax/models/tables/`` (written by ``write_module_tables``; a test checks it
    against the meta model), so that naming a kohya LoRA's modules needs neither diffusers nor transformers: their
    import and the meta model cost seconds on every ``convert``, ``mix``, ``extract`` and ``merge``.
    """
    _check(family, component)
    shipped = resources.files("lorax.models") / "tables" / f"{family}_{component}.json"
    if shipped.is_file():
        return {k: tuple(v) for k, v in json.loads(shipped.read_text()).items()}
    return weight_table(meta_model(family, component), component)


def write_module_tables(folder: Path) -> list[Path]:
    """Write every family's module tables (``{path: shape}`` in traversal order) as JSON into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for family, components in FAMILIES.items():
        for component in components:
            table = weight_table(meta_model(family, component), component)
            path = folder / f"{family}_{component}.json"
            path.write_text(json.dumps({k: list(v) for k, v in table.items()}, indent=0) + "\n")
            written.append(path)
    return written


def module_paths(family: str, component: str) -> frozenset[str]:
    """The on-disk paths of the full-size model's Linear/Conv2d modules."""
    return frozenset(module_table(family, component))


# ---------------------------------------------------------------------------------------------------------------
# SGM (original Stable Diffusion) UNet naming ⇄ diffusers naming

_RESNET_SGM = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_DIFFUSERS = {v: k for k, v in _RESNET_SGM.items()}
_TOP_SGM = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def _block_map(unet_config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(diffusers prefix, sgm prefix, kind)`` for every UNet block; kind is resnet, attention or plain."""
    down = list(unet_config["down_block_types"])
    up = list(unet_config["up_block_types"])
    layers = int(unet_config.get("layers_per_block", 2))
    rows: list[tuple[str, str, str]] = []
    n = 1
    for i, block in enumerate(down):
        for j in range(layers):
            rows.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", "resnet"))
            if "CrossAttn" in block:
                rows.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", "attention"))
            n += 1
        if i < len(down) - 1:
            rows.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{n}.0.op", "plain"))
            n += 1
    rows += [
        ("mid_block.resnets.0", "middle_block.0", "resnet"),
        ("mid_block.attentions.0", "middle_block.1", "attention"),
        ("mid_block.resnets.1", "middle_block.2", "resnet"),
    ]
    n = 0
    for i, block in enumerate(up):
        attn = "CrossAttn" in block
        for j in range(layers + 1):
            rows.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", "resnet"))
            if attn:
                rows.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", "attention"))
            if j == layers and i < len(up) - 1:
                rows.append(
                    (
                        f"up_blocks.{i}.upsamplers.0.conv",
                        f"output_blocks.{n}.{2 if attn else 1}.conv",
                        "plain",
                    )
                )
            n += 1
    return rows


def _translate(
    path: str, rows: Iterable[tuple[str, str, str]], top: Mapping[str, str], inner: Mapping[str, str]
) -> str | None:
    for prefix, target in top.items():
        if path == prefix or path.startswith(prefix + "."):
            return target + path[len(prefix) :]
    for src, dst, kind in rows:
        if path == src or path.startswith(src + "."):
            rest = path[len(src) + 1 :] if path != src else ""
            if kind == "resnet":
                for a, b in inner.items():
                    if rest == a or rest.startswith(a + "."):
                        rest = b + rest[len(a) :]
                        break
            return f"{dst}.{rest}" if rest else dst
    return None


def diffusers_to_sgm(path: str, unet_config: Mapping[str, Any]) -> str | None:
    """A diffusers UNet module path in SGM naming (``down_blocks.1.attentions.0…`` → ``input_blocks.4.1…``)."""
    rows = [(d, s, k) for d, s, k in _block_map(unet_config)]
    return _translate(path, rows, {v: k for k, v in _TOP_SGM.items()}, _RESNET_DIFFUSERS)


def sgm_to_diffusers(path: str, unet_config: Mapping[str, Any]) -> str | None:
    """An SGM UNet module path in diffusers naming; ``None`` when it names no known block."""
    rows = [(s, d, k) for d, s, k in _block_map(unet_config)]
    return _translate(path, rows, _TOP_SGM, _RESNET_SGM)


# ---------------------------------------------------------------------------------------------------------------
# Family detection from LoRA keys

_CROSS_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_BASE_VERSIONS = {"sd_v1": "sd1", "sd_v2": "sd2", "sdxl": "sdxl"}


def family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """A family a file's header states: lorax's ``lorax_family``, or kohya's ``ss_base_model_version``."""
    if metadata.get("lorax_family") in FAMILIES:
        return metadata["lorax_family"]
    base = metadata.get("ss_base_model_version", "")
    for prefix, family in _BASE_VERSIONS.items():
        if base.startswith(prefix):
            return family
    return None


_TEXT_DIM = {768: "sd1", 1024: "sd2", 1280: "sdxl"}


def detect_family_from_lora_keys(
    keys: Iterable[str], shapes: Mapping[str, Sequence[int]] | None = None
) -> str | None:
    """Guess the family from a LoRA's keys (any format, file keys or lorax paths) and, if given, their shapes.

    Evidence, strongest first: a second text encoder or kohya's SGM block names (sdxl); the cross-attention key
    input width (768 sd1, 1024 sd2, 2048 sdxl); the text encoder's width. ``None`` when nothing tells.
    """
    keys = list(keys)
    shapes = shapes or {}
    flat = {k: k.replace(".", "_") for k in keys}
    for f in flat.values():
        if f.startswith(("lora_te2_", "text_encoder_2_", "lora_te1_")) or re.search(
            r"(^|_)(input_blocks|output_blocks|middle_block)_\d", f
        ):
            return "sdxl"
        if re.search(r"transformer_blocks_[1-9]", f) and "unet" in f:
            return "sdxl"
    for k, f in flat.items():
        shape = shapes.get(k)
        if not shape or len(shape) < 2:
            continue
        if re.search(r"attn2_(to_k|to_v|processor_to_k|processor_to_v)", f) and re.search(
            r"(down|lora_A|lora_down)", f
        ):
            found = _CROSS_DIM.get(int(shape[-1] if len(shape) == 2 else shape[1]))
            if found:
                return found
    for k, f in flat.items():
        shape = shapes.get(k)
        if not shape or len(shape) != 2:
            continue
        if re.search(r"self_attn_(q|k|v)_proj", f) and re.search(r"(down|lora_A)", f):
            found = _TEXT_DIM.get(int(shape[1]))
            if found:
                return found
    return None


# ---------------------------------------------------------------------------------------------------------------
# What a module is, from its path

TARGET_KINDS = ("attention", "ff", "conv", "other")


def target_kind(path: str) -> str:
    """``attention`` (q/k/v/out, proj_in/out), ``ff`` (feed-forward / MLP), ``conv`` (resnets, samplers, conv_in/out)
    or ``other`` (time embeddings …), from a module path in diffusers naming."""
    parts = path.split(".")
    if "ff" in parts or "mlp" in parts:
        return "ff"
    if any(p in ("attn1", "attn2", "self_attn", "attentions") for p in parts):
        return "attention"
    if any(p in ("resnets", "downsamplers", "upsamplers", "conv_in", "conv_out") for p in parts):
        return "conv" if parts[-1] != "time_emb_proj" else "other"
    return "other"


def target_kinds(paths: Iterable[str]) -> list[str]:
    """The kinds present among ``paths``, in the order of ``TARGET_KINDS``."""
    found = {target_kind(p) for p in paths}
    return [k for k in TARGET_KINDS if k in found]
