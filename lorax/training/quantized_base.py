"""``--fp8-base``: the frozen denoiser's linear weights stored as 8-bit floats (``float8_e4m3fn``, one scale per
tensor), dequantised to the compute dtype in each forward; the LoRA layers wrap them and train in fp32.

This is kohya's ``fp8_base`` and ComfyUI's "scaled fp8" storage: ``q = fp8(W / s)`` with ``s = max|W| / 448``
(448 is e4m3fn's largest finite value), so the largest weight is stored exactly at the top of the range and every
other to fp8's precision (3 mantissa bits: a relative error of at most 2⁻⁴, and at most ``s · 2⁻¹⁰`` for weights in
e4m3fn's subnormal range). A weight takes one byte instead of four (fp32) or two (bf16).

Only the frozen weights are stored this way; the forward and its backward (the gradient that flows to the LoRA
layers in earlier blocks) dequantise ``W ≈ s · q`` on the fly in the input's dtype (the autocast dtype under
``--mixed-precision``), and the backward keeps the fp8 tensor, not a dequantised copy, for its matmul. The fp8 bytes
live in a ``uint8`` buffer so that ``module.to(dtype)`` (placing the model in the run's precision) leaves them alone.
No library is needed: torch has had ``float8_e4m3fn`` since 2.1, on the CPU too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def fp8_scale(weight: torch.Tensor) -> float:
    """The per-tensor scale ``max|W| / 448`` (1 for an all-zero weight)."""
    amax = float(weight.detach().abs().max()) if weight.numel() else 0.0
    return amax / FP8_MAX if amax > 0 else 1.0


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(q, s)``: the fp8 codes of ``weight / s`` (as ``uint8`` bytes) and the scale ``s``."""
    from lorax.errors import ConfigError

    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise ConfigError("--fp8-base: the base model has a non-finite weight; it cannot be stored in fp8")
    scale = fp8_scale(w)
    return (w / scale).to(FP8).view(torch.uint8), scale


def dequantize_fp8(codes: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    return codes.view(FP8).to(dtype) * scale


class _Fp8Matmul(torch.autograd.Function):
    """``x @ (s·q)ᵀ`` whose backward dequantises ``q`` again instead of keeping a full-precision copy."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, codes: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(codes)
        ctx.scale = scale
        return torch.nn.functional.linear(x, dequantize_fp8(codes, scale, x.dtype))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> Any:
        (codes,) = ctx.saved_tensors
        grad = grads[0]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad @ dequantize_fp8(codes, ctx.scale, grad.dtype), None, None


class Fp8Linear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored in fp8 with a per-tensor scale. It stays an ``nn.Linear`` (so
    PEFT wraps it like any other); ``weight`` reads the dequantised fp32 weight (for code that inspects it)."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        codes, scale = quantize_fp8(linear.weight)
        self.register_buffer("codes", codes.to(linear.weight.device))
        self.scale = scale
        bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.register_parameter("bias", bias)

    codes: torch.Tensor

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]  # dequantised on demand (PEFT reads it once)
        return dequantize_fp8(self.codes, self.scale, torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        out = _Fp8Matmul.apply(x.to(dtype), self.codes, self.scale)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3fn, scale={self.scale:.3g}"


def quantize_linears(model: nn.Module, keep: Callable[[str], bool] | None = None) -> int:
    """Replace every plain frozen ``nn.Linear`` of ``model`` (not a LoRA layer's, not a trainable one, none that
    ``keep(name)`` keeps) by an ``Fp8Linear``, in place; the number replaced. Call it before the LoRA is injected."""
    from lorax.errors import ConfigError

    swaps: list[tuple[nn.Module, str, nn.Linear]] = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not nn.Linear or (keep is not None and keep(full)):
                continue
            if "lora_" in full:
                raise ConfigError("--fp8-base: quantise the base before the LoRA layers are injected")
            if child.weight.requires_grad:
                continue  # only frozen weights are stored in fp8
            swaps.append((module, child_name, child))
    for parent, child_name, child in swaps:
        setattr(parent, child_name, Fp8Linear(child))
    return len(swaps)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers (fp8 codes count one byte a weight)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)
