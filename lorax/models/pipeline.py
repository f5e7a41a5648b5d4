"""``load_pipeline(spec)``: a diffusers pipeline from a diffusers folder, a Hub id, a built-in name or a single file.

Single files are converted in memory with lorax's key tables and the configs the file carries (lorax writes them
into the header), a ``config_from`` folder, or the family's reference model in the local Hugging Face cache; never
through ``from_single_file`` (which would download configs).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax import dtypes
from lorax.errors import ConfigError, FormatError, LoraxError
from lorax.io.checkpoint import DiffusersCheckpoint, SingleFileCheckpoint, open_checkpoint

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = dtypes.LONG_NAMES
# A model this big (on disk) takes seconds to read: commands say "loading model …" first (the built-in and tiny
# test models, a few MB, load at once and say nothing).
SLOW_LOAD_BYTES = 64 * 2**20


def load_is_slow(spec: str | Path) -> bool:
    """Whether loading ``spec`` is worth announcing: a local model of ``SLOW_LOAD_BYTES`` or more, or a Hub id."""
    from lorax.models.defaults import local_model_path

    path = local_model_path(spec)
    if path is None:
        text = str(spec)
        looks_local = Path(text.split("/")[0]).expanduser().is_dir()  # `models/mine`: a missing local path
        return (
            text.count("/") == 1
            and not text.startswith((".", "/", "~"))
            and not Path(text).suffix
            and not looks_local
        )
    if path.is_file():
        return path.stat().st_size >= SLOW_LOAD_BYTES
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) >= SLOW_LOAD_BYTES


def torch_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp16"``/``"bf16"``/``"fp32"``, a torch dtype, or None → a torch dtype or None."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = DTYPE_NAMES.get(str(dtype), str(dtype).removeprefix("torch."))
    found = getattr(torch, name, None)
    if not isinstance(found, torch.dtype):
        raise ConfigError(f"unknown dtype {dtype!r}; use fp16, bf16 or fp32")
    return found


def load_pipeline(
    spec: str | Path,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    *,
    config_from: str | Path | None = None,
) -> Any:
    """A ready ``StableDiffusionPipeline`` (or XL) for ``spec``; ``dtype`` and ``device`` applied when given."""
    ckpt = open_checkpoint(spec)
    dt = torch_dtype(dtype)
    if isinstance(ckpt, DiffusersCheckpoint):
        pipe = _from_folder(ckpt, dt)
    else:
        pipe = _from_single_file(ckpt, dt, config_from)
    if device is not None:
        pipe = pipe.to(device)
    return pipe


def _pipeline_class(family: str, index: dict[str, Any] | None) -> Any:
    import diffusers

    from lorax.models import families

    name = (index or {}).get("_class_name") or families.get(family).pipelines["txt2img"]
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise FormatError(f"unknown pipeline class {name}")
    return cls


def _from_folder(ckpt: DiffusersCheckpoint, dtype: torch.dtype | None) -> Any:
    cls = _pipeline_class(ckpt.family, ckpt.model_index)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if "safety_checker" in ckpt.model_index and (ckpt.model_index["safety_checker"] or [None])[0] is None:
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    import pickle
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # the filters in force still choose what is kept
        try:
            pipe = cls.from_pretrained(ckpt.path, **kwargs)
        except pickle.UnpicklingError as err:  # a component's pickle that torch's weights-only loader refused
            from lorax.io.pickle_safe import refusal, weights_only_detail

            detail = weights_only_detail(err)
            if detail is None:
                raise
            # the libraries' advice (weights_only=False) and warnings stay below lorax's own line: not shown
            raise refusal(_pickled_weights(ckpt.path), detail) from None
    for w in caught:  # a load that worked shows what the libraries had to say, as it would have
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    return pipe


def _pickled_weights(folder: Path) -> Path:
    """The pickle a model folder's components were read from (the first, when several are)."""
    from lorax.io.pickle_safe import PICKLE_WEIGHTS

    found = sorted(p for p in Path(folder).glob("*/*") if p.suffix.lower() in PICKLE_WEIGHTS)
    return found[0] if found else Path(folder)


