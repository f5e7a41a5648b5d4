"""The ``LoraFormat`` protocol every LoRA and embedding format implements, and the torch-free pieces they share.

A format is one object (``lorax.formats.registry.FORMATS`` holds them in the order detection tries them):

* ``detect(view)``: whether a file's tensor names (a ``KeyView``: names, header metadata, shapes) are this format's;
* ``read(content, meta, family)``: the file's tensors (or unpickled object) → ``LoraState``; ``meta`` is a ``Source``
  (header metadata, the model the LoRA is for, the file's path) or a plain metadata mapping;
* ``write(state, dtype=..., model=...)``: ``LoraState`` (its ``family`` says which model) → ``(tensors, header)``,
  for the formats lorax writes (``writable``);
* ``describe(header)``: what ``lorax inspect`` says about a file, from its ``Header`` (names, shapes, dtypes,
  metadata, scalars read from their bytes) alone: no torch import.

Nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lorax.errors import ErrorPath, FormatError
from lorax.models import families

if TYPE_CHECKING:
    import torch

    from lorax.adapters.state import LoraState

Tensors = Mapping[str, "torch.Tensor"]
Written = tuple[dict[str, "torch.Tensor"], dict[str, str]]


@dataclass(frozen=True)
class Source:
    """What a reader knows of a file besides its tensors: its header metadata, the model the LoRA is for (a
    pipeline or ``{component: module}``, for exact names), and the file's path (named in every error)."""

    metadata: Mapping[str, str] = field(default_factory=dict)
    model: Any = None
    path: ErrorPath = None


Meta = Source | Mapping[str, str] | None


def source(meta: Meta) -> Source:
    """``meta`` as a ``Source``: a plain metadata mapping (or ``None``) is a file's header with no model or path."""
    if isinstance(meta, Source):
        return Source(dict(meta.metadata), meta.model, meta.path)
    return Source(dict(meta or {}))


class KeyView:
    """A file's tensor names, header metadata and shapes, with the parses several formats' detection share."""

    def __init__(
        self, keys: Sequence[str], metadata: Mapping[str, str], shapes: Mapping[str, Sequence[int]]
    ) -> None:
        self.keys = list(keys)
        self.metadata = metadata
        self.shapes = shapes

    @cached_property
    def flux(self) -> str | None:
        """The Flux LoRA layout of the names (``kohya``, ``xlabs``, ``bfl``, ``diffusers``), or ``None``."""
        from lorax.formats.keys import flux_variant

        return flux_variant(self.keys)

    @cached_property
    def kohya_suffixes(self) -> set[str] | None:
        """The per-module suffixes when every name is kohya-named (or a bundled embedding); else ``None``."""
        from lorax.formats.keys import BUNDLE, kohya_groups

        groups, rest = kohya_groups(self.keys)
        if (groups or rest) and all(k.startswith(BUNDLE) for k in rest):
            return {s for parts in groups.values() for s in parts}
        return None


@dataclass
class Header:
    """A file's tensors as ``lorax inspect`` sees them: names and shapes, dtypes, header metadata, the file's path,
    and a way to read one scalar's value (an alpha) without loading the rest."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    metadata: dict[str, str]
    scalar: Callable[[str], float]
    path: Path


@dataclass
class LoraSummary:
    """What a LoRA's keys say about it: its family, components, modules, algorithms, ranks, alphas and targets (the
    head of a ``Description`` and of ``lorax inspect``'s report, in their order)."""

    family: str | None = None
    components: list[str] = field(default_factory=list)
    modules: int = 0
    algorithms: list[str] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)


@dataclass
class Description(LoraSummary):
    """What a format's ``describe`` finds in a header (the LoRA- or embedding-specific part of inspect's report)."""

    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    layout: str | None = None  # a Flux LoRA's key layout, in words
    blocks: list[str] = field(default_factory=list)  # a Flux LoRA's targeted blocks and projections

    def add_module(self, algorithm: str, rank: int | None, alpha: float | None, module_path: str) -> None:
        self.modules += 1
        if algorithm not in self.algorithms:
            self.algorithms.append(algorithm)
        if rank is not None and rank not in self.ranks:
            self.ranks.append(rank)
        if alpha is not None and alpha not in self.alphas:
            self.alphas.append(alpha)
        kind = families.target_kind(module_path)
        if kind not in self.targets:
            self.targets.append(kind)

    def add_token(self, token: str, component: str, shape: Sequence[int]) -> None:
        vectors, dim = (1, shape[0]) if len(shape) == 1 else (shape[0], shape[-1])
        entry = self.tokens.setdefault(token, {"vectors": vectors, "dims": {}})
        entry["dims"][component] = dim

    def finish(self, components: set[str]) -> Description:
        """Components, ranks, alphas and target kinds in their canonical order."""
        self.components = [c for c in families.all_components() if c in components]
        self.ranks.sort()
        self.alphas.sort()
        self.targets = [k for k in families.TARGET_KINDS if k in self.targets]
        return self


def check_pair_shapes(name: str, down: Sequence[int], up: Sequence[int], path: ErrorPath = None) -> None:
    """Refuse up/down shapes that cannot multiply (``up[:, :r] @ down[:r]``), naming the module and the file."""
    if len(down) not in (2, 4) or len(up) != len(down) or up[1] != down[0]:
        raise FormatError(
            f"module {name}: up {list(up)} and down {list(down)} do not form a low-rank pair", path=path
        )


def check_pair(name: str, down: torch.Tensor, up: torch.Tensor, path: ErrorPath = None) -> None:
    """Refuse up/down tensors that cannot multiply, and conv up weights that are not 1x1."""
    check_pair_shapes(name, tuple(down.shape), tuple(up.shape), path)
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise FormatError(f"module {name}: conv up weight must be 1x1, got {list(up.shape)}", path=path)


class LoraFormat(Protocol):
    """One LoRA or embedding file format (see the module's docstring)."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...  # "lora" | "embedding"

    @property
    def writable(self) -> bool: ...

    @property
    def description(self) -> str: ...

    def detect(self, view: KeyView) -> bool: ...

    def read(self, content: Any, meta: Meta, family: str | None = None) -> LoraState: ...

    def write(self, state: LoraState, *, dtype: torch.dtype | None = None, model: Any = None) -> Written: ...

    def describe(self, header: Header) -> Description: ...
