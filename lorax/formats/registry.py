"""The registry of LoRA and embedding formats, in the order detection tries them; format detection from a header.

Each entry is a ``LoraFormat`` (``lorax.formats.base``): ``detect`` and ``describe`` work on headers and import no
torch; ``read`` and ``write`` import the format's own module (``module``) when called. ``FORMATS`` is the one place
that maps a format's name to its code: ``lorax.formats.load_lora`` / ``save_lora`` and ``lorax inspect`` go through it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import lorax.formats.describe as _describe
import lorax.formats.keys as K
from lorax.formats.base import Description, Header, KeyView, LoraFormat, Meta, Written, source
from lorax.io.checkpoint_layouts import LAYOUTS

if TYPE_CHECKING:
    import torch

    from lorax.adapters.state import LoraState

# (the format's own module, the file's content, what is known of it, the family) → the LoRA; and back
Reader = Callable[[ModuleType, Any, Meta, "str | None"], "LoraState"]
Writer = Callable[[ModuleType, "LoraState", "torch.dtype | None", Any], Written]


def _read(module: ModuleType, content: Any, meta: Meta, family: str | None) -> LoraState:
    return module.read(content, meta, family)  # type: ignore[no-any-return]


def _write(module: ModuleType, state: LoraState, dtype: torch.dtype | None, model: Any) -> Written:
    return module.write(state, dtype=dtype)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Format:
    """One format: what detects and describes it (torch-free) and the module that reads and writes it."""

    name: str
    kind: str  # "lora" | "embedding"
    module: str  # the lorax.formats submodule holding its reader and writer
    writable: bool
    description: str
    detects: Callable[[KeyView], bool]
    describes: Callable[[Header, str], Description]
    reader: Reader = _read
    writer: Writer = _write

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def detect(self, view: KeyView) -> bool:
        return self.detects(view)

    def read(self, content: Any, meta: Meta, family: str | None = None) -> LoraState:
        return self.reader(self.load(), content, meta, family)

    def write(self, state: LoraState, *, dtype: torch.dtype | None = None, model: Any = None) -> Written:
        return self.writer(self.load(), state, dtype, model)

    def describe(self, header: Header) -> Description:
        if self.kind == "lora" and K.flux_variant(list(header.shapes)) is not None:
            return _describe.flux(header, self.name)  # a Flux LoRA in kohya or diffusers names
        return self.describes(header, self.name)


# --- Flux layouts inside the kohya and diffusers formats: lorax.formats.flux reads and writes them ----------------
def _is_flux(content: Any, family: str | None) -> bool:
    return K.flux_variant(list(content)) is not None or family == K.FLUX_FAMILY


def _read_flux(module: ModuleType, content: Any, meta: Meta, family: str | None) -> LoraState:
    from lorax.formats import flux

    src = source(meta)
    return flux.read(content, src.metadata, model=src.model, family=family, path=src.path)


def _read_kohya(module: ModuleType, content: Any, meta: Meta, family: str | None) -> LoraState:
    return (_read_flux if _is_flux(content, family) else _read)(module, content, meta, family)


def _write_kohya(module: ModuleType, state: LoraState, dtype: torch.dtype | None, model: Any) -> Written:
    if state.family != K.FLUX_FAMILY:
        return module.write(state, dtype=dtype)  # type: ignore[no-any-return]
    from lorax.formats import flux

    return flux.write(state, dtype=dtype, variant="kohya")


def _read_diffusers(module: ModuleType, content: Any, meta: Meta, family: str | None) -> LoraState:
    if _is_flux(content, family):
        return _read_flux(module, content, meta, family)
    return module.read(content, meta, family, module.peft_adapter_config(source(meta).path))  # type: ignore[no-any-return]


def _write_diffusers(module: ModuleType, state: LoraState, dtype: torch.dtype | None, model: Any) -> Written:
    if state.family != K.FLUX_FAMILY:
        return module.write(state, dtype=dtype)  # type: ignore[no-any-return]
    from lorax.formats import flux

    tensors, header = flux.write(state, dtype=dtype, variant="diffusers")
    return tensors, {**header, "format": "pt"}


def _write_flux(module: ModuleType, state: LoraState, dtype: torch.dtype | None, model: Any) -> Written:
    return module.write(state, dtype=dtype)  # type: ignore[no-any-return]


def _read_lora_diffusion(module: ModuleType, content: Any, meta: Meta, family: str | None) -> LoraState:
    """A ``.safetensors`` file's tensors, or (a legacy ``.pt`` set) the files beside ``meta``'s path."""
    from lorax.formats import is_safetensors

    src = source(meta)
    if isinstance(content, Mapping) and (src.path is None or is_safetensors(src.path)):
        return module.read(content, src, family)  # type: ignore[no-any-return]
    return module.read_legacy(src.path, model=src.model, family=family)  # type: ignore[no-any-return]


def _write_lora_diffusion(
    module: ModuleType, state: LoraState, dtype: torch.dtype | None, model: Any
) -> Written:
    return module.write(state, dtype=dtype, model=model)  # type: ignore[no-any-return]


def _read_embedding(
    module: ModuleType, content: Any, meta: Meta, family: str | None, *, fmt: str = ""
) -> LoraState:
    from lorax.adapters.state import LoraState

    src = source(meta)
    found = module.read(content, fmt, path=src.path, metadata=src.metadata)
    return LoraState(embeddings=found, metadata=dict(src.metadata), family=family)


def _embedding(name: str, description: str, detects: Callable[[KeyView], bool]) -> Format:
    def reader(module: ModuleType, content: Any, meta: Meta, family: str | None) -> LoraState:
        return _read_embedding(module, content, meta, family, fmt=name)

    def writer(module: ModuleType, state: LoraState, dtype: torch.dtype | None, model: Any) -> Written:
        return module.write(state.embeddings, name), {}

    return Format(
        name,
        "embedding",
        "lorax.formats.embeddings",
        True,
        description,
        detects,
        _describe.embedding,
        reader,
        writer,
    )


def _kohya_named(view: KeyView, lycoris: bool) -> bool:
    suffixes = view.kohya_suffixes
    return suffixes is not None and bool(suffixes & K.LYCORIS_SUFFIXES) == lycoris


def _is_diffusers(view: KeyView) -> bool:
    return any(K.diffusers_parse(k) is not None and not k.endswith(".alpha") for k in view.keys)


def _is_a1111(view: KeyView) -> bool:
    return "emb_params" in view.keys or any(k.startswith("string_to_param") for k in view.keys)


def _is_diffusers_embedding(view: KeyView) -> bool:
    keys = view.keys
    return all("." not in k and len(view.shapes.get(k, ())) in (1, 2) for k in keys) and len(keys) <= 64


_FORMATS: tuple[Format, ...] = (
    Format("lora_diffusion", "lora", "lorax.formats.lora_diffusion", True, "cloneofsimo/lora (unet:{i}:up, by index)",
           lambda v: any(K.LORA_DIFFUSION_KEY.match(k) for k in v.keys), _describe.lora_diffusion,
           _read_lora_diffusion, _write_lora_diffusion),
    Format("bfl", "lora", "lorax.formats.flux", True,
           "Flux BFL / ComfyUI (diffusion_model.double_blocks.….lora_A.weight)",
           lambda v: v.flux == "bfl", _describe.flux, _read_flux, _write_flux),
    Format("xlabs", "lora", "lorax.formats.flux", False, "Flux XLabs (double_blocks.….processor.qkv_lora1.down.weight)",
           lambda v: v.flux == "xlabs", _describe.flux, _read_flux, _write_flux),
    Format("kohya", "lora", "lorax.formats.kohya", True, "kohya / AUTOMATIC1111 / ComfyUI (lora_unet_…)",
           lambda v: v.flux == "kohya" or (v.flux is None and _kohya_named(v, False)), _describe.kohya,
           _read_kohya, _write_kohya),
    Format("lycoris", "lora", "lorax.formats.kohya", True, "LyCORIS LoHa / LoKr / DoRA (kohya names)",
           lambda v: v.flux is None and _kohya_named(v, True), _describe.kohya, _read_kohya, _write_kohya),
    Format("diffusers", "lora", "lorax.formats.diffusers", True, "diffusers / PEFT (unet.….lora_A.weight)",
           lambda v: v.flux == "diffusers" or (v.flux is None and _is_diffusers(v)), _describe.diffusers,
           _read_diffusers, _write_diffusers),
    _embedding("a1111-embedding", "A1111 embedding", _is_a1111),
    _embedding("sdxl-embedding", "SDXL embedding (clip_l, clip_g)", lambda v: set(v.keys) <= {"clip_l", "clip_g"}),
    _embedding("diffusers-embedding", "diffusers learned_embeds ({token: [dim]})", _is_diffusers_embedding),
)  # fmt: skip
FORMATS: dict[str, LoraFormat] = {f.name: f for f in _FORMATS}
EMBEDDING_FORMATS = tuple(f.name for f in _FORMATS if f.kind == "embedding")
LORA_FORMATS = tuple(f.name for f in _FORMATS if f.kind == "lora")

# Model files, tried after every LoRA and embedding format: a single-file checkpoint, a diffusers component's weights.
_CHECKPOINT_PREFIXES = (
    "model.diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.",
    "conditioner.embedders.",
)


def detect(
    keys: Sequence[str], metadata: Mapping[str, str], shapes: Mapping[str, Sequence[int]]
) -> str | None:
    """The format of a file from its tensor names, header metadata and shapes; ``None`` when unknown.

    Answers a name in ``FORMATS`` (the first whose ``detect`` holds), ``checkpoint`` (a single-file model) or
    ``model-weights`` (a diffusers component file).
    """
    if not keys:
        return None
    view = KeyView(keys, metadata, shapes)
    for fmt in _FORMATS:
        if fmt.detect(view):
            return fmt.name
    markers = tuple(
        m for layout in LAYOUTS.values() for m in layout.single_markers
    )  # e.g. Flux's bare BFL file
    if any(k.startswith((*_CHECKPOINT_PREFIXES, *markers)) for k in keys):
        return "checkpoint"
    if any(k.endswith((".weight", ".bias")) for k in keys):
        return "model-weights"
    return None
