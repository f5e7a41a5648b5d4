"""LyCORIS algorithms under kohya naming (``lora_unet_…``, ``lora_te_…``): one table, ``ALGORITHMS``.

Per-module suffixes: LoHa ``hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b`` (+ ``hada_t1, hada_t2`` Tucker cores); LoKr
``lokr_w1`` or ``lokr_w1_a/_b``, ``lokr_w2`` or ``lokr_w2_a/_b`` (+ ``lokr_t2``); DoRA ``dora_scale`` beside a LoRA
pair or beside LoHa/LoKr tensors (LyCORIS ``weight_decompose``); LoCon with a Tucker core ``lora_mid.weight`` (folded
exactly into ``down``); full ``diff`` (+ ``diff_b``); IA3 ``weight`` + ``on_input``; ``alpha`` as in kohya. The delta
math lives in ``lorax.adapters.lycoris``.

Each ``Algorithm`` says which suffixes are its (``test``), its rank from the tensors' shapes (``rank``, torch-free:
``lorax inspect`` uses it on headers), and how to build its module from the tensors (``build``). The kohya reader
(``lorax.formats.kohya``) hands every group that is not a plain LoRA pair to ``module_from_parts``. This module
imports torch only inside ``build``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from lorax.errors import ErrorPath, FormatError
from lorax.formats.base import check_pair

if TYPE_CHECKING:
    import torch

    from lorax.adapters.state import DeltaModule, LoraModule

NAME = "lycoris"
_LOHA = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
_LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_PAIR = {"lora_down.weight", "lora_up.weight"}
Parts = Mapping[str, "torch.Tensor"]
# (module name, its tensors by suffix, alpha, the base weight's shape, file) → (module, the suffixes it used)
Shape: TypeAlias = "tuple[int, ...] | None"
Built: TypeAlias = "tuple[LoraModule | DeltaModule, set[str]]"
Builder = Callable[[str, Parts, "float | None", Shape, ErrorPath], Built]


@dataclass(frozen=True)
class Algorithm:
    name: str  # as inspect names it; a DoRA scale beside LoHa / LoKr adds "+dora", beside a LoRA pair it is "dora"
    test: Callable[[set[str]], bool]  # whether a module's suffixes are this algorithm's
    rank: Callable[[Mapping[str, Sequence[int]]], int | None]  # shapes by suffix → rank (None: no rank)
    build: Builder
    alpha_is_rank: bool  # a module with no alpha has alpha = rank


def _loha(name: str, parts: Parts, alpha: float | None, shape: Shape, path: ErrorPath) -> Built:
    from lorax.adapters.lycoris import LohaModule

    module = LohaModule(
        parts["hada_w1_a"], parts["hada_w1_b"], parts["hada_w2_a"], parts["hada_w2_b"], alpha,
        parts.get("hada_t1"), parts.get("hada_t2"), shape,
    )  # fmt: skip
    return module, _LOHA | ({"hada_t1", "hada_t2"} & set(parts))


def _lokr(name: str, parts: Parts, alpha: float | None, shape: Shape, path: ErrorPath) -> Built:
    from lorax.adapters.lycoris import LokrModule

    got = {n: parts.get(n) for n in _LOKR}
    if got["lokr_w1"] is None and (got["lokr_w1_a"] is None or got["lokr_w1_b"] is None):
        raise FormatError(f"LoKr module {name} has neither lokr_w1 nor lokr_w1_a/_b", path=path)
    if got["lokr_w2"] is None and (got["lokr_w2_a"] is None or got["lokr_w2_b"] is None):
        raise FormatError(f"LoKr module {name} has neither lokr_w2 nor lokr_w2_a/_b", path=path)
    module = LokrModule(
        got["lokr_w1"], got["lokr_w1_a"], got["lokr_w1_b"], got["lokr_w2"], got["lokr_w2_a"], got["lokr_w2_b"],
        got["lokr_t2"], alpha, shape,
    )  # fmt: skip
    return module, {n for n in _LOKR if got[n] is not None}


def _pair(name: str, parts: Parts, alpha: float | None, shape: Shape, path: ErrorPath) -> Built:
    import torch

    from lorax.adapters.lycoris import DoraModule, magnitude_on_out
    from lorax.adapters.state import LoraModule

    down, up = parts["lora_down.weight"], parts["lora_up.weight"]
    used = set(_PAIR)
    if "lora_mid.weight" in parts:
        mid = parts["lora_mid.weight"]  # [r, r, kh, kw]; down [r, in, 1, 1]
        down = torch.einsum("ijkl,jn->inkl", mid.float(), down.reshape(down.shape[0], -1).float()).to(
            down.dtype
        )
        used.add("lora_mid.weight")
    check_pair(name, down, up, path)
    if "dora_scale" not in parts:
        return LoraModule(down, up, alpha), used
    scale = parts["dora_scale"]
    alpha = alpha if alpha is not None else float(down.shape[0])
    return DoraModule(down, up, alpha, scale, magnitude_on_out(scale, up.shape[0])), used | {"dora_scale"}


def _full(name: str, parts: Parts, alpha: float | None, shape: Shape, path: ErrorPath) -> Built:
    from lorax.adapters.lycoris import FullDiffModule

    return FullDiffModule(parts["diff"], parts.get("diff_b")), {"diff"} | ({"diff_b"} & set(parts))


def _ia3(name: str, parts: Parts, alpha: float | None, shape: Shape, path: ErrorPath) -> Built:
    from lorax.adapters.lycoris import Ia3Module

    on_input = bool(int(parts["on_input"].reshape(-1)[0].item()))
    return Ia3Module(parts["weight"], on_input), {"weight", "on_input"}


def _lokr_rank(shapes: Mapping[str, Sequence[int]]) -> int | None:
    inner = shapes.get("lokr_w1_b") or shapes.get("lokr_w2_b")
    return inner[0] if inner else None


# In the order a module's suffixes are tried.
ALGORITHMS: tuple[Algorithm, ...] = (
    Algorithm("loha", lambda s: s >= _LOHA, lambda shapes: shapes["hada_w1_b"][0], _loha, True),
    Algorithm("lokr", lambda s: bool(s & {"lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a"}), _lokr_rank, _lokr, False),
    Algorithm("lora", lambda s: s >= _PAIR, lambda shapes: shapes["lora_down.weight"][0], _pair, True),
    Algorithm("full", lambda s: "diff" in s, lambda shapes: None, _full, False),
    Algorithm("ia3", lambda s: s >= {"weight", "on_input"}, lambda shapes: None, _ia3, False),
)  # fmt: skip


def algorithm_of(suffixes: set[str], name: str, path: ErrorPath = None) -> Algorithm:
    """The algorithm of one module's suffixes; unknown groups raise ``FormatError`` naming the module."""
    for algorithm in ALGORITHMS:
        if algorithm.test(suffixes):
            return algorithm
    raise FormatError(f"module {name}: unknown tensors {sorted(suffixes)}", path=path)


