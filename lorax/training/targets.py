"""Which modules get a LoRA: presets ``attn`` / ``attn-ff`` / ``all`` (LoCon convs) or custom glob patterns.

Patterns match the live module path inside one component (``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``,
``encoder.layers.0.self_attn.q_proj``). Only ``nn.Linear`` and ``nn.Conv2d`` modules are ever targeted.
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


def _matcher(targets: str, presets: dict[str, tuple[str, ...]]) -> Any:
    if targets in presets:
        regexes = [re.compile(r"(^|\.)" + p) for p in presets[targets]]
        return lambda name: any(r.search(name) for r in regexes)
    globs = [g.strip() for g in targets.split(",") if g.strip()]
    return lambda name: any(
        fnmatch.fnmatchcase(name, g) or name.endswith("." + g) or name == g for g in globs
    )


def find_targets(model: Any, targets: str, component: str) -> list[str]:
    """Live paths of ``model``'s Linear/Conv2d modules selected by ``targets`` (a preset or comma-separated globs)."""
    from torch import nn

    presets = UNET_PRESETS if component == "unet" else TEXT_PRESETS
    match = _matcher(targets, presets)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d) and name and match(name)
    ]


def resolve_targets(unet: Any, text_encoder: Any | None, targets: str) -> dict[str, list[str]]:
    """``{component: [module path, …]}`` for the UNet (and the text encoder when it trains); refuses an empty match."""
    found = {"unet": find_targets(unet, targets, "unet")}
    if text_encoder is not None:
        found["text_encoder"] = find_targets(text_encoder, targets, "text_encoder")
    if not found["unet"] and not found.get("text_encoder"):
        raise ConfigError(f"--targets {targets!r} matches no Linear or Conv2d module of the model")
    if not found["unet"]:
        raise ConfigError(f"--targets {targets!r} matches no UNet module (the UNet always trains)")
    return found
