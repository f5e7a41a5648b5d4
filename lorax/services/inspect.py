"""``lorax inspect``: what a LoRA, embedding or model file holds, from headers alone where possible.

On the safetensors path this module reads only the header (and the few bytes of scalar ``alpha`` tensors) with the
standard library: no torch import. Pickles (``.pt``, ``.ckpt``, ``.bin``) are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.errors import FormatError, InputError
from lorax.formats.base import Description, Header, LoraSummary
from lorax.formats.keys import finite_alpha
from lorax.formats.registry import FORMATS, detect
from lorax.models import families
from lorax.progress import NullProgress, Progress

if TYPE_CHECKING:
    from lorax.io.safetensors_io import SafetensorsFile

# What a format's describe gives the report (Description's fields).
_DESCRIBED = tuple(Description.__dataclass_fields__)


@dataclass
class InspectConfig:
    paths: list[Path]


@dataclass
class _FileHead:
    path: str
    kind: str  # lora | embedding | model
    format: str


@dataclass
class FileReport(LoraSummary, _FileHead):  # JSON order: _FileHead's fields, LoraSummary's, these
    """Everything ``lorax inspect`` says about one file."""

    dtypes: list[str] = field(default_factory=list)
    tensors: int = 0
    size_bytes: int = 0
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] | None = None  # an image's A1111 "parameters": text, prompt, negative, fields
    layout: str | None = None  # a Flux LoRA's key layout, in words (kohya, BFL / ComfyUI, XLabs, diffusers)
    blocks: list[str] = field(default_factory=list)  # a Flux LoRA's targeted blocks and projections


# --------------------------------------------------------------------------------------------------------------


def inspect_files(config: InspectConfig, progress: Progress | None = None) -> list[FileReport]:
    progress = progress or NullProgress()
    reports = []
    with progress.task("inspecting", total=len(config.paths)) as task:
        for path in config.paths:
            reports.append(inspect_path(path))
            task.advance()
    return reports


def inspect_path(path: str | Path) -> FileReport:
    """Describe one file or model folder; every problem is a ``LoraxError`` naming the file."""
    p = Path(path)
    if not p.exists():
        raise InputError("no such file or folder", path=p)
    if p.is_dir():
        if (p / "model_index.json").is_file():
            return _model_folder(p)
        for name in (
            "pytorch_lora_weights.safetensors",
            "adapter_model.safetensors",
            "learned_embeds.safetensors",
        ):
            if (p / name).is_file():
                return inspect_path(p / name)
        raise InputError("is a folder, but neither a diffusers model nor a LoRA folder", path=p)
    from lorax.formats import is_safetensors
    from lorax.io.safetensors_io import check_readable_file

    check_readable_file(p)
    if is_safetensors(p):
        return _safetensors(p)
    with open(p, "rb") as f:
        head = f.read(8)
    if head == b"\x89PNG\r\n\x1a\n":
        return _png(p)
    if len(head) >= 8 and (head[:1] == b"\x80" or head[:2] == b"PK"):
        return _pickle(p)
    if p.suffix.lower() == ".safetensors":
        from lorax.io.safetensors_io import read_header

        read_header(p)  # raises the precise problem (length, JSON, truncation)
    raise FormatError("unknown format: neither safetensors nor a torch pickle", path=p)


# --------------------------------------------------------------------------------------------------------------


def _png(p: Path) -> FileReport:
    """A PNG's generation parameters (A1111's ``parameters`` text chunk, as lorax generate writes it)."""
    from PIL import Image

    from lorax.gen.params import PARAMETERS_KEY, read_png_parameters

    params = read_png_parameters(p)  # the one-line errors: unreadable, or no parameters chunk
    with Image.open(p) as image:  # the text exactly as stored, for pasting into A1111's PNG Info
        text = str(getattr(image, "text", {}).get(PARAMETERS_KEY) or image.info.get(PARAMETERS_KEY))
    return FileReport(
        path=str(p),
        kind="image",
        format="png",
        size_bytes=p.stat().st_size,
        parameters={
            "text": text,
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "fields": params.fields,
        },
    )


def _scalar_from_bytes(raw: bytes, dtype: str) -> float:
    if dtype == "F32":
        return float(struct.unpack("<f", raw)[0])
    if dtype == "F16":
        return float(struct.unpack("<e", raw)[0])
    if dtype == "BF16":
        return float(struct.unpack("<f", b"\x00\x00" + raw)[0])
    if dtype == "F64":
        return float(struct.unpack("<d", raw)[0])
    if dtype in ("I64", "I32", "I16", "I8", "U8"):
        return float(int.from_bytes(raw, "little", signed=dtype.startswith("I")))
    raise FormatError(f"cannot read a scalar of dtype {dtype}")


def _alpha_of_header(sf: SafetensorsFile, name: str, p: Path) -> float:
    """A scalar (an alpha) read from its few bytes: one finite number, or one line naming the key and the file."""
    import math

    shape = sf.header.tensors[name].shape
    if math.prod(shape) != 1:
        raise FormatError(f"{name} must hold one number, it has shape {list(shape)}", path=p)
    return finite_alpha(_scalar_from_bytes(sf.raw(name), sf.header.tensors[name].dtype), name, p)


def _safetensors(p: Path) -> FileReport:
    from lorax.io.safetensors_io import SafetensorsFile

    sf = SafetensorsFile(p)
    header = sf.header
    info = Header(
        {k: t.shape for k, t in header.tensors.items()},
        {k: t.dtype for k, t in header.tensors.items()},
        dict(header.metadata),
        lambda name: _alpha_of_header(sf, name, p),
        p,
    )
    fmt = detect(list(info.shapes), info.metadata, info.shapes)
    if fmt is None:
        raise FormatError("unknown format: not a LoRA, embedding or model file lorax knows", path=p)
    if fmt == "checkpoint":
        return _single_file_model(p, info)
    return _describe(p, fmt, info)


def _pickle(p: Path) -> FileReport:
    import torch

    from lorax.formats import detect_object
    from lorax.io.pickle_safe import load_pickle

    with warnings.catch_warnings():  # torch's notes on pickle protocols are not for the user
        warnings.simplefilter("ignore")
        obj = load_pickle(p)
    fmt = detect_object(obj, p)
    if fmt is None:
        raise FormatError("unknown format: a pickle lorax does not recognise", path=p)
    if isinstance(obj, list | tuple):
        component = "text_encoder" if p.name.endswith(".text_encoder.pt") else "unet"
        tensors = {}
        for i in range(0, len(obj) - 1, 2):
            tensors[f"{component}:{i // 2}:up"], tensors[f"{component}:{i // 2}:down"] = obj[i], obj[i + 1]
    elif fmt == "a1111-embedding":
        token = str(obj.get("name") or p.stem)
        params = obj.get("string_to_param") or {}
        tensors = {f"string_to_param.{token}": v for v in params.values() if isinstance(v, torch.Tensor)}
    else:
        mapping = obj.get("state_dict", obj) if isinstance(obj, Mapping) else {}
        tensors = {str(k): v for k, v in mapping.items() if isinstance(v, torch.Tensor)}
    st_names = {
        "torch.float32": "F32",
        "torch.float16": "F16",
        "torch.bfloat16": "BF16",
        "torch.float64": "F64",
    }
    info = Header(
        {k: tuple(v.shape) for k, v in tensors.items()},
        {k: st_names.get(str(v.dtype), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()},
        {},
        lambda name: finite_alpha(tensors[name], name, p),
        p,
    )
    if fmt == "checkpoint":
        return _single_file_model(p, info)
    return _describe(p, fmt, info)


# --------------------------------------------------------------------------------------------------------------


def _describe(p: Path, fmt: str, info: Header) -> FileReport:
    """What the format's ``describe`` finds, in a report with the file's own facts (size, dtypes, training)."""
    report = FileReport(
        path=str(p), kind=FORMATS[fmt].kind if fmt in FORMATS else "model", format=fmt,
        dtypes=sorted(set(info.dtypes.values())), tensors=len(info.shapes), size_bytes=p.stat().st_size,
        metadata=dict(info.metadata), training=readable_training(info.metadata),
    )  # fmt: skip
    if fmt in FORMATS:
        found = FORMATS[fmt].describe(info)
        for name in _DESCRIBED:
            setattr(report, name, getattr(found, name))
    else:  # a diffusers component's weights file
        report.components = sorted({k.split(".", 1)[0] for k in info.shapes})[:8]
    report.family = report.family or _family(info)
    return report


def _family(info: Header) -> str | None:
    return families.detect(metadata=info.metadata) or families.detect(
        lora_keys=list(info.shapes), shapes=info.shapes
    )


# --------------------------------------------------------------------------------------------------------------


def _single_file_model(p: Path, info: Header) -> FileReport:
    from lorax.io.checkpoint import stated_family
    from lorax.io.checkpoint_layouts import LAYOUTS

    keys = list(info.shapes)
    family = stated_family(info.metadata) or families.detect(
        single_keys=keys, shape_of=info.shapes.get, path=p
    )
    assert family is not None  # single-file detection raises rather than return None
    layout = LAYOUTS.get(family)
    prefixes = layout.single_prefixes if layout else {}
    components = [c for c, (pre, _) in prefixes.items() if any(k.startswith(pre) for k in keys)]
    return FileReport(
        path=str(p), kind="model", format="single-file", family=family, components=components,
        dtypes=sorted(set(info.dtypes.values())), tensors=len(keys), size_bytes=p.stat().st_size,
        metadata={k: v for k, v in info.metadata.items() if len(v) < 2000},
    )  # fmt: skip


def _model_folder(p: Path) -> FileReport:
    from lorax.io.checkpoint import open_diffusers_folder

    ckpt = open_diffusers_folder(p)
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    dtypes: set[str] = set()
    tensors = 0
    for component in ckpt.components():
        for file in ckpt.weight_files(component):
            if file.suffix == ".safetensors":
                from lorax.io.safetensors_io import read_header

                header = read_header(file)
                tensors += len(header.tensors)
                dtypes |= {t.dtype for t in header.tensors.values()}
    return FileReport(
        path=str(p), kind="model", format="diffusers-folder", family=ckpt.family, components=ckpt.components(),
        dtypes=sorted(dtypes), tensors=tensors, size_bytes=size,
        metadata={"pipeline": str(ckpt.model_index.get("_class_name", ""))},
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------------------


def readable_training(metadata: Mapping[str, str]) -> dict[str, Any]:
    """kohya's ``ss_*`` header keys, decoded: JSON parsed, Unix times as UTC dates, tag counts summarised."""
    out: dict[str, Any] = {}
    for key, raw in metadata.items():
        if not key.startswith("ss_"):
            continue
        name = key[3:]
        value: Any = raw
        if raw in ("None", ""):
            continue
        if raw[:1] in "{[":
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
        if name.endswith("_at"):
            try:
                value = datetime.fromtimestamp(float(raw), tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
            except ValueError:
                value = raw
        if name == "tag_frequency" and isinstance(value, dict):
            counts: dict[str, int] = {}
            for tags in value.values():
                if isinstance(tags, dict):
                    for tag, n in tags.items():
                        counts[tag] = counts.get(tag, 0) + int(n)
            value = dict(sorted(counts.items(), key=lambda kv: -kv[1])[:10])
            name = "top_tags"
        out[name] = value
    return out
