"""``lorax inspect``: what a LoRA, embedding or model file holds, from headers alone where possible.

On the safetensors path this module reads only the header (and the few bytes of scalar ``alpha`` tensors) with the
standard library: no torch import. Pickles (``.pt``, ``.ckpt``, ``.bin``) are loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import struct
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lorax.errors import FormatError, InputError
from lorax.formats import keys as K
from lorax.formats.naming import Resolver
from lorax.models import families
from lorax.progress import NullProgress, Progress

LORA_FORMATS = ("kohya", "lycoris", "diffusers", "bfl", "xlabs", "lora_diffusion")
EMBEDDING_FORMATS = ("a1111-embedding", "sdxl-embedding", "diffusers-embedding")
_TD_KINDS = {"Attention": "attention", "CrossAttention": "attention", "CLIPAttention": "attention",
             "GEGLU": "ff", "ResnetBlock2D": "conv"}  # fmt: skip


@dataclass
class InspectConfig:
    paths: list[Path]


@dataclass
class FileReport:
    """Everything ``lorax inspect`` says about one file."""

    path: str
    kind: str  # lora | embedding | model
    format: str
    family: str | None = None
    components: list[str] = field(default_factory=list)
    modules: int = 0
    algorithms: list[str] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)
    tensors: int = 0
    size_bytes: int = 0
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] | None = None  # an image's A1111 "parameters": text, prompt, negative, fields
    layout: str | None = None  # a Flux LoRA's key layout, in words (kohya, BFL / ComfyUI, XLabs, diffusers)
    blocks: list[str] = field(default_factory=list)  # a Flux LoRA's targeted blocks and projections


@dataclass
class _Tensors:
    """Names, dtypes and shapes of a file's tensors, plus a way to read a scalar's value."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    scalar: Callable[[str], float]


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


def _alpha_of_header(sf: Any, name: str, p: Path) -> float:
    """A scalar (an alpha) read from its few bytes: one finite number, or one line naming the key and the file."""
    import math

    shape = sf.header.tensors[name].shape
    if math.prod(shape) != 1:
        raise FormatError(f"{name} must hold one number, it has shape {list(shape)}", path=p)
    return K.finite_alpha(_scalar_from_bytes(sf.raw(name), sf.header.tensors[name].dtype), name, p)


def _safetensors(p: Path) -> FileReport:
    from lorax.io.safetensors_io import SafetensorsFile

    sf = SafetensorsFile(p)
    header = sf.header
    info = _Tensors(
        {k: t.shape for k, t in header.tensors.items()},
        {k: t.dtype for k, t in header.tensors.items()},
        lambda name: _alpha_of_header(sf, name, p),
    )
    fmt = K.detect(list(info.shapes), header.metadata, info.shapes)
    if fmt is None:
        raise FormatError("unknown format: not a LoRA, embedding or model file lorax knows", path=p)
    if fmt == "checkpoint":
        return _single_file_model(p, info, header.metadata)
    return _describe(p, fmt, info, header.metadata)


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
    info = _Tensors(
        {k: tuple(v.shape) for k, v in tensors.items()},
        {k: st_names.get(str(v.dtype), str(v.dtype).removeprefix("torch.")) for k, v in tensors.items()},
        lambda name: K.finite_alpha(tensors[name], name, p),
    )
    if fmt == "checkpoint":
        return _single_file_model(p, info, {})
    return _describe(p, fmt, info, {})


# --------------------------------------------------------------------------------------------------------------


def _describe(p: Path, fmt: str, info: _Tensors, metadata: dict[str, str]) -> FileReport:
    report = FileReport(
        path=str(p),
        kind="embedding" if fmt in EMBEDDING_FORMATS else "lora" if fmt in LORA_FORMATS else "model",
        format=fmt,
        dtypes=sorted(set(info.dtypes.values())),
        tensors=len(info.shapes),
        size_bytes=p.stat().st_size,
        metadata=dict(metadata),
        training=readable_training(metadata),
    )
    if fmt in LORA_FORMATS and K.flux_variant(list(info.shapes)) is not None:
        _flux(report, info, p)
    elif fmt in ("kohya", "lycoris"):
        _kohya(report, info, p)
    elif fmt == "diffusers":
        _diffusers(report, info, metadata, p)
    elif fmt == "lora_diffusion":
        _lora_diffusion(report, info, metadata, p)
    elif fmt in EMBEDDING_FORMATS:
        _embedding(report, info, fmt, p)
    else:  # a diffusers component's weights file
        report.kind = "model"
        report.components = sorted({k.split(".", 1)[0] for k in info.shapes})[:8]
    report.family = report.family or _family(metadata, info)
    return report


def _family(metadata: Mapping[str, str], info: _Tensors) -> str | None:
    return families.detect(metadata=metadata) or families.detect(
        lora_keys=list(info.shapes), shapes=info.shapes
    )


