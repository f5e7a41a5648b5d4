"""Sharding the frozen base across processes (FSDP) while the LoRA trains replicated, as under DDP.

Chosen the way any accelerate program chooses FSDP: ``accelerate config`` (``distributed_type: FSDP``) or
``accelerate launch --use_fsdp …``, which set ``ACCELERATE_USE_FSDP=true`` (the variable alone works under
``torchrun`` too). lorax then builds its ``Accelerator`` as for DDP (``make_accelerator`` hides the variable from
accelerate, whose own FSDP is GPU-only and would shard the LoRA weights too) and shards the denoiser itself with
PyTorch's FSDP2 ``fully_shard``, one unit per block of the model's block lists (SD's down/mid/up blocks, Flux's
double and single blocks) and the rest at the root, on CPU (gloo) and GPU (NCCL) alike:

* each process keeps 1/N of every frozen weight, gathered block by block for the forward and backward passes;
* the trainable weights (LoRA, …) are left out of the shards (``ignored_params``): every process holds them whole,
  their gradients are averaged across processes at the end of each backward pass (once per optimizer step, not on
  the micro-batches of ``--grad-accum``, as DDP does), so weights, optimizer state, checkpoints and resume are the
  same as under DDP, and saving needs no gather.

``FSDP_RESHARD_AFTER_FORWARD`` (FSDP2's name) or ``FSDP_SHARDING_STRATEGY`` (FSDP1's) choose between freeing the
gathered weights after the forward pass (``FULL_SHARD``, the default) and keeping them for the backward
(``SHARD_GRAD_OP``); ``NO_SHARD`` is plain DDP. What lorax cannot honour is refused in one line.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lorax.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from lorax.training.config import TrainConfig

USE_FSDP = "ACCELERATE_USE_FSDP"
_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class ShardPlan:
    """How the frozen denoiser is sharded: ``reshard_after_forward`` frees each block's gathered weights after its
    forward pass (FULL_SHARD) rather than keeping them until its backward (SHARD_GRAD_OP)."""

    reshard_after_forward: bool = True


def _flag(value: str | None) -> bool:
    return value is not None and value.strip().lower() in _TRUE


def requested(environ: Mapping[str, str] | None = None) -> ShardPlan | None:
    """The sharding asked for through accelerate's FSDP settings (``None``: not asked, or ``NO_SHARD``)."""
    env = os.environ if environ is None else environ
    if not _flag(env.get(USE_FSDP)):
        return None
    if _flag(env.get("FSDP_OFFLOAD_PARAMS")):
        raise ConfigError(
            "FSDP_OFFLOAD_PARAMS / fsdp_offload_params: lorax shards the frozen base across processes but does "
            "not offload it to the CPU; set it to false"
        )
    strategy = env.get("FSDP_SHARDING_STRATEGY", "").strip().upper()
    names = {
        "1": "FULL_SHARD",
        "2": "SHARD_GRAD_OP",
        "3": "NO_SHARD",
        "4": "HYBRID_SHARD",
        "5": "HYBRID_SHARD_ZERO2",
    }
    strategy = names.get(strategy, strategy)
    reshard = env.get("FSDP_RESHARD_AFTER_FORWARD", "").strip().upper()
    if reshard in names.values():  # accelerate's FSDP1 spelling of the same setting
        strategy, reshard = reshard, ""
    if strategy == "NO_SHARD":
        return None
    if strategy.startswith("HYBRID"):
        raise ConfigError(
            f"FSDP sharding strategy {strategy}: lorax shards across all processes (FULL_SHARD or SHARD_GRAD_OP)"
        )
    if strategy not in ("", "FULL_SHARD", "SHARD_GRAD_OP"):
        raise ConfigError(f"FSDP sharding strategy {strategy!r}: use FULL_SHARD, SHARD_GRAD_OP or NO_SHARD")
    if reshard:
        if reshard.lower() not in (*_TRUE, "0", "false", "no", "off"):
            raise ConfigError(f"FSDP_RESHARD_AFTER_FORWARD {reshard!r}: use true or false")
        return ShardPlan(reshard_after_forward=_flag(reshard))
    return ShardPlan(reshard_after_forward=strategy != "SHARD_GRAD_OP")


@contextlib.contextmanager
def accelerate_without_fsdp() -> Iterator[None]:
    """While the ``Accelerator`` is built: accelerate does not see ``ACCELERATE_USE_FSDP`` (lorax shards itself)."""
    saved = os.environ.get(USE_FSDP)
    if saved is not None:
        os.environ[USE_FSDP] = "false"
    try:
        yield
    finally:
        if saved is not None:
            os.environ[USE_FSDP] = saved


