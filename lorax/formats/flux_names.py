"""Flux.1 LoRA key names, standard library only (``lorax inspect`` reads headers through this module).

The tables map BFL module names (what kohya, BFL/ComfyUI and XLabs files use) onto diffusers' module paths (lorax's
canonical keys); ``lorax.formats.flux`` reads and writes the tensors. Conventions from diffusers'
``lora_conversion_utils`` (``_convert_kohya_flux_lora_to_diffusers``, ``_convert_xlabs_flux_lora_to_diffusers``) and
``single_file_utils.convert_flux_transformer_checkpoint_to_diffusers``, and kohya's ``networks/convert_flux_lora.py``.
"""

from __future__ import annotations

import re

from lorax.formats import naming
from lorax.formats.keys import PEFT_PREFIX
from lorax.io.keymaps.flux import (  # noqa: F401  (the module tables live in io: checkpoints map by them too)
    DOUBLE,
    MLP_RATIO,
    SINGLE,
    SWAPPED,
    TOP,
    bfl_parts,
    to_bfl,
)

FAMILY = "flux"
TRANSFORMER = "transformer"


_BFL_PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.", "model.diffusion_model.")
_BFL_ROLES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_down.weight": "down",
              "lora_up.weight": "up", "alpha": "alpha"}  # fmt: skip


_FLAT_DOUBLE = {naming.flatten(k): k for k in DOUBLE}
_FLAT_SINGLE = {naming.flatten(k): k for k in SINGLE}
_FLAT_TOP = {naming.flatten(k): k for k in TOP}


def bfl_of_flat(flat: str) -> str | None:
    """kohya's flat name (``double_blocks_0_img_attn_qkv``) → the BFL path (``double_blocks.0.img_attn.qkv``)."""
    m = re.fullmatch(r"(double|single)_blocks_(\d+)_(.+)", flat)
    if m:
        rest = (_FLAT_DOUBLE if m.group(1) == "double" else _FLAT_SINGLE).get(m.group(3))
        return f"{m.group(1)}_blocks.{m.group(2)}.{rest}" if rest else None
    return _FLAT_TOP.get(flat)


def is_diffusers_path(path: str) -> bool:
    return to_bfl(path) is not None


_KOHYA = re.compile(r"^(?P<prefix>lora_[a-z0-9]+_)(?P<flat>[^.]+)\.(?P<suffix>.+)$")
_XLABS = re.compile(
    r"^(?:diffusion_model\.)?(?P<kind>double|single)_blocks\.(?P<n>\d+)\.processor\."
    r"(?P<what>qkv|proj)_lora(?P<stream>[12]?)\.(?P<role>down|up)\.weight$"
)
_XLABS_DOUBLE = {("qkv", "1"): "img_attn.qkv", ("qkv", "2"): "txt_attn.qkv",
                 ("proj", "1"): "img_attn.proj", ("proj", "2"): "txt_attn.proj"}  # fmt: skip
_XLABS_SINGLE = {"qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "proj": ("proj_out",)}
_DIFFUSERS = re.compile(r"^(?P<p>.+)\.(?P<role>lora_A|lora_B)(?:\.[A-Za-z_][\w-]*)?\.weight$")


_KOHYA_COMPONENTS = {"lora_unet_": TRANSFORMER, "lora_te1_": "text_encoder", "lora_te3_": "text_encoder_2"}
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}

LAYOUTS = {
    "kohya": "kohya (lora_unet_ + BFL module names, fused qkv / linear1)",
    "bfl": "BFL / ComfyUI (diffusion_model. + BFL module names, fused qkv / linear1)",
    "xlabs": "XLabs (double_blocks.N.processor.qkv_lora1 …, no alphas)",
    "diffusers": "diffusers / PEFT (transformer. + diffusers module paths, split q / k / v)",
}


