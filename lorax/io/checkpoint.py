"""Model checkpoints: diffusers folders, Hub ids, built-in names, and single files in the original layout.

``open_checkpoint(spec)`` resolves the spec and returns a ``SingleFileCheckpoint`` or a ``DiffusersCheckpoint``.
Both give lazy per-tensor access (nothing is read whole) and a family (``sd1``, ``sd2``, ``sdxl``), and both show the
model in diffusers terms through ``component_keys(component)`` / ``tensor(component, key)`` (text-encoder keys with
``text_model.``). Pickles (``.ckpt``, ``.pt``, ``.bin``) load only through ``lorax.io.pickle_safe.load_pickle``.
No torch or diffusers import happens until a tensor is asked for.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lorax.errors import FormatError, InputError, ModelNotFoundError
from lorax.io import checkpoint_layouts
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
from lorax.io.safetensors_io import SafetensorsFile, check_readable_file

if TYPE_CHECKING:
    import torch

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
# Metadata keys lorax writes into single files it converts, so they convert back without outside configs.
# The family, spelled as in LoRA headers; single files written before this spelling say ``lorax.family`` (read too).
META_FAMILY_KEYS = checkpoint_layouts.META_FAMILY_KEYS
META_FAMILY = META_FAMILY_KEYS[0]
META_CONFIGS = "lorax.configs"
META_TOKENIZER = "lorax.tokenizer"
_HUB_PATTERNS = [
    "model_index.json",
    "*/config.json",
    "*/*_config.json",
    "*/*.txt",
    "*/tokenizer*.json",
    "*/vocab.json",
    "*/special_tokens_map.json",
    "*/diffusion_pytorch_model.safetensors",
    "*/model.safetensors",
    "*/*.safetensors.index.json",
]


# ---------------------------------------------------------------------------------------------------------------
# Tensor sources


class TensorSource(Protocol):
    def keys(self) -> list[str]: ...

    def dtype(self, name: str) -> str:
        """safetensors dtype name (``F16``, ``F32`` …)."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> torch.Tensor: ...

    def raw(self, name: str) -> bytes:
        """The tensor's bytes in safetensors order."""


class SafetensorsSource:
    """One or more safetensors files (shards) as one tensor source, headers only until a tensor is read."""

    def __init__(self, paths: list[Path]) -> None:
        self.files = [SafetensorsFile(p) for p in paths]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for k in f.header.tensors:
                self._where[k] = f

    @property
    def metadata(self) -> dict[str, str]:
        return self.files[0].metadata if self.files else {}

    def keys(self) -> list[str]:
        return list(self._where)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def file_of(self, name: str) -> SafetensorsFile:
        return self._where[name]

    def dtype(self, name: str) -> str:
        return self._where[name].info(name).dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].info(name).shape

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get(name)

    def raw(self, name: str) -> bytes:
        return self._where[name].raw(name)


