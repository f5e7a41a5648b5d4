"""kohya / AUTOMATIC1111 / ComfyUI LoRA files.

Keys: ``lora_unet_<flat path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (a scalar); text encoders
``lora_te_…`` (SD1/SD2) or ``lora_te1_…`` / ``lora_te2_…`` (SDXL). Flat paths are module paths with ``.`` → ``_``;
kohya's SDXL trainer names UNet blocks the original way (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``).
Conv layers (LoCon) carry 4-D tensors. Embeddings may be bundled: ``bundle_emb.<token>.string_to_param.*``
(SD1/SD2) or ``bundle_emb.<token>.clip_l`` / ``.clip_g`` (SDXL). Training metadata lives in ``ss_*`` header keys.

Names are resolved against a table of module paths (see ``lorax.formats.naming``), never by string replacement.
When writing, SDXL UNet modules use kohya's original (SGM) naming; other families use diffusers names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lorax.errors import ErrorPath, FormatError
from lorax.formats import keys, lycoris, naming
from lorax.formats.base import Meta, Tensors, check_pair, source
from lorax.models import families

if TYPE_CHECKING:
    import torch

    from lorax.adapters.state import LoraState

NAME = "kohya"
LORA_SUFFIXES = ("lora_down.weight", "lora_up.weight", "alpha")
BUNDLE = keys.BUNDLE
split_key = keys.kohya_split
group_keys = keys.kohya_groups


def resolve_groups(
    groups: Mapping[tuple[str, str], object],
    *,
    model: Any = None,
    family: str | None = None,
    path: ErrorPath = None,
) -> dict[tuple[str, str], str]:
    flats: dict[str, list[str]] = {}
    for component, flat in groups:
        flats.setdefault(component, []).append(flat)
    return naming.resolve_all(flats, model=model, family=family, path=path)


def read_bundles(
    tensors: Mapping[str, torch.Tensor], path: ErrorPath = None
) -> dict[str, dict[str, torch.Tensor]]:
    """kohya's bundled embeddings: ``bundle_emb.<token>.string_to_param.*`` or ``.clip_l`` / ``.clip_g``."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(BUNDLE):
            continue
        token, _, rest = key[len(BUNDLE) :].partition(".")
        if rest.startswith("string_to_param"):
            component = families.embedding_component()
        elif rest in families.embedding_keys():
            component = families.embedding_keys()[rest]
        else:
            raise FormatError(f"unknown bundled embedding key {key!r}", path=path)
        vectors = tensor if tensor.dim() == 2 else tensor.reshape(1, -1)
        out.setdefault(token, {})[component] = vectors
    return out


def read(tensors: Tensors, meta: Meta = None, family: str | None = None) -> LoraState:
    """kohya tensors → ``LoraState``; LyCORIS algorithms in the same naming are built from ``lycoris.ALGORITHMS``.
    (The kohya format hands Flux files, BFL module names, to ``lorax.formats.flux``: ``lorax.formats.registry``.)"""
    from lorax.adapters.state import LoraModule, LoraState  # torch: naming alone needs none

    src = source(meta)
    metadata, model, path = dict(src.metadata), src.model, src.path
    names = list(tensors)
    groups, rest = group_keys(names)
    leftovers = [k for k in rest if not k.startswith(BUNDLE)]
    if leftovers:
        raise FormatError(
            f"{len(leftovers)} key(s) not in kohya naming: {', '.join(leftovers[:5])}", path=path
        )
    family = (
        family
        or families.family_from_metadata(metadata)
        or families.detect_family_from_lora_keys(names, {k: tuple(t.shape) for k, t in tensors.items()})
    )
    resolved = resolve_groups(groups, model=model, family=family, path=path)
    state = LoraState(metadata=metadata, family=family, embeddings=read_bundles(tensors, path))
    for (component, flat), parts in groups.items():
        module_path = f"{component}.{resolved[(component, flat)]}"
        suffixes = set(parts)
        if suffixes <= set(LORA_SUFFIXES) and {"lora_down.weight", "lora_up.weight"} <= suffixes:
            down, up = tensors[parts["lora_down.weight"]], tensors[parts["lora_up.weight"]]
            check_pair(module_path, down, up, path)
            alpha = file_alpha(tensors[parts["alpha"]], parts["alpha"], path) if "alpha" in parts else None
            state.modules[module_path] = LoraModule(down, up, alpha)
            continue
        if "alpha" in parts:  # named by the file's own key
            file_alpha(tensors[parts["alpha"]], parts["alpha"], path)
        module = lycoris.module_from_parts(
            module_path,
            {s: tensors[k] for s, k in parts.items()},
            path=path,
            weight_shape=_weight_shape(component, resolved[(component, flat)], model, family),
        )
        state.modules[module_path] = module
    return state


