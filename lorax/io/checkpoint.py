"""Model checkpoints: diffusers folders, Hub ids, built-in names, and single files in the original layout.

``open_checkpoint(spec)`` resolves the spec and returns a ``SingleFileCheckpoint`` or a ``DiffusersCheckpoint``.
Both give lazy per-tensor access (nothing is read whole) and a family (``sd1``, ``sd2``, ``sdxl``), and both show the
model in diffusers terms through ``component_keys(component)`` / ``tensor(component, key)`` (text-encoder keys with
``text_model.``). Pickles (``.ckpt``, ``.pt``, ``.bin``) load only through ``lorax.io.pickle_safe.load_pickle``.
No torch or diffusers import happens until a tensor is asked for.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.errors import FormatError, InputError
from lorax.io import checkpoint_layouts
from lorax.io.checkpoint_sources import (  # sources live there; their names stay importable from here
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    PickleSource,
    SafetensorsSource,
    TensorSource,  # noqa: F401
    open_source,
    read_json,
    weight_files,
)
from lorax.io.keymaps import (
    KeyMap,
    Layouts,
    TextLayout,
    UnetLayout,
    VaeLayout,
    canonical_text_key,
    keymap_from_single,
    split_single,
)
from lorax.io.model_paths import hub_offline, hub_snapshot, resolve_model  # noqa: F401 - re-exported
from lorax.io.safetensors_io import check_readable_file

if TYPE_CHECKING:
    import torch

# Metadata keys lorax writes into single files it converts, so they convert back without outside configs.
# The family, spelled as in LoRA headers; single files written before this spelling say ``lorax.family`` (read too).
META_FAMILY_KEYS = checkpoint_layouts.META_FAMILY_KEYS
META_FAMILY = META_FAMILY_KEYS[0]
META_CONFIGS = "lorax.configs"
META_TOKENIZER = "lorax.tokenizer"


# ---------------------------------------------------------------------------------------------------------------
# Family detection


# The rules read the registered families' layouts (``lorax.io.checkpoint_layouts``); re-exported here.
family_from_single_keys = checkpoint_layouts.family_from_single_keys
family_from_configs = checkpoint_layouts.family_from_configs


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


@dataclass
class SingleFileCheckpoint:
    """A single-file checkpoint in the original (LDM/SGM) layout."""

    path: Path
    source: SafetensorsSource | PickleSource
    family: str
    kind: str = "single-file"

    @property
    def metadata(self) -> dict[str, str]:
        return self.source.metadata

    @property
    def is_safetensors(self) -> bool:
        return isinstance(self.source, SafetensorsSource)

    def keys(self) -> list[str]:
        return self.source.keys()

    def configs(self) -> dict[str, dict[str, Any]]:
        """Component configs lorax stored when it wrote this file (empty for files from elsewhere)."""
        text = self.metadata.get(META_CONFIGS)
        if not text:
            return {}
        try:
            configs = json.loads(text)
        except json.JSONDecodeError:
            raise FormatError(f"invalid {META_CONFIGS} metadata", path=self.path) from None
        return configs if isinstance(configs, dict) else {}

    def layouts(self) -> Layouts:
        configs = self.configs()
        layouts = Layouts()
        if "unet" in configs:
            layouts.unet = UnetLayout.from_config(configs["unet"])
        if "vae" in configs:
            layouts.vae = VaeLayout.from_config(configs["vae"])
        lay = checkpoint_layouts.layout(self.family)
        for c in lay.text_components():
            if c in configs:
                layouts.text[c] = TextLayout.from_config(configs[c])
            elif c in lay.openclip_layers:
                layouts.text[c] = TextLayout(lay.openclip_layers[c])
        return layouts

    @cached_property
    def keymap(self) -> KeyMap:
        try:
            return keymap_from_single(self.keys(), self.family, self.layouts())
        except FormatError as err:
            raise FormatError(str(err), path=self.path) from None

    def components(self) -> list[str]:
        return [c for c in checkpoint_layouts.layout(self.family).components if c in self.keymap.components()]

    def component_keys(self, component: str) -> list[str]:
        return self.keymap.component_keys(component)

    def tensor(self, component: str, key: str) -> torch.Tensor:
        found = self.keymap.locate(component, key)
        if found is None:
            raise KeyError(f"{component}.{key}")
        entry, i = found
        return split_single(entry, self.source.get(entry.single))[i]


@dataclass
class DiffusersCheckpoint:
    """A diffusers pipeline folder (``model_index.json`` and one subfolder per component)."""

    path: Path
    family: str
    model_index: dict[str, Any]
    kind: str = "diffusers"
    _sources: dict[str, SafetensorsSource | PickleSource] = field(default_factory=dict, repr=False)

    def components(self) -> list[str]:
        return [c for c in checkpoint_layouts.layout(self.family).components if self.weight_files(c)]

    def config(self, component: str) -> dict[str, Any]:
        p = self.path / component / "config.json"
        if not p.is_file():
            raise FormatError(f"component {component} has no config.json", path=self.path)
        return read_json(p)

    def weight_files(self, component: str) -> list[Path]:
        """The component's weight files: the plain safetensors (or its shards), else the fp16 variant, else .bin."""
        return weight_files(self.path / component)

    def source(self, component: str) -> SafetensorsSource | PickleSource:
        if component not in self._sources:
            files = self.weight_files(component)
            if not files:
                raise FormatError(f"component {component} has no weights", path=self.path)
            if files[0].suffix == ".safetensors":
                self._sources[component] = SafetensorsSource(files)
            else:
                self._sources[component] = PickleSource(files[0])
        return self._sources[component]

    def component_keys(self, component: str) -> list[str]:
        keys = self.source(component).keys()
        if component in checkpoint_layouts.layout(self.family).text_components():
            return [canonical_text_key(k) for k in keys if not k.endswith("position_ids")]
        return keys

    def _disk_key(self, component: str, key: str) -> str:
        src = self.source(component)
        text = checkpoint_layouts.layout(self.family).text_components()
        if component in text and key not in src and key.startswith("text_model."):
            return key[len("text_model.") :]
        return key

    def tensor(self, component: str, key: str) -> torch.Tensor:
        return self.source(component).get(self._disk_key(component, key))