def check_deepspeed(accelerator: Accelerator) -> None:
    """DeepSpeed ZeRO-3 partitions every weight, the LoRA's too, which lorax reads whole to save: refused."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and int(getattr(plugin, "zero_stage", 0) or 0) >= 3:
        raise ConfigError(
            "DeepSpeed ZeRO-3 partitions the LoRA weights lorax saves; to shard the frozen base use FSDP "
            "(accelerate config → FSDP), or ZeRO stage 1/2"
        )


def plan_for(config: TrainConfig, accelerator: Accelerator, log: Callable[[str], None]) -> ShardPlan | None:
    """The run's sharding: ``requested()`` with more than one process (one process has nothing to share),
    refusing what would run the sharded model on the main process alone (validation images, --val-split)."""
    check_deepspeed(accelerator)
    plan = requested()
    if plan is None:
        return None
    if accelerator.num_processes < 2:
        log("FSDP asked for with one process: nothing to shard, the base model stays whole")
        return None
    main_only = [
        flag
        for flag, value in (
            ("--validation-prompt", getattr(config, "validation_prompt", None)),
            ("--sample-prompts", getattr(config, "sample_prompts", None)),
            ("--val-split", getattr(config, "val_split", None)),
        )
        if value
    ]
    if main_only:
        raise ConfigError(
            f"{', '.join(main_only)} under FSDP: the main process alone would run the sharded model; "
            "drop it or train with DDP (no FSDP)"
        )
    return plan


def block_units(model: Any) -> list[Any]:
    """The model's blocks, each one FSDP unit: the items of its block lists (SD's ``down_blocks`` /
    ``up_blocks``, Flux's ``transformer_blocks`` / ``single_transformer_blocks``) and SD's ``mid_block``."""
    import torch

    units: list[Any] = []
    for name, child in model.named_children():
        if isinstance(child, torch.nn.ModuleList):
            units.extend(child)
        elif name == "mid_block" and child is not None:
            units.append(child)
    return units


class GradientSync:
    """Averages the trainable weights' gradients across processes at the end of each backward pass (one
    all-reduce per dtype), except inside ``no_sync()`` (the loop's accumulated micro-batches), as DDP does."""

    def __init__(self, params: list[Any]) -> None:
        self.params = params
        self.enabled = True
        self.reductions = 0  # backward passes whose gradients were averaged
        self._queued = False
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad)

    def _on_grad(self, param: Any) -> None:
        if self.enabled and not self._queued:
            import torch

            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._all_reduce)

    def _all_reduce(self) -> None:
        import torch
        import torch.distributed as dist

        self._queued = False
        self.reductions += 1
        world = dist.get_world_size()
        by_dtype: dict[Any, list[Any]] = {}
        for p in self.params:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads]).div_(world)  # divided first, as DDP's hook does
            dist.all_reduce(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True


def shard_frozen(model: Any, device: torch.device, plan: ShardPlan) -> GradientSync:
    """Shard ``model``'s frozen weights across the processes (FSDP2, one unit per block, the rest at the root) onto
    ``device``; its trainable weights stay whole on every process (moved to ``device``, made equal to the main
    process's) and get their gradients averaged (the returned ``GradientSync``, also ``model.no_sync``)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = torch.device(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ignored = set(trainable)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in block_units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=plan.reshard_after_forward, ignored_params=ignored)
    fully_shard(model, mesh=mesh, reshard_after_forward=plan.reshard_after_forward, ignored_params=ignored)
    with torch.no_grad():
        for p in trainable:
            p.data = p.data.to(device)
            dist.broadcast(p.data, src=0)  # as DDP does: every process starts from the main one's weights
    sync = GradientSync(trainable)
    model.no_sync = sync.no_sync  # accelerate's no_sync(model) uses it, as it uses DDP's
    return sync


def frozen_bytes(model: Any) -> tuple[int, int]:
    """(bytes of frozen weights this process holds, bytes of the whole frozen weights)."""
    local = total = 0
    for p in model.parameters():
        if p.requires_grad:
            continue
        size = p.element_size()
        held = p.to_local() if hasattr(p, "to_local") else p
        local += held.numel() * size
        total += p.numel() * size
    return local, total


def prepare(
    accelerator: Accelerator,
    denoiser: Any,
    trained: list[Any],
    optimizer: torch.optim.Optimizer,
    plan: ShardPlan | None,
    log: Callable[[str], None],
) -> tuple[Any, list[Any], Any]:
    """``accelerator.prepare`` for the denoiser, the trained text encoders and the optimizer; with ``plan`` the
    denoiser is sharded (``shard_frozen``) rather than DDP-wrapped."""
    if plan is None:
        denoiser, *trained, optimizer = accelerator.prepare(denoiser, *trained, optimizer)
        return denoiser, trained, optimizer
    shard_frozen(denoiser, accelerator.device, plan)
    local, total = frozen_bytes(denoiser)
    if accelerator.is_main_process:
        log(
            f"FSDP: the frozen {type(denoiser).__name__.removeprefix('FSDP')} is sharded across "
            f"{accelerator.num_processes} processes ({local / 2**20:.1f} of {total / 2**20:.1f} MiB on the main one)"
        )
    if not trained:
        return denoiser, [], accelerator.prepare(optimizer)
    *trained, optimizer = accelerator.prepare(*trained, optimizer)
    return denoiser, trained, optimizer
