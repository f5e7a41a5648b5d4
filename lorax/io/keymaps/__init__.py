"""diffusers ⇄ original single-file key tables for SD1, SD2 (and SDXL) UNet, VAE and text encoders.

A ``KeyMap`` lists, for every tensor of a single-file checkpoint, the diffusers component and key(s) it holds:
usually one, three for OpenCLIP's fused ``attn.in_proj_weight`` (q;k;v stacked along dim 0). Text-encoder keys on the
diffusers side keep ``text_model.`` (lorax's on-disk convention; ``canonical_text_key`` adds it to keys that
transformers ≥ 5 writes without it). The tables are computed from block layouts (``layout.py``), so tiny and
full-size models map alike; ``convert`` and ``merge`` use them, tested by bit-identical round trips.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from lorax.errors import FormatError
from lorax.io.checkpoint_layouts import layout as family_layout
from lorax.io.keymaps.layout import TextLayout, UnetLayout, VaeLayout
from lorax.io.keymaps.tables import PrefixMapper, unet_rules, vae_rules

__all__ = [
    "Entry",
    "KeyMap",
    "Layouts",
    "TextLayout",
    "UnetLayout",
    "VaeLayout",
    "canonical_text_key",
    "join_parts",
    "keymap_from_diffusers",
    "keymap_from_single",
    "part_shapes",
    "single_shape",
    "split_single",
]

_TEXT_CHILDREN = ("embeddings.", "encoder.", "final_layer_norm.")


def canonical_text_key(key: str) -> str:
    """A text-encoder tensor key with ``text_model.`` (as transformers < 5 and lorax's tables write it)."""
    return "text_model." + key if key.startswith(_TEXT_CHILDREN) else key


@dataclass(frozen=True)
class Entry:
    """One single-file tensor and the diffusers tensor(s) it holds.

    ``reshape``: ``""`` (same shape), ``"conv1x1"`` (single ``[o, i, 1, 1]`` ⇄ diffusers ``[o, i]``) or
    ``"transpose"`` (SDXL's OpenCLIP ``text_projection``) or ``"swap"`` (the halves of dim 0 swapped: Flux's final
    layer). With several ``parts`` the single tensor is their concatenation along dim 0, in equal slices or, with
    ``sizes``, in slices weighed by them (Flux's ``linear1``: ``1, 1, 1, 4``).
    """

    single: str
    component: str
    parts: tuple[str, ...]
    reshape: str = ""
    sizes: tuple[int, ...] = ()


@dataclass
class Layouts:
    unet: UnetLayout | None = None
    vae: VaeLayout | None = None
    text: dict[str, TextLayout] = field(default_factory=dict)


class KeyMap:
    """Every single-file tensor ↔ its diffusers counterpart(s); ``extras`` are single keys with none (EMA …)."""

    def __init__(self, family: str, entries: list[Entry], extras: list[str]) -> None:
        self.family = family
        self.entries = entries
        self.extras = extras
        self.by_single = {e.single: e for e in entries}
        self._by_part: dict[tuple[str, str], tuple[Entry, int]] = {}
        for e in entries:
            for i, part in enumerate(e.parts):
                self._by_part[(e.component, part)] = (e, i)

    def locate(self, component: str, key: str) -> tuple[Entry, int] | None:
        """The entry holding diffusers ``key`` of ``component`` and its slice index, or None."""
        return self._by_part.get(
            (component, canonical_text_key(key) if component.startswith("text") else key)
        )

    def components(self) -> list[str]:
        return sorted({e.component for e in self.entries})

    def component_keys(self, component: str) -> list[str]:
        return [p for e in self.entries if e.component == component for p in e.parts]


# ---------------------------------------------------------------------------------------------------------------
# OpenCLIP text encoder (SD2, SDXL's second encoder)

_OPENCLIP_FIXED = {
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
}
_OPENCLIP_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_OPENCLIP_LAYER_D = {v: k for k, v in _OPENCLIP_LAYER.items()}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")
_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)$")


def _openclip_from_single(
    rest: str, layers: int, with_projection: bool
) -> tuple[tuple[str, ...], str] | None:
    if rest in _OPENCLIP_FIXED:
        return (_OPENCLIP_FIXED[rest],), ""
    if rest == "text_projection" and with_projection:
        return ("text_projection.weight",), "transpose"
    m = _RESBLOCK.match(rest)
    if not m or int(m.group(1)) >= layers:
        return None
    i, tail = m.group(1), m.group(2)
    base = f"text_model.encoder.layers.{i}."
    if tail in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = tail.rsplit("_", 1)[1]
        return tuple(f"{base}self_attn.{p}_proj.{kind}" for p in "qkv"), ""
    name, _, param = tail.rpartition(".")
    if name in _OPENCLIP_LAYER:
        return (f"{base}{_OPENCLIP_LAYER[name]}.{param}",), ""
    return None


