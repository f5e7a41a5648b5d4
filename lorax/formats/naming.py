"""Module-path tables for formats whose names lost their dots (kohya ``lora_unet_down_blocks_0_…``).

Decoding never splits on ``_`` blindly: a flat name is looked up in a table built from, in order of preference,
the target model's own modules, the family's full-size module table (plus SGM names for the UNet), and only for
tiny or unknown models a segment-vocabulary decoder that rejoins ``_``-split tokens into known attribute names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

from lorax.errors import ErrorPath, MismatchError
from lorax.models import families

# Multi-token attribute names found in SD UNets, CLIP text encoders, the original (SGM) UNet layout, Flux's
# transformer and T5.
VOCABULARY = frozenset(
    [
        "down_blocks",
        "up_blocks",
        "mid_block",
        "transformer_blocks",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "proj_in",
        "proj_out",
        "time_emb_proj",
        "conv_shortcut",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "text_model",
        "final_layer_norm",
        "conv_in",
        "conv_out",
        "conv_norm_out",
        "time_embedding",
        "linear_1",
        "linear_2",
        "add_embedding",
        "layer_norm1",
        "layer_norm2",
        "input_blocks",
        "middle_block",
        "output_blocks",
        "time_embed",
        "label_emb",
        "in_layers",
        "out_layers",
        "emb_layers",
        "skip_connection",
        "add_k_proj",
        "add_v_proj",
        "add_q_proj",
        "to_add_out",
        "token_embedding",
        "position_embedding",
        "text_projection",
        "encoder_hid_proj",
        "class_embedding",
        "norm_out",
        "conv_act",
        "ff_context",
        # Flux's transformer (diffusers names) and the T5 encoder
        "single_transformer_blocks",
        "time_text_embed",
        "timestep_embedder",
        "guidance_embedder",
        "text_embedder",
        "context_embedder",
        "x_embedder",
        "norm1_context",
        "proj_mlp",
        "wi_0",
        "wi_1",
    ]
)
_MAX_JOIN = max(len(w.split("_")) for w in VOCABULARY)


def flatten(path: str) -> str:
    """kohya's flat form of a module path: dots (and dashes) become underscores."""
    return path.replace(".", "_").replace("-", "_")


def vocabulary_decode(flat: str) -> str:
    """Rejoin ``_``-split tokens, preferring the longest known multi-token attribute name at each position."""
    tokens = flat.split("_")
    parts: list[str] = []
    i = 0
    while i < len(tokens):
        for n in range(min(_MAX_JOIN, len(tokens) - i), 1, -1):
            candidate = "_".join(tokens[i : i + n])
            if candidate in VOCABULARY:
                parts.append(candidate)
                i += n
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


def components_of(model: Any) -> dict[str, Any]:
    """``{component: nn.Module}`` from a dict or a pipeline (attributes unet, text_encoder, text_encoder_2)."""
    if model is None:
        return {}
    if isinstance(model, Mapping):
        return {k: v for k, v in model.items() if v is not None}
    return {c: getattr(model, c) for c in families.all_components() if getattr(model, c, None) is not None}


def unet_config_of(module: Any) -> dict[str, Any] | None:
    config = getattr(module, "config", None)
    if config is None or "down_block_types" not in config:
        return None
    return dict(config)


def _table_from_paths(
    component: str, paths: Iterable[str], unet_config: Mapping[str, Any] | None
) -> dict[str, str]:
    table: dict[str, str] = {}
    for path in paths:
        table[flatten(path)] = path
        if component == "unet" and unet_config is not None:
            sgm = families.diffusers_to_sgm(path, unet_config)
            if sgm is not None:
                table.setdefault(flatten(sgm), path)
        if component in families.all_text_components() and path.startswith("text_model."):
            table.setdefault(flatten(path[len("text_model.") :]), path)
    return table


def model_table(component: str, module: Any) -> dict[str, str]:
    """``{flat name: on-disk path}`` of a live module's Linear/Conv2d layers (and SGM names for a UNet)."""
    return _table_from_paths(component, families.weight_table(module, component), unet_config_of(module))


@cache
def family_table(family: str, component: str) -> dict[str, str]:
    """``{flat name: on-disk path}`` for a family's full-size component (cached; do not mutate)."""
    config = families.family_config(family, "unet") if component == "unet" else None
    return _table_from_paths(component, families.module_table(family, component), config)


class Resolver:
    """Maps flat names of one component back to module paths (model table, family table, or vocabulary)."""

    def __init__(self, component: str, *, model: Any = None, family: str | None = None) -> None:
        self.component = component
        self.strict = model is not None
        self.table: dict[str, str] = {}
        if model is not None:
            self.table = model_table(component, model)
        elif family is not None and component in families.FAMILIES.get(family, ()):
            self.table = family_table(family, component)

    def resolve(self, flat: str) -> str | None:
        if flat in self.table:
            return self.table[flat]
        if self.strict:
            return None
        path = vocabulary_decode(flat)
        if self.component == "unet" and path.split(".", 1)[0] in (
            "input_blocks",
            "middle_block",
            "output_blocks",
        ):
            # SGM names without a model or family table: the families whose kohya names are SGM (SDXL).
            for fam in families.all_families():
                if fam.kohya_unet_names != "sgm":
                    continue
                mapped = families.sgm_to_diffusers(path, families.family_config(fam.name, fam.unet().name))
                if mapped is not None:
                    return mapped
        return families.live_to_disk(self.component, path)


def resolve_all(
    flats: Mapping[str, Iterable[str]],
    *,
    model: Any = None,
    family: str | None = None,
    path: ErrorPath = None,
) -> dict[tuple[str, str], str]:
    """Resolve ``{component: flat names}``; raise ``MismatchError`` listing names the given model lacks."""
    live = components_of(model)
    out: dict[tuple[str, str], str] = {}
    missing: list[str] = []
    for component, names in flats.items():
        module = live.get(component) if model is not None else None
        if model is not None and module is None:
            raise MismatchError(
                f"the LoRA has {component} modules but the model has no {component}", path=path
            )
        resolver = Resolver(component, model=module, family=family)
        for flat in names:
            resolved = resolver.resolve(flat)
            if resolved is None:
                missing.append(f"{component}:{flat}")
            else:
                out[(component, flat)] = resolved
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MismatchError(f"{len(missing)} LoRA module(s) not found in the model: {shown}", path=path)
    return out
