"""The original ``lora_diffusion`` format (cloneofsimo/lora): modules by index, not by name.

``.safetensors``: tensors ``unet:{i}:up`` / ``unet:{i}:down`` and ``text_encoder:{i}:up/down``; header metadata
``{"unet": json list of target class names, "unet:{i}:rank": "4", "<s1>": "<embed>", …}``; token embeddings as
tensors named by the token. The LoRA scale is folded into ``up`` (``realize_as_lora``), so ``alpha = r`` on reading.
Legacy ``.pt``: ``torch.save`` lists ``[up0, down0, up1, down1, …]`` — UNet in ``X.pt``, text encoder in
``X.text_encoder.pt``, tokens ``{token: [dim]}`` in ``X.ti.pt`` — with the scale not folded (1 at inference).

The i-th pair belongs to the i-th ``nn.Linear`` (and with the extended targets ``nn.Conv2d``) found inside modules
whose class is a target — UNet {CrossAttention, Attention, GEGLU}, extended adds ResnetBlock2D; text encoder
{CLIPAttention} — walking the model's ``named_modules()`` (so CLIP's ``k_proj, v_proj, q_proj, out_proj``).
diffusers ≤ 0.14 registered a transformer block's ``ff`` before ``attn2``, later versions after: both orders are
tried against the pair shapes; when both fit and disagree, reading refuses rather than guess.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from lorax.adapters.state import LoraModule, LoraState
from lorax.errors import ErrorPath, FormatError, MismatchError
from lorax.formats import keys as _keys
from lorax.formats.base import Meta, Tensors, source
from lorax.formats.naming import components_of
from lorax.models import families

NAME = "lora_diffusion"
EMBED_FLAG = "<embed>"
UNET_DEFAULT = ("CrossAttention", "Attention", "GEGLU")
UNET_EXTENDED = ("ResnetBlock2D", "CrossAttention", "Attention", "GEGLU")
TEXT_DEFAULT = ("CLIPAttention",)
_ALIASES = {"CLIPAttention": {"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2"}}
DEFAULT_TARGETS = {"unet": UNET_DEFAULT, "text_encoder": TEXT_DEFAULT, "text_encoder_2": TEXT_DEFAULT}


def traversal(
    module: torch.nn.Module, component: str, targets: Iterable[str]
) -> list[tuple[str, tuple[int, ...]]]:
    """``[(on-disk path, weight shape)]`` in lora_diffusion's index order for ``targets`` (class names)."""
    names: set[str] = set()
    for t in targets:
        names |= _ALIASES.get(t, {t})
    search: tuple[type, ...] = (
        (torch.nn.Linear, torch.nn.Conv2d) if "ResnetBlock2D" in names else (torch.nn.Linear,)
    )
    out: list[tuple[str, tuple[int, ...]]] = []
    seen: set[str] = set()
    for ancestor_name, ancestor in module.named_modules():
        if type(ancestor).__name__ not in names:
            continue
        for child_name, child in ancestor.named_modules():
            if not isinstance(child, search) or not child_name:
                continue
            full = f"{ancestor_name}.{child_name}" if ancestor_name else child_name
            if full not in seen:
                seen.add(full)
                out.append((families.live_to_disk(component, full), tuple(child.weight.shape)))  # type: ignore[attr-defined]
    return out


def legacy_order(order: Sequence[tuple[str, tuple[int, ...]]]) -> list[tuple[str, tuple[int, ...]]]:
    """diffusers ≤ 0.14's order: within each transformer block, ``attn1``, then ``ff``, then ``attn2``."""
    out: list[tuple[str, tuple[int, ...]]] = []
    i = 0
    while i < len(order):
        path = "." + order[i][0]
        marker = path.find(".transformer_blocks.")
        if marker < 0:
            out.append(order[i])
            i += 1
            continue
        block = path[: path.index(".", marker + len(".transformer_blocks.")) + 1]
        group = []
        while i < len(order) and ("." + order[i][0]).startswith(block):
            group.append(order[i])
            i += 1
        rank = {"attn1": 0, "ff": 1, "attn2": 2}
        group.sort(
            key=lambda item: rank.get(item[0][len(block) - 1 :].split(".", 1)[0], 3)
        )  # stable within kinds
        out.extend(group)
    return out