Checkpoint = SingleFileCheckpoint | DiffusersCheckpoint


def stated_family(metadata: dict[str, str]) -> str | None:
    """The family a header states (``lorax_family``, or the older ``lorax.family``), if any."""
    return next((metadata[k] for k in META_FAMILY_KEYS if metadata.get(k)), None)


def without_stated_family(metadata: dict[str, str]) -> dict[str, str]:
    """``metadata`` less every spelling of the stated family (a writer states it once, as ``META_FAMILY``)."""
    return {k: v for k, v in metadata.items() if k not in META_FAMILY_KEYS}


def open_single_file(path: str | Path) -> SingleFileCheckpoint:
    p = check_readable_file(path)
    if p.suffix.lower() not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise InputError(
            "not a model checkpoint file (expected .safetensors, or .ckpt/.pt loaded safely)", path=p
        )
    source = open_source(p)
    family = stated_family(source.metadata) or family_from_single_keys(source.keys(), source.shape, path=p)
    return SingleFileCheckpoint(p, source, family)


def open_diffusers_folder(path: str | Path) -> DiffusersCheckpoint:
    p = Path(path)
    index_path = p / "model_index.json"
    if not index_path.is_file():
        if (p / "config.json").is_file() and weight_files(p):
            raise InputError("is one model component, not a pipeline folder; pass its parent folder", path=p)
        raise InputError("is a folder but not a diffusers model (no model_index.json)", path=p)
    index = read_json(index_path)
    text = (
        read_json(p / "text_encoder" / "config.json") if (p / "text_encoder/config.json").is_file() else None
    )
    unet = read_json(p / "unet" / "config.json") if (p / "unet/config.json").is_file() else None
    return DiffusersCheckpoint(p, family_from_configs(index, text, unet, path=p), index)


def open_checkpoint(spec: str | Path) -> Checkpoint:
    """Open a model from a diffusers folder, a Hub id, a built-in name, or a single-file checkpoint."""
    p = resolve_model(spec)
    if p.is_dir():
        return open_diffusers_folder(p)
    return open_single_file(p)