def _openclip_to_single(key: str) -> tuple[str, str, str] | None:
    """diffusers key → (single rest, fused slot q/k/v or "", reshape)."""
    fixed = {v: k for k, v in _OPENCLIP_FIXED.items()}
    if key in fixed:
        return fixed[key], "", ""
    if key == "text_projection.weight":
        return "text_projection", "", "transpose"
    m = _LAYER.match(key)
    if not m:
        return None
    i, tail = m.group(1), m.group(2)
    base = f"transformer.resblocks.{i}."
    qkv = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", tail)
    if qkv:
        return f"{base}attn.in_proj_{qkv.group(2)}", qkv.group(1), ""
    name, _, param = tail.rpartition(".")
    if name in _OPENCLIP_LAYER_D:
        return f"{base}{_OPENCLIP_LAYER_D[name]}.{param}", "", ""
    return None


# ---------------------------------------------------------------------------------------------------------------


def _check_family(family: str) -> Mapping[str, tuple[str, str]]:
    """``{component: (single-file prefix, kind)}`` of ``family`` (its ``CheckpointLayout``)."""
    return family_layout(family).single_prefixes


def keymap_from_single(
    keys: Iterable[str],
    family: str,
    layouts: Layouts | None = None,
    *,
    default_text_layers: int | None = None,
) -> KeyMap:
    """Map every key of an original-layout checkpoint; keys without a diffusers counterpart become ``extras``.

    Layouts not given are inferred from the keys; an OpenCLIP encoder without a ``TextLayout`` keeps
    ``default_text_layers`` layers, or all of them when that is None.
    """
    prefixes = _check_family(family)
    keys = list(keys)
    flux = [c for c, (_, kind) in prefixes.items() if kind == "flux"]
    if flux:  # the BFL layout (its own rules)
        from lorax.io.keymaps.flux import keymap_from_bfl

        keymap = keymap_from_bfl(keys, family, flux[0])
        if not keymap.entries:
            raise FormatError(f"no tensor of this file matches the {family} single-file layout")
        return keymap
    layouts = layouts or Layouts()
    mappers: dict[str, PrefixMapper] = {}
    for component, (prefix, kind) in prefixes.items():
        sub = [k[len(prefix) :] for k in keys if k.startswith(prefix)]
        if not sub:
            continue
        if kind == "unet":
            mappers[component] = PrefixMapper(unet_rules(layouts.unet or UnetLayout.from_single_keys(sub)))
        elif kind == "vae":
            mappers[component] = PrefixMapper(vae_rules(layouts.vae or VaeLayout.from_single_keys(sub)))
    entries: list[Entry] = []
    extras: list[str] = []
    for key in keys:
        entry = _entry_from_single(key, family, prefixes, mappers, layouts, default_text_layers)
        if entry is None:
            extras.append(key)
        else:
            entries.append(entry)
    if not entries:
        raise FormatError(f"no tensor of this file matches the {family} single-file layout")
    return KeyMap(family, entries, extras)


def _entry_from_single(
    key: str,
    family: str,
    prefixes: Mapping[str, tuple[str, str]],
    mappers: dict[str, PrefixMapper],
    layouts: Layouts,
    default_text_layers: int | None,
) -> Entry | None:
    for component, (prefix, kind) in prefixes.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        if kind in ("unet", "vae"):
            mapped = mappers[component].to_diffusers(rest)
            if mapped is None:
                return None
            return Entry(key, component, (mapped[0],), "conv1x1" if mapped[1] else "")
        if kind == "clip":
            if rest.endswith("position_ids"):
                return None
            part = rest if rest.startswith("text_model.") else canonical_text_key(rest)
            if not part.startswith("text_model."):
                return None
            return Entry(key, component, (part,))
        layout = layouts.text.get(component)
        layers = layout.layers if layout else (default_text_layers or 10**9)
        found = _openclip_from_single(rest, layers, with_projection=family_layout(family).text_projection)
        if found is None:
            return None
        return Entry(key, component, found[0], found[1])
    return None


