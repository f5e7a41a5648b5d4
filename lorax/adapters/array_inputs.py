"""Which merges need no torch, and their LoRAs read as numpy arrays (``lorax.adapters.array_merge`` merges them).

A merge runs without torch when its base is a safetensors single file that fuses nothing in unequal slices (SD1,
SD2, SDXL layouts; not Flux's), its output is a single file in the base's dtype, and every LoRA is a kohya
safetensors file of plain LoRA / LoCon pairs (``lora_down`` / ``lora_up`` / ``alpha``, nothing else) in fp16,
bf16 or fp32 whose names resolve as ``merge_inputs.read_for_base`` resolves them. Anything else, and any file the
torch path would refuse (a pair that does not multiply, non-finite weights, a LoRA of another family), returns
``None``: the torch path then reads it, and says what is wrong in its own words.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.adapters.array_merge import NUMPY_DTYPES, ArrayLora, ArrayState, to_fp32
from lorax.errors import LoraxError

if TYPE_CHECKING:
    import numpy as np

    from lorax.io.checkpoint import Checkpoint, PathSkeleton

_PAIR = {"lora_down.weight", "lora_up.weight"}


def base_skeleton(ckpt: Checkpoint, dtype: str | None) -> dict[str, PathSkeleton] | None:
    """The base's layers for naming (``model_skeleton`` without torch), or ``None`` where the merge needs torch."""
    from lorax.io.checkpoint import SingleFileCheckpoint, path_skeleton
    from lorax.io.checkpoint_sources import SafetensorsSource
    from lorax.io.model_layout import FP8_DTYPES

    if dtype is not None or not isinstance(ckpt, SingleFileCheckpoint):
        return None
    if not isinstance(ckpt.source, SafetensorsSource):
        return None
    if any(e.sizes or e.reshape == "swap" for e in ckpt.keymap.entries):  # Flux's (flux_merge.needs_slicing)
        return None
    if any(ckpt.source.dtype(k) in FP8_DTYPES for k in ckpt.source):
        return None
    return path_skeleton(ckpt)


def read_lora(path: Path, family: str | None, skeleton: dict[str, PathSkeleton]) -> ArrayState | None:
    """A kohya LoRA of plain pairs read for a merge into the base of ``family`` (names as ``read_for_base``
    resolves them), or ``None`` where the torch path must read it."""
    try:
        return _read(path, family, skeleton)
    except LoraxError:  # the torch path words it
        return None


def _read(path: Path, family: str | None, skeleton: dict[str, PathSkeleton]) -> ArrayState | None:
    from lorax.adapters.merge_inputs import declared_family, refuse_unmergeable
    from lorax.errors import MismatchError
    from lorax.formats import detect_format, keys
    from lorax.formats.base import check_pair_shapes
    from lorax.formats.kohya import LORA_SUFFIXES, resolve_groups
    from lorax.io.safetensors_io import read_header

    if not path.is_file() or path.suffix.lower() != ".safetensors" or detect_format(path) != "kohya":
        return None
    refuse_unmergeable(path)
    declared = declared_family(path)
    if family is None or family == keys.FLUX_FAMILY or (declared and declared != family):
        return None
    header = read_header(path)
    names = list(header.tensors)
    if keys.flux_variant(names) is not None:
        return None
    groups, rest = keys.kohya_groups(names)
    if rest or any(not (_PAIR <= set(p) <= set(LORA_SUFFIXES)) for p in groups.values()):
        return None
    if any(t.dtype not in NUMPY_DTYPES for t in header.tensors.values()):
        return None
    try:
        resolved = resolve_groups(groups, model=skeleton, family=family, path=path)
    except MismatchError:  # read again by the family's tables, so that the plan names what does not match
        resolved = resolve_groups(groups, family=family, path=path)
    modules: dict[str, ArrayLora] = {}
    with open(path, "rb") as f:
        for (component, flat), parts in groups.items():
            down, up = (_array(f, header.tensors[parts[s]]) for s in ("lora_down.weight", "lora_up.weight"))
            name = f"{component}.{resolved[(component, flat)]}"
            check_pair_shapes(name, down.shape, up.shape, path)
            if (up.ndim == 4 and up.shape[2:] != (1, 1)) or down.shape[0] == 0:
                return None
            if not (_finite(down) and _finite(up)):
                return None
            alpha = float(down.shape[0])
            if "alpha" in parts:
                value = _array(f, header.tensors[parts["alpha"]])
                if value.size != 1 or not _finite(value):
                    return None
                alpha = float(value.reshape(-1)[0])
            modules[name] = ArrayLora(down, up, alpha)
    return ArrayState(modules, family, dict(header.metadata))


def _array(f: Any, info: Any) -> np.ndarray:
    import numpy as np

    f.seek(info.start)
    data = np.frombuffer(f.read(info.nbytes), dtype=NUMPY_DTYPES[info.dtype])
    return to_fp32(data).reshape(info.shape)


def _finite(a: np.ndarray) -> bool:
    import numpy as np

    return bool(np.isfinite(a).all())
