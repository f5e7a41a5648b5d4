"""A model family as data: ``Family`` and ``Component``, the registry, and the one detection function.

A family is one frozen object (``sd1.py``, ``sd2.py``, ``sdxl.py`` each build and register one). Code asks it —
``get(name).text_components()``, ``get(name).kohya_prefix(component)`` — instead of spelling ``"text_encoder_2"``
or ``family == "sdxl"``. What ``io`` needs (single-file key layout, folder evidence) is the family's
``CheckpointLayout``, a plain ``io`` dataclass that ``register`` hands down to ``io``.

Nothing here imports torch, diffusers or transformers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorax.errors import ConfigError
from lorax.io import checkpoint_layouts
from lorax.io.checkpoint_layouts import CheckpointLayout


@dataclass(frozen=True)
class Component:
    """One LoRA-able model of a family (the UNet, a text encoder).

    Attributes:
        name: the diffusers component (``unet``, ``text_encoder`` …), also lorax's key prefix in ``LoraState``.
        kind: ``unet`` or ``text``.
        model_class: the diffusers / transformers class (``UNet2DConditionModel``, ``CLIPTextModel`` …).
        config: the full-size config: the stem of a JSON file in ``lorax/models/configs`` or the config itself.
        kohya_prefix: the prefix of its modules' names in kohya files (``lora_unet_``, ``lora_te1_`` …).
        width: the hidden width of a text encoder (its ``q_proj`` input): evidence for detection.
        tokenizer: the pipeline attribute holding its tokenizer (text encoders).
        embedding_key: its slot in SDXL-style embedding files (``clip_l``, ``clip_g``).
        table: the stem of its shipped module table in ``lorax/models/tables`` (else computed from ``config``).
    """

    name: str
    kind: str
    model_class: str
    config: str | Mapping[str, Any]
    kohya_prefix: str
    width: int | None = None
    tokenizer: str | None = None
    embedding_key: str | None = None
    table: str | None = None


def shipped(
    family: str, name: str, kind: str, model_class: str, kohya_prefix: str, **fields: Any
) -> Component:
    """A component whose full-size config and module table ship with lorax as ``<family>_<name>.json`` (in
    ``lorax/models/configs`` and ``lorax/models/tables``)."""
    stem = f"{family}_{name}"
    return Component(name, kind, model_class, stem, kohya_prefix, table=stem, **fields)


@dataclass(frozen=True)
class Family:
    """Everything lorax knows about one model family.

    Attributes:
        name: ``sd1``, ``sd2``, ``sdxl`` …
        components: the LoRA-able components, in lorax's order (UNet first).
        checkpoint: the ``io`` layout of its checkpoints (folder components, single-file keys, evidence).
        kohya_versions: ``ss_base_model_version`` prefixes that name this family in kohya headers.
        kohya_version: the ``ss_base_model_version`` lorax writes (``kohya_version_v`` for v-prediction).
        kohya_unet_names: ``diffusers`` or ``sgm``: how kohya's trainer names this family's UNet modules.
        pipelines: diffusers pipeline classes ``{"txt2img": …, "img2img": …}``.
        conditioning: ``text`` (prompt embeddings) or ``text_time`` (SDXL: pooled embeddings and time ids).
        embedding_format: the format lorax writes a learned token in for this family.
        modelspec: the Stability AI model-spec ``(architecture id, resolution)`` by prediction type (``epsilon``,
            and ``v`` where it differs), as kohya's ``sai_model_spec.py`` writes them.
        modelspec_implementation: ``diffusers`` or ``stability`` (kohya names SDXL LoRAs' implementation so).
        lora_markers: regular expressions over a LoRA key (any format, ``.`` as ``_`` or not) that only this
            family's modules match (Flux's ``double_blocks_0``): the strongest LoRA-key evidence.
        mergeable: whether ``merge`` / ``generate`` can apply this family's LoRAs to a model (Flux: not yet).
    """

    name: str
    components: tuple[Component, ...]
    checkpoint: CheckpointLayout
    kohya_versions: tuple[str, ...]
    kohya_version: str
    kohya_version_v: str | None = None
    kohya_unet_names: str = "diffusers"
    pipelines: Mapping[str, str] = field(default_factory=dict)
    conditioning: str = "text"
    embedding_format: str = "a1111-embedding"
    modelspec: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    modelspec_implementation: str = "diffusers"
    lora_markers: tuple[str, ...] = ()
    mergeable: bool = True

    @property
    def label(self) -> str:
        """The family's name in messages (``Flux``, ``SDXL`` …)."""
        return self.name.upper() if self.name.startswith("sd") else self.name.capitalize()

    @property
    def cross_attention_dim(self) -> int:
        return self.checkpoint.cross_attention_dim

    def component_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components)

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise ConfigError(
            f"family {self.name} has no component {name!r}; it has {', '.join(self.component_names())}"
        )

    def has(self, name: str) -> bool:
        return name in self.component_names()

    def unet(self) -> Component:
        return next(c for c in self.components if c.kind == "unet")

    def text_components(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components if c.kind == "text")

    def kohya_prefix(self, component: str) -> str:
        return self.component(component).kohya_prefix

    def base_model_version(self, prediction_type: str) -> str:
        """kohya's ``ss_base_model_version`` for a model of this family trained with ``prediction_type``."""
        if prediction_type == "v_prediction" and self.kohya_version_v:
            return self.kohya_version_v
        return self.kohya_version