def keymap_from_diffusers(
    keys_by_component: Mapping[str, Iterable[str]], family: str, layouts: Layouts
) -> KeyMap:
    """Map every key of the diffusers components to single-file names; raise listing any key left over."""
    prefixes = _check_family(family)
    entries: list[Entry] = []
    leftovers: list[str] = []
    for component, keys in keys_by_component.items():
        if component not in prefixes:
            raise FormatError(f"{family} single files hold no component {component!r}")
        prefix, kind = prefixes[component]
        if kind == "flux":
            from lorax.io.keymaps.flux import keymap_to_bfl

            flux_map, missed = keymap_to_bfl(keys, family, component, prefix)
            entries += flux_map.entries
            leftovers += missed
            continue
        if kind == "unet":
            if layouts.unet is None:
                raise FormatError("the UNet layout is needed to map its keys")
            mapper = PrefixMapper(unet_rules(layouts.unet))
        elif kind == "vae":
            if layouts.vae is None:
                raise FormatError("the VAE layout is needed to map its keys")
            mapper = PrefixMapper(vae_rules(layouts.vae))
        fused: dict[str, dict[str, str]] = {}
        for key in keys:
            if kind in ("unet", "vae"):
                mapped = mapper.to_single(key)
                if mapped is None:
                    leftovers.append(f"{component}.{key}")
                    continue
                entries.append(Entry(prefix + mapped[0], component, (key,), "conv1x1" if mapped[1] else ""))
            elif kind == "clip":
                canon = canonical_text_key(key)
                if canon.endswith("position_ids"):
                    continue
                if not canon.startswith("text_model."):
                    leftovers.append(f"{component}.{key}")
                    continue
                entries.append(Entry(prefix + canon, component, (canon,)))
            else:
                canon = canonical_text_key(key)
                if canon.endswith("position_ids"):
                    continue
                found = _openclip_to_single(canon)
                if found is None:
                    leftovers.append(f"{component}.{key}")
                    continue
                rest, slot, reshape = found
                if slot:
                    fused.setdefault(prefix + rest, {})[slot] = canon
                else:
                    entries.append(Entry(prefix + rest, component, (canon,), reshape))
        for single, slots in fused.items():
            if set(slots) != {"q", "k", "v"}:
                leftovers.append(f"{component}: {single} lacks {sorted({'q', 'k', 'v'} - set(slots))}")
                continue
            entries.append(Entry(single, component, (slots["q"], slots["k"], slots["v"])))
    if leftovers:
        shown = ", ".join(leftovers[:5])
        raise FormatError(
            f"{len(leftovers)} diffusers tensors have no place in the {family} single-file layout: {shown}"
            + (" …" if len(leftovers) > 5 else "")
        )
    return KeyMap(family, entries, [])


# ---------------------------------------------------------------------------------------------------------------
# Tensor transforms (torch imported lazily: planning a merge needs only shapes)


def single_shape(entry: Entry, part_shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The single-file tensor's shape from its diffusers parts' shapes."""
    shape = tuple(part_shapes[0])
    if len(part_shapes) > 1:
        shape = (sum(s[0] for s in part_shapes), *shape[1:])
    if entry.reshape == "conv1x1":
        return (*shape, 1, 1)
    if entry.reshape == "transpose":
        return tuple(reversed(shape))
    return shape


def part_shapes(entry: Entry, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Each diffusers part's shape from the single-file tensor's shape."""
    if entry.reshape == "conv1x1":
        shape = shape[:2]
    elif entry.reshape == "transpose":
        shape = tuple(reversed(shape))
    n = len(entry.parts)
    if entry.sizes:
        from lorax.io.keymaps.flux import row_sizes

        return [(rows, *shape[1:]) for rows in row_sizes(entry, shape[0])]
    if n > 1:
        if shape[0] % n:
            raise FormatError(f"{entry.single}: {shape[0]} rows cannot hold {n} equal fused parts")
        return [(shape[0] // n, *shape[1:])] * n
    return [shape]


def split_single(entry: Entry, tensor):  # type: ignore[no-untyped-def]
    """Single-file tensor → list of diffusers tensors (views where possible)."""
    t = tensor
    if entry.reshape == "conv1x1":
        t = t.reshape(t.shape[0], t.shape[1])
    elif entry.reshape == "transpose":
        t = t.t().contiguous()
    elif entry.reshape == "swap":
        from lorax.io.keymaps.flux import swap_rows

        t = swap_rows(t)
    if entry.sizes:
        from lorax.io.keymaps.flux import row_sizes

        return [c.contiguous() for c in t.split(row_sizes(entry, t.shape[0]), dim=0)]
    if len(entry.parts) > 1:
        return [c.contiguous() for c in t.chunk(len(entry.parts), dim=0)]
    return [t]


def join_parts(entry: Entry, tensors):  # type: ignore[no-untyped-def]
    """Diffusers tensors → the single-file tensor."""
    import torch

    t = torch.cat(list(tensors), dim=0) if len(tensors) > 1 else tensors[0]
    if entry.reshape == "conv1x1":
        return t.reshape(*t.shape, 1, 1)
    if entry.reshape == "transpose":
        return t.t().contiguous()
    if entry.reshape == "swap":
        from lorax.io.keymaps.flux import swap_rows

        return swap_rows(t)
    return t
