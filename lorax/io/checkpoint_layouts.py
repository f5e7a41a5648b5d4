"""What ``io`` knows of a model family's checkpoints, as data: one ``CheckpointLayout`` per family.

``io`` does not import ``lorax.models``: a family (``lorax.models.families``) owns a ``CheckpointLayout`` and
registering the family registers its layout here. The built-in families' layouts (SD1, SD2, SDXL, Flux) are defined
and registered in this module so that ``io`` works on its own, with no import of ``lorax.models`` to fill it; a new
family builds its layout in its own module.

The two rules below read only these layouts: ``family_from_single_keys`` (a single file's keys) and
``family_from_configs`` (a diffusers folder's configs). ``lorax.models.families.detect`` is the one entry point that
combines them with the other evidence (LoRA keys, headers, live pipelines).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lorax.errors import FormatError

# A single-file component's key kinds: the UNet and VAE map by block rules, ``clip`` keeps transformers names under
# a prefix, ``openclip`` is OpenCLIP's layout (fused ``attn.in_proj_weight``), ``flux`` the BFL Flux transformer
# (``lorax.io.keymaps.flux``: bare in its own file, under ``model.diffusion_model.`` in all-in-one files).
SINGLE_KINDS = ("unet", "vae", "clip", "openclip", "flux")
# The header key stating a file's family (LoRAs and single files alike), then the older spelling single files had.
META_FAMILY_KEYS = ("lorax_family", "lorax.family")


@dataclass(frozen=True)
class CheckpointLayout:
    """A family's checkpoints: folder components, single-file key layout and the evidence that identifies them.

    Attributes:
        family: the family's name (``sd1`` …).
        components: diffusers components holding weights, in the order lorax lists them.
        single_prefixes: ``{component: (single-file key prefix, kind)}`` (kinds: ``SINGLE_KINDS``).
        text_projection: whether the OpenCLIP encoder's ``text_projection`` maps (SDXL's second encoder).
        single_markers: key prefixes (or whole keys) of a single file that only this family has.
        cross_attention_dim: the UNet's cross-attention width (the evidence when nothing else tells).
        folder_markers: ``model_index.json`` components only this family has (``text_encoder_2`` for SDXL).
        pipeline_markers: substrings of a ``model_index.json`` ``_class_name`` only this family's pipelines have.
        pipeline_names: substrings of the ``_class_name`` this family's folders may declare (besides the generic
            ``DiffusionPipeline``).
        text_hidden_act: the first text encoder's ``hidden_act`` (tells sd1 from sd2 without a UNet config).
        linear_projection: the UNet's ``use_linear_projection``.
        openclip_layers: ``{component: layers}`` the diffusers OpenCLIP encoder keeps (SD2 drops the last one),
            for single files that carry no config.
        reference_repo: the Hub repo whose configs complete a single file that carries none.
        model_index: the ``model_index.json`` written for a folder converted from a single file without one.
    """

    family: str
    components: tuple[str, ...]
    single_prefixes: Mapping[str, tuple[str, str]]
    cross_attention_dim: int
    text_projection: bool = False
    single_markers: tuple[str, ...] = ()
    folder_markers: tuple[str, ...] = ()
    pipeline_markers: tuple[str, ...] = ()
    pipeline_names: tuple[str, ...] = ("StableDiffusion",)
    text_hidden_act: str | None = None
    linear_projection: bool = False
    openclip_layers: Mapping[str, int] = field(default_factory=dict)
    reference_repo: str | None = None
    model_index: Mapping[str, Any] = field(default_factory=dict)

    def text_components(self) -> tuple[str, ...]:
        """The text encoders, in order."""
        return tuple(c for c, (_, kind) in self.single_prefixes.items() if kind in ("clip", "openclip"))

    def lora_components(self) -> tuple[str, ...]:
        """The components a LoRA may target (the UNet and the text encoders), in order."""
        return tuple(c for c, (_, kind) in self.single_prefixes.items() if kind != "vae")


_SD_INDEX: dict[str, Any] = {
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
_SD_SINGLE = {
    "unet": ("model.diffusion_model.", "unet"),
    "vae": ("first_stage_model.", "vae"),
}

SD1 = CheckpointLayout(
    family="sd1",
    components=("unet", "vae", "text_encoder"),
    single_prefixes={**_SD_SINGLE, "text_encoder": ("cond_stage_model.transformer.", "clip")},
    cross_attention_dim=768,
    single_markers=("cond_stage_model.transformer.",),
    text_hidden_act="quick_gelu",
    reference_repo="stable-diffusion-v1-5/stable-diffusion-v1-5",
    model_index={
        "_class_name": "StableDiffusionPipeline",
        **_SD_INDEX,
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    },
)
# SD2: SD1's layout with an OpenCLIP text encoder (diffusers keeps 23 of its 24 layers) and linear projections.
SD2 = replace(
    SD1,
    family="sd2",
    single_prefixes={**_SD_SINGLE, "text_encoder": ("cond_stage_model.model.", "openclip")},
    cross_attention_dim=1024,
    single_markers=("cond_stage_model.model.",),
    text_hidden_act="gelu",
    linear_projection=True,
    openclip_layers={"text_encoder": 23},
    reference_repo="stabilityai/stable-diffusion-2-1",
)
SDXL = CheckpointLayout(
    family="sdxl",
    components=("unet", "vae", "text_encoder", "text_encoder_2"),
    single_prefixes={
        **_SD_SINGLE,
        "text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
        "text_encoder_2": ("conditioner.embedders.1.model.", "openclip"),
    },
    cross_attention_dim=2048,
    text_projection=True,
    single_markers=("conditioner.embedders.1.model.", "model.diffusion_model.label_emb.0.0.weight"),
    folder_markers=("text_encoder_2",),
    pipeline_markers=("XL",),
    linear_projection=True,
    openclip_layers={"text_encoder_2": 32},
    reference_repo="stabilityai/stable-diffusion-xl-base-1.0",
    model_index={
        "_class_name": "StableDiffusionXLPipeline",
        **_SD_INDEX,
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
    },
)

# Flux.1: the BFL transformer file (bare keys; all-in-one files under ``model.diffusion_model.``, found by the
# rules), CLIP-L and T5. Its markers are keys only a Flux transformer checkpoint has (a LoRA has ``double_blocks.``
# names too).
FLUX = CheckpointLayout(
    family="flux",
    components=("transformer", "vae", "text_encoder", "text_encoder_2"),
    single_prefixes={"transformer": ("", "flux")},
    single_markers=("img_in.weight", "model.diffusion_model.img_in.weight"),
    cross_attention_dim=4096,  # the transformer's joint_attention_dim (T5's width)
    folder_markers=("transformer",),
    pipeline_markers=("Flux",),
    pipeline_names=("Flux",),
    reference_repo="black-forest-labs/FLUX.1-dev",
    model_index={
        "_class_name": "FluxPipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    },
)

LAYOUTS: dict[str, CheckpointLayout] = {}


def register_layout(layout: CheckpointLayout) -> None:
    """Make ``layout`` known to ``io`` (``lorax.models.families.register`` calls this)."""
    LAYOUTS[layout.family] = layout


def unregister_layout(family: str) -> None:
    LAYOUTS.pop(family, None)


for _builtin in (SD1, SD2, SDXL, FLUX):  # the built-in families' (their Family objects hold the same)
    register_layout(_builtin)


def layout(family: str) -> CheckpointLayout:
    """The layout of ``family``; a ``FormatError`` naming the known ones when there is none."""
    if family not in LAYOUTS:
        raise FormatError(f"no single-file key tables for model family {family!r} (known: {_known(', ')})")
    return LAYOUTS[family]


def all_components() -> tuple[str, ...]:
    """Every component a registered family's checkpoints hold, first-seen order (``unet``, ``vae``, …)."""
    seen: dict[str, None] = {}
    for lay in LAYOUTS.values():
        seen.update(dict.fromkeys(lay.components))
    return tuple(seen)


