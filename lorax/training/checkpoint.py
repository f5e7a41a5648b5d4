"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a folder ``step-<N>/`` holding the trainable tensors (``weights.safetensors``, lossless fp32), the
optimizer, LR scheduler and gradient-scaler states, every RNG state, the step/epoch counters and the loss history
(``state.json``), and the run's resolved config (``config.toml``). Folders appear whole (written to a temporary name,
then renamed). ``--resume`` takes a checkpoint folder or the folder of checkpoints (its latest one).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lorax.errors import InputError, LoraxError, UnsafeFileError
from lorax.io.atomic import CHECKPOINT, atomic_path

STATE_FILE = "state.json"
WEIGHTS_FILE = "weights.safetensors"
PREFIX = "step-"


@dataclass
class LoopState:
    """Counters and history of a run; everything in it is JSON."""

    global_step: int = 0  # optimizer steps done
    micro_step: int = 0  # batches consumed (global_step × grad_accum)
    epoch: int = 0
    losses: list[list[float]] = field(default_factory=list)  # [step, loss, lr, training seconds so far]
    seconds: float = 0.0


@dataclass
class Checkpoint:
    path: Path
    state: LoopState
    tensors: dict[str, Any]
    optimizer: Any
    scheduler: Any
    scaler: Any
    rng: dict[str, Any]
    info: dict[str, Any]


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def rng_states() -> dict[str, Any]:
    import numpy as np
    import torch

    np_state: Any = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(states["torch"])
    keys = states["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, states["numpy_pos"], 0, 0.0))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    folder: Path,
    *,
    state: LoopState,
    tensors: dict[str, Any],
    optimizer: Any,
    scheduler: Any,
    scaler: Any = None,
    info: dict[str, Any] | None = None,
    config_toml: str | None = None,
    rng: dict[str, Any] | None = None,
) -> Path:
    """Write ``folder/step-<N>`` (replacing one of the same step) and return its path; ``rng``: the RNG states to
    store (default: the current ones)."""
    import torch
    from safetensors.torch import save_file

    out = Path(folder) / checkpoint_name(state.global_step)
    with atomic_path(out, force=True, directory=True, kind=CHECKPOINT) as tmp:
        save_file(
            {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE)
        )
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        torch.save(rng if rng is not None else rng_states(), tmp / "rng.pt")
        body = {"state": asdict(state), "info": info or {}}
        (tmp / STATE_FILE).write_text(json.dumps(body, indent=1), encoding="utf-8")
        if config_toml is not None:
            (tmp / "config.toml").write_text(config_toml, encoding="utf-8")
    return out


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the latest ``step-*`` inside a folder of checkpoints."""
    path = Path(path)
    if not path.exists():
        raise InputError("--resume: no such checkpoint folder", path=path)
    if (path / STATE_FILE).is_file():
        return path
    found = sorted(p for p in path.glob(PREFIX + "*") if (p / STATE_FILE).is_file())
    if not found:
        raise InputError(
            f"--resume: not a checkpoint (no {STATE_FILE}) and holds no {PREFIX}* checkpoints", path=path
        )
    return max(found, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(folder: Path) -> Path | None:
    try:
        return find_checkpoint(folder)
    except InputError:
        return None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by ``save_checkpoint`` (pickles only through ``load_pickle``)."""
    from safetensors.torch import load_file

    from lorax.io.pickle_safe import load_pickle

    folder = find_checkpoint(path)
    try:
        body = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        if not isinstance(body, dict) or not isinstance(body.get("state"), dict):
            raise ValueError('not {"state": {…}, "info": {…}}')
        state = LoopState(**body["state"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise InputError(f"damaged checkpoint: {STATE_FILE} cannot be read ({err})", path=folder) from None
    _check_state(state, folder)

    def part(name: str, optional: bool = False) -> Any:
        file = folder / name
        if not file.exists():
            if optional:
                return None
            raise InputError(f"damaged checkpoint: {name} is missing", path=folder)
        try:
            return load_file(str(file)) if name == WEIGHTS_FILE else load_pickle(file)
        except UnsafeFileError:
            raise InputError(
                f"damaged checkpoint: {name} is not the pickle of plain tensors lorax writes; refused, nothing in "
                "it was run",
                path=folder,
            ) from None
        except LoraxError as err:
            reason = str(err).split(": ", 1)[-1]
            raise InputError(f"damaged checkpoint: {name} {reason}", path=folder) from None
        except Exception as err:  # safetensors' own errors: truncated, bad header
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise InputError(f"damaged checkpoint: {name} cannot be read ({first})", path=folder) from None

    rng = part("rng.pt")
    _check_rng(rng, folder)
    return Checkpoint(
        path=folder,
        state=state,
        tensors=part(WEIGHTS_FILE),
        optimizer=part("optimizer.pt"),
        scheduler=part("scheduler.pt"),
        scaler=part("scaler.pt", optional=True),
        rng=rng,
        info=body.get("info", {}) if isinstance(body.get("info", {}), dict) else {},
    )


def _check_state(state: LoopState, folder: Path) -> None:
    """The counters and history of ``state.json``, each of its type: else one line naming the folder and the key."""

    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    for name in ("global_step", "micro_step", "epoch"):
        value = getattr(state, name)
        if not count(value):
            raise InputError(
                f"damaged checkpoint: {STATE_FILE}'s {name} is {value!r}, not a whole number ≥ 0", path=folder
            )
    if not isinstance(state.seconds, int | float) or isinstance(state.seconds, bool) or state.seconds < 0:
        raise InputError(f"damaged checkpoint: {STATE_FILE}'s seconds is {state.seconds!r}", path=folder)
    rows_ok = isinstance(state.losses, list) and all(
        isinstance(r, list) and len(r) == 4 and all(isinstance(v, int | float) for v in r)
        for r in state.losses
    )
    if not rows_ok:
        raise InputError(
            f"damaged checkpoint: {STATE_FILE}'s losses are not rows of [step, loss, lr, seconds]",
            path=folder,
        )


def _check_rng(rng: Any, folder: Path) -> None:
    import torch

    ok = (
        isinstance(rng, dict)
        and isinstance(rng.get("torch"), torch.Tensor)
        and isinstance(rng.get("numpy_keys"), torch.Tensor)
        and isinstance(rng.get("numpy_pos"), int)
        and isinstance(rng.get("python"), tuple | list)
        and len(rng["python"]) == 3
    )
    if not ok:
        raise InputError(
            "damaged checkpoint: rng.pt does not hold the random number generators' states", path=folder
        )
