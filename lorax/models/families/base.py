"""A model family as data: ``Family`` and ``Component`` and the registry (the one detection function: ``detect``).

A family is one frozen object (``sd1.py``, ``sd2.py``, ``sdxl.py``, ``flux.py`` each build and register one; the
registry imports them on its first lookup, ``BUILTIN``). Code asks it —
``get(name).text_components()``, ``get(name).kohya_prefix(component)`` — instead of spelling ``"text_encoder_2"``
or ``family == "sdxl"``. What ``io`` needs (single-file key layout, folder evidence) is the family's
``CheckpointLayout``, a plain ``io`` dataclass that ``register`` hands down to ``io``.

Nothing here imports torch, diffusers or transformers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
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
        mergeable: whether ``merge`` / ``generate`` can apply this family's LoRAs to a model (every built-in family can).
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

# The built-in families, one module each under ``lorax.models.families``, in the order lookups see them (Flux after
# SD: the first family to use a kohya prefix, ``lora_unet_``, names its component). This is the one place they are
# registered: the first lookup imports them (each module builds its ``Family`` and calls ``register``), so no caller
# imports a family module for its side effect.
BUILTIN = ("sd1", "sd2", "sdxl", "flux")
_REGISTRY: dict[str, Family] = {}
_builtins_loaded = False


def _registry() -> dict[str, Family]:
    """The registry, the built-in families registered first (on the first call)."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True  # before the imports: their ``register`` calls come back here
        import importlib

        for name in BUILTIN:
            importlib.import_module(f"lorax.models.families.{name}")
    return _REGISTRY


def register(family: Family) -> Family:
    """Make ``family`` known to every command (and its checkpoint layout to ``io``); returns it."""
    if family.checkpoint.family != family.name:
        raise ConfigError(
            f"family {family.name}: its checkpoint layout is named {family.checkpoint.family!r}"
        )
    _registry()[family.name] = family
    checkpoint_layouts.register_layout(family.checkpoint)
    return family


def unregister(name: str) -> None:
    """Forget a family registered with ``register`` (tests register toy families and remove them)."""
    _registry().pop(name, None)
    checkpoint_layouts.unregister_layout(name)


def get(name: str) -> Family:
    """The registered family ``name``; a ``ConfigError`` naming the known ones otherwise."""
    registry = _registry()
    if name not in registry:
        raise ConfigError(f"unknown model family {name!r}; known: {', '.join(registry)}")
    return registry[name]


def find(name: str | None) -> Family | None:
    """The registered family ``name``, or ``None`` (also for ``None``)."""
    return _registry().get(name) if name else None


def names() -> tuple[str, ...]:
    return tuple(_registry())


def all_families() -> tuple[Family, ...]:
    return tuple(_registry().values())


def all_components() -> tuple[str, ...]:
    """Every LoRA-able component of a registered family, in first-seen order (``unet``, ``text_encoder``, …)."""
    seen: dict[str, None] = {}
    for f in _registry().values():
        seen.update(dict.fromkeys(f.component_names()))
    return tuple(seen)


def all_text_components() -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for f in _registry().values():
        seen.update(dict.fromkeys(f.text_components()))
    return tuple(seen)


def kohya_prefixes() -> dict[str, str]:
    """``{kohya prefix: component}`` over every registered family, longest prefix first."""
    found: dict[str, str] = {}
    for f in (
        _registry().values()
    ):  # the first family to use a prefix names its component (Flux's transformer shares
        for c in (
            f.components
        ):  # ``lora_unet_`` with SD's UNet; lorax.formats.flux reads Flux's kohya names itself)
            found.setdefault(c.kohya_prefix, c.name)
    return dict(sorted(found.items(), key=lambda kv: -len(kv[0])))


def embedding_keys() -> dict[str, str]:
    """``{embedding-file slot (clip_l, clip_g): component}`` over every registered family."""
    return {c.embedding_key: c.name for f in _registry().values() for c in f.components if c.embedding_key}


def any_component(name: str) -> Component | None:
    """The first registered family's component called ``name`` (components of one name agree across families)."""
    return next((c for f in _registry().values() for c in f.components if c.name == name), None)


def embedding_component(slot: str | None = None) -> str:
    """The text encoder an embedding-file slot (``clip_l``, ``clip_g``) feeds; the first one for no / another slot."""
    return embedding_keys().get(slot or "") or all_text_components()[0]


def family_of_text_width(width: int) -> str | None:
    """The family with a single text encoder of this width (a lone learned token tells no more)."""
    for f in _registry().values():
        text = [c for c in f.components if c.kind == "text"]
        if len(text) == 1 and text[0].width == width:
            return f.name
    return None


class ComponentsView(Mapping[str, tuple[str, ...]]):
    """``{family: its LoRA-able components}``, live over the registry (the old ``FAMILIES`` table)."""

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return _registry()[name].component_names()

    def __iter__(self) -> Iterator[str]:
        return iter(list(_registry()))

    def __len__(self) -> int:
        return len(_registry())
