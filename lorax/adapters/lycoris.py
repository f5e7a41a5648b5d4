"""LyCORIS algorithms and DoRA as ``DeltaModule``s: each produces its weight delta by the published definition.

* LoHa (``hada_*``): ``ΔW = (alpha / r) · (W1a @ W1b) ⊙ (W2a @ W2b)``; with Tucker cores ``hada_t1/t2`` each factor is
  ``einsum("ijkl,jr,ip->prkl", t, Wb, Wa)``. ``r = hada_w1_b.shape[0]``.
* LoKr (``lokr_*``): ``ΔW = (alpha / r) · W1 ⊗ W2`` (Kronecker), ``W1 = lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``,
  ``W2 = lokr_w2`` or ``lokr_w2_a @ lokr_w2_b`` (Tucker: ``einsum("ijkl,jr,ip->prkl", lokr_t2, w2_b, w2_a)``);
  ``r`` is the inner size of the factored matrix, and the scale is 1 when neither is factored.
* DoRA (``dora_scale`` / PEFT ``lora_magnitude_vector``): ``W' = m · (W0 + ΔW) / ‖W0 + ΔW‖`` with the norm taken per
  output row (magnitude ``[out]`` or ``[out, 1]``, PEFT and LyCORIS ``wd_on_out``) or per input column (magnitude
  ``[1, in]``, kohya). It needs the base weight: ``delta(dtype, base_weight=W0)`` returns ``W' − W0``, and
  ``apply(W0, strength)`` returns ``W0 + strength · (W' − W0)``. Without ``base_weight`` ``delta`` raises.
* Full difference (``diff``, optional ``diff_b`` for the bias): ``ΔW = diff``.

For conv layers without Tucker cores the factors are flattened (``[out, in·kh·kw]``): ``delta`` reshapes to
``weight_shape`` when the reader knew it (from the model or the family table), else returns the flat ``[out, -1]``
form, which the merge helper reshapes to the target weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorax.errors import MismatchError

_CP = "ijkl,jr,ip->prkl"


def _shape(delta: torch.Tensor, weight_shape: tuple[int, ...] | None) -> torch.Tensor:
    if weight_shape is not None and delta.numel() == torch.Size(weight_shape).numel():
        return delta.reshape(weight_shape)
    return delta


@dataclass
class LohaModule:
    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    alpha: float | None = None
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    weight_shape: tuple[int, ...] | None = None
    kind = "loha"

    @property
    def rank(self) -> int:
        return int(self.w1b.shape[0])

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def out_features(self) -> int:
        return int(self.w1a.shape[1] if self.t1 is not None else self.w1a.shape[0])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.t1 is not None and self.t2 is not None:
            m1 = torch.einsum(_CP, self.t1.to(dtype), self.w1b.to(dtype), self.w1a.to(dtype))
            m2 = torch.einsum(_CP, self.t2.to(dtype), self.w2b.to(dtype), self.w2a.to(dtype))
        else:
            m1 = self.w1a.to(dtype) @ self.w1b.to(dtype)
            m2 = self.w2a.to(dtype) @ self.w2b.to(dtype)
        return _shape(self.scale * (m1 * m2), self.weight_shape)

    def to_kohya(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = {"hada_w1_a": self.w1a, "hada_w1_b": self.w1b, "hada_w2_a": self.w2a, "hada_w2_b": self.w2b}
        if self.t1 is not None and self.t2 is not None:
            out |= {"hada_t1": self.t1, "hada_t2": self.t2}
        out = {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in out.items()}
        if self.alpha is not None:
            out["alpha"] = torch.tensor(float(self.alpha))
        return out


@dataclass
class LokrModule:
    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    weight_shape: tuple[int, ...] | None = None
    kind = "lokr"

    @property
    def rank(self) -> int | None:
        """The inner size of the factored matrix; ``None`` when both Kronecker factors are full."""
        if self.w1 is None and self.w1b is not None:
            return int(self.w1b.shape[0])
        if self.w2 is None and self.w2b is not None:
            return int(self.w2b.shape[0])
        return None

    @property
    def scale(self) -> float:
        r = self.rank
        if r is None or self.alpha is None:
            return 1.0
        return self.alpha / r

    def _w1(self, dtype: torch.dtype) -> torch.Tensor:
        if self.w1 is not None:
            return self.w1.to(dtype)
        assert self.w1a is not None and self.w1b is not None
        return self.w1a.to(dtype) @ self.w1b.to(dtype)

    def _w2(self, dtype: torch.dtype) -> torch.Tensor:
        if self.w2 is not None:
            return self.w2.to(dtype)
        assert self.w2a is not None and self.w2b is not None
        if self.t2 is not None:
            return torch.einsum(_CP, self.t2.to(dtype), self.w2b.to(dtype), self.w2a.to(dtype))
        return self.w2a.to(dtype) @ self.w2b.to(dtype)

    @property
    def out_features(self) -> int:
        return int(self._w1(torch.float32).shape[0] * self._w2(torch.float32).shape[0])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w1, w2 = self._w1(dtype), self._w2(dtype)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        return _shape(self.scale * torch.kron(w1, w2), self.weight_shape)

    def to_kohya(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        names = {"lokr_w1": self.w1, "lokr_w1_a": self.w1a, "lokr_w1_b": self.w1b, "lokr_w2": self.w2,
                 "lokr_w2_a": self.w2a, "lokr_w2_b": self.w2b, "lokr_t2": self.t2}  # fmt: skip
        out = {
            k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in names.items() if v is not None
        }
        if self.alpha is not None:
            out["alpha"] = torch.tensor(float(self.alpha))
        return out


@dataclass
class DoraModule:
    """A LoRA pair plus a DoRA magnitude. ``wd_on_out``: norms per output row (True) or per input column."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: torch.Tensor
    wd_on_out: bool = True
    kind = "dora"

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    def lora_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        up = self.up.to(dtype).reshape(self.up.shape[0], -1)
        down = self.down.to(dtype).reshape(self.rank, -1)
        shape = (self.up.shape[0], *self.down.shape[1:])
        return (self.scale * (up @ down)).reshape(shape)

    def apply(self, base_weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """The DoRA-adapted weight ``W0 + strength · (m · V / ‖V‖ − W0)``, ``V = W0 + ΔW``."""
        w0 = base_weight.to(torch.float32)
        v = w0 + self.lora_delta(torch.float32).reshape(w0.shape)
        if self.wd_on_out:
            norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(v.shape[0], *[1] * (v.dim() - 1))
            m = self.magnitude.to(torch.float32).reshape(v.shape[0], *[1] * (v.dim() - 1))
        else:
            norm = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1)
            norm = norm.reshape(1, v.shape[1], *[1] * (v.dim() - 2))
            m = self.magnitude.to(torch.float32).reshape(1, v.shape[1], *[1] * (v.dim() - 2))
        adapted = m * v / norm
        return (w0 + strength * (adapted - w0)).to(base_weight.dtype)

    def delta(
        self, dtype: torch.dtype = torch.float32, base_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        if base_weight is None:
            raise MismatchError("a DoRA module's delta depends on the base weight: pass base_weight")
        return (self.apply(base_weight.to(dtype)) - base_weight.to(dtype)).to(dtype)

    def to_kohya(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
        magnitude = self.magnitude
        if magnitude.dim() == 1:
            magnitude = magnitude.reshape(-1, 1) if self.wd_on_out else magnitude.reshape(1, -1)
        return {
            "lora_down.weight": cast(self.down).contiguous(),
            "lora_up.weight": cast(self.up).contiguous(),
            "dora_scale": cast(magnitude).contiguous(),
            "alpha": torch.tensor(float(self.alpha)),
        }


@dataclass
class FullDiffModule:
    """A stored full weight difference (LyCORIS ``full``): ``diff`` and optionally ``diff_b`` for the bias."""

    diff: torch.Tensor
    diff_b: torch.Tensor | None = None
    kind = "full"
    rank = None
    alpha = None

    @property
    def out_features(self) -> int:
        return int(self.diff.shape[0])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.diff.to(dtype)

    def to_kohya(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = {"diff": self.diff}
        if self.diff_b is not None:
            out["diff_b"] = self.diff_b
        return {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in out.items()}