def is_model_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` looks like a model (folder with model_index.json, or a single file in the original layout)."""
    p = Path(path)
    if p.is_dir():
        return (p / "model_index.json").is_file()
    if not p.is_file():
        return False
    if p.suffix.lower() == ".safetensors":
        try:
            from lorax.io.safetensors_io import read_header

            keys = list(read_header(p).tensors)
        except InputError:
            return False
        markers = {m for lay in checkpoint_layouts.LAYOUTS.values() for m in lay.single_markers}
        return any(
            k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model."))
            or k in markers
            for k in keys
        )
    return p.suffix.lower() == ".ckpt"


def iter_component_tensors(ckpt: Checkpoint, component: str) -> Iterator[tuple[str, torch.Tensor]]:
    for key in ckpt.component_keys(component):
        yield key, ckpt.tensor(component, key)


def model_skeleton(ckpt: Checkpoint, components: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``{component: nn.Module}`` holding only meta-device ``Linear``/``Conv2d`` layers at the checkpoint's module
    paths (and a UNet ``config`` with its block layout): enough for a LoRA reader to resolve names exactly against
    this model, without building it (no diffusers import, no memory). ``components``: the family's LoRA
    components unless given."""
    from torch import nn

    out: dict[str, Any] = {}
    if components is None:
        components = checkpoint_layouts.layout(ckpt.family).lora_components()
    for component in components:
        if component not in ckpt.components():
            continue
        root = nn.Module()
        for path, shape in _layers(ckpt, component):
            if len(shape) == 2:
                layer: nn.Module = nn.Linear(shape[1], shape[0], bias=False, device="meta")
            else:
                layer = nn.Conv2d(shape[1], shape[0], tuple(shape[2:]), bias=False, device="meta")  # type: ignore[arg-type]
            *parents, leaf = path.split(".")
            node = root
            for name in parents:
                child = node._modules.get(name)
                if child is None:
                    child = nn.Module()
                    node.add_module(name, child)
                node = child
            if leaf not in node._modules:
                node.add_module(leaf, layer)
        if component == "unet":
            root.config = _unet_layout_config(ckpt)  # type: ignore[assignment]
        out[component] = root
    return out


def _layers(ckpt: Checkpoint, component: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(module path, weight shape) of each 2-D or 4-D ``.weight`` of a component: its Linear and Conv2d layers."""
    for key in ckpt.component_keys(component):
        if key.endswith(".weight"):
            shape = _shape_of(ckpt, component, key)
            if len(shape) in (2, 4):
                yield key[: -len(".weight")], shape


@dataclass
class PathSkeleton:
    """``model_skeleton``'s component without torch: its layers' ``{path: weight shape}`` in the order the meta
    module's ``named_modules()`` walks them, and the UNet's ``config`` (``lorax.formats.naming`` reads both)."""

    weight_shapes: dict[str, tuple[int, ...]]
    config: dict[str, Any] | None = None


def path_skeleton(ckpt: Checkpoint) -> dict[str, PathSkeleton]:
    """``model_skeleton(ckpt)`` as ``PathSkeleton``s, for a merge that imports no torch."""
    out: dict[str, PathSkeleton] = {}
    for component in checkpoint_layouts.layout(ckpt.family).lora_components():
        if component not in ckpt.components():
            continue
        tree: dict[str, Any] = {}  # name → [shape or None, children], as model_skeleton nests modules
        for path, shape in _layers(ckpt, component):
            *parents, leaf = path.split(".")
            node = tree
            for name in parents:
                node = node.setdefault(name, [None, {}])[1]
            node.setdefault(leaf, [shape, {}])
        shapes: dict[str, tuple[int, ...]] = {}
        stack: list[tuple[str, Any]] = list(reversed(tree.items()))
        while stack:  # pre-order, children in insertion order: named_modules()
            name, (shape, children) = stack.pop()
            if shape is not None:
                shapes[name] = shape
            stack.extend((f"{name}.{k}", v) for k, v in reversed(children.items()))
        config = _unet_layout_config(ckpt) if component == "unet" else None
        out[component] = PathSkeleton(shapes, config)
    return out


def _shape_of(ckpt: Checkpoint, component: str, key: str) -> tuple[int, ...]:
    if isinstance(ckpt, SingleFileCheckpoint):
        from lorax.io.keymaps import part_shapes

        found = ckpt.keymap.locate(component, key)
        assert found is not None
        entry, i = found
        return part_shapes(entry, ckpt.source.shape(entry.single))[i]
    return ckpt.source(component).shape(ckpt._disk_key(component, key))


def _unet_layout_config(ckpt: Checkpoint) -> dict[str, Any]:
    if isinstance(ckpt, DiffusersCheckpoint):
        return ckpt.config("unet")
    layout = ckpt.layouts().unet or UnetLayout.from_single_keys(
        [k[len("model.diffusion_model.") :] for k in ckpt.source if k.startswith("model.diffusion_model.")]
    )
    return {
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in layout.up_attention],
        "layers_per_block": layout.layers_per_block,
    }
