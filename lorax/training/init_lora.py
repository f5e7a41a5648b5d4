"""``--init-lora FILE``: start training from an existing LoRA (kohya's ``network_weights``).

Any LoRA file lorax reads (kohya / A1111, diffusers / PEFT, lora_diffusion) gives the starting weights. The file's
modules must be exactly those the flags train (``--targets``, ``--train-text``) at ``--rank``; otherwise one line
says what differs and which flag to pass. A file whose alpha differs from ``--network-alpha`` starts from the same
LoRA: its up weights are scaled by ``file alpha / alpha`` so that ``(alpha / r) · up @ down`` is unchanged (diffusers
files fold ``alpha / r`` into their up weights and read back with ``alpha = r``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorax.errors import MismatchError


def initial_lora(
    path: Path,
    pipe: Any,
    targets: dict[str, list[str]],
    *,
    rank: int,
    alpha: float,
    family: str,
    log: Any = None,
) -> dict[str, dict[str, Any]]:
    """``{component: {PEFT key (<live path>.lora_A.weight …): tensor}}`` from ``path``, checked against the run.

    ``pipe`` is the base pipeline before injection (its module names resolve kohya's names); ``targets`` the live
    module paths per component that this run trains.
    """
    from lorax.adapters.state import LoraModule
    from lorax.formats import load_lora
    from lorax.models.families import live_to_disk

    where = f"--init-lora {path}"
    state = load_lora(path, model=pipe, family=family)
    if not state.modules:
        raise MismatchError(f"{where}: the file holds no LoRA modules (token embeddings alone start nothing)")
    if state.family and state.family != family:
        raise MismatchError(f"{where}: a {state.family} LoRA, but the model is {family}")
    other = sorted({type(m).__name__ for m in state.modules.values() if not isinstance(m, LoraModule)})
    if other:
        raise MismatchError(
            f"{where}: holds {', '.join(other)} modules; only plain LoRA pairs can start a run"
        )
    wanted = {f"{c}.{live_to_disk(c, p)}": (c, p) for c, paths in targets.items() for p in paths}
    have = set(state.modules)
    missing, extra = sorted(set(wanted) - have), sorted(have - set(wanted))
    if missing or extra:
        components = sorted({k.split(".", 1)[0] for k in have})
        hint = (
            "pass --train-text"
            if any(c.startswith("text_encoder") for c in components) and "text_encoder" not in targets
            else "pass the --targets (and --train-text) it was trained with"
        )
        parts = []
        if extra:
            parts.append(f"{len(extra)} of its modules are not trained here (e.g. {extra[0]})")
        if missing:
            parts.append(f"{len(missing)} trained modules are not in it (e.g. {missing[0]})")
        raise MismatchError(f"{where}: {'; '.join(parts)}; {hint}")
    ranks = sorted({m.rank for m in state.modules.values() if isinstance(m, LoraModule)})
    if ranks != [rank]:
        said = ", ".join(str(r) for r in ranks)
        fix = f"pass --rank {ranks[0]}" if len(ranks) == 1 else "its modules have different ranks"
        raise MismatchError(f"{where}: rank {said}, not --rank {rank}; {fix}")
    out: dict[str, dict[str, Any]] = {c: {} for c in targets}
    rescaled: set[float] = set()
    for key, module in state.modules.items():
        assert isinstance(module, LoraModule) and module.alpha is not None
        component, live = wanted[key]
        factor = module.alpha / alpha
        if factor != 1.0:
            rescaled.add(module.alpha)
        out[component][f"{live}.lora_A.weight"] = module.down.float()
        out[component][f"{live}.lora_B.weight"] = module.up.float() * factor
    if rescaled and log is not None:
        alphas = ", ".join(f"{a:g}" for a in sorted(rescaled))
        log(
            f"{where}: alpha {alphas} in the file, --network-alpha {alpha:g} here: up weights rescaled (same LoRA)"
        )
    return out
