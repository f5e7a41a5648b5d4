"""Each format's ``describe(header)``: what ``lorax inspect`` says about a LoRA or embedding file, from its header.

Torch-free: the names and shapes of the tensors, the header metadata, and the few bytes of scalar ``alpha`` tensors
(``Header.scalar``) are all each describer reads. ``lorax.formats.registry`` gives each format its describer.
"""

from __future__ import annotations

import json

import lorax.formats.keys as K
import lorax.formats.lycoris as lycoris
from lorax.errors import FormatError
from lorax.formats.base import Description, Header, check_pair_shapes
from lorax.formats.naming import Resolver
from lorax.models import families

_TD_KINDS = {"Attention": "attention", "CrossAttention": "attention", "CLIPAttention": "attention",
             "GEGLU": "ff", "ResnetBlock2D": "conv"}  # fmt: skip


def kohya(header: Header, fmt: str) -> Description:
    """kohya and LyCORIS: each module's algorithm (``lycoris.ALGORITHMS``), rank and alpha; bundled tokens."""
    out = Description()
    groups, rest = K.kohya_groups(header.shapes)
    resolvers: dict[str, Resolver] = {}
    for (component, flat), parts in groups.items():
        resolver = resolvers.setdefault(component, Resolver(component))
        path = resolver.resolve(flat) or flat
        alpha = header.scalar(parts["alpha"]) if "alpha" in parts else None
        suffixes = set(parts)
        algorithm = lycoris.algorithm_of(suffixes, f"{component}.{path}", header.path)
        shapes = {s: header.shapes[k] for s, k in parts.items()}
        if algorithm.name == "lora" and "lora_mid.weight" not in parts:
            check_pair_shapes(
                f"{component}.{path}", shapes["lora_down.weight"], shapes["lora_up.weight"], header.path
            )
        rank = algorithm.rank(shapes)
        if alpha is None and rank is not None and algorithm.alpha_is_rank:
            alpha = float(rank)
        out.add_module(lycoris.label(algorithm, suffixes), rank, alpha, path)
    for key in (k for k in rest if k.startswith(K.BUNDLE)):
        token, _, slot = key[len(K.BUNDLE) :].partition(".")
        out.add_token(token, families.embedding_component(slot), header.shapes[key])
    return out.finish({c for c, _ in groups})


def flux(header: Header, fmt: str) -> Description:
    """A Flux LoRA in any layout (``lorax.formats.flux_names``): the layout, blocks and projections, ranks, alphas."""
    from lorax.formats import flux_names

    groups: dict[str, dict[str, str]] = {}
    where: dict[str, tuple[str, str]] = {}
    for key in header.shapes:
        found = flux_names.classify(key)
        if found is None:
            raise FormatError(f"key {key!r} is in no Flux LoRA layout", path=header.path)
        name, component, module, role = found
        groups.setdefault(name, {})[role] = key
        where[name] = (component, module)
    out = Description(family="flux", layout=flux_names.LAYOUTS[fmt])
    components: set[str] = set()
    bfl: set[str] = set()
    for name, roles in groups.items():
        if "down" not in roles or "up" not in roles:
            missing = "down" if "down" not in roles else "up"
            raise FormatError(f"module {name} has no {missing} weight", path=header.path)
        down, up = header.shapes[roles["down"]], header.shapes[roles["up"]]
        check_pair_shapes(name, down, up, header.path)
        alpha = header.scalar(roles["alpha"]) if "alpha" in roles else float(down[0])
        component, module = where[name]
        components.add(component)
        if component == flux_names.TRANSFORMER:
            bfl.add(module)
            parts = flux_names.bfl_parts(module) or flux_names.bfl_parts(module.replace(".qkv", ".linear1"))
            module = parts[0] if parts else module  # a diffusers path tells the target kind
        out.add_module("lora", down[0], alpha, module)
    out.blocks = flux_names.block_summary(bfl)
    text = sorted(c for c in components if c != flux_names.TRANSFORMER)
    if text:
        out.blocks.append("text encoders: " + ", ".join(text))
    return out.finish(components)


