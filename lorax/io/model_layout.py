"""Model layout conversion, streaming: diffusers folder ⇄ single file in the original layout.

Tensors are read and written one at a time; a tensor whose bytes do not change (most of them: only OpenCLIP's fused
q;k;v and SDXL's transposed text projection are rebuilt) is copied as raw bytes. Single files lorax writes carry the
component configs, tokenizer and model defaults in their metadata (``lorax.configs``, ``lorax.tokenizer``,
``lorax.defaults``, a folder's ``lorax.json``) so they convert back, and
load as pipelines, offline; for files from elsewhere the configs come from ``config_from`` (a diffusers folder of the
same family) or the family's reference repo in the local Hugging Face cache.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lorax import dtypes
from lorax.errors import ConfigError, FormatError, ModelNotFoundError
from lorax.io.checkpoint import (
    META_CONFIGS,
    META_FAMILY,
    META_TOKENIZER,
    DiffusersCheckpoint,
    SingleFileCheckpoint,
    hub_snapshot,
    open_checkpoint,
)
from lorax.io.checkpoint_layouts import all_components, layout
from lorax.io.keymaps import (
    KeyMap,
    Layouts,
    TextLayout,
    UnetLayout,
    VaeLayout,
    join_parts,
    keymap_from_diffusers,
    part_shapes,
    single_shape,
    split_single,
)
from lorax.io.safetensors_io import StreamingWriter
from lorax.progress import NullProgress, Progress

if TYPE_CHECKING:
    import torch

DTYPES = dtypes.SAFETENSORS
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
TOKENIZER_FOLDERS = ("tokenizer", "tokenizer_2")
WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model"}


def st_to_torch(dtype: str) -> torch.dtype:
    import torch

    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}[dtype]


def out_dtype(src: str, target: str | None) -> str:
    """The dtype a tensor is written in: ``target`` (a safetensors name) for float tensors, else unchanged."""
    return target if target and src in FLOAT_DTYPES else src


def _folder_text_files(folder: Path) -> dict[str, str]:
    files = {}
    for p in sorted(folder.glob("*")):
        if p.is_file() and p.suffix in (".json", ".txt") and p.stat().st_size < 8 * 1024 * 1024:
            files[p.name] = p.read_text()
    return files


def diffusers_layouts(ckpt: DiffusersCheckpoint, components: list[str]) -> Layouts:
    layouts = Layouts()
    if "unet" in components:
        layouts.unet = UnetLayout.from_config(ckpt.config("unet"))
    if "vae" in components:
        layouts.vae = VaeLayout.from_config(ckpt.config("vae"))
    for c in components:
        if c in layout(ckpt.family).text_components():
            layouts.text[c] = TextLayout.from_config(ckpt.config(c))
    return layouts


def diffusers_keymap(ckpt: DiffusersCheckpoint) -> tuple[KeyMap, list[str]]:
    components = [c for c in ckpt.components() if c in layout(ckpt.family).single_prefixes]
    keys = {c: ckpt.component_keys(c) for c in components}
    try:
        return keymap_from_diffusers(keys, ckpt.family, diffusers_layouts(ckpt, components)), components
    except FormatError as err:
        raise FormatError(str(err), path=ckpt.path) from None


class CarriedDefaults(Protocol):
    """A model's own defaults for the commands (its ``lorax.json``), which a conversion carries from folder to single
    file and back. ``io`` moves them without knowing them: the caller hands in the reader and writer
    (``lorax.services.common.MODEL_DEFAULTS``, over ``lorax.models.defaults``); without one nothing is carried."""

    def header_entries(self, folder: Path) -> dict[str, str]:
        """The single-file metadata entries for the defaults of the folder ``folder``."""
        ...

    def write_folder(self, folder: Path, metadata: Mapping[str, str], source: str) -> None:
        """Write the defaults a single file's ``metadata`` carries into the folder ``folder``."""
        ...


def single_file_metadata(
    ckpt: DiffusersCheckpoint, components: list[str], carry: CarriedDefaults | None = None
) -> dict[str, str]:
    configs: dict[str, Any] = {c: ckpt.config(c) for c in components}
    sched = ckpt.path / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        configs["scheduler"] = json.loads(sched.read_text())
    configs["model_index"] = ckpt.model_index
    tokenizers = {
        name: _folder_text_files(ckpt.path / name)
        for name in TOKENIZER_FOLDERS
        if (ckpt.path / name).is_dir()
    }
    meta = {META_FAMILY: ckpt.family, META_CONFIGS: json.dumps(configs, sort_keys=True)}
    if tokenizers:
        meta[META_TOKENIZER] = json.dumps(tokenizers, sort_keys=True)
    if carry is not None:
        meta.update(carry.header_entries(ckpt.path))  # the model's lorax.json travels along
    return meta


