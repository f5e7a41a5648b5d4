"""``--blocks-to-swap N`` (kohya's ``blocks_to_swap``): the frozen weights of the denoiser's last N blocks stay in
CPU memory, and each layer of those blocks gets its weights copied to the device just before it runs and dropped
right after, so the device holds the weights of the other blocks and of one layer at a time.

The blocks are the denoiser's ``nn.ModuleList`` attributes in the order they run: Flux's ``transformer_blocks`` then
``single_transformer_blocks`` (its 19 double and 38 single blocks), SD's ``down_blocks`` then ``up_blocks``; the last
N of that sequence are swapped. Only frozen tensors move: the LoRA weights inside those blocks are trainable, stay
on the device with the optimizer's state and are never copied.

The parked weights are taken out of the modules' parameters (held as plain attributes), so placing the model on the
device (``model.to(device)``) never copies them there, even once. Each forward pre-hook sets a layer's attributes to
device copies and the forward hook sets them back to the CPU tensors (frozen, so nothing is copied back). The copy
is per layer rather than per block so that a backward pass which recomputes a single layer (gradient checkpointing
at any granularity: Flux checkpoints whole blocks, SD's UNet its resnets and attentions) fetches it again.

The backward pass needs the weights of the layer whose gradient it computes; autograd keeps the device copies a
forward saved until then. So swapping frees device memory only with ``--gradient-checkpointing``, where a block's
forward saves nothing and its recomputation in the backward holds one block's copies at a time; lorax refuses
``--blocks-to-swap`` without it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from lorax.training.config import TrainConfig


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model`` in the order they run: its ``nn.ModuleList`` attributes, concatenated."""
    base = getattr(model, "module", model)  # DDP
    base = getattr(base, "_orig_mod", base)  # torch.compile
    return [block for child in base.children() if isinstance(child, nn.ModuleList) for block in child]


@dataclass
class _Parked:
    module: nn.Module
    name: str
    cpu: torch.Tensor
    kind: str  # "parameter" or "buffer"


@dataclass
class BlockSwap:
    """The swapped blocks' frozen tensors, parked on the CPU, and the hooks that fetch them. ``fetches`` counts the
    layer copies made (the mechanics tests and the bench read it); ``remove()`` puts everything back."""

    device: torch.device
    parked: dict[nn.Module, list[_Parked]] = field(default_factory=dict)
    fetches: int = 0
    _handles: list[Any] = field(default_factory=list)

    def fetch(self, module: nn.Module, *_: Any) -> None:
        for p in self.parked[module]:
            object.__setattr__(module, p.name, p.cpu.to(self.device, non_blocking=True))
        self.fetches += 1

    def release(self, module: nn.Module, *_: Any) -> None:
        for p in self.parked[module]:
            object.__setattr__(module, p.name, p.cpu)

    def remove(self) -> None:
        """Undo: hooks off, the parked tensors back as the modules' parameters and buffers (on the CPU)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, items in self.parked.items():
            for p in items:
                object.__delattr__(module, p.name)
                if p.kind == "parameter":
                    module.register_parameter(p.name, nn.Parameter(p.cpu, requires_grad=False))
                else:
                    module.register_buffer(p.name, p.cpu)
        self.parked.clear()


def install_block_swap(
    model: nn.Module,
    count: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
    *,
    pin: bool | None = None,
) -> BlockSwap:
    """Park the frozen tensors of ``model``'s last ``count`` blocks on the CPU (floating ones in ``dtype``, the run's
    weight dtype, since ``model.to(dtype)`` no longer reaches them) and hook their layers. Call it after the LoRA is
    injected and before the model is placed on the device."""
    from lorax.errors import ConfigError

    blocks = model_blocks(model)
    if count < 1:
        raise ConfigError(f"--blocks-to-swap {count}: give a number of blocks of at least 1")
    if count > len(blocks):
        raise ConfigError(
            f"--blocks-to-swap {count}: the model has {len(blocks)} blocks; swap at most {len(blocks)}"
        )
    device = torch.device(device)
    if pin is None:
        pin = device.type == "cuda"
    swap = BlockSwap(device)
    for block in blocks[len(blocks) - count :]:
        for module in block.modules():
            items = _park(module, dtype, pin)
            if items:
                swap.parked[module] = items
                swap._handles.append(module.register_forward_pre_hook(swap.fetch))
                swap._handles.append(module.register_forward_hook(swap.release, always_call=True))
    return swap


def _park(module: nn.Module, dtype: torch.dtype | None, pin: bool) -> list[_Parked]:
    items: list[_Parked] = []
    tables: list[tuple[str, dict[str, Any]]] = [
        ("parameter", module._parameters),
        ("buffer", module._buffers),
    ]
    for kind, table in tables:
        for name, tensor in list(table.items()):
            if tensor is None or (kind == "parameter" and tensor.requires_grad):
                continue
            cpu = tensor.detach().to("cpu")
            if dtype is not None and cpu.is_floating_point() and cpu.dtype != torch.float8_e4m3fn:
                cpu = cpu.to(dtype)
            if pin:
                cpu = cpu.pin_memory()
            del table[name]
            object.__setattr__(module, name, cpu)
            items.append(_Parked(module, name, cpu, kind))
    return items


def parked_bytes(swap: BlockSwap) -> int:
    return sum(p.cpu.numel() * p.cpu.element_size() for items in swap.parked.values() for p in items)


def swap_for(
    config: TrainConfig, unet: Any, device: torch.device, dtype: torch.dtype, log: Callable[[str], None]
) -> BlockSwap | None:
    """``config.blocks_to_swap``'s swap on the denoiser (``None`` without the option)."""
    count = getattr(config, "blocks_to_swap", None)
    if not count:
        return None
    swap = install_block_swap(unet, count, device, dtype)
    log(f"block swap: {count} blocks' frozen weights ({parked_bytes(swap) / 2**20:.0f} MiB) stay on the CPU")
    return swap
