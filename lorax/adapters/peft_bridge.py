"""Between ``LoraState`` and PEFT: state dicts for injected models, and LoraState from trained PEFT adapters.

* ``to_peft_state_dict(state, component, model=...)``: PEFT names (``<live path>.lora_A.weight``) for one component,
  with each module's ``alpha / r`` folded into ``lora_B``; load it under a ``LoraConfig`` whose ``lora_alpha``
  equals each module's rank (``peft_config_for``), which is also what diffusers assumes for a dict without alphas.
* ``to_pipeline_state_dict(state, pipe)``: every component with its ``unet.`` / ``text_encoder.`` prefix, folded,
  ready for ``pipe.load_lora_weights(dict)``.
* ``lora_state_from_peft({component: peft_state_dict}, {component: LoraConfig or dict})``: back to ``LoraState``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lorax.adapters.lycoris import DoraModule
from lorax.adapters.state import LoraModule, LoraState
from lorax.errors import FormatError
from lorax.formats.diffusers import module_alpha
from lorax.models import families

if TYPE_CHECKING:
    import torch

_ADAPTER_SUFFIX = re.compile(r"^(?P<p>.+)\.lora_(?P<ab>[AB])(?:\.(?P<name>[A-Za-z_][\w-]*))?\.weight$")
_MAGNITUDE = re.compile(r"^(?P<p>.+)\.lora_magnitude_vector(?:\.(?P<name>[A-Za-z_][\w-]*))?(?:\.weight)?$")


def to_peft_state_dict(
    state: LoraState,
    component: str,
    *,
    model: torch.nn.Module | None = None,
    text_model: bool | None = None,
    fold_alpha: bool = True,
) -> dict[str, torch.Tensor]:
    """PEFT-named tensors of one component, keyed by the live module path inside ``model``.

    With ``fold_alpha`` (default) ``up`` is multiplied by ``alpha / r``, so the dict is exact under a scale of 1
    (``lora_alpha = r``). For text encoders, ``model`` (or ``text_model``) says whether the live model keeps the
    ``text_model`` level; without either, transformers' current ``CLIPTextModel`` layout (no level) is assumed for
    ``text_encoder`` and ``CLIPTextModelWithProjection``'s (with it) for ``text_encoder_2``.
    """
    if text_model is None and model is None:
        text_model = families.class_keeps_text_model(component)
    out: dict[str, torch.Tensor] = {}
    for path, module in state.component_modules(component).items():
        if not isinstance(module, LoraModule):
            raise FormatError(f"module {component}.{path} ({type(module).__name__}) has no PEFT LoRA form")
        live = families.disk_to_live(component, path, model, text_model=text_model)
        up = module.up * module.scale if fold_alpha else module.up
        out[f"{live}.lora_A.weight"] = module.down.contiguous()
        out[f"{live}.lora_B.weight"] = up.to(module.up.dtype).contiguous()
    return out


def peft_config_for(
    state: LoraState, component: str, *, model: torch.nn.Module | None = None, text_model: bool | None = None
) -> dict[str, Any]:
    """LoraConfig kwargs that fit ``to_peft_state_dict(..., fold_alpha=True)``: alpha equals rank everywhere."""
    if text_model is None and model is None:
        text_model = families.class_keeps_text_model(component)
    ranks: dict[str, int] = {}
    for path, module in state.component_modules(component).items():
        if isinstance(module, LoraModule):
            ranks[families.disk_to_live(component, path, model, text_model=text_model)] = module.rank
    if not ranks:
        return {}
    from collections import Counter

    r = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {f"^{re.escape(p)}": v for p, v in ranks.items() if v != r}
    return {
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
    }


def to_pipeline_state_dict(state: LoraState, pipe: Any = None) -> dict[str, torch.Tensor]:
    """All components, prefixed (``unet.…``, ``text_encoder.…``), alphas folded: for ``pipe.load_lora_weights``."""
    out: dict[str, torch.Tensor] = {}
    for component in state.components():
        model = getattr(pipe, component, None) if pipe is not None else None
        for key, tensor in to_peft_state_dict(state, component, model=model).items():
            out[f"{component}.{key}"] = tensor
    return out


def _config_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return dict(config.to_dict())
    return dict(vars(config))


def lora_state_from_peft(
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
    configs: Mapping[str, Any] | None = None,
    *,
    family: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> LoraState:
    """``{component: get_peft_model_state_dict(model)}`` and their LoraConfigs → ``LoraState``.

    Keys may carry ``base_model.model.`` and an adapter name (``lora_A.default.weight``); live text-encoder paths
    gain ``text_model.``. Each module's alpha follows the config (``lora_alpha``, ``alpha_pattern``, rsLoRA).
    """
    configs = configs or {}
    state = LoraState(metadata=dict(metadata or {}), family=family)
    for component, sd in state_dicts.items():
        config = _config_dict(configs.get(component))
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in sd.items():
            body = key.removeprefix("base_model.model.")
            m = _ADAPTER_SUFFIX.match(body)
            if m is not None:
                pairs.setdefault(m.group("p"), {})[m.group("ab")] = tensor
                continue
            mag = _MAGNITUDE.match(body)
            if mag is None:
                raise FormatError(f"{component}: key {key!r} is not a PEFT LoRA weight")
            pairs.setdefault(mag.group("p"), {})["M"] = tensor
        for live, ab in pairs.items():
            if not {"A", "B"} <= set(ab):
                raise FormatError(f"{component}: module {live} lacks lora_{'B' if 'A' in ab else 'A'}")
            path = families.live_to_disk(component, live)
            rank = int(ab["A"].shape[0])
            alpha = module_alpha(config, path, rank) if config else float(rank)
            if "M" in ab:  # DoRA: PEFT keeps one magnitude per output row
                state.modules[f"{component}.{path}"] = DoraModule(
                    ab["A"], ab["B"], alpha, ab["M"], wd_on_out=True
                )
            else:
                state.modules[f"{component}.{path}"] = LoraModule(ab["A"], ab["B"], alpha)
    if state.family is None:
        keys = [k + ".lora_A.weight" for k in state.modules]
        shapes = {
            k + ".lora_A.weight": tuple(m.down.shape)
            for k, m in state.modules.items()
            if isinstance(m, LoraModule | DoraModule)
        }
        state.family = families.detect_family_from_lora_keys(keys, shapes)
    return state