def bfl_body(key: str) -> str:
    """``key`` less its BFL-style prefix (``diffusion_model.``, ``transformer.``, …), if it has one."""
    for prefix in _BFL_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def diffusers_parts(key: str, components: tuple[str, ...]) -> tuple[str | None, str, str] | None:
    """A diffusers / PEFT key → ``(its component of ``components``, or ``None`` under ``base_model.model.`` or
    none; module path; role: down, up or alpha)``; ``None`` if it is not one."""
    body, owner = key, None
    for c in components:
        if body.startswith(c + "."):
            body, owner = body[len(c) + 1 :], c
            break
    else:
        if body.startswith(PEFT_PREFIX):
            body = body[len(PEFT_PREFIX) :]
    if body.endswith(".alpha"):
        return owner, body[: -len(".alpha")], "alpha"
    md = _DIFFUSERS.match(body)
    if md is None:
        return None
    return owner, md.group("p"), "down" if md.group("role") == "lora_A" else "up"


def classify(key: str) -> tuple[str, str, str, str] | None:
    """A Flux LoRA key → ``(module name in the file, component, BFL or module path, role)``; ``None`` if it is not
    one. For the transformer the path is the BFL module it belongs to (diffusers paths are mapped to theirs); XLabs'
    single-block ``qkv_lora`` is named ``single_blocks.N.qkv``."""
    m = _KOHYA.match(key)
    if m and m.group("prefix") in _KOHYA_COMPONENTS and m.group("suffix") in _KOHYA_ROLES:
        component, flat = _KOHYA_COMPONENTS[m.group("prefix")], m.group("flat")
        path = bfl_of_flat(flat) if component == TRANSFORMER else flat
        role = _KOHYA_ROLES[m.group("suffix")]
        return (m.group("prefix") + flat, component, path, role) if path else None
    m = _XLABS.match(key)
    if m:
        n, what = m.group("n"), m.group("what")
        if m.group("kind") == "double":
            bfl = f"double_blocks.{n}.{_XLABS_DOUBLE[(what, m.group('stream') or '1')]}"
        else:
            bfl = f"single_blocks.{n}.{'linear2' if what == 'proj' else 'qkv'}"
        return key.rsplit(".", 2)[0], TRANSFORMER, bfl, m.group("role")
    body = bfl_body(key)
    for suffix, role in _BFL_ROLES.items():
        if body.endswith("." + suffix) and bfl_parts(body[: -len(suffix) - 1]) is not None:
            return body[: -len(suffix) - 1], TRANSFORMER, body[: -len(suffix) - 1], role
    found_diffusers = diffusers_parts(key, (TRANSFORMER, "text_encoder", "text_encoder_2"))
    if found_diffusers is None:
        return None
    owner, module, role = found_diffusers
    if owner in (None, TRANSFORMER):
        found = to_bfl(module)
        return (module, TRANSFORMER, found[0], role) if found else None
    return module, owner, module, role


def block_summary(bfl_modules: set[str]) -> list[str]:
    """``double blocks 0-18: img_attn.qkv, …`` lines for a file's transformer modules (BFL names)."""
    blocks: dict[str, tuple[set[int], set[str]]] = {}
    top: list[str] = []
    for name in bfl_modules:
        m = re.fullmatch(r"(double|single)_blocks\.(\d+)\.(.+)", name)
        if m is None:
            top.append(name)
            continue
        ids, kinds = blocks.setdefault(m.group(1), (set(), set()))
        ids.add(int(m.group(2)))
        kinds.add(m.group(3))
    lines = []
    for kind in ("double", "single"):
        if kind in blocks:
            ids, kinds = blocks[kind]
            lines.append(f"{kind} blocks {_ranges(sorted(ids))}: {', '.join(sorted(kinds))}")
    if top:
        lines.append(", ".join(sorted(top)))
    return lines


def _ranges(ids: list[int]) -> str:
    out: list[str] = []
    start = prev = ids[0]
    for i in [*ids[1:], None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ", ".join(out)
