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


def _spec(family: str | None, v_prediction: bool) -> tuple[str, int] | None:
    """The family's ``(architecture id, resolution)`` (``Family.modelspec``); None for a family without one."""
    from lorax.models import families

    found = families.find(family)
    if found is None or not found.modelspec:
        return None
    return found.modelspec.get("v" if v_prediction else "epsilon") or found.modelspec["epsilon"]


def architecture(family: str | None, *, v_prediction: bool = False, adapter: str = "lora") -> str | None:
    """``stable-diffusion-v1/lora`` and the like (kohya's ``determine_architecture``); None for other families."""
    spec = _spec(family, v_prediction)
    return None if spec is None else f"{spec[0]}/{adapter}"


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
    from lorax.models import families

    key = _spec(family, v_prediction)
    arch = architecture(family, v_prediction=v_prediction, adapter=adapter)
    if resolution is None and key is not None:
        resolution = key[1]
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    stamp = datetime.datetime.now() if timestamp is None else datetime.datetime.fromtimestamp(int(timestamp))
    # kohya: (lora and sdxl) or textual inversion → the Stability implementation, else diffusers
    stability = getattr(families.find(family), "modelspec_implementation", "") == "stability"
    impl = IMPL_STABILITY_AI if stability or adapter == "textual-inversion" else IMPL_DIFFUSERS
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
