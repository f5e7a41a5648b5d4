"""Which modules get a LoRA: presets ``attn`` / ``attn-ff`` / ``all`` (LoCon convs) or custom glob patterns.

Patterns match the live module path inside one component (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``,
``encoder.layers.0.self_attn.q_proj``). Only ``nn.Linear`` and ``nn.Conv2d`` modules are ever targeted.

Flux's transformer (``FluxTransformer2DModel``) has its own presets over its double-stream blocks
(``transformer_blocks.N``: kohya's ``double_blocks``) and single-stream blocks (``single_transformer_blocks.N``:
``single_blocks``): ``attn`` the attention projections of both streams (``to_q/k/v``, ``to_out.0``,
``add_q/k/v_proj``, ``to_add_out``; in single blocks ``to_q/k/v``), ``attn-ff`` adds the MLPs (``ff``, ``ff_context``;
single blocks' ``proj_mlp`` and ``proj_out``): diffusers' ``train_dreambooth_lora_flux.py`` set and more, and ``all``
every Linear in the blocks, the modulations too (``norm1.linear``, ``norm1_context.linear``, ``norm.linear``): kohya's
``lora_flux`` default. ``blocks`` (``--train-blocks``, kohya's ``train_blocks``) keeps ``double``, ``single`` or
``all`` of them. T5 (``T5EncoderModel``) has its own: ``SelfAttention.q/k/v/o`` and ``DenseReluDense.wi_0/wi_1/wo``.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from lorax.errors import ConfigError

_ATTN = r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$"
_FF = r"ff\.net\.(0\.proj|2)$"
_CONV = (
    r"(proj_in|proj_out)$",
    r"resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)$",
    r"(downsamplers|upsamplers)\.0\.conv$",
)
UNET_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": (_ATTN,),  # the seed's default: the attention projections (CrossAttention's Linear layers)
    "attn-ff": (_ATTN, _FF),
    "all": (_ATTN, _FF, *_CONV),  # + LoCon: resnet/sampler convs, transformer in/out projections
}
_TEXT_ATTN = r"self_attn\.(q_proj|k_proj|v_proj|out_proj)$"
_TEXT_FF = r"mlp\.(fc1|fc2)$"
TEXT_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": (_TEXT_ATTN,),
    "attn-ff": (_TEXT_ATTN, _TEXT_FF),
    "all": (_TEXT_ATTN, _TEXT_FF),
}


_FLUX_ATTN = (
    r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",
    r"single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)$",
)
_FLUX_FF = (
    r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)$",
    r"single_transformer_blocks\.\d+\.(proj_mlp|proj_out)$",
)
_FLUX_MOD = (
    r"transformer_blocks\.\d+\.(norm1|norm1_context)\.linear$",
    r"single_transformer_blocks\.\d+\.norm\.linear$",
)
FLUX_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": _FLUX_ATTN,
    "attn-ff": (*_FLUX_ATTN, *_FLUX_FF),
    "all": (*_FLUX_ATTN, *_FLUX_FF, *_FLUX_MOD),
}
_T5_ATTN = r"SelfAttention\.(q|k|v|o)$"
T5_PRESETS: dict[str, tuple[str, ...]] = {
    "attn": (_T5_ATTN,),
    "attn-ff": (_T5_ATTN, r"DenseReluDense\.(wi|wi_0|wi_1|wo)$"),
    "all": (_T5_ATTN, r"DenseReluDense\.(wi|wi_0|wi_1|wo)$"),
}
_FLUX_BLOCKS = {"double": r"^transformer_blocks\.", "single": r"^single_transformer_blocks\."}


def presets_of(model: Any, component: str) -> dict[str, tuple[str, ...]]:
    """The presets for ``model``: by its class (Flux's transformer, T5), else by component (UNet or CLIP)."""
    kind = type(model).__name__
    if kind.startswith("Flux"):
        return FLUX_PRESETS
    if kind.startswith("T5"):
        return T5_PRESETS
    return UNET_PRESETS if component == "unet" else TEXT_PRESETS


def _matcher(targets: str, presets: dict[str, tuple[str, ...]]) -> Any:
    if targets in presets:
        regexes = [re.compile(r"(^|\.)" + p) for p in presets[targets]]
        return lambda name: any(r.search(name) for r in regexes)
    globs = [g.strip() for g in targets.split(",") if g.strip()]
    return lambda name: any(
        fnmatch.fnmatchcase(name, g) or name.endswith("." + g) or name == g for g in globs
    )


def find_targets(model: Any, targets: str, component: str, blocks: str | None = None) -> list[str]:
    """Live paths of ``model``'s Linear/Conv2d modules selected by ``targets`` (a preset or comma-separated globs);
    ``blocks`` (Flux's transformer): ``double``, ``single`` or ``all`` (None) of its blocks."""
    from torch import nn

    match = _matcher(targets, presets_of(model, component))
    within = re.compile(_FLUX_BLOCKS[blocks]) if blocks in _FLUX_BLOCKS else None
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d)
        and name
        and match(name)
        and (within is None or within.match(name))
    ]


def resolve_targets(
    unet: Any, text_encoder: Any | None, targets: str, blocks: str | None = None
) -> dict[str, list[str]]:
    """``{component: [module path, …]}`` for the UNet (and the text encoder when it trains); refuses an empty match.
    ``blocks``: Flux's ``--train-blocks``."""
    found = {"unet": find_targets(unet, targets, "unet", blocks)}
    if text_encoder is not None:
        found["text_encoder"] = find_targets(text_encoder, targets, "text_encoder")
    if not found["unet"] and not found.get("text_encoder"):
        raise ConfigError(f"--targets {targets!r} matches no Linear or Conv2d module of the model")
    if not found["unet"]:
        raise ConfigError(f"--targets {targets!r} matches no UNet module (the UNet always trains)")
    return found
