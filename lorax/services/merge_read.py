"""Reading the LoRAs of a merge into a model: by the torch path (``load_loras``: any format, resolved against the
base by ``lorax.adapters.merge_inputs.read_for_base``) or, where the merge needs no torch, as numpy arrays
(``load_array_loras``, ``lorax.adapters.array_inputs``); each with its scales from the command line.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorax.adapters.merge_inputs import base_index_model, read_for_base
from lorax.errors import InputError
from lorax.io.checkpoint import Checkpoint, model_skeleton
from lorax.progress import Progress
from lorax.services.common import LoraSpec

if TYPE_CHECKING:
    from lorax.adapters.array_merge import ArrayState
    from lorax.adapters.state import LoraState
    from lorax.services.merge import MergeConfig

# (path, state, alpha, alpha_text, format) per LoRA; ArrayState: read as numpy arrays for a merge without torch
Loras = list[tuple[str, "LoraState | ArrayState", float, float, str]]


def load_loras(config: MergeConfig, ckpt: Checkpoint, progress: Progress) -> Loras:
    """Read every LoRA against the base (``lorax.adapters.merge_inputs.read_for_base``: names resolved against the
    base's own modules, index files against the base built with its real classes), with its scales."""
    from lorax.formats import detect_format
    from lorax.io.rewrite import single_thread

    out: Loras = []
    with single_thread():  # checks over the LoRA's weights: torch's thread pool spins on a busy machine
        skeleton, index_model = model_skeleton(ckpt), base_index_model(config.base)
        for text in config.loras:
            spec = LoraSpec.parse(text)
            if not spec.path.exists():
                raise InputError("no such file", path=spec.path)
            fmt = detect_format(spec.path)
            state = read_for_base(spec.path, fmt, ckpt.family, str(config.base), skeleton, index_model)
            out.append(_scaled(config, spec, state, fmt))
    return _logged(out, progress)


def load_array_loras(config: MergeConfig, ckpt: Checkpoint, progress: Progress) -> Loras | None:
    """The LoRAs of a merge that needs no torch, read as numpy arrays (``lorax.adapters.array_inputs``); ``None``
    where the merge needs torch."""
    from lorax.adapters.array_inputs import base_skeleton, read_lora

    skeleton = base_skeleton(ckpt, config.dtype)
    if skeleton is None:
        return None
    out: Loras = []
    for text in config.loras:
        spec = LoraSpec.parse(text)
        state = read_lora(spec.path, ckpt.family, skeleton)
        if state is None:
            return None
        out.append(_scaled(config, spec, state, "kohya"))
    return _logged(out, progress)


def _scaled(
    config: MergeConfig, spec: LoraSpec, state: LoraState | ArrayState, fmt: str
) -> tuple[str, LoraState | ArrayState, float, float, str]:
    alpha = (1.0 if config.alpha is None else config.alpha) if spec.alpha is None else spec.alpha
    alpha_text = alpha if config.alpha_text is None else config.alpha_text
    return (str(spec.path), state, alpha, alpha_text, fmt)


def _logged(loras: Loras, progress: Progress) -> Loras:
    for path, state, _, _, fmt in loras:
        progress.log(
            f"{path}: {fmt}, {len(state.modules)} modules"
            + (f", {len(state.embeddings)} tokens" if state.embeddings else "")
        )
    return loras