def write_single_file(
    ckpt: DiffusersCheckpoint,
    out: Path,
    *,
    dtype: str | None = None,
    progress: Progress | None = None,
    carry: CarriedDefaults | None = None,
) -> int:
    """Stream a diffusers folder into one original-layout safetensors file at ``out``; returns the tensor count."""
    progress = progress or NullProgress()
    keymap, components = diffusers_keymap(ckpt)
    target = DTYPES[dtype] if dtype else None
    specs = []
    for e in keymap.entries:
        src = ckpt.source(e.component)
        disk = [ckpt._disk_key(e.component, p) for p in e.parts]
        shape = single_shape(e, [src.shape(k) for k in disk])
        specs.append((e.single, out_dtype(src.dtype(disk[0]), target), shape))
    meta = single_file_metadata(ckpt, components, carry)
    with (
        StreamingWriter(out, specs, meta) as writer,
        progress.task("writing single file", total=len(specs)) as task,
    ):
        for e, (_, dt, _) in zip(keymap.entries, specs, strict=True):
            src = ckpt.source(e.component)
            disk = [ckpt._disk_key(e.component, p) for p in e.parts]
            if len(disk) == 1 and e.reshape != "transpose" and src.dtype(disk[0]) == dt:
                writer.write(e.single, src.raw(disk[0]))
            else:
                tensor = join_parts(e, [src.get(k) for k in disk])
                writer.write(e.single, tensor.to(st_to_torch(dt)) if dt in FLOAT_DTYPES else tensor)
            task.advance()
    return len(specs)


def single_file_configs(ckpt: SingleFileCheckpoint, config_from: str | Path | None = None) -> dict[str, Any]:
    """Component configs (and tokenizer files) to rebuild a diffusers folder from a single file.

    Order: ``config_from`` (a diffusers folder or Hub id), the file's own lorax metadata, the family's reference repo
    in the local Hugging Face cache. Raises a ``ModelNotFoundError`` saying what to pass when none is available.
    """
    if config_from is not None:
        ref = open_checkpoint(config_from)
        if not isinstance(ref, DiffusersCheckpoint):
            raise ConfigError("--config-from must be a diffusers folder or Hub id, not a single file")
        if ref.family != ckpt.family:
            raise ConfigError(f"--config-from is a {ref.family} model but the checkpoint is {ckpt.family}")
        return _configs_of_folder(ref.path)
    own = ckpt.configs()
    if own:
        tokenizers = json.loads(ckpt.metadata.get(META_TOKENIZER, "{}"))
        return {"configs": own, "tokenizers": tokenizers}
    repo = layout(ckpt.family).reference_repo
    if repo is None:
        raise ModelNotFoundError(
            f"{ckpt.path}: this {ckpt.family} single file carries no configs and its family names no reference "
            "model; pass --config-from with a diffusers folder of the same family"
        )
    try:
        folder = hub_snapshot(repo, ["model_index.json", "*/*.json", "*/*.txt"])
    except ModelNotFoundError:
        raise ModelNotFoundError(
            f"{ckpt.path}: this {ckpt.family} single file carries no configs, and the reference model {repo} "
            "is not in the local Hugging Face cache; pass --config-from with a diffusers folder of the same family"
        ) from None
    return _configs_of_folder(folder)


def _configs_of_folder(folder: Path) -> dict[str, Any]:
    configs: dict[str, Any] = {}
    for c in all_components():
        p = folder / c / "config.json"
        if p.is_file():
            configs[c] = json.loads(p.read_text())
    sched = folder / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        configs["scheduler"] = json.loads(sched.read_text())
    index = folder / "model_index.json"
    if index.is_file():
        configs["model_index"] = json.loads(index.read_text())
    tokenizers = {t: _folder_text_files(folder / t) for t in TOKENIZER_FOLDERS if (folder / t).is_dir()}
    return {"configs": configs, "tokenizers": tokenizers}