def _check_pair(name: str, down: Sequence[int], up: Sequence[int], p: Path) -> None:
    if len(down) not in (2, 4) or len(up) != len(down) or up[1] != down[0]:
        raise FormatError(
            f"module {name}: up {list(up)} and down {list(down)} do not form a low-rank pair", path=p
        )


def _add_module(report: FileReport, algorithm: str, rank: int | None, alpha: float | None, path: str) -> None:
    report.modules += 1
    if algorithm not in report.algorithms:
        report.algorithms.append(algorithm)
    if rank is not None and rank not in report.ranks:
        report.ranks.append(rank)
    if alpha is not None and alpha not in report.alphas:
        report.alphas.append(alpha)
    kind = families.target_kind(path)
    if kind not in report.targets:
        report.targets.append(kind)


def _finish(report: FileReport, components: set[str]) -> None:
    report.components = [c for c in families.all_components() if c in components]
    report.ranks.sort()
    report.alphas.sort()
    report.targets = [k for k in families.TARGET_KINDS if k in report.targets]


def _kohya(report: FileReport, info: _Tensors, p: Path) -> None:
    groups, rest = K.kohya_groups(info.shapes)
    resolvers: dict[str, Resolver] = {}
    for (component, flat), parts in groups.items():
        resolver = resolvers.setdefault(component, Resolver(component))
        path = resolver.resolve(flat) or flat
        alpha = info.scalar(parts["alpha"]) if "alpha" in parts else None
        rank: int | None
        if "hada_w1_b" in parts:
            algorithm, rank = "loha", info.shapes[parts["hada_w1_b"]][0]
        elif any(s.startswith("lokr_") for s in parts):
            algorithm = "lokr"
            inner = parts.get("lokr_w1_b") or parts.get("lokr_w2_b")
            rank = info.shapes[inner][0] if inner else None
        elif "lora_down.weight" in parts and "lora_up.weight" in parts:
            down, up = info.shapes[parts["lora_down.weight"]], info.shapes[parts["lora_up.weight"]]
            if "lora_mid.weight" not in parts:
                _check_pair(f"{component}.{path}", down, up, p)
            algorithm = "dora" if "dora_scale" in parts else "lora"
            rank = down[0]
        elif "diff" in parts:
            algorithm, rank = "full", None
        elif {"weight", "on_input"} <= set(parts):
            algorithm, rank = "ia3", None
        else:
            raise FormatError(f"module {component}.{path}: unknown tensors {sorted(parts)}", path=p)
        if "dora_scale" in parts and algorithm in ("loha", "lokr"):
            algorithm += "+dora"  # LyCORIS weight_decompose on LoHa / LoKr
        if alpha is None and rank is not None and algorithm in ("lora", "dora", "loha", "loha+dora"):
            alpha = float(rank)
        _add_module(report, algorithm, rank, alpha, path)
    tokens = [k for k in rest if k.startswith(K.BUNDLE)]
    for key in tokens:
        token, _, slot = key[len(K.BUNDLE) :].partition(".")
        component = families.embedding_component(slot)
        _add_token(report, token, component, info.shapes[key])
    _finish(report, {c for c, _ in groups})


def _flux(report: FileReport, info: _Tensors, p: Path) -> None:
    """A Flux LoRA in any layout, from its header: the layout, blocks and projections, ranks, alphas."""
    from lorax.formats import flux_names

    groups: dict[str, dict[str, str]] = {}
    where: dict[str, tuple[str, str]] = {}
    for key in info.shapes:
        found = flux_names.classify(key)
        if found is None:
            raise FormatError(f"key {key!r} is in no Flux LoRA layout", path=p)
        name, component, module, role = found
        groups.setdefault(name, {})[role] = key
        where[name] = (component, module)
    report.family = "flux"
    report.layout = flux_names.LAYOUTS[report.format]
    components: set[str] = set()
    bfl: set[str] = set()
    for name, roles in groups.items():
        if "down" not in roles or "up" not in roles:
            raise FormatError(
                f"module {name} has no {'down' if 'down' not in roles else 'up'} weight", path=p
            )
        down, up = info.shapes[roles["down"]], info.shapes[roles["up"]]
        _check_pair(name, down, up, p)
        alpha = info.scalar(roles["alpha"]) if "alpha" in roles else float(down[0])
        component, module = where[name]
        components.add(component)
        if component == flux_names.TRANSFORMER:
            bfl.add(module)
            parts = flux_names.bfl_parts(module) or flux_names.bfl_parts(module.replace(".qkv", ".linear1"))
            module = parts[0] if parts else module  # a diffusers path tells the target kind
        _add_module(report, "lora", down[0], alpha, module)
    report.blocks = flux_names.block_summary(bfl)
    text = sorted(c for c in components if c != flux_names.TRANSFORMER)
    if text:
        report.blocks.append("text encoders: " + ", ".join(text))
    _finish(report, components)