def _fits(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], order: Sequence[tuple[str, tuple[int, ...]]]
) -> int:
    """The index of the first pair whose shapes do not fit ``order`` (``len(pairs)`` when all fit)."""
    if len(pairs) != len(order):
        return -1
    for i, ((up, down), (_, shape)) in enumerate(zip(pairs, order, strict=True)):
        if up.shape[0] != shape[0] or down.shape[1] != shape[1] or tuple(down.shape[2:]) != tuple(shape[2:]):
            return i
    return len(pairs)


def resolve(
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    module: torch.nn.Module,
    component: str,
    targets: Sequence[Sequence[str]],
    path: ErrorPath = None,
) -> list[str]:
    """The module path of every pair index, trying each target set and both diffusers-era block orders."""
    problems: list[str] = []
    for target in targets:
        order = traversal(module, component, target)
        candidates = {"diffusers ≥ 0.15": order}
        if component == "unet":
            old = legacy_order(order)
            if [p for p, _ in old] != [p for p, _ in order]:
                candidates["diffusers ≤ 0.14"] = old
        fitting = {label: o for label, o in candidates.items() if _fits(pairs, o) == len(pairs)}
        if len(fitting) == 2:
            raise MismatchError(
                f"{component}: the pair shapes fit both the diffusers ≤ 0.14 and ≥ 0.15 module orders; "
                "cannot tell which modules they belong to",
                path=path,
            )
        if fitting:
            return [p for p, _ in next(iter(fitting.values()))]
        first = _fits(pairs, order)
        if first < 0:
            problems.append(f"{len(order)} target modules for {list(target)}")
        else:
            problems.append(
                f"pair {first} does not fit {order[first][0]} {list(order[first][1])} ({list(target)})"
            )
    raise MismatchError(
        f"{component}: {len(pairs)} LoRA pairs do not match the model: " + "; ".join(problems), path=path
    )


def _models(
    model: Any, family: str | None, components: Iterable[str], pairs: Mapping[str, Any]
) -> tuple[dict[str, Any], str | None]:
    live = components_of(model)
    if model is not None:
        missing = [c for c in components if c not in live]
        if missing:
            raise MismatchError(f"the model has no {', '.join(missing)}")
        return live, family
    candidates = [family] if family else list(families.FAMILIES)
    for fam in candidates:
        if fam is None or any(c not in families.FAMILIES[fam] for c in components):
            continue
        metas = {c: families.meta_model(fam, c) for c in components}
        ok = True
        for c in components:
            try:
                resolve(
                    pairs[c], metas[c], c, [DEFAULT_TARGETS[c]] + ([UNET_EXTENDED] if c == "unet" else [])
                )
            except MismatchError:
                ok = False
                break
        if ok:
            return metas, fam
    raise MismatchError(
        "lora_diffusion files name modules by index only: pass the model they were trained for "
        f"(no full-size family {'(' + family + ') ' if family else ''}fits)"
    )


def read_parts(
    pairs: Mapping[str, Sequence[tuple[torch.Tensor, torch.Tensor]]],
    targets: Mapping[str, Sequence[Sequence[str]]],
    tokens: Mapping[str, torch.Tensor],
    *,
    model: Any = None,
    family: str | None = None,
    metadata: Mapping[str, str] | None = None,
    path: ErrorPath = None,
) -> LoraState:
    """Index-ordered pairs per component → ``LoraState`` (the scale is already in ``up``: alpha = r)."""
    modules, family = _models(model, family, list(pairs), pairs)
    state = LoraState(metadata=dict(metadata or {}), family=family)
    for component, comp_pairs in pairs.items():
        paths = resolve(comp_pairs, modules[component], component, targets[component], path)
        for (up, down), module_path in zip(comp_pairs, paths, strict=True):
            state.modules[f"{component}.{module_path}"] = LoraModule(down, up, None)
    for token, vectors in tokens.items():
        state.embeddings[token] = {"text_encoder": vectors.reshape(1, -1) if vectors.dim() == 1 else vectors}
    return state


