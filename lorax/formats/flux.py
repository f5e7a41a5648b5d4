"""Flux.1 LoRA files in every layout users trade, read into and written from ``LoraState`` structurally.

Layouts (``lorax.formats.keys.flux_variant`` tells them apart, headers only):

* ``kohya`` (sd-scripts ``networks/lora_flux.py``): ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``,
  ``….lora_up.weight``, ``….alpha``; CLIP-L ``lora_te1_…``, T5 ``lora_te3_…``. kohya's split-qkv option trains
  ``to_q/k/v`` apart but saves them fused again: a block-diagonal up with a down of rank 3r (4r for ``linear1``) and
  the alpha unchanged, so every consumer applies ``alpha / 3r``. Read so (as consumers do).
* ``bfl`` (BFL / ComfyUI / ai-toolkit): the same BFL module names with dots, under ``diffusion_model.`` (or bare,
  or ``transformer.`` / ``base_model.model.``), ``.lora_A/.lora_B.weight`` or ``.lora_down/.lora_up.weight``,
  optional ``.alpha``.
* ``diffusers`` (diffusers / PEFT): ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` (also under
  ``base_model.model.`` with no component), CLIP-L ``text_encoder.…``.
* ``xlabs`` (XLabs-AI's trainer): ``double_blocks.0.processor.qkv_lora1.down.weight`` (``1`` image stream, ``2``
  text stream), ``….proj_lora1…``; ``single_blocks.0.processor.qkv_lora…``, ``proj_lora``. No alphas.

The mapping onto diffusers' modules (lorax's canonical keys, ``transformer.<diffusers path>``) follows diffusers'
``lora_conversion_utils`` and kohya's ``convert_flux_lora.py``: fused ``qkv`` ⇄ ``to_q/to_k/to_v`` (``add_q/k/v_proj``
for the text stream), ``single_blocks.N.linear1`` ⇄ ``to_q, to_k, to_v, proj_mlp``, ``linear2`` ⇄ ``proj_out``,
modulations ⇄ ``norm1.linear`` / ``norm1_context.linear`` / ``norm.linear``, and ``final_layer.adaLN_modulation.1``
⇄ ``norm_out.linear`` with its shift and scale halves swapped. Split widths come from the tensors' shapes (any size
of the architecture): a ``qkv`` is three equal parts, ``linear1`` is ``[h, h, h, rest]`` with ``h`` its input width.

Fused → split is exact: each part keeps the shared down and its rows of the up. Split → fused is exact too: parts
that share one down and alpha (a file read fused) fuse back at rank r; others grow the rank block-diagonally (``Σ r``,
each part's ``alpha / r`` folded into its block of the up, alpha = the new rank).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lorax.adapters.state import LoraModule, LoraState
from lorax.errors import ErrorPath, FormatError
from lorax.formats import keys as _keys
from lorax.formats import naming
from lorax.formats.flux_fuse import fused_modules, split
from lorax.formats.kohya import check_pair, file_alpha, kohya_name

if TYPE_CHECKING:
    import torch

from lorax.formats.flux_names import (  # noqa: F401  (the name tables, re-exported)
    _BFL_PREFIXES,
    _BFL_ROLES,
    _DIFFUSERS,
    _KOHYA,
    _XLABS,
    _XLABS_DOUBLE,
    _XLABS_SINGLE,
    DOUBLE,
    FAMILY,
    MLP_RATIO,
    SINGLE,
    SWAPPED,
    TOP,
    TRANSFORMER,
    bfl_body,
    bfl_of_flat,
    bfl_parts,
    diffusers_parts,
    is_diffusers_path,
    to_bfl,
)

# ---------------------------------------------------------------------------------------------------------------
# Reading


@dataclass
class _Group:
    """One module of the file: its tensors and the diffusers parts it covers."""

    name: str  # the file's name for it (for messages)
    component: str
    parts: tuple[str, ...]  # module paths inside the component
    swap: bool = False  # BFL's final_layer.adaLN_modulation.1: shift, scale halves in the other order
    roles: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)


def _add(groups: dict[str, _Group], name: str, component: str, parts: tuple[str, ...], role: str,
         key: str, tensor: torch.Tensor, path: ErrorPath) -> None:  # fmt: skip
    swap = component == TRANSFORMER and name.replace("_", ".").endswith("final.layer.adaLN.modulation.1")
    g = groups.setdefault(name, _Group(name, component, parts, swap))
    if role in g.roles:
        raise FormatError(f"module {name} has two {role} tensors ({g.keys[role]}, {key})", path=path)
    g.roles[role] = tensor
    g.keys[role] = key


def _text_resolvers() -> dict[str, naming.Resolver]:
    from lorax.models import families

    fam = families.get(FAMILY)
    return {c: naming.Resolver(c, family=FAMILY) for c in fam.text_components()}


def _kohya_key(
    key: str,
    tensor: torch.Tensor,
    groups: dict[str, _Group],
    resolvers: dict[str, naming.Resolver],
    path: ErrorPath,
) -> bool:
    from lorax.models import families

    m = _KOHYA.match(key)
    if m is None:
        return False
    prefix, flat, suffix = m.group("prefix"), m.group("flat"), m.group("suffix")
    fam = families.get(FAMILY)
    component = next((c.name for c in fam.components if c.kohya_prefix == prefix), None)
    if component is None:
        return False
    if suffix not in ("lora_down.weight", "lora_up.weight", "alpha"):
        if suffix in _keys.LYCORIS_SUFFIXES:
            raise FormatError(f"{key}: LyCORIS algorithms in Flux LoRAs are not supported yet", path=path)
        return False
    role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[suffix]
    if fam.component(component).kind == "unet":
        bfl = bfl_of_flat(flat)
        parts = bfl_parts(bfl) if bfl else None
        if parts is None:
            raise FormatError(f"{key}: no Flux transformer module is named {flat}", path=path)
    else:
        resolved = resolvers[component].resolve(flat)
        if resolved is None:
            raise FormatError(f"{key}: no {component} module is named {flat}", path=path)
        parts = (resolved,)
    _add(groups, prefix + flat, component, parts, role, key, tensor, path)
    return True


def read(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    *,
    model: Any = None,
    family: str | None = None,
    path: ErrorPath = None,
    **_: Any,
) -> LoraState:
    """Any Flux LoRA layout → ``LoraState`` keyed by diffusers module paths (``transformer.…``, ``text_encoder.…``)."""
    groups: dict[str, _Group] = {}
    leftovers: list[str] = []
    resolvers = _text_resolvers()
    for key, tensor in tensors.items():
        if _kohya_key(key, tensor, groups, resolvers, path):
            continue
        m = _XLABS.match(key)
        if m:
            n = m.group("n")
            if m.group("kind") == "double":
                bfl = f"double_blocks.{n}.{_XLABS_DOUBLE[(m.group('what'), m.group('stream') or '1')]}"
                parts = bfl_parts(bfl)
                assert parts is not None
            else:
                parts = tuple(f"single_transformer_blocks.{n}.{p}" for p in _XLABS_SINGLE[m.group("what")])
                bfl = f"single_blocks.{n}.{m.group('what')}_lora"
            _add(groups, bfl, TRANSFORMER, parts, m.group("role"), key, tensor, path)
            continue
        if _bfl_key(key, tensor, groups, path) or _diffusers_key(key, tensor, groups, path):
            continue
        leftovers.append(key)
    if leftovers:
        raise FormatError(
            f"{len(leftovers)} key(s) not in any Flux LoRA layout: {', '.join(leftovers[:5])}", path=path
        )
    state = LoraState(metadata=dict(metadata or {}), family=family or FAMILY)
    if state.family != FAMILY:
        raise FormatError(f"is a Flux LoRA, not a {state.family} one", path=path)
    for g in groups.values():
        if "down" not in g.roles or "up" not in g.roles:
            missing = "down" if "down" not in g.roles else "up"
            raise FormatError(f"module {g.name} has no {missing} weight", path=path)
        down, up = g.roles["down"], g.roles["up"]
        check_pair(g.name, down, up, path)
        if down.dim() != 2:
            raise FormatError(
                f"module {g.name}: Flux LoRA weights are 2-D, got {list(down.shape)}", path=path
            )
        alpha = file_alpha(g.roles["alpha"], g.keys["alpha"], path) if "alpha" in g.roles else None
        modules = split(g.name, down, up, alpha, g.parts, path, swap=g.swap)
        for part, module in zip(g.parts, modules, strict=True):
            name = f"{g.component}.{part}"
            if name in state.modules:
                raise FormatError(f"module {name} is given twice (by {g.name} and another key)", path=path)
            state.modules[name] = module
    return state


def _bfl_key(key: str, tensor: torch.Tensor, groups: dict[str, _Group], path: ErrorPath) -> bool:
    body = bfl_body(key)
    for suffix, role in _BFL_ROLES.items():
        if body.endswith("." + suffix):
            bfl = body[: -len(suffix) - 1]
            parts = bfl_parts(bfl)
            if parts is None:
                return False
            _add(groups, bfl, TRANSFORMER, parts, role, key, tensor, path)
            return True
    return False


def _diffusers_key(key: str, tensor: torch.Tensor, groups: dict[str, _Group], path: ErrorPath) -> bool:
    from lorax.models import families

    found = diffusers_parts(key, families.get(FAMILY).component_names())
    if found is None:
        return False
    component, module, role = found
    if component in (None, TRANSFORMER):
        if not is_diffusers_path(module):
            return False
        component = TRANSFORMER
    else:
        module = families.live_to_disk(component, module)
    _add(groups, f"{component}.{module}", component, (module,), role, key, tensor, path)
    return True


def write(
    state: LoraState, *, dtype: torch.dtype | None = None, variant: str = "bfl"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``LoraState`` → a Flux LoRA in ``variant`` (``kohya``, ``bfl`` or ``diffusers``) and its header."""
    import torch

    def cast(t: torch.Tensor) -> torch.Tensor:
        return (t if dtype is None else t.to(dtype)).contiguous()

    tensors: dict[str, torch.Tensor] = {}
    if state.family != FAMILY:
        raise FormatError(
            f"the {variant} Flux layout holds Flux LoRAs; this is a {state.family or 'unknown'} LoRA"
        )
    if state.embeddings:
        raise FormatError("Flux LoRA files hold no token embeddings")
    text = {k: m for k, m in state.modules.items() if not k.startswith(TRANSFORMER + ".")}
    for name, m in text.items():
        if not isinstance(m, LoraModule):
            raise FormatError(f"module {name} ({type(m).__name__}) cannot be written in a Flux LoRA layout")
    if variant == "diffusers":
        for name, m in state.modules.items():
            component = name.partition(".")[0]
            if component not in (TRANSFORMER, "text_encoder"):
                raise FormatError(
                    f"module {name}: diffusers' Flux loader reads no {component} LoRA; use --to kohya or --to bfl"
                )
            if not isinstance(m, LoraModule):
                raise FormatError(
                    f"module {name} ({type(m).__name__}) cannot be written in a Flux LoRA layout"
                )
            tensors[f"{name}.lora_A.weight"] = cast(m.down)
            tensors[f"{name}.lora_B.weight"] = cast(m.up * m.scale)
        return tensors, dict(state.metadata)
    if variant not in ("kohya", "bfl"):
        raise FormatError(f"no Flux LoRA layout {variant!r} to write (kohya, bfl, diffusers)")
    for bfl, m in fused_modules(state).items():
        if variant == "kohya":
            stem = "lora_unet_" + naming.flatten(bfl)
            tensors[f"{stem}.lora_down.weight"] = cast(m.down)
            tensors[f"{stem}.lora_up.weight"] = cast(m.up)
            tensors[f"{stem}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)  # type: ignore[arg-type]
        else:
            tensors[f"diffusion_model.{bfl}.lora_A.weight"] = cast(m.down)
            tensors[f"diffusion_model.{bfl}.lora_B.weight"] = cast(m.up * m.scale)
    for name, m in text.items():  # kohya names in both (ComfyUI reads lora_te1_ / lora_te3_ beside BFL names)
        assert isinstance(m, LoraModule)
        stem = kohya_name(name, FAMILY)
        tensors[f"{stem}.lora_down.weight"] = cast(m.down)
        tensors[f"{stem}.lora_up.weight"] = cast(m.up)
        tensors[f"{stem}.alpha"] = torch.tensor(float(m.alpha), dtype=torch.float32)  # type: ignore[arg-type]
    header = dict(state.metadata)
    if variant == "kohya":
        header.setdefault("ss_base_model_version", "flux1")
    return tensors, header