def diffusers(header: Header, fmt: str) -> Description:
    """diffusers / PEFT: ranks, and alphas from ``.alpha`` keys or the ``lora_adapter_metadata`` LoraConfigs."""
    out = Description()
    parts: dict[tuple[str, str], dict[str, str]] = {}
    for key in header.shapes:
        parsed = K.diffusers_parse(key)
        if parsed is None:
            raise FormatError(f"key {key!r} is not in diffusers/PEFT naming", path=header.path)
        component, path, role = parsed
        parts.setdefault((component, path), {})[role] = key
    configs = K.component_configs(header.metadata)
    for (component, path), roles in parts.items():
        if "down" not in roles or "up" not in roles:
            missing = "up" if "down" in roles else "down"
            raise FormatError(f"module {component}.{path} lacks its {missing} weight", path=header.path)
        down, up = header.shapes[roles["down"]], header.shapes[roles["up"]]
        check_pair_shapes(f"{component}.{path}", down, up, header.path)
        rank = down[0]
        if "alpha" in roles:
            alpha = header.scalar(roles["alpha"])
        else:
            config = configs.get(component) or configs.get("")
            alpha = (
                K.module_alpha(config, path, rank, component=component, path=header.path)
                if config
                else float(rank)
            )
        out.add_module("dora" if "magnitude" in roles else "lora", rank, alpha, path)
    return out.finish({c for c, _ in parts})


def lora_diffusion(header: Header, fmt: str) -> Description:
    """lora_diffusion: pairs by index (their ranks; the scale is folded into ``up``), target classes, tokens."""
    out = Description()
    slots: dict[tuple[str, int], dict[str, tuple[int, ...]]] = {}
    for key, shape in header.shapes.items():
        m = K.LORA_DIFFUSION_KEY.match(key)
        if m:
            slots.setdefault((m.group("c"), int(m.group("i"))), {})[m.group("r")] = shape
        else:
            out.add_token(key, families.embedding_component(), shape)
    for (component, i), pair in sorted(slots.items()):
        if set(pair) != {"up", "down"}:
            raise FormatError(f"{component}:{i} lacks its up or down tensor", path=header.path)
        check_pair_shapes(f"{component}:{i}", pair["down"], pair["up"], header.path)
        out.modules += 1
        if pair["down"][0] not in out.ranks:
            out.ranks.append(pair["down"][0])
    out.algorithms = ["lora"] if slots else []
    out.alphas = [float(r) for r in sorted(out.ranks)]  # the scale is folded into up
    kinds: set[str] = set()
    for component in {c for c, _ in slots}:
        try:
            listed = json.loads(header.metadata[component]) if component in header.metadata else None
        except json.JSONDecodeError:
            listed = None
        names = listed or (["Attention", "GEGLU"] if component == "unet" else ["CLIPAttention"])
        kinds |= {_TD_KINDS.get(n, "other") for n in names}
    out.targets = [k for k in families.TARGET_KINDS if k in kinds]
    out.components = [c for c in families.all_components() if c in {c for c, _ in slots}]
    out.ranks.sort()
    te = slots.get((families.embedding_component(), 0))
    if te and "down" in te:
        out.family = families.family_of_text_width(te["down"][1])
    return out


def embedding(header: Header, fmt: str) -> Description:
    """Token embeddings: each token's vectors and width per text encoder; the family from the widths."""
    out = Description()
    stem = header.path.name.removesuffix(".safetensors").removesuffix(".pt")
    if fmt == "sdxl-embedding":
        for key, shape in header.shapes.items():
            out.add_token(stem, families.embedding_component(key), shape)
        out.family = next(f.name for f in families.all_families() if f.embedding_format == fmt)
    elif fmt == "a1111-embedding":
        for key, shape in header.shapes.items():
            token = key.removeprefix("string_to_param.") if key.startswith("string_to_param.") else stem
            out.add_token(token, families.embedding_component(), shape)
    else:
        for key, shape in header.shapes.items():
            out.add_token(key, families.embedding_component(), shape)
    out.components = sorted({c for t in out.tokens.values() for c in t["dims"]})
    if out.family is None:
        dims = {d for t in out.tokens.values() for d in t["dims"].values()}
        out.family = families.family_of_text_width(next(iter(dims))) if len(dims) == 1 else None
    return out