def label(algorithm: Algorithm, suffixes: set[str]) -> str:
    """What inspect calls a module: ``lora``, ``dora`` (a LoRA pair with a DoRA scale), ``loha+dora`` …"""
    if "dora_scale" not in suffixes:
        return algorithm.name
    return "dora" if algorithm.name == "lora" else f"{algorithm.name}+dora"


def module_from_parts(
    name: str,
    parts: Mapping[str, torch.Tensor],
    *,
    path: ErrorPath = None,
    weight_shape: tuple[int, ...] | None = None,
) -> LoraModule | DeltaModule:
    """The module one group of suffixed tensors describes; unknown or incomplete groups raise ``FormatError``."""
    from lorax.adapters.lycoris import DecomposedModule, LohaModule, LokrModule, magnitude_on_out
    from lorax.formats.keys import finite_alpha

    keys = set(parts)
    alpha = finite_alpha(parts["alpha"], f"{name}.alpha", path) if "alpha" in parts else None
    module, used = algorithm_of(keys, name, path).build(name, parts, alpha, weight_shape, path)
    used |= {"alpha"} & keys
    if "dora_scale" in keys and "dora_scale" not in used and isinstance(module, LohaModule | LokrModule):
        scale = parts["dora_scale"]
        module = DecomposedModule(module, scale, magnitude_on_out(scale, module.out_features))
        used.add("dora_scale")
    leftovers = keys - used
    if leftovers:
        raise FormatError(f"module {name}: unexpected tensors {sorted(leftovers)}", path=path)
    return module