def _known(sep: str, last: str | None = None) -> str:
    names = list(LAYOUTS)
    if last is None or len(names) < 2:
        return sep.join(names)
    return sep.join(names[:-1]) + last + names[-1]


def _marks(marker: str, keys: Iterable[str], keyset: set[str]) -> bool:
    return marker in keyset or any(k.startswith(marker) for k in keys if marker.endswith("."))


def family_from_single_keys(
    keys: list[str], shape_of: Callable[[str], Any] | None = None, *, path: Path | None = None
) -> str:
    """The family of a single file in the original layout, from its keys (and the cross-attention width).

    A family whose ``single_markers`` appear wins; several (a variant that shares its parent's layout) are told
    apart by the UNet's cross-attention width; a file with no marker (UNet only) is named by that width alone.
    """
    keyset = set(keys)
    found = [lay for lay in LAYOUTS.values() if any(_marks(m, keys, keyset) for m in lay.single_markers)]
    probe = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    width = shape_of(probe)[-1] if probe in keyset and shape_of is not None else None
    if found:
        by_width = [lay for lay in found if lay.cross_attention_dim == width]
        return (by_width or found)[0].family
    if width is not None:
        for lay in LAYOUTS.values():
            if lay.cross_attention_dim == width:
                return lay.family
        widths = ", ".join(f"{lay.family}: {lay.cross_attention_dim}" for lay in LAYOUTS.values())
        raise FormatError(
            f"cannot tell the model family: no text encoder and a cross-attention width of {width} ({widths})",
            path=path,
        )
    prefixes = {k.split(".", 2)[0] + "." + k.split(".", 2)[1] if "." in k else k for k in keys}
    shown = ", ".join(sorted(prefixes)[:4])
    raise FormatError(
        f"not a Stable Diffusion checkpoint in a layout lorax knows ({_known(', ')}): "
        f"no model.diffusion_model / cond_stage_model keys (found {shown} …)",
        path=path,
    )