def clip(
    family: str, kohya_prefix: str, width: int, *, name: str = "text_encoder", **fields: Any
) -> Component:
    """A shipped CLIP text encoder of ``family``: ``CLIPTextModel`` with the ``tokenizer`` unless ``fields`` say."""
    fields = {"model_class": "CLIPTextModel", "tokenizer": "tokenizer", **fields}
    return shipped(family, name, "text", fields.pop("model_class"), kohya_prefix, width=width, **fields)


def unet_family(name: str, *text_encoders: Component, kohya_version: str, **fields: Any) -> Family:
    """Build and register a family of a shipped ``UNet2DConditionModel`` (kohya ``lora_unet_``) and
    ``text_encoders``; kohya headers name it by ``kohya_version`` unless ``kohya_versions`` says otherwise."""
    unet = shipped(name, "unet", "unet", "UNet2DConditionModel", "lora_unet_")
    fields.setdefault("kohya_versions", (kohya_version,))
    return register(Family(name, (unet, *text_encoders), kohya_version=kohya_version, **fields))


# ---------------------------------------------------------------------------------------------------------------
# Registry

_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    """Make ``family`` known to every command (and its checkpoint layout to ``io``); returns it."""
    if family.checkpoint.family != family.name:
        raise ConfigError(
            f"family {family.name}: its checkpoint layout is named {family.checkpoint.family!r}"
        )
    _REGISTRY[family.name] = family
    checkpoint_layouts.register_layout(family.checkpoint)
    return family


def unregister(name: str) -> None:
    """Forget a family registered with ``register`` (tests register toy families and remove them)."""
    _REGISTRY.pop(name, None)
    checkpoint_layouts.unregister_layout(name)


