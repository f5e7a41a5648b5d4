"""diffusers / PEFT LoRA files (``pytorch_lora_weights.safetensors``).

Keys, newest first:
* ``unet.<path>.lora_A.weight`` / ``.lora_B.weight`` (PEFT names; ``text_encoder.…`` / ``text_encoder_2.…``, with or
  without ``text_model.``); raw PEFT adapters use ``base_model.model.<path>.lora_A.weight``;
* ``unet.<path>.lora.down.weight`` / ``.lora.up.weight`` (``LoRACompatibleLinear`` era; also ``.lora_linear_layer.``);
* ``<path>.processor.to_q_lora.down.weight`` (attention processors; ``to_out_lora`` is ``to_out.0``), and the old
  text-encoder patch ``self_attn.to_q_lora.down.weight`` (= ``q_proj``).
Alphas come from ``<path>.alpha`` keys, else from the ``lora_adapter_metadata`` header JSON that diffusers writes
(``{"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {...}}``, one LoraConfig per component), else ``alpha = r``.

DoRA magnitudes are ``<path>.lora_magnitude_vector``: ``[out]`` for Linear, ``[1, out, 1, 1]`` for Conv2d (PEFT's
shapes); both, and a flat ``[out]`` for convs, are read. Text encoders' are written ``….lora_magnitude_vector.weight``
(``magnitude_key``: the name diffusers' text-encoder loader matches); both names are read.

lorax writes the newest names, with ``text_model.`` kept for text encoders (diffusers strips it for models that lack
it), with each module's ``alpha / r`` folded into ``lora_B`` (``prepare``) so the tensors alone give the strength, as
diffusers' own training scripts do (``lora_alpha = r``): consumers that read no header (ComfyUI) apply the same delta as
diffusers. The ``lora_adapter_metadata`` header still gives diffusers' ``load_lora_weights`` each component's
``LoraConfig`` (r, lora_alpha = r, rank_pattern, alpha_pattern, target_modules, use_dora).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.adapters.state import DeltaModule, LoraModule, LoraState
from lorax.errors import ErrorPath, FormatError, MismatchError
from lorax.formats import keys
from lorax.formats.base import Meta, Tensors, check_pair, source
from lorax.models import families

if TYPE_CHECKING:
    import torch

NAME = "diffusers"
METADATA_KEY = "lora_adapter_metadata"
parse_key = keys.diffusers_parse


component_configs = keys.component_configs
module_alpha = keys.module_alpha


def read(
    tensors: Tensors,
    meta: Meta = None,
    family: str | None = None,
    adapter_config: Mapping[str, Any] | None = None,
) -> LoraState:
    """diffusers/PEFT tensors → ``LoraState`` (``adapter_config``: a raw PEFT adapter's ``adapter_config.json``).
    (The diffusers format hands Flux files to ``lorax.formats.flux``: ``lorax.formats.registry``.)"""
    src = source(meta)
    metadata, model, path = dict(src.metadata), src.model, src.path
    parts: dict[str, dict[str, torch.Tensor]] = {}
    leftovers: list[str] = []
    for key, tensor in tensors.items():
        parsed = parse_key(key)
        if parsed is None:
            leftovers.append(key)
            continue
        component, module, role = parsed
        slot = parts.setdefault(f"{component}.{module}", {})
        if role in slot:
            raise FormatError(f"module {component}.{module} has two {role} tensors", path=path)
        slot[role] = tensor
    if leftovers:
        raise FormatError(
            f"{len(leftovers)} key(s) not in diffusers/PEFT naming: {', '.join(leftovers[:5])}", path=path
        )
    configs = component_configs(metadata)
    if adapter_config is not None:
        configs.setdefault("", dict(adapter_config))
    shapes = {k + ".lora_A.weight": tuple(v["down"].shape) for k, v in parts.items() if "down" in v}
    family = (
        family
        or families.family_from_metadata(metadata)
        or families.detect_family_from_lora_keys(list(shapes), shapes)
    )
    if model is not None:
        _check_against_model(parts, model, path)
    state = LoraState(metadata=metadata, family=family)
    for module_path, slot in parts.items():
        if "down" not in slot or "up" not in slot:
            missing = "up" if "down" in slot else "down"
            raise FormatError(f"module {module_path} has no {missing} weight", path=path)
        extra = set(slot) - {"down", "up", "alpha", "magnitude"}
        if extra:
            raise FormatError(f"module {module_path}: unexpected tensors {sorted(extra)}", path=path)
        down, up = slot["down"], slot["up"]
        check_pair(module_path, down, up, path)
        component, _, inner = module_path.partition(".")
        rank = int(down.shape[0])
        if "alpha" in slot:
            alpha = keys.finite_alpha(slot["alpha"], f"{module_path}.alpha", path)
        else:
            config = configs.get(component) or configs.get("")
            alpha = (
                module_alpha(config, inner, rank, component=component, path=path) if config else float(rank)
            )
        if "magnitude" in slot:
            from lorax.adapters.lycoris import DoraModule

            magnitude = slot["magnitude"]
            if magnitude.numel() != up.shape[0]:
                raise FormatError(
                    f"module {module_path}: DoRA magnitude {list(magnitude.shape)} does not match "
                    f"{up.shape[0]} output channels",
                    path=path,
                )
            state.modules[module_path] = DoraModule(down, up, alpha, magnitude.reshape(-1), wd_on_out=True)
        else:
            state.modules[module_path] = LoraModule(down, up, alpha)
    return state


def peft_adapter_config(path: ErrorPath) -> dict[str, Any] | None:
    """A raw PEFT adapter's ``adapter_config.json`` beside its weights file, if there is one."""
    if path is None:
        return None
    config = Path(path).parent / "adapter_config.json"
    return dict(json.loads(config.read_text())) if config.is_file() else None


def _check_against_model(parts: Mapping[str, Any], model: Any, path: ErrorPath) -> None:
    """Refuse modules the given model does not have (a LoRA for another model)."""
    from lorax.formats.naming import components_of

    live = components_of(model)
    tables: dict[str, set[str]] = {}
    missing = []
    for module_path in parts:
        component, _, inner = module_path.partition(".")
        if component not in live:
            raise MismatchError(
                f"the LoRA has {component} modules but the model has no {component}", path=path
            )
        if component not in tables:
            tables[component] = set(families.weight_table(live[component], component))
        if inner not in tables[component]:
            missing.append(module_path)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MismatchError(f"{len(missing)} LoRA module(s) not found in the model: {shown}", path=path)


def peft_config_kwargs(state: LoraState, component: str) -> dict[str, Any]:
    """LoraConfig kwargs (r, lora_alpha, rank_pattern, alpha_pattern, target_modules) for one component."""
    from collections import Counter

    from lorax.adapters.lycoris import DoraModule

    modules = state.component_modules(component)
    pairs = {p: m for p, m in modules.items() if isinstance(m, LoraModule | DoraModule)}
    ranks = {p: m.rank for p, m in pairs.items()}
    alphas = {p: float(m.alpha) for p, m in pairs.items()}  # type: ignore[arg-type]
    if not ranks:
        return {}
    dora = {p for p, m in pairs.items() if isinstance(m, DoraModule)}
    if dora and len(dora) != len(pairs):
        raise FormatError(
            f"{component} mixes DoRA and plain LoRA modules; a diffusers/PEFT file has one use_dora per component "
            "(write it in the kohya format: --to kohya, or --format kohya in train and pivot)"
        )
    r = Counter(ranks.values()).most_common(1)[0][0]
    lora_alpha = Counter(alphas.values()).most_common(1)[0][0]

    def pattern(p: str) -> str:
        # Suffix patterns without text_model., so they match CLIP text encoders with or without that level.
        return re.escape(p[len("text_model.") :] if p.startswith("text_model.") else p)

    return {
        "r": r,
        "lora_alpha": lora_alpha,
        "rank_pattern": {pattern(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {pattern(p): v for p, v in alphas.items() if v != lora_alpha},
        "target_modules": sorted(pattern(p).replace("\\", "") for p in ranks),
        "use_dora": bool(dora),
    }


def prepare(state: LoraState) -> LoraState:
    """``state`` with every LoRA/DoRA module's ``alpha / r`` folded into ``up`` (then ``alpha = r``): the same deltas,
    and a file whose tensors alone give them (diffusers' scripts' ``lora_alpha = r``). Folded in fp32, cast back."""
    from dataclasses import replace

    import torch

    from lorax.adapters.lycoris import DoraModule

    modules: dict[str, Any] = {}
    for module_path, module in state.modules.items():
        if isinstance(module, LoraModule | DoraModule) and module.alpha != module.rank:
            up = (module.up.to(torch.float32) * module.scale).to(module.up.dtype)
            module = replace(module, up=up, alpha=float(module.rank))
        modules[module_path] = module
    return replace(state, modules=modules)


# What each LyCORIS algorithm is, for the one line that refuses it in a diffusers/PEFT file.
_ALGORITHMS = {
    "loha": "a LoHa (a Hadamard product of two low-rank pairs)",
    "lokr": "a LoKr (a Kronecker product)",
    "ia3": "an IA3 (a per-channel scale of the base weight)",
    "full": "a full weight difference (diff)",
}


def _no_peft_form(module: LoraModule | DeltaModule) -> str:
    kind = str(getattr(module, "kind", type(module).__name__))
    inner, dora, _ = kind.partition("+dora")
    what = _ALGORITHMS.get(inner, f"a {type(module).__name__}")
    return f"{what} with DoRA magnitudes" if dora else what


def magnitude_key(module_path: str) -> str:
    """The key of a DoRA module's magnitude: PEFT's ``<path>.lora_magnitude_vector`` for the UNet;
    ``<path>.lora_magnitude_vector.weight`` for text encoders, which diffusers (0.42) loads through transformers'
    (≥ 5) adapter loader, which matches only that name (it drops the bare name: the text encoder's DoRA would fuse as
    a plain LoRA). PEFT's own loader, diffusers' UNet path, and lorax's reader take both names."""
    component = module_path.partition(".")[0]
    suffix = ".weight" if component in families.TEXT_COMPONENTS else ""
    return f"{module_path}.lora_magnitude_vector{suffix}"


def write(
    state: LoraState, *, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``LoraState`` → diffusers tensors (PEFT names, ``alpha / r`` folded in) and a ``lora_adapter_metadata``
    header."""
    from lorax.adapters.lycoris import DoraModule

    state = prepare(state)
    tensors: dict[str, torch.Tensor] = {}
    for module_path, module in state.modules.items():
        if isinstance(module, DoraModule) and not module.wd_on_out:
            raise FormatError(
                f"module {module_path}: DoRA magnitudes per input column have no PEFT form; write it in the kohya format (--to kohya; --format kohya in train and pivot)"
            )
        if not isinstance(module, LoraModule | DoraModule):
            raise FormatError(
                f"module {module_path} is {_no_peft_form(module)}, which a diffusers/PEFT file (lora_A/lora_B "
                "pairs) cannot hold; write it in the kohya format (--to kohya; --format kohya in train and pivot)"
            )
        down, up = (module.down, module.up) if dtype is None else (module.down.to(dtype), module.up.to(dtype))
        tensors[f"{module_path}.lora_A.weight"] = down.contiguous()
        tensors[f"{module_path}.lora_B.weight"] = up.contiguous()
        if isinstance(module, DoraModule):
            magnitude = module.magnitude.reshape(-1)
            if module.down.dim() == 4:  # PEFT's Conv2d magnitude: [1, out, 1, 1]
                magnitude = magnitude.reshape(1, -1, 1, 1)
            tensors[magnitude_key(module_path)] = (
                magnitude if dtype is None else magnitude.to(dtype)
            ).contiguous()
    packed: dict[str, Any] = {}
    for component in state.components():
        for field, value in peft_config_kwargs(state, component).items():
            packed[f"{component}.{field}"] = value
    metadata = dict(state.metadata)
    if packed:
        metadata[METADATA_KEY] = json.dumps(packed, sort_keys=True)
    metadata.setdefault("format", "pt")
    for token in state.embeddings:
        raise FormatError(
            f"the diffusers LoRA format holds no token embeddings (token {token!r}); save them with "
            "save_embeddings or write it in the kohya format (--to kohya; --format kohya in train and pivot)"
        )
    return tensors, metadata