def _target_options(metadata: Mapping[str, str], component: str, path: ErrorPath) -> list[Sequence[str]]:
    if component in metadata:
        try:
            listed = json.loads(metadata[component])
        except json.JSONDecodeError:
            raise FormatError(
                f"metadata {component!r} is not a JSON list of class names", path=path
            ) from None
        return [list(listed)]
    options: list[Sequence[str]] = [DEFAULT_TARGETS[component]]
    return options + ([UNET_EXTENDED] if component == "unet" else [])


def _pairs_from_list(
    items: Sequence[Any], what: str, path: ErrorPath
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if len(items) % 2 or not all(isinstance(t, torch.Tensor) for t in items):
        raise FormatError(f"{what}: expected a list [up0, down0, up1, down1, …] of tensors", path=path)
    pairs = [(items[i], items[i + 1]) for i in range(0, len(items), 2)]
    for i, (up, down) in enumerate(pairs):
        if up.dim() != down.dim() or up.shape[1] != down.shape[0]:
            raise FormatError(
                f"{what} pair {i}: up/down shapes {list(up.shape)} / {list(down.shape)} do not pair",
                path=path,
            )
    return pairs


def read(tensors: Tensors, meta: Meta = None, family: str | None = None) -> LoraState:
    """A lora_diffusion ``.safetensors`` content → ``LoraState``."""
    src = source(meta)
    metadata, model, path = dict(src.metadata), src.model, src.path
    slots: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    tokens: dict[str, torch.Tensor] = {}
    leftovers = []
    for key, tensor in tensors.items():
        m = _keys.LORA_DIFFUSION_KEY.match(key)
        if m:
            slots.setdefault(m.group("c"), {}).setdefault(int(m.group("i")), {})[m.group("r")] = tensor
        elif metadata.get(key) == EMBED_FLAG or (":" not in key and tensor.dim() in (1, 2)):
            tokens[key] = tensor
        else:
            leftovers.append(key)
    if leftovers:
        raise FormatError(
            f"{len(leftovers)} key(s) not in lora_diffusion naming: {', '.join(leftovers[:5])}", path=path
        )
    pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for component, by_index in slots.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise FormatError(f"{component}: pair indices are not 0…{len(by_index) - 1}", path=path)
        items: list[Any] = []
        for i in range(len(by_index)):
            if set(by_index[i]) != {"up", "down"}:
                raise FormatError(f"{component}:{i} lacks its up or down tensor", path=path)
            items += [by_index[i]["up"], by_index[i]["down"]]
        pairs[component] = _pairs_from_list(items, component, path)
    targets = {c: _target_options(metadata, c, path) for c in pairs}
    return read_parts(pairs, targets, tokens, model=model, family=family, metadata=metadata, path=path)


def legacy_paths(path: Path) -> dict[str, Path]:
    """The files of a legacy ``.pt`` set from any one of them: ``X.pt``, ``X.text_encoder.pt``, ``X.ti.pt``."""
    name = path.name
    for suffix in (".text_encoder.pt", ".ti.pt", ".pt"):
        if name.endswith(suffix):
            base = name[: -len(suffix)]
            break
    else:
        base = path.stem
    parts = {
        "unet": path.with_name(base + ".pt"),
        "text_encoder": path.with_name(base + ".text_encoder.pt"),
        "tokens": path.with_name(base + ".ti.pt"),
    }
    return {k: p for k, p in parts.items() if p.is_file()}


def read_legacy(path: Path, *, model: Any = None, family: str | None = None) -> LoraState:
    """Read a legacy ``.pt`` set (siblings found from any member)."""
    from lorax.io.pickle_safe import load_pickle

    files = legacy_paths(path)
    pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for component in ("unet", "text_encoder"):
        if component in files:
            obj = load_pickle(files[component])
            if not isinstance(obj, list | tuple):
                raise FormatError("a lora_diffusion .pt file holds a list of tensors", path=files[component])
            pairs[component] = _pairs_from_list(list(obj), component, files[component])
    tokens: dict[str, torch.Tensor] = {}
    if "tokens" in files:
        obj = load_pickle(files["tokens"])
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise FormatError("a lora_diffusion .ti.pt file holds {token: tensor}", path=files["tokens"])
        tokens = {str(k): v for k, v in obj.items()}
    if not pairs and not tokens:
        raise FormatError("no lora_diffusion content found", path=path)
    targets = {c: _target_options({}, c, path) for c in pairs}
    return read_parts(pairs, targets, tokens, model=model, family=family, path=path)


def write(
    state: LoraState, *, dtype: torch.dtype | None = None, model: Any = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``LoraState`` → lora_diffusion tensors (scale folded into ``up``) and metadata.

    Indices follow ``model``'s traversal (else the family's full-size model). Target modules the LoRA lacks get
    zero pairs (no effect), since an index file cannot skip modules; a module outside the target classes is refused.
    """
    live = components_of(model)
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = dict(state.metadata)
    for component in state.components():
        module = live.get(component)
        if module is None:
            if state.family not in families.FAMILIES:
                raise FormatError("writing lora_diffusion needs the model or a known family (index order)")
            module = families.meta_model(state.family, component)
        present = state.component_modules(component)
        options = [DEFAULT_TARGETS[component]] + ([UNET_EXTENDED] if component == "unet" else [])
        chosen = None
        for target in options:
            order = traversal(module, component, target)
            if set(present) <= {p for p, _ in order}:
                chosen = (target, order)
                break
        if chosen is None:
            extra = sorted(set(present) - {p for p, _ in traversal(module, component, options[-1])})
            raise FormatError(
                f"lora_diffusion cannot hold {component} module(s) outside its target classes: {', '.join(extra[:3])}"
            )
        target, order = chosen
        ranks = [m.rank for m in present.values() if isinstance(m, LoraModule)]
        fill_rank = max(ranks) if ranks else 1
        fill_dtype = next((m.up.dtype for m in present.values() if isinstance(m, LoraModule)), torch.float32)
        metadata[component] = json.dumps(list(target))
        for i, (module_path, shape) in enumerate(order):
            m = present.get(module_path)
            if m is None:
                up = torch.zeros(shape[0], fill_rank, *([1, 1] if len(shape) == 4 else []), dtype=fill_dtype)
                down = torch.zeros(fill_rank, *shape[1:], dtype=fill_dtype)
            elif isinstance(m, LoraModule):
                up, down = m.up * m.scale, m.down
            else:
                raise FormatError(
                    f"module {component}.{module_path} ({type(m).__name__}) has no lora_diffusion form"
                )
            if dtype is not None:
                up, down = up.to(dtype), down.to(dtype)
            elif m is not None:
                up = up.to(m.up.dtype)
            tensors[f"{component}:{i}:up"] = up.contiguous()
            tensors[f"{component}:{i}:down"] = down.contiguous()
            metadata[f"{component}:{i}:rank"] = str(down.shape[0])
    for token, per in state.embeddings.items():
        if set(per) != {"text_encoder"}:
            raise FormatError(
                f"lora_diffusion holds tokens for the first text encoder only; {token!r} has {sorted(per)}"
            )
        t = per["text_encoder"]
        t = t[0] if t.shape[0] == 1 else t
        tensors[token] = (t if dtype is None else t.to(dtype)).contiguous()
        metadata[token] = EMBED_FLAG
    return tensors, metadata