def get(name: str) -> Family:
    """The registered family ``name``; a ``ConfigError`` naming the known ones otherwise."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def find(name: str | None) -> Family | None:
    """The registered family ``name``, or ``None`` (also for ``None``)."""
    return _REGISTRY.get(name) if name else None


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def all_families() -> tuple[Family, ...]:
    return tuple(_REGISTRY.values())


def all_components() -> tuple[str, ...]:
    """Every LoRA-able component of a registered family, in first-seen order (``unet``, ``text_encoder``, …)."""
    seen: dict[str, None] = {}
    for f in _REGISTRY.values():
        seen.update(dict.fromkeys(f.component_names()))
    return tuple(seen)


def all_text_components() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for f in _REGISTRY.values():
        seen.update(dict.fromkeys(f.text_components()))
    return tuple(seen)


def kohya_prefixes() -> dict[str, str]:
    """``{kohya prefix: component}`` over every registered family, longest prefix first."""
    found: dict[str, str] = {}
    for f in (
        _REGISTRY.values()
    ):  # the first family to use a prefix names its component (Flux's transformer shares
        for c in (
            f.components
        ):  # ``lora_unet_`` with SD's UNet; lorax.formats.flux reads Flux's kohya names itself)
            found.setdefault(c.kohya_prefix, c.name)
    return dict(sorted(found.items(), key=lambda kv: -len(kv[0])))


def embedding_keys() -> dict[str, str]:
    """``{embedding-file slot (clip_l, clip_g): component}`` over every registered family."""
    return {c.embedding_key: c.name for f in _REGISTRY.values() for c in f.components if c.embedding_key}


def any_component(name: str) -> Component | None:
    """The first registered family's component called ``name`` (components of one name agree across families)."""
    return next((c for f in _REGISTRY.values() for c in f.components if c.name == name), None)


def embedding_component(slot: str | None = None) -> str:
    """The text encoder an embedding-file slot (``clip_l``, ``clip_g``) feeds; the first one for no / another slot."""
    return embedding_keys().get(slot or "") or all_text_components()[0]


def family_of_text_width(width: int) -> str | None:
    """The family with a single text encoder of this width (a lone learned token tells no more)."""
    for f in _REGISTRY.values():
        text = [c for c in f.components if c.kind == "text"]
        if len(text) == 1 and text[0].width == width:
            return f.name
    return None


class ComponentsView(Mapping[str, tuple[str, ...]]):
    """``{family: its LoRA-able components}``, live over the registry (the old ``FAMILIES`` table)."""

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return _REGISTRY[name].component_names()

    def __iter__(self) -> Iterator[str]:
        return iter(list(_REGISTRY))

    def __len__(self) -> int:
        return len(_REGISTRY)


# ---------------------------------------------------------------------------------------------------------------
# Detection: one function, every kind of evidence


def detect(
    *,
    metadata: Mapping[str, str] | None = None,
    lora_keys: Iterable[str] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    single_keys: list[str] | None = None,
    shape_of: Any = None,
    model_index: Mapping[str, Any] | None = None,
    text_config: Mapping[str, Any] | None = None,
    unet_config: Mapping[str, Any] | None = None,
    pipeline: Any = None,
    path: Path | None = None,
) -> str | None:
    """The family the evidence names, strongest first; ``None`` when LoRA evidence tells nothing.

    - ``metadata``: a header's ``lorax_family`` / ``lorax.family``, or kohya's ``ss_base_model_version``;
    - ``single_keys`` (+ ``shape_of``): a single-file checkpoint's keys (raises when no family fits);
    - ``model_index`` (+ ``text_config``, ``unet_config``): a diffusers folder's configs (raises likewise);
    - ``pipeline``: a live pipeline (its ``lorax_family`` label, else its components and UNet config);
    - ``lora_keys`` (+ ``shapes``): a LoRA's keys in any format, and their shapes.
    """
    if metadata:
        found = _from_metadata(metadata)
        if found:
            return found
    if single_keys is not None:
        return checkpoint_layouts.family_from_single_keys(single_keys, shape_of, path=path)
    if model_index is not None:
        return checkpoint_layouts.family_from_configs(model_index, text_config, unet_config, path=path)
    if pipeline is not None:
        return _from_pipeline(pipeline)
    if lora_keys is not None:
        return _from_lora_keys(lora_keys, shapes)
    return None


META_KEYS = checkpoint_layouts.META_FAMILY_KEYS


def _from_metadata(metadata: Mapping[str, str]) -> str | None:
    for key in META_KEYS:
        if metadata.get(key) in _REGISTRY:
            return metadata[key]
    base = metadata.get("ss_base_model_version", "")
    for f in _REGISTRY.values():
        if any(base.startswith(v) for v in f.kohya_versions):
            return f.name
    return None


