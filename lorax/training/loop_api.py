"""What the training loop (``lorax.training.loop.TrainingLoop``) is given and gives back: the ``Job`` protocol a
recipe's job implements (its train step: ``loss`` per micro-batch, ``after_step``; its state), the ``LoopSettings``
of a run and the ``LoopResult`` of one ``run()``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from lorax.training.checkpoint import LoopState

if TYPE_CHECKING:
    import torch

    from lorax.training.config import TrainConfig


class Job(Protocol):
    """What the loop trains. ``loss`` is called once per micro-batch, inside autocast."""

    def trainable_models(self) -> Sequence[Any]:
        """The (prepared) modules holding trainable parameters."""

    def parameters(self) -> list[Any]:
        """Every trainable parameter (for clipping)."""

    def loss(self, micro_step: int, generator: torch.Generator) -> Any:
        """The scalar loss of micro-batch ``micro_step`` (draw randomness from ``generator``)."""

    def epoch_of(self, micro_step: int) -> int: ...

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (e.g. to restore frozen embedding rows)."""

    def state_tensors(self) -> dict[str, Any]:
        """The trainable state to checkpoint (flat name → tensor)."""

    def load_state_tensors(self, tensors: dict[str, Any]) -> None: ...

    def validate(self, step: int) -> list[Path]:
        """Validation samples at ``step``; returns the files written."""


@dataclass
class LoopSettings:
    max_steps: int
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0
    checkpoint_dir: Path | None = None
    validation_every: int = 0
    memory_flags: Sequence[str] = ()
    config_toml: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    description: str = "training"
    resume_command: Callable[[Path], str] | None = None  # the command line that continues from a checkpoint
    tracker: Any = None  # lorax.training.trackers.StepTracker (--log-with): loss, lr, grad norm, samples
    # the fields a training config holds under the same names
    SAME_NAMED: ClassVar[tuple[str, ...]] = (
        "grad_accum", "max_grad_norm", "seed", "checkpoint_every", "validation_every",
    )  # fmt: skip

    @classmethod
    def from_config(cls, config: TrainConfig, max_steps: int, **extra: Any) -> LoopSettings:
        """The loop fields of a training config (train, invert and pivot configs share their names)."""
        return cls(
            max_steps=max_steps,
            **{name: getattr(config, name) for name in cls.SAME_NAMED},
            checkpoint_dir=config.checkpoints_path,
            config_toml=config.to_toml(),
            resume_command=getattr(config, "resume_command", None),
            **extra,
        )


@dataclass
class LoopResult:
    state: LoopState
    checkpoints: list[Path]
    samples: list[Path]
    seconds_this_run: float
    steps_this_run: int