def _diffusers(report: FileReport, info: _Tensors, metadata: Mapping[str, str], p: Path) -> None:
    parts: dict[tuple[str, str], dict[str, str]] = {}
    for key in info.shapes:
        parsed = K.diffusers_parse(key)
        if parsed is None:
            raise FormatError(f"key {key!r} is not in diffusers/PEFT naming", path=p)
        component, path, role = parsed
        parts.setdefault((component, path), {})[role] = key
    configs = K.component_configs(metadata)
    for (component, path), roles in parts.items():
        if "down" not in roles or "up" not in roles:
            raise FormatError(
                f"module {component}.{path} lacks its {'up' if 'down' in roles else 'down'} weight", path=p
            )
        down, up = info.shapes[roles["down"]], info.shapes[roles["up"]]
        _check_pair(f"{component}.{path}", down, up, p)
        rank = down[0]
        if "alpha" in roles:
            alpha = info.scalar(roles["alpha"])
        else:
            config = configs.get(component) or configs.get("")
            alpha = K.module_alpha(config, path, rank, component=component, path=p) if config else float(rank)
        _add_module(report, "dora" if "magnitude" in roles else "lora", rank, alpha, path)
    _finish(report, {c for c, _ in parts})


def _lora_diffusion(report: FileReport, info: _Tensors, metadata: Mapping[str, str], p: Path) -> None:
    slots: dict[tuple[str, int], dict[str, tuple[int, ...]]] = {}
    for key, shape in info.shapes.items():
        m = K.LORA_DIFFUSION_KEY.match(key)
        if m:
            slots.setdefault((m.group("c"), int(m.group("i"))), {})[m.group("r")] = shape
        else:
            _add_token(report, key, families.embedding_component(), shape)
    for (component, i), pair in sorted(slots.items()):
        if set(pair) != {"up", "down"}:
            raise FormatError(f"{component}:{i} lacks its up or down tensor", path=p)
        _check_pair(f"{component}:{i}", pair["down"], pair["up"], p)
        report.modules += 1
        if pair["down"][0] not in report.ranks:
            report.ranks.append(pair["down"][0])
    report.algorithms = ["lora"] if slots else []
    report.alphas = [float(r) for r in sorted(report.ranks)]  # the scale is folded into up
    kinds: set[str] = set()
    for component in {c for c, _ in slots}:
        try:
            listed = json.loads(metadata[component]) if component in metadata else None
        except json.JSONDecodeError:
            listed = None
        names = listed or (["Attention", "GEGLU"] if component == "unet" else ["CLIPAttention"])
        kinds |= {_TD_KINDS.get(n, "other") for n in names}
    report.targets = [k for k in families.TARGET_KINDS if k in kinds]
    report.components = [c for c in families.all_components() if c in {c for c, _ in slots}]
    report.ranks.sort()
    te = slots.get((families.embedding_component(), 0))
    if te and "down" in te:
        report.family = families.family_of_text_width(te["down"][1])


def _add_token(report: FileReport, token: str, component: str, shape: Sequence[int]) -> None:
    vectors, dim = (1, shape[0]) if len(shape) == 1 else (shape[0], shape[-1])
    entry = report.tokens.setdefault(token, {"vectors": vectors, "dims": {}})
    entry["dims"][component] = dim


def _embedding(report: FileReport, info: _Tensors, fmt: str, p: Path) -> None:
    stem = p.name.removesuffix(".safetensors").removesuffix(".pt")
    if fmt == "sdxl-embedding":
        for key, shape in info.shapes.items():
            _add_token(report, stem, families.embedding_component(key), shape)
        report.family = next(f.name for f in families.all_families() if f.embedding_format == fmt)
    elif fmt == "a1111-embedding":
        for key, shape in info.shapes.items():
            token = key.removeprefix("string_to_param.") if key.startswith("string_to_param.") else stem
            _add_token(report, token, families.embedding_component(), shape)
    else:
        for key, shape in info.shapes.items():
            _add_token(report, key, families.embedding_component(), shape)
    report.components = sorted({c for t in report.tokens.values() for c in t["dims"]})
    if report.family is None:
        dims = {d for t in report.tokens.values() for d in t["dims"].values()}
        report.family = families.family_of_text_width(next(iter(dims))) if len(dims) == 1 else None


# --------------------------------------------------------------------------------------------------------------


def _single_file_model(p: Path, info: _Tensors, metadata: dict[str, str]) -> FileReport:
    from lorax.io.checkpoint import stated_family
    from lorax.io.checkpoint_layouts import LAYOUTS

    keys = list(info.shapes)
    family = stated_family(metadata) or families.detect(single_keys=keys, shape_of=info.shapes.get, path=p)
    assert family is not None  # single-file detection raises rather than return None
    layout = LAYOUTS.get(family)
    prefixes = layout.single_prefixes if layout else {}
    components = [c for c, (pre, _) in prefixes.items() if any(k.startswith(pre) for k in keys)]
    return FileReport(
        path=str(p), kind="model", format="single-file", family=family, components=components,
        dtypes=sorted(set(info.dtypes.values())), tensors=len(keys), size_bytes=p.stat().st_size,
        metadata={k: v for k, v in metadata.items() if len(v) < 2000},
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
