"""Flux.1 transformer checkpoints: the BFL single-file layout ⇄ diffusers' ``FluxTransformer2DModel`` keys.

The BFL file (``flux1-dev.safetensors``) names its tensors ``double_blocks.N.img_attn.qkv.weight``,
``single_blocks.N.linear1.weight``, ``img_in``, ``txt_in``, ``time_in``, ``vector_in``, ``guidance_in``,
``final_layer``; all-in-one files carry the same under ``model.diffusion_model.``. The mapping follows diffusers'
``single_file_utils.convert_flux_transformer_checkpoint_to_diffusers``: a ``qkv`` is ``to_q; to_k; to_v`` stacked in
rows (``add_q/k/v_proj`` for the text stream), ``linear1`` is ``to_q; to_k; to_v; proj_mlp`` in rows
``[h, h, h, 4h]`` (``FluxSingleTransformerBlock``'s ``mlp_ratio``), and ``final_layer.adaLN_modulation.1`` is
``norm_out.linear`` with its two halves swapped (BFL: shift, scale; diffusers: scale, shift). Sizes come from the
tensors' shapes, so any size of the architecture maps. The module tables serve the LoRA formats too
(``lorax.formats.flux_names`` re-exports them).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from lorax.io.keymaps import Entry, KeyMap

# BFL module (inside a double block) → its diffusers parts, in row order.
DOUBLE: dict[str, tuple[str, ...]] = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn.proj": ("attn.to_out.0",),
    "img_mlp.0": ("ff.net.0.proj",),
    "img_mlp.2": ("ff.net.2",),
    "img_mod.lin": ("norm1.linear",),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn.proj": ("attn.to_add_out",),
    "txt_mlp.0": ("ff_context.net.0.proj",),
    "txt_mlp.2": ("ff_context.net.2",),
    "txt_mod.lin": ("norm1_context.linear",),
}
SINGLE: dict[str, tuple[str, ...]] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation.lin": ("norm.linear",),
}
TOP: dict[str, str] = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
# diffusers' AdaLayerNormContinuous chunks (scale, shift); BFL's final layer (shift, scale).
SWAPPED = frozenset({"norm_out.linear"})
# The single block's MLP is 4× its width (FluxSingleTransformerBlock's mlp_ratio).
MLP_RATIO = 4
# The QK RMSNorm scales (parameters, not modules).
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
ALL_IN_ONE = "model.diffusion_model."
_BLOCK = re.compile(r"(double|single)_blocks\.(\d+)\.(.+)")
_DIFFUSERS_BLOCK = re.compile(r"((?:single_)?transformer_blocks)\.(\d+)\.(.+)")


def bfl_parts(bfl: str) -> tuple[str, ...] | None:
    """A BFL module path → the diffusers module paths it covers, in row order; ``None`` if it is not one."""
    m = _BLOCK.fullmatch(bfl)
    if m:
        table = DOUBLE if m.group(1) == "double" else SINGLE
        block = f"{_diffusers_block(m.group(1))}.{m.group(2)}"
        parts = table.get(m.group(3))
        return tuple(f"{block}.{p}" for p in parts) if parts else None
    return (TOP[bfl],) if bfl in TOP else None


def _diffusers_block(kind: str) -> str:
    return "transformer_blocks" if kind == "double" else "single_transformer_blocks"


def _templates() -> dict[str, tuple[str, int]]:
    """``{diffusers path with block N: (BFL path with N, index among its parts)}``."""
    out: dict[str, tuple[str, int]] = {}
    for kind, table in (("double", DOUBLE), ("single", SINGLE)):
        for bfl, parts in table.items():
            for i, p in enumerate(parts):
                out[f"{_diffusers_block(kind)}.N.{p}"] = (f"{kind}_blocks.N.{bfl}", i)
    for bfl, path in TOP.items():
        out[path] = (bfl, 0)
    return out


_TO_BFL = _templates()


def to_bfl(path: str) -> tuple[str, int, int] | None:
    """A diffusers transformer module path → ``(BFL path, its index among the parts, the number of parts)``."""
    m = _DIFFUSERS_BLOCK.fullmatch(path)
    template = f"{m.group(1)}.N.{m.group(3)}" if m else path
    found = _TO_BFL.get(template)
    if found is None:
        return None
    bfl, index = found
    if m:
        bfl = bfl.replace(".N.", f".{m.group(2)}.", 1)
    parts = bfl_parts(bfl)
    assert parts is not None
    return bfl, index, len(parts)


def _sizes(bfl_module: str) -> tuple[int, ...]:
    return (1, 1, 1, MLP_RATIO) if bfl_module.endswith(".linear1") else ()


def tensor_from_single(rest: str) -> Entry | None:
    """A BFL tensor key (no prefix) → its entry (single key ``rest``), or None when it has no diffusers place."""
    m = _BLOCK.fullmatch(rest)
    if m:
        norms = _DOUBLE_NORMS if m.group(1) == "double" else _SINGLE_NORMS
        if m.group(3) in norms:
            return Entry(
                rest, "transformer", (f"{_diffusers_block(m.group(1))}.{m.group(2)}.{norms[m.group(3)]}",)
            )
    module, _, param = rest.rpartition(".")
    parts = bfl_parts(module) if param in ("weight", "bias") else None
    if not parts:
        return None
    reshape = "swap" if parts[0] in SWAPPED else ""
    return Entry(rest, "transformer", tuple(f"{p}.{param}" for p in parts), reshape, _sizes(module))


def tensor_to_single(key: str) -> tuple[str, int, int] | None:
    """A diffusers transformer tensor key → ``(BFL key, index among the parts, number of parts)``."""
    m = _DIFFUSERS_BLOCK.fullmatch(key)
    if m:
        norms = _DOUBLE_NORMS if m.group(1) == "transformer_blocks" else _SINGLE_NORMS
        kind = "double" if m.group(1) == "transformer_blocks" else "single"
        for bfl, diffusers in norms.items():
            if diffusers == m.group(3):
                return f"{kind}_blocks.{m.group(2)}.{bfl}", 0, 1
    module, _, param = key.rpartition(".")
    found = to_bfl(module) if param in ("weight", "bias") else None
    if found is None:
        return None
    bfl, index, n = found
    return f"{bfl}.{param}", index, n


def single_prefix(keys: Iterable[str]) -> str:
    """``model.diffusion_model.`` for an all-in-one file, ``""`` for the BFL transformer file."""
    return ALL_IN_ONE if ALL_IN_ONE + "img_in.weight" in set(keys) else ""


def keymap_from_bfl(keys: Iterable[str], family: str, component: str) -> KeyMap:
    """Every key of a BFL (or all-in-one) file; keys outside the transformer (VAE, text encoders, fp8 scales)
    become ``extras`` (copied as they are by ``merge``)."""
    keys = list(keys)
    prefix = single_prefix(keys)
    entries: list[Entry] = []
    extras: list[str] = []
    for key in keys:
        found = tensor_from_single(key[len(prefix) :]) if key.startswith(prefix) else None
        if found is None:
            extras.append(key)
        else:
            entries.append(Entry(key, component, found.parts, found.reshape, found.sizes))
    return KeyMap(family, entries, extras)


def keymap_to_bfl(
    keys: Iterable[str], family: str, component: str, prefix: str = ""
) -> tuple[KeyMap, list[str]]:
    """A diffusers transformer's keys → the BFL entries, and the keys with no BFL place (or fused parts missing)."""
    fused: dict[str, dict[int, str]] = {}
    counts: dict[str, int] = {}
    leftovers: list[str] = []
    for key in keys:
        found = tensor_to_single(key)
        if found is None:
            leftovers.append(f"{component}.{key}")
            continue
        single, index, n = found
        fused.setdefault(single, {})[index] = key
        counts[single] = n
    entries = []
    for single, parts in fused.items():
        if len(parts) != counts[single]:
            leftovers.append(f"{component}: {single} lacks {counts[single] - len(parts)} of its parts")
            continue
        probe = tensor_from_single(single)
        assert probe is not None
        entries.append(
            Entry(
                prefix + single,
                component,
                tuple(parts[i] for i in range(len(parts))),
                probe.reshape,
                probe.sizes,
            )
        )
    return KeyMap(family, entries, []), leftovers


def swap_rows(tensor):  # type: ignore[no-untyped-def]
    """The two halves of dim 0 swapped (the same operation both ways)."""
    import torch

    a, b = torch.chunk(tensor, 2, dim=0)
    return torch.cat([b, a], dim=0)


def row_sizes(entry: Entry, rows: int) -> list[int]:
    """Each part's rows of a fused tensor of ``rows`` rows (equal parts unless ``entry.sizes`` weighs them)."""
    weights = entry.sizes or (1,) * len(entry.parts)
    unit, rest = divmod(rows, sum(weights))
    if rest:
        from lorax.errors import FormatError

        raise FormatError(f"{entry.single}: {rows} rows cannot hold its {len(entry.parts)} fused parts")
    return [unit * w for w in weights]