class PickleSource:
    """A torch pickle's tensors (loaded with ``weights_only=True``; memory-mapped when the file is a zip)."""

    def __init__(self, path: Path) -> None:
        from lorax.io.pickle_safe import load_pickle

        self.path = path
        obj = load_pickle(path)
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise FormatError("not a model checkpoint (the pickle holds no state dict)", path=path)
        import torch

        self.tensors: dict[str, torch.Tensor] = {
            str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)
        }
        if not self.tensors:
            raise FormatError("not a model checkpoint (no tensors in its state dict)", path=path)
        self.metadata: dict[str, str] = {}

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def dtype(self, name: str) -> str:
        from lorax.io.safetensors_io import st_dtype

        return st_dtype(self.tensors[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def raw(self, name: str) -> bytes:
        from lorax.io.safetensors_io import tensor_bytes

        return bytes(tensor_bytes(self.tensors[name]))


def open_source(path: Path) -> SafetensorsSource | PickleSource:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return PickleSource(path)
    return SafetensorsSource([path])


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
        return _read_json(p)

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


def weight_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    for stem in ("diffusion_pytorch_model", "model"):
        plain = folder / f"{stem}.safetensors"
        if plain.is_file():
            return [plain]
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
            return [folder / s for s in shards]
    variants = sorted(folder.glob("*.safetensors"))
    if variants:
        return variants[:1]
    bins = sorted(folder.glob("*.bin"))
    return bins[:1]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FormatError(f"cannot be read as JSON ({err})", path=path) from None
    if not isinstance(doc, dict):
        raise FormatError("is not a JSON object", path=path)
    return doc


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
    index = _read_json(index_path)
    text = (
        _read_json(p / "text_encoder" / "config.json") if (p / "text_encoder/config.json").is_file() else None
    )
    unet = _read_json(p / "unet" / "config.json") if (p / "unet/config.json").is_file() else None
    return DiffusersCheckpoint(p, family_from_configs(index, text, unet, path=p), index)


def resolve_model(spec: str | Path) -> Path:
    """A model spec → a local path: an existing file or folder, a built-in name, or a Hub id from the HF cache."""
    p = Path(spec).expanduser()
    if p.exists():
        return p
    text = str(spec)
    builtin = _resolve_builtin(text)
    if builtin is not None:
        return builtin
    if p.suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES or text.startswith((".", "/", "~")):
        raise InputError("no such file", path=p)
    if text.count("/") == 1 and all(text.split("/")):
        return _local_or_hub(text, p)
    raise ModelNotFoundError(f"{text!r} is not a file, a folder, a built-in model or a Hub id (owner/name)")


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")


def _local_or_hub(text: str, p: Path) -> Path:
    """``owner/name`` that is no local path: a path that looks local (its first folder exists here, or no Hub id
    could be spelled so) is reported missing without asking the Hub; else the Hub's cache (or the Hub itself)."""
    first = Path(text.split("/")[0]).expanduser()
    if first.is_dir():
        raise InputError(f"no such file or folder ({first}/ exists, {p.name} is not in it)", path=p)
    if not _HUB_ID.fullmatch(text):
        raise InputError("no such file or folder", path=p)
    try:
        return hub_snapshot(text)
    except ModelNotFoundError as err:
        if hub_offline():
            raise ModelNotFoundError(
                "neither a local path (no such file or folder) nor a Hub model in the local Hugging Face cache "
                "(the hub is offline: HF_HUB_OFFLINE); pass a local path (a diffusers folder or a single-file "
                "checkpoint) or a cached Hub id",
                path=p,
            ) from None
        raise ModelNotFoundError(
            f"{p}: neither a local path (no such file or folder) nor a Hub model lorax can fetch ({err})"
        ) from None


def _resolve_builtin(name: str) -> Path | None:
    try:
        from lorax.models import registry  # type: ignore[attr-defined]
    except ImportError:
        return None
    try:
        found = registry.resolve_builtin(name)
    except KeyError:
        return None
    return None if found is None else Path(found)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_snapshot(repo_id: str, patterns: list[str] | None = None) -> Path:
    """A Hub repo's files through the normal Hugging Face cache (no download when offline)."""
    try:
        from huggingface_hub import snapshot_download

        offline = hub_offline()
        folder = snapshot_download(
            repo_id, allow_patterns=patterns or _HUB_PATTERNS, local_files_only=offline
        )
    except Exception as err:  # the hub client's many error types: all mean "not available here"
        if hub_offline():
            raise ModelNotFoundError(
                f"{repo_id!r} is not in the local Hugging Face cache and the hub is offline "
                "(HF_HUB_OFFLINE); pass a local path: a diffusers folder or a single-file checkpoint"
            ) from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(
            f"cannot fetch {repo_id!r} from the Hugging Face hub ({first}); pass a local path instead"
        ) from None
    return Path(folder)


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
        for key in ckpt.component_keys(component):
            if not key.endswith(".weight"):
                continue
            shape = _shape_of(ckpt, component, key)
            if len(shape) == 2:
                layer: nn.Module = nn.Linear(shape[1], shape[0], bias=False, device="meta")
            elif len(shape) == 4:
                layer = nn.Conv2d(shape[1], shape[0], tuple(shape[2:]), bias=False, device="meta")  # type: ignore[arg-type]
            else:
                continue
            *parents, leaf = key[: -len(".weight")].split(".")
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
