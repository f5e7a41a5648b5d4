"""LyCORIS files: kohya naming (``lora_unet_…``, ``lora_te_…``) with other algorithms' tensors per module.

Per-module suffixes: LoHa ``hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b`` (+ ``hada_t1, hada_t2`` Tucker cores); LoKr
``lokr_w1`` or ``lokr_w1_a/_b``, ``lokr_w2`` or ``lokr_w2_a/_b`` (+ ``lokr_t2``); DoRA ``dora_scale`` beside a LoRA
pair or beside LoHa/LoKr tensors (LyCORIS ``weight_decompose``); LoCon with a Tucker core ``lora_mid.weight`` (folded
exactly into ``down``); full ``diff`` (+ ``diff_b``); IA3 ``weight`` + ``on_input``; ``alpha`` as in kohya. The delta
math lives in ``lorax.adapters.lycoris``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from lorax.adapters.lycoris import (
    DecomposedModule,
    DoraModule,
    FullDiffModule,
    Ia3Module,
    LohaModule,
    LokrModule,
    magnitude_on_out,
)
from lorax.adapters.state import LoraModule, LoraState
from lorax.errors import FormatError
from lorax.formats import kohya

NAME = "lycoris"
_LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}


def _alpha(parts: Mapping[str, torch.Tensor], name: str = "", path: Any = None) -> float | None:
    from lorax.formats.keys import finite_alpha

    return finite_alpha(parts["alpha"], f"{name}.alpha", path) if "alpha" in parts else None


def module_from_parts(
    name: str,
    parts: Mapping[str, torch.Tensor],
    *,
    path: Any = None,
    weight_shape: tuple[int, ...] | None = None,
) -> Any:
    """The module one group of suffixed tensors describes; unknown or incomplete groups raise ``FormatError``."""
    keys = set(parts)
    used: set[str] = {"alpha"} & keys
    module: Any
    if keys >= _LOHA:
        module = LohaModule(
            parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"], parts["hada_w2_b"], _alpha(parts, name, path),
            parts.get("hada_t1"), parts.get("hada_t2"), weight_shape,
        )  # fmt: skip
        used |= _LOHA | ({"hada_t1", "hada_t2"} & keys)
    elif keys & {"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"}:
        names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        got = {n: parts.get(n) for n in names}
        if got["lokr_w1"] is None and (got["lokr_w1_a"] is None or got["lokr_w1_b"] is None):
            raise FormatError(f"LoKr module {name} has neither lokr_w1 nor lokr_w1_a/_b", path=path)
        if got["lokr_w2"] is None and (got["lokr_w2_a"] is None or got["lokr_w2_b"] is None):
            raise FormatError(f"LoKr module {name} has neither lokr_w2 nor lokr_w2_a/_b", path=path)
        module = LokrModule(
            got["lokr_w1"], got["lokr_w1_a"], got["lokr_w1_b"], got["lokr_w2"], got["lokr_w2_a"], got["lokr_w2_b"],
            got["lokr_t2"], _alpha(parts, name, path), weight_shape,
        )  # fmt: skip
        used |= {n for n in names if got[n] is not None}
    elif {"lora_down.weight", "lora_up.weight"} <= keys:
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        used |= {"lora_down.weight", "lora_up.weight"}
        if "lora_mid.weight" in keys:
            mid = parts["lora_mid.weight"]  # [r, r, kh, kw]; down [r, in, 1, 1]
            down = torch.einsum("ijkl,jn->inkl", mid.float(), down.reshape(down.shape[0], -1).float()).to(
                down.dtype
            )
            used.add("lora_mid.weight")
        kohya.check_pair(name, down, up, path)
        alpha = _alpha(parts, name, path)
        if "dora_scale" in keys:
            scale = parts["dora_scale"]
            wd_on_out = magnitude_on_out(scale, up.shape[0])
            module = DoraModule(
                down, up, alpha if alpha is not None else float(down.shape[0]), scale, wd_on_out
            )
            used.add("dora_scale")
        else:
            module = LoraModule(down, up, alpha)
    elif "diff" in keys:
        module = FullDiffModule(parts["diff"], parts.get("diff_b"))
        used |= {"diff"} | ({"diff_b"} & keys)
    elif {"weight", "on_input"} <= keys:
        module = Ia3Module(parts["weight"], bool(int(parts["on_input"].reshape(-1)[0].item())))
        used |= {"weight", "on_input"}
    else:
        raise FormatError(f"module {name}: unknown tensors {sorted(keys)}", path=path)
    if "dora_scale" in keys and "dora_scale" not in used and isinstance(module, LohaModule | LokrModule):
        scale = parts["dora_scale"]
        module = DecomposedModule(module, scale, magnitude_on_out(scale, module.out_features))
        used.add("dora_scale")
    leftovers = keys - used
    if leftovers:
        raise FormatError(f"module {name}: unexpected tensors {sorted(leftovers)}", path=path)
    return module


def read(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    model: Any = None,
    family: str | None = None,
    path: Any = None,
) -> LoraState:
    """LyCORIS tensors → ``LoraState`` (the kohya reader, which hands non-LoRA groups to ``module_from_parts``)."""
    return kohya.read(tensors, metadata, model=model, family=family, path=path)


def write(
    state: LoraState, *, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``LoraState`` (any mix of LoRA, LoHa, LoKr, DoRA, full) → kohya-named tensors."""
    return kohya.write(state, dtype=dtype)
