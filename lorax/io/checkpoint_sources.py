"""Tensor sources: one or more safetensors files (shards) or a torch pickle, read lazily tensor by tensor, and the
weight files of a diffusers component folder. No torch import until a tensor is asked for.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lorax.errors import FormatError
from lorax.io.safetensors_io import SafetensorsFile

if TYPE_CHECKING:
    import torch

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


# ---------------------------------------------------------------------------------------------------------------
# Tensor sources


class _Named:
    """A source's tensor names, in file order (``_names``: name → where the tensor is)."""

    _names: Mapping[str, object]

    def keys(self) -> list[str]:
        return list(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names


class TensorSource(Protocol):
    def keys(self) -> list[str]: ...

    def dtype(self, name: str) -> str:
        """safetensors dtype name (``F16``, ``F32`` …)."""

    def shape(self, name: str) -> tuple[int, ...]: ...

    def get(self, name: str) -> torch.Tensor: ...

    def raw(self, name: str) -> bytes:
        """The tensor's bytes in safetensors order."""


class SafetensorsSource(_Named):
    """One or more safetensors files (shards) as one tensor source, headers only until a tensor is read."""

    def __init__(self, paths: list[Path]) -> None:
        self.files = [SafetensorsFile(p) for p in paths]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for k in f.header.tensors:
                self._where[k] = f
        self._names = self._where

    @property
    def metadata(self) -> dict[str, str]:
        return self.files[0].metadata if self.files else {}

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


class PickleSource(_Named):
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
        self._names = self.tensors
        self.metadata: dict[str, str] = {}

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


def weight_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    for stem in ("diffusion_pytorch_model", "model"):
        plain = folder / f"{stem}.safetensors"
        if plain.is_file():
            return [plain]
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(read_json(index).get("weight_map", {}).values()))
            return [folder / s for s in shards]
    variants = sorted(folder.glob("*.safetensors"))
    if variants:
        return variants[:1]
    bins = sorted(folder.glob("*.bin"))
    return bins[:1]


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` (a ``FormatError`` naming the file otherwise)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FormatError(f"cannot be read as JSON ({err})", path=path) from None
    if not isinstance(doc, dict):
        raise FormatError("is not a JSON object", path=path)
    return doc


def all_weight_files(folder: Path) -> list[Path]:
    """Every safetensors file of a component folder (variants such as fp16 too), else its ``weight_files``."""
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return st
    return weight_files(folder)