def single_keymap(ckpt: SingleFileCheckpoint, configs: dict[str, Any]) -> KeyMap:
    from lorax.io.keymaps import keymap_from_single

    layouts = Layouts()
    if "unet" in configs:
        layouts.unet = UnetLayout.from_config(configs["unet"])
    if "vae" in configs:
        layouts.vae = VaeLayout.from_config(configs["vae"])
    for c in layout(ckpt.family).text_components():
        if c in configs:
            layouts.text[c] = TextLayout.from_config(configs[c])
    return keymap_from_single(ckpt.keys(), ckpt.family, layouts)


def text_disk_key(component: str, key: str, configs: dict[str, Any]) -> str:
    """How transformers ≥ 5 names a text-encoder tensor on disk: ``CLIPTextModel`` without ``text_model.``."""
    cls = (configs.get(component) or {}).get("architectures", ["CLIPTextModel"])[0]
    if cls == "CLIPTextModel" and key.startswith("text_model."):
        return key[len("text_model.") :]
    return key


def write_diffusers_folder(
    ckpt: SingleFileCheckpoint,
    out: Path,
    *,
    dtype: str | None = None,
    config_from: str | Path | None = None,
    progress: Progress | None = None,
    carry: CarriedDefaults | None = None,
) -> dict[str, int]:
    """Stream an original-layout single file into a diffusers folder at ``out`` (an existing empty folder)."""
    progress = progress or NullProgress()
    found = single_file_configs(ckpt, config_from)
    configs, tokenizers = found["configs"], found["tokenizers"]
    keymap = single_keymap(ckpt, configs)
    target = DTYPES[dtype] if dtype else None
    src = ckpt.source
    counts: dict[str, int] = {}
    components = [c for c in layout(ckpt.family).components if c in keymap.components()]
    missing = [c for c in components if c not in configs]
    if missing:
        raise ConfigError(f"no config for {', '.join(missing)}; pass --config-from a diffusers folder")
    with progress.task("writing diffusers folder", total=len(keymap.entries)) as task:
        for c in components:
            entries = [e for e in keymap.entries if e.component == c]
            specs = []
            for e in entries:
                dt = out_dtype(src.dtype(e.single), target)
                for part, shape in zip(e.parts, part_shapes(e, src.shape(e.single)), strict=True):
                    specs.append((text_disk_key(c, part, configs), dt, shape))
            folder = out / c
            folder.mkdir(parents=True, exist_ok=True)
            name = WEIGHT_NAMES.get(c, "model") + ".safetensors"
            with StreamingWriter(folder / name, specs, {"format": "pt"}) as writer:
                for e in entries:
                    dt = out_dtype(src.dtype(e.single), target)
                    if len(e.parts) == 1 and e.reshape != "transpose" and src.dtype(e.single) == dt:
                        writer.write(text_disk_key(c, e.parts[0], configs), src.raw(e.single))
                    else:
                        tensors = split_single(e, src.get(e.single))
                        for part, t in zip(e.parts, tensors, strict=True):
                            t = t.to(st_to_torch(dt)) if dt in FLOAT_DTYPES else t
                            writer.write(text_disk_key(c, part, configs), t)
                    task.advance()
            (folder / "config.json").write_text(json.dumps(configs[c], indent=2, sort_keys=True) + "\n")
            counts[c] = len(specs)
    if "scheduler" in configs:
        (out / "scheduler").mkdir(exist_ok=True)
        (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(configs["scheduler"], indent=2))
    for name, files in tokenizers.items():
        (out / name).mkdir(exist_ok=True)
        for fname, text in files.items():
            (out / name / fname).write_text(text)
    index = dict(configs.get("model_index") or layout(ckpt.family).model_index)
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if carry is not None:
        carry.write_folder(out, ckpt.metadata, str(ckpt.path))
    return counts


def single_file_state_dicts(
    ckpt: SingleFileCheckpoint, configs: dict[str, Any]
) -> dict[str, dict[str, torch.Tensor]]:
    """In memory: every component's diffusers state dict (text encoders keyed as transformers ≥ 5 loads them)."""
    keymap = single_keymap(ckpt, configs)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for e in keymap.entries:
        tensors = split_single(e, ckpt.source.get(e.single))
        for part, t in zip(e.parts, tensors, strict=True):
            out.setdefault(e.component, {})[text_disk_key(e.component, part, configs)] = t
    return out


def copy_tree_files(src: Path, dst: Path, skip_suffixes: tuple[str, ...] = ()) -> None:
    """Copy a folder's non-weight files (configs, tokenizer, scheduler), keeping its structure."""
    for p in src.rglob("*"):
        if p.is_file() and not p.name.endswith(skip_suffixes):
            target = dst / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(p, target)