def family_from_configs(
    model_index: Mapping[str, Any],
    text_config: Mapping[str, Any] | None,
    unet_config: Mapping[str, Any] | None,
    *,
    path: Path | None = None,
) -> str:
    """The family of a diffusers folder from its ``model_index.json`` and its UNet / first text-encoder configs."""
    cls = str(model_index.get("_class_name", ""))
    layouts = list(LAYOUTS.values())
    for lay in layouts:  # a pipeline class only one family has (``…XL…``, ``Flux…``)
        if any(m in cls for m in lay.pipeline_markers):
            return lay.family
    for (
        lay
    ) in layouts:  # a component only one family has, beside that family's denoiser (Flux has a second text
        own = any(c in model_index for c in lay.folder_markers)  # encoder like SDXL, but no UNet)
        if own and (lay.components[0] in model_index or "_class_name" not in model_index):
            return lay.family
    if (
        cls
        and cls != "DiffusionPipeline"
        and not any(p in cls for lay in layouts for p in lay.pipeline_names)
    ):
        raise FormatError(f"unsupported pipeline {cls}; lorax knows {_known(', ', ' and ')}", path=path)
    # Families with components of their own (SDXL's second encoder) are out: the folder has none of them.
    candidates = [lay for lay in layouts if not lay.folder_markers]
    if not candidates:
        raise FormatError("cannot tell the model family (no family fits this folder)", path=path)
    width = (unet_config or {}).get("cross_attention_dim")
    for lay in candidates:
        if width == lay.cross_attention_dim:
            return lay.family
    if text_config is not None:
        act = text_config.get("hidden_act")
        return next((lay for lay in candidates if lay.text_hidden_act == act), candidates[0]).family
    if unet_config is not None and unet_config.get("use_linear_projection"):
        return next((lay for lay in candidates if lay.linear_projection), candidates[0]).family
    if unet_config is not None:
        return candidates[0].family
    raise FormatError("cannot tell the model family (no UNet or text-encoder config)", path=path)
