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

from lorax.errors import InputError
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
        state = LoopState(**body["state"])
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"damaged checkpoint state ({err})", path=folder / STATE_FILE) from None
    scaler = load_pickle(folder / "scaler.pt") if (folder / "scaler.pt").exists() else None
    return Checkpoint(
        path=folder,
        state=state,
        tensors=load_file(str(folder / WEIGHTS_FILE)),
        optimizer=load_pickle(folder / "optimizer.pt"),
        scheduler=load_pickle(folder / "scheduler.pt"),
        scaler=scaler,
        rng=load_pickle(folder / "rng.pt"),
        info=body.get("info", {}),
    )