def _component_model(name: str, config: dict[str, Any], index: dict[str, Any] | None) -> Any:
    """An empty (meta-device) model for component ``name`` of a single file: the class its pipeline's
    ``model_index.json`` names (a diffusers model or a transformers text encoder), else its config's."""
    import importlib

    from accelerate import init_empty_weights

    library, class_name = ((index or {}).get(name) or [None, None])[:2]
    if class_name is None:
        if "architectures" in config:
            library, class_name = "transformers", config["architectures"][0]
        else:
            library = "diffusers"
            class_name = config.get(
                "_class_name", "UNet2DConditionModel" if name == "unet" else "AutoencoderKL"
            )
    cls = getattr(importlib.import_module(library), class_name, None)
    if cls is None:
        raise FormatError(f"{name}: unknown model class {library}.{class_name}")
    with init_empty_weights():
        if library == "diffusers":
            return cls.from_config({k: v for k, v in config.items() if k != "architectures"})
        return cls(cls.config_class(**{k: v for k, v in config.items() if not k.startswith("_")}))


def _tokenizer(name: str, folder: Path, index: dict[str, Any] | None) -> Any:
    import transformers

    class_name = ((index or {}).get(name) or [None, "CLIPTokenizer"])[1] or "CLIPTokenizer"
    return getattr(transformers, class_name, transformers.AutoTokenizer).from_pretrained(folder)


def _from_single_file(
    ckpt: SingleFileCheckpoint, dtype: torch.dtype | None, config_from: str | Path | None
) -> Any:
    import diffusers

    from lorax.io.model_layout import single_file_configs, single_file_state_dicts

    found = single_file_configs(ckpt, config_from)
    configs, tokenizers = found["configs"], found["tokenizers"]
    index = configs.get("model_index")
    states = single_file_state_dicts(ckpt, configs)
    components: dict[str, Any] = {}
    for name, state in states.items():
        model = _component_model(name, configs[name], index)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            shown = ", ".join((missing + unexpected)[:3])
            raise FormatError(
                f"{name}: the single file does not fill the model ({len(missing)} missing, "
                f"{len(unexpected)} unexpected: {shown})",
                path=ckpt.path,
            )
        components[name] = model.eval()
    cls = _pipeline_class(ckpt.family, index)
    from lorax.models import families

    family = families.get(ckpt.family)
    absent = [c for c in family.checkpoint.components if c not in components]
    if absent:  # a transformer-only file (Flux's BFL layout): the rest from a diffusers folder of the family
        return _completed(ckpt, cls, components, absent, dtype, config_from)
    with tempfile.TemporaryDirectory() as tmp:
        for tok_name, files in tokenizers.items():
            folder = Path(tmp) / tok_name
            folder.mkdir()
            for fname, text in files.items():
                (folder / fname).write_text(text)
            components[tok_name] = _tokenizer(tok_name, folder, index)
    if "tokenizer" not in components:
        raise FormatError(
            "no tokenizer for this single file; pass config_from a diffusers folder", path=ckpt.path
        )
    sched_config = dict(configs.get("scheduler") or {})
    sched_cls = getattr(diffusers, sched_config.get("_class_name", "DDIMScheduler"))
    components["scheduler"] = sched_cls.from_config(sched_config)
    if "safety_checker" in family.checkpoint.model_index:  # SD1/SD2 pipelines take one
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = cls(**components)
    if dtype is not None:
        pipe = pipe.to(dtype=dtype)
    return pipe


def _completed(
    ckpt: SingleFileCheckpoint,
    cls: Any,
    components: dict[str, Any],
    absent: list[str],
    dtype: torch.dtype | None,
    config_from: str | Path | None,
) -> Any:
    """``cls`` with the file's ``components`` and the ``absent`` ones (VAE, text encoders, tokenizers, scheduler)
    read from ``config_from`` or the family's reference model in the local Hugging Face cache."""
    from lorax.io.checkpoint_layouts import layout

    reference: str | Path | None = config_from or layout(ckpt.family).reference_repo
    hint = (
        f"this {ckpt.family} single file holds only its {', '.join(components) or 'denoiser'} (no "
        f"{', '.join(absent)}); pass --config-from with a diffusers {ckpt.family} folder or Hub id to take them from"
    )
    if reference is None:
        raise FormatError(hint, path=ckpt.path)
    try:
        ref = open_checkpoint(reference)
    except LoraxError as err:
        why = str(err) if config_from else f"the reference model {reference} is not available here"
        raise FormatError(f"{hint} ({why})", path=ckpt.path) from None
    if not isinstance(ref, DiffusersCheckpoint) or ref.family != ckpt.family:
        raise FormatError(hint, path=ckpt.path)
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    pipe = cls.from_pretrained(ref.path, **components, **kwargs)
    if dtype is not None:
        pipe = pipe.to(dtype=dtype)
    return pipe