def _from_pipeline(pipe: Any) -> str:
    label = getattr(pipe, "lorax_family", None) or getattr(
        getattr(pipe, "config", None), "lorax_family", None
    )
    if isinstance(label, str):
        return label
    families = list(_REGISTRY.values())
    for (
        f
    ) in families:  # a family with a component of its own (SDXL's second text encoder) beside its own UNet
        own = [c for c in f.checkpoint.folder_markers if _module(pipe, c) is not None]
        if own and _module(pipe, f.unet().name) is not None:
            return f.name
    config = getattr(_module(pipe, "unet"), "config", None)
    for f in families:
        if f.conditioning == "text_time" and getattr(config, "addition_embed_type", None) == "text_time":
            return f.name
    plain = [f for f in families if not f.checkpoint.folder_markers]
    width = getattr(config, "cross_attention_dim", None)
    for f in plain:  # a family told by its linear projections (SD2) or its cross-attention width
        if f.checkpoint.linear_projection and (
            f.cross_attention_dim == width or getattr(config, "use_linear_projection", False)
        ):
            return f.name
    return next((f for f in plain if f.cross_attention_dim == width), plain[0]).name


def _module(pipe: Any, name: str) -> Any:
    import torch

    model = getattr(pipe, name, None)
    return model if isinstance(model, torch.nn.Module) else None


_SGM_BLOCKS = re.compile(r"(^|_)(input_blocks|output_blocks|middle_block)_\d")


def _from_lora_keys(keys: Iterable[str], shapes: Mapping[str, Sequence[int]] | None) -> str | None:
    """Evidence, strongest first: a component or a naming only one family has (a second text encoder, kohya's SGM
    block names); the cross-attention key input width; the text encoder's width."""
    keys = list(keys)
    shapes = shapes or {}
    flat = {k: k.replace(".", "_") for k in keys}
    families = list(_REGISTRY.values())
    for fam in families:  # module names only one family has (Flux's double / single blocks)
        markers = [re.compile(m) for m in fam.lora_markers]
        if any(m.search(k) for m in markers for k in keys):
            return fam.name
    for f in flat.values():
        for fam in families:
            if _only_this_family(f, fam, families):
                return fam.name
    for k, f in flat.items():
        shape = shapes.get(k)
        if not shape or len(shape) < 2:
            continue
        if re.search(r"attn2_(to_k|to_v|processor_to_k|processor_to_v)", f) and re.search(
            r"(down|lora_A|lora_down)", f
        ):
            width = int(shape[-1] if len(shape) == 2 else shape[1])
            found = next((fam for fam in families if fam.cross_attention_dim == width), None)
            if found:
                return found.name
    for k, f in flat.items():
        shape = shapes.get(k)
        if not shape or len(shape) != 2:
            continue
        if re.search(r"self_attn_(q|k|v)_proj", f) and re.search(r"(down|lora_A)", f):
            found = next((fam for fam in families if int(shape[1]) in _text_widths(fam)), None)
            if found:
                return found.name
    return None


def _text_widths(family: Family) -> set[int]:
    return {c.width for c in family.components if c.kind == "text" and c.width}


def _only_this_family(flat_key: str, family: Family, families: list[Family]) -> bool:
    """Whether a flattened LoRA key names something only ``family`` has: a component name or kohya prefix no
    other family uses, or (kohya's SDXL trainer) SGM block names / deep transformer blocks."""
    others = [f for f in families if f is not family]
    for c in family.components:
        if any(o.has(c.name) for o in others):
            continue
        if flat_key.startswith(c.name + "_"):
            return True
    for c in family.components:
        if any(c.kohya_prefix == oc.kohya_prefix for o in others for oc in o.components):
            continue
        if flat_key.startswith(c.kohya_prefix):
            return True
    if family.kohya_unet_names == "sgm":
        if _SGM_BLOCKS.search(flat_key):
            return True
        if re.search(r"transformer_blocks_[1-9]", flat_key) and "unet" in flat_key:
            return True
    return False
