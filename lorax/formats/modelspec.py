"""The Stability AI model-spec (``modelspec.*`` header keys) as kohya's ``library/sai_model_spec.py`` writes it.

Sites and UIs (Civitai, ComfyUI, SwarmUI, A1111) read these keys to show a LoRA's title, base architecture,
resolution and trigger phrase. Values are strings; architecture ids name the base model then ``/lora``.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

SPEC_VERSION = "1.0.1"
IMPL_STABILITY_AI = "https://github.com/Stability-AI/generative-models"
IMPL_DIFFUSERS = "diffusers"

_ARCHITECTURES = {
    "sd1": "stable-diffusion-v1",
    "sd2": "stable-diffusion-v2-512",
    "sd2-v": "stable-diffusion-v2-768-v",
    "sdxl": "stable-diffusion-xl-v1-base",
}
_RESOLUTIONS = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024}


def _key(family: str | None, v_prediction: bool) -> str | None:
    if family == "sd2" and v_prediction:
        return "sd2-v"
    return family if family in _ARCHITECTURES else None


def architecture(family: str | None, *, v_prediction: bool = False, adapter: str = "lora") -> str | None:
    """``stable-diffusion-v1/lora`` and the like (kohya's ``determine_architecture``); None for other families."""
    key = _key(family, v_prediction)
    return None if key is None else f"{_ARCHITECTURES[key]}/{adapter}"


def modelspec(
    family: str | None,
    *,
    title: str,
    v_prediction: bool = False,
    resolution: int | tuple[int, int] | None = None,
    trigger_phrase: str | None = None,
    timestamp: float | None = None,
    adapter: str = "lora",
    extra: Mapping[str, str | None] | None = None,
) -> dict[str, str]:
    """The ``modelspec.*`` keys of a LoRA (or ``adapter="textual-inversion"``) for ``family``."""
    from lorax import __version__

    key = _key(family, v_prediction)
    arch = architecture(family, v_prediction=v_prediction, adapter=adapter)
    if resolution is None and key is not None:
        resolution = _RESOLUTIONS[key]
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    stamp = datetime.datetime.now() if timestamp is None else datetime.datetime.fromtimestamp(int(timestamp))
    # kohya: (lora and sdxl) or textual inversion → the Stability implementation, else diffusers
    impl = IMPL_STABILITY_AI if family == "sdxl" or adapter == "textual-inversion" else IMPL_DIFFUSERS
    values: dict[str, str | None] = {
        "modelspec.sai_model_spec": SPEC_VERSION,
        "modelspec.architecture": arch,
        "modelspec.implementation": impl,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}" if resolution else None,
        "modelspec.date": stamp.isoformat(),
        "modelspec.prediction_type": ("v" if v_prediction else "epsilon") if key is not None else None,
        "modelspec.trigger_phrase": trigger_phrase or None,
        "modelspec.implementation_version": f"lorax/{__version__}",
        **dict(extra or {}),
    }
    return {k: v for k, v in values.items() if v is not None}
