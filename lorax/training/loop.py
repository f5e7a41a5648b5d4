"""The optimisation loop shared by ``train``, ``invert`` and ``pivot``.

A job (the ``Job`` protocol) says what a micro-batch's loss is and which tensors make its state; the loop does the
rest, the same way on one CPU or under ``accelerate launch`` on many GPUs: gradient accumulation (without DDP syncs
between micro-batches), clipping, optimizer and LR-schedule steps, seeded randomness per micro-batch, NaN/inf stops
that keep the last good state, out-of-memory messages that list the memory flags, checkpoints every N steps,
validation every N steps, progress (step, smoothed loss, lr, it/s, ETA), and exact resume.

Randomness: before micro-batch ``m`` the global torch RNG is seeded from ``(seed, m, process)`` and the job gets a
generator seeded the same way for its noise and timesteps. A resumed run therefore draws exactly what an uninterrupted
one would; the RNG states are checkpointed as well, for whatever else the job draws.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.data.dataset import derive_seed
from lorax.errors import Interrupted, LoraxError, TrainingError
from lorax.progress import NullProgress, Progress
from lorax.training.checkpoint import Checkpoint, LoopState, save_checkpoint, set_rng_states
from lorax.training.good_state import GoodStates, StateDict
from lorax.training.loop_api import Job, LoopResult, LoopSettings

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

__all__ = ["Job", "LoopResult", "LoopSettings", "TrainingLoop", "is_out_of_memory"]


def is_out_of_memory(err: BaseException) -> bool:
    import torch

    if isinstance(err, MemoryError | torch.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


@dataclass(eq=False, repr=False)
class TrainingLoop:
    job: Job
    _: KW_ONLY
    accelerator: Accelerator
    optimizer: torch.optim.Optimizer
    scheduler: Any
    settings: LoopSettings
    progress: Progress = field(default_factory=NullProgress)  # None: NullProgress too
    state: LoopState = field(default_factory=LoopState, init=False)
    checkpoints: list[Path] = field(default_factory=list, init=False)
    samples: list[Path] = field(default_factory=list, init=False)
    _last_saved_step: int | None = field(default=None, init=False)
    _interrupted: bool = field(default=False, init=False)
    # called with the state after each optimizer step, validation and checkpoint (e.g. usable snapshots)
    step_hooks: list[Callable[[LoopState], None]] = field(default_factory=list, init=False)
    # In memory: the state after the last step, and the last one that trained on cleanly (written on a
    # non-finite stop)
    _states: GoodStates = field(default_factory=GoodStates, init=False)

    def __post_init__(self) -> None:
        self.progress = self.progress or NullProgress()

    # ---------------------------------------------------------------------------------------------------------
    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue from ``checkpoint``: trainable tensors, optimizer, scheduler, scaler, RNG, counters, history."""
        self.job.load_state_tensors(checkpoint.tensors)
        wanted = list(getattr(self.scheduler, "base_lrs", []))  # this run's learning rates
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.scheduler.load_state_dict(checkpoint.scheduler)
        self._keep_learning_rates(wanted)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and checkpoint.scaler is not None:
            scaler.load_state_dict(checkpoint.scaler)
        set_rng_states(checkpoint.rng)
        self.state = checkpoint.state
        self._last_saved_step = self.state.global_step

    def _keep_learning_rates(self, wanted: list[float]) -> None:
        """A run resumed with another learning rate (after a non-finite stop: "try a lower --learning-rate") goes on
        with it, on the schedule where the checkpoint left it; the same rates resume bitwise exactly."""
        sched = self.scheduler
        stored = list(getattr(sched, "base_lrs", []))
        lambdas = getattr(sched, "lr_lambdas", None)
        if not wanted or stored == wanted or lambdas is None or len(wanted) != len(stored):
            return
        sched.base_lrs = wanted
        for group, base, factor in zip(self.optimizer.param_groups, wanted, lambdas, strict=False):
            group["initial_lr"] = base
            group["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        old = ", ".join(f"{lr:g}" for lr in stored)
        new = ", ".join(f"{lr:g}" for lr in wanted)
        self.progress.log(f"learning rate {new} (the checkpoint was trained with {old})")

    def _weights_finite(self, tensors: dict[str, torch.Tensor] | None = None) -> bool:
        import torch

        tensors = self.job.state_tensors() if tensors is None else tensors
        return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())

    def save(self) -> Path | None:
        """A checkpoint of the current state; never one whose weights are not finite (None then)."""
        if self.settings.checkpoint_dir is None:
            return None
        tensors = self.job.state_tensors()
        if not self._weights_finite(tensors):
            return None
        return self._write(
            self.state, tensors, self.optimizer, self.scheduler, getattr(self.accelerator, "scaler", None)
        )

    def _write(
        self,
        state: LoopState,
        tensors: dict[str, torch.Tensor],
        optimizer: Any,  # the live optimizer, or a good state's StateDict of it
        scheduler: Any,
        scaler: Any,
        rng: Any = None,
    ) -> Path | None:
        assert self.settings.checkpoint_dir is not None
        path: Path | None = None
        if self.accelerator.is_main_process:
            path = save_checkpoint(
                self.settings.checkpoint_dir,
                state=state,
                tensors=tensors,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                info=self.settings.info,
                config_toml=self.settings.config_toml,
                rng=rng,
            )
            self.checkpoints.append(path)
        self.accelerator.wait_for_everyone()
        self._last_saved_step = state.global_step
        return path

    def _keep_state(self) -> None:
        """After a step whose weights are finite: what its checkpoint would hold, kept in memory
        (``GoodStates.keep``)."""
        scaler = getattr(self.accelerator, "scaler", None)
        self._states.keep(self.state, self.job.state_tensors(), self.optimizer, self.scheduler, scaler)

    def _confirm_state(self, grad_norm: Any) -> None:
        self._states.confirm(grad_norm, self.job.parameters)

    def _save_good_state(self) -> Path | None:
        """The kept copy as a checkpoint (or the checkpoint already written of that step)."""
        good, folder = self._states.good, self.settings.checkpoint_dir
        if good is None or folder is None:
            return None
        step = good.state.global_step
        if self._last_saved_step == step:
            from lorax.training.checkpoint import checkpoint_name

            return folder / checkpoint_name(step)
        state = LoopState(**{**vars(good.state), "losses": self.state.losses[: good.n_losses]})
        scaler = StateDict(good.scaler) if good.scaler is not None else None
        return self._write(
            state, good.tensors, StateDict(good.optimizer), StateDict(good.scheduler), scaler, good.rng
        )

    # ---------------------------------------------------------------------------------------------------------
    def run(self) -> LoopResult:
        start_step = self.state.global_step
        started = time.perf_counter()
        try:
            with self._stop_on_interrupt():
                self._run()
        except LoraxError:
            raise
        except BaseException as err:
            if not is_out_of_memory(err):
                raise
            flags = ", ".join(self.settings.memory_flags) or "a smaller batch"
            raise TrainingError(
                f"out of memory at step {self.state.global_step + 1}; lower memory with {flags}"
            ) from None
        elapsed = time.perf_counter() - started
        return LoopResult(
            self.state, self.checkpoints, self.samples, elapsed, self.state.global_step - start_step
        )

    @contextlib.contextmanager
    def _stop_on_interrupt(self) -> Iterator[None]:
        """Ctrl-C (SIGINT) stops the run at the next step boundary, with a checkpoint of that exact state and the
        command that resumes it; a second Ctrl-C stops at once. One process only (under accelerate each process
        would stop at its own step), and only where Python lets a handler be set (the main thread)."""
        self._interrupted = False
        if self.accelerator.num_processes > 1 or threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._interrupted:
                raise KeyboardInterrupt
            self._interrupted = True

        previous = signal.signal(signal.SIGINT, handler)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _stop_interrupted(self) -> None:
        """Save where the run stands and say how to go on."""
        s = self.settings
        step = self.state.global_step
        kept: Path | None = None
        if step > 0 and self._last_saved_step != step:
            kept = self.save()
        elif self._last_saved_step is not None and s.checkpoint_dir is not None:
            from lorax.training.checkpoint import checkpoint_name

            kept = s.checkpoint_dir / checkpoint_name(self._last_saved_step)
        where = f"interrupted at step {step}/{s.max_steps}"
        if kept is None:
            raise Interrupted(f"{where}; nothing to resume from yet")
        if s.resume_command is not None:
            raise Interrupted(f"{where}; checkpoint {kept}; resume with: {s.resume_command(kept)}")
        raise Interrupted(f"{where}; checkpoint {kept} (resume with --resume {kept})")

    def _micro_rng(self, micro: int) -> torch.Generator:
        import torch

        process = self.accelerator.process_index
        torch.manual_seed(derive_seed(self.settings.seed, "global", micro, process))
        generator = torch.Generator(device=self.accelerator.device)
        generator.manual_seed(derive_seed(self.settings.seed, "noise", micro, process))
        return generator

    def _stop_non_finite(self, value: float, what: str = "loss") -> None:
        # the last state whose weights were finite: the copy kept in memory after each step, else (just resumed)
        # the checkpoint the run started from
        kept = self._save_good_state()
        good = self._states.good
        kept_step = good.state.global_step if good is not None else None
        if kept is None and self._last_saved_step is not None and self.settings.checkpoint_dir is not None:
            from lorax.training.checkpoint import checkpoint_name

            kept_step = self._last_saved_step
            kept = self.settings.checkpoint_dir / checkpoint_name(kept_step)
        where = (
            f"the last good state, from step {kept_step}, is kept in {kept} (resume with --resume {kept})"
            if kept is not None
            else "no good state to keep yet"
        )
        raise TrainingError(
            f"{what} became {value} at step {self.state.global_step + 1}; {where}; "
            "try a lower --learning-rate, --max-grad-norm 1, or --mixed-precision bf16 instead of fp16"
        )

    def _run(self) -> None:
        s = self.settings
        acc = self.accelerator
        models = list(self.job.trainable_models())
        for m in models:
            m.train()
        smoothed: float | None = None
        session_start = last_tick = time.perf_counter()
        session_steps = 0
        with self.progress.task(s.description, total=s.max_steps) as task:
            task.update(completed=self.state.global_step)
            self._keep_state()  # the start (step 0, or the checkpoint resumed) is good once its gradients are
            while self.state.global_step < s.max_steps:
                if self._interrupted:
                    self._stop_interrupted()
                step_loss = 0.0
                for a in range(s.grad_accum):
                    micro = self.state.micro_step
                    generator = self._micro_rng(micro)
                    with contextlib.ExitStack() as stack:
                        if a < s.grad_accum - 1 and acc.num_processes > 1:
                            for m in models:
                                stack.enter_context(acc.no_sync(m))
                        with acc.autocast():
                            loss = self.job.loss(micro, generator)
                        value = loss.detach()
                        if acc.num_processes > 1:
                            value = acc.reduce(value, "mean")
                        value_f = float(value)
                        if not math.isfinite(value_f):
                            self._stop_non_finite(value_f)
                        acc.backward(loss / s.grad_accum)
                    step_loss += value_f / s.grad_accum
                    self.state.micro_step += 1
                grad_norm = None
                if s.max_grad_norm and acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(self.job.parameters(), s.max_grad_norm)
                elif s.tracker is not None:  # the norm alone (an infinite bound clips nothing)
                    grad_norm = acc.clip_grad_norm_(self.job.parameters(), float("inf"))
                self._confirm_state(grad_norm)
                self.optimizer.step()
                if not self._weights_finite():  # a finite loss, then non-finite weights (e.g. inf gradients)
                    self._stop_non_finite(float("nan"), "the trained weights")
                lr = float(self.scheduler.get_last_lr()[0])
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.job.after_step(self.state.global_step)
                self.state.global_step += 1
                self.state.epoch = self.job.epoch_of(self.state.micro_step)
                now = time.perf_counter()
                self.state.seconds += now - last_tick
                last_tick = now
                self.state.losses.append(
                    [self.state.global_step, step_loss, lr, round(self.state.seconds, 4)]
                )
                smoothed = step_loss if smoothed is None else 0.9 * smoothed + 0.1 * step_loss
                session_steps += 1
                rate = session_steps / max(1e-9, now - session_start)
                task.update(completed=self.state.global_step, loss=smoothed, lr=lr, **{"it/s": rate})
                step = self.state.global_step
                if s.tracker is not None:
                    values = {"loss": step_loss, "lr": lr, "seconds": self.state.seconds}
                    if grad_norm is not None:
                        values["grad_norm"] = float(grad_norm)
                    s.tracker.log_step(step, values)
                if s.validation_every and step % s.validation_every == 0:
                    self._validate(step, models)
                if s.checkpoint_every and step % s.checkpoint_every == 0 and step < s.max_steps:
                    path = self.save()
                    if path is not None:
                        self.progress.log(f"checkpoint: {path}")
                self._keep_state()
                for hook in self.step_hooks:
                    hook(self.state)
                last_tick = time.perf_counter()  # samples and checkpoints are not optimisation time

    def _validate(self, step: int, models: list[Any]) -> None:
        import torch

        for m in models:
            m.eval()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            paths = self.job.validate(step)
        for m in models:
            m.train()
        self.accelerator.wait_for_everyone()
        for p in paths:
            self.progress.log(f"sample at step {step}: {p}")
        if self.settings.tracker is not None:
            self.settings.tracker.log_samples(step, paths)
        self.samples.extend(paths)
