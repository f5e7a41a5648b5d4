"""Weightless copies of a model's UNet and text encoder(s): the real diffusers / transformers classes built on the
meta device, so that module paths, shapes *and class names* are the model's own (lora_diffusion's index order walks
class names), at no memory cost and without reading a single weight.

* ``skeleton(pipe)``: from a loaded pipeline (a LoRA-injected one too: the copies have no LoRA layers).
* ``skeleton_from_configs(configs)``: from component configs (``{"unet": {...}, "text_encoder": {...}}``).
* ``load_skeleton(spec, config_from=None)``: from a model spec as ``--model`` takes it (built-in name, diffusers
  folder, Hub id in the local cache, single file), reading configs only; returns the modules and the family.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from lorax.models import families

if TYPE_CHECKING:
    import torch

# ``{component: its meta-device module}`` (the real diffusers / transformers class, no weights).
Skeleton: TypeAlias = "dict[str, torch.nn.Module]"


def skeleton(pipe: Any) -> Skeleton:
    """Meta-device copies of the pipeline's UNet and text encoder(s) (no weights, no LoRA layers)."""
    import torch

    out: Skeleton = {}
    with torch.device("meta"):
        out["unet"] = type(pipe.unet).from_config(pipe.unet.config)
        for name in families.all_text_components():
            module = getattr(pipe, name, None)
            if module is not None:
                out[name] = type(module)(module.config)
    return out


def _build(component: str, config: Mapping[str, Any]) -> torch.nn.Module:
    if component == "unet":
        import diffusers

        cls = getattr(diffusers, str(config.get("_class_name") or "UNet2DConditionModel"))
        return cls.from_config(dict(config))
    import transformers

    arch = (config.get("architectures") or ["CLIPTextModel"])[0]
    cls = getattr(transformers, str(arch))
    fields = {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}
    return cls(transformers.CLIPTextConfig(**fields))


def skeleton_from_configs(configs: Mapping[str, Mapping[str, Any]]) -> Skeleton:
    """Meta-device UNet and text encoder(s) from their configs (components without a config are left out)."""
    import torch

    with torch.device("meta"):
        return {c: _build(c, configs[c]) for c in families.all_components() if configs.get(c)}


def load_skeleton(spec: str | Path, config_from: str | Path | None = None) -> tuple[Skeleton, str]:
    """``({component: meta module}, family)`` for a model spec, from its configs alone.

    A single file takes its configs as ``lorax convert`` does: the ones lorax wrote into its header, ``config_from``,
    or the family's reference model in the local Hugging Face cache (else a ``ModelNotFoundError`` naming
    ``--config-from``).
    """
    from lorax.io.checkpoint import DiffusersCheckpoint, open_checkpoint

    ckpt = open_checkpoint(spec)
    configs: dict[str, Any]
    if isinstance(ckpt, DiffusersCheckpoint):
        configs = {
            c: ckpt.config(c)
            for c in families.get(ckpt.family).component_names()
            if (ckpt.path / c / "config.json").is_file()
        }
    else:
        from lorax.io.model_layout import single_file_configs

        configs = single_file_configs(ckpt, config_from)["configs"]
    return skeleton_from_configs(configs), ckpt.family