def _weight_shape(component: str, module_path: str, model: Any, family: str | None) -> tuple[int, ...] | None:
    live = naming.components_of(model).get(component)
    if live is not None:
        return families.weight_table(live, component).get(module_path)
    if family is not None and family in families.FAMILIES and component in families.FAMILIES[family]:
        return families.module_table(family, component).get(module_path)
    return None


def kohya_name(module_path: str, family: str | None) -> str:
    """The kohya key stem of a lorax module path (``unet.down_blocks.0…`` → ``lora_unet_down_blocks_0…``).

    The prefix is the family's (``Component.kohya_prefix``); with no family, that of the first family with the
    component. A family with ``kohya_unet_names == "sgm"`` names UNet modules the original way."""
    component, _, inner = module_path.partition(".")
    fam = families.find(family)
    if fam is None or not fam.has(component):
        fam = next((f for f in families.all_families() if f.has(component)), None)
    if fam is None:
        raise FormatError(f"kohya format has no naming for component {component!r} (module {module_path})")
    part = fam.component(component)
    if part.kind == "unet" and fam.kohya_unet_names == "sgm" and fam.name == family:
        sgm = families.diffusers_to_sgm(inner, families.family_config(fam.name, component))
        inner = sgm if sgm is not None else inner
    return part.kohya_prefix + naming.flatten(inner)


def write(
    state: LoraState, *, dtype: torch.dtype | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``LoraState`` → kohya tensors and header metadata (``alpha`` scalars stay float32)."""
    import torch

    from lorax.adapters.state import DeltaModule, LoraModule

    tensors: dict[str, torch.Tensor] = {}
    for module_path, module in state.modules.items():
        stem = kohya_name(module_path, state.family)
        if isinstance(module, LoraModule):
            down, up = (
                (module.down, module.up) if dtype is None else (module.down.to(dtype), module.up.to(dtype))
            )
            tensors[f"{stem}.lora_down.weight"] = down.contiguous()
            tensors[f"{stem}.lora_up.weight"] = up.contiguous()
            tensors[f"{stem}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)  # type: ignore[arg-type]
        elif isinstance(module, DeltaModule) and hasattr(module, "to_kohya"):
            for suffix, tensor in module.to_kohya(dtype).items():
                tensors[f"{stem}.{suffix}"] = tensor
        else:
            raise FormatError(f"module {module_path} ({type(module).__name__}) cannot be written as kohya")
    first = families.embedding_component()
    fam = families.find(state.family)
    single = fam is None or len(fam.text_components()) == 1
    for token, per_component in state.embeddings.items():
        if set(per_component) <= {first} and single:
            tensors[f"{BUNDLE}{token}.string_to_param.*"] = _cast(per_component[first], dtype)
        else:
            for name, component in families.embedding_keys().items():
                if component in per_component:
                    tensors[f"{BUNDLE}{token}.{name}"] = _cast(per_component[component], dtype)
    return tensors, dict(state.metadata)


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return (t if dtype is None else t.to(dtype)).contiguous()


def file_alpha(tensor: torch.Tensor, key: str, path: ErrorPath) -> float:
    """A file's own alpha: one finite number, or one line naming the key and the file."""
    from lorax.formats.keys import finite_alpha

    return finite_alpha(tensor, key, path)
