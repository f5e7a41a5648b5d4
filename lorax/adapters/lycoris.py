"""LyCORIS algorithms and DoRA as ``DeltaModule``s: each produces its weight delta by the published definition.

* LoHa (``hada_*``): ``ΔW = (alpha / r) · (W1a @ W1b) ⊙ (W2a @ W2b)``; with Tucker cores ``hada_t1/t2`` each factor is
  ``einsum("ijkl,jr,ip->prkl", t, Wb, Wa)``. ``r = hada_w1_b.shape[0]``.
* LoKr (``lokr_*``): ``ΔW = (alpha / r) · W1 ⊗ W2`` (Kronecker), ``W1 = lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``,
  ``W2 = lokr_w2`` or ``lokr_w2_a @ lokr_w2_b`` (Tucker: ``einsum("ijkl,jr,ip->prkl", lokr_t2, w2_b, w2_a)``);
  ``r`` is the inner size of the factored matrix, and the scale is 1 when neither is factored.
* DoRA (``dora_scale`` / PEFT ``lora_magnitude_vector``): ``W' = m · (W0 + ΔW) / ‖W0 + ΔW‖`` with the norm taken per
  output row (magnitude ``[out]`` or ``[out, 1, …]``, PEFT and LyCORIS ``wd_on_out``) or per input column (magnitude
  ``[1, in, …]``, kohya). ``ΔW`` is a LoRA pair's (``DoraModule``) or any other algorithm's delta (``DecomposedModule``:
  LyCORIS' LoHa/LoKr with ``weight_decompose``). At strength ``s`` the merged weight is ``W0 + s · (W' − W0)``
  (ComfyUI's rule; LyCORIS' own blends the scale, ``W0 + sΔW`` rescaled by ``s(m/‖·‖ − 1) + 1``).
* IA3 (``weight``, ``on_input``): ``ΔW = W0 ⊙ w``, ``w`` scaling each output row (``on_input`` 0) or input column.
* DoRA and IA3 need the base weight: ``delta(dtype, base_weight=W0)`` returns ``W' − W0`` (without it ``delta``
  raises) and ``apply(W0, strength)`` returns ``W0 + strength · (W' − W0)``.
* Full difference (``diff``, optional ``diff_b`` for the bias): ``ΔW = diff``.

For conv layers without Tucker cores the factors are flattened (``[out, in·kh·kw]``; a 4-D ``…_b`` factor is
flattened first): ``delta`` reshapes to ``weight_shape`` when the reader knew it (from the model or the family table),
else returns the flat ``[out, -1]`` form, which the merge helper reshapes to the target weight.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from lorax.adapters.state import LoraModule, LowRankPair
from lorax.errors import MismatchError

_CP = "ijkl,jr,ip->prkl"


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """A Tucker-factored weight ``einsum("ijkl,jr,ip->prkl", t, wb, wa)``, contiguous (``torch.kron`` views it)."""
    return torch.einsum(_CP, t, wb, wa).contiguous()


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for a factor pair of any rank: ``a`` ``[out, r(, 1, 1)]``, ``b`` ``[r, in(, kh, kw)]`` → ``[out, in(, kh, kw)]``."""
    flat = a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1)
    return flat.reshape(a.shape[0], *b.shape[1:])


def weight_decompose(
    base_weight: torch.Tensor,
    delta: torch.Tensor,
    magnitude: torch.Tensor,
    wd_on_out: bool,
    strength: float = 1.0,
) -> torch.Tensor:
    """DoRA on any delta: ``W0 + strength · (m · V / ‖V‖ − W0)``, ``V = W0 + ΔW``, in fp32, in ``base_weight``'s dtype.

    The norm is per output row (``wd_on_out``) or per input column (over the output and kernel axes).
    """
    w0 = base_weight.to(torch.float32)
    v = w0 + delta.to(torch.float32).reshape(w0.shape)
    rest = [1] * (v.dim() - 1)
    if wd_on_out:
        norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape(v.shape[0], *rest)
        m = magnitude.to(torch.float32).reshape(v.shape[0], *rest)
    else:
        norm = v.transpose(0, 1).reshape(v.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, v.shape[1], *rest[1:])
        m = magnitude.to(torch.float32).reshape(1, v.shape[1], *rest[1:])
    adapted = m * v / norm
    return (w0 + strength * (adapted - w0)).to(base_weight.dtype)


def magnitude_on_out(magnitude: torch.Tensor, out_features: int) -> bool:
    """Whether a DoRA magnitude holds one value per output row (``[out]``, ``[out, 1, …]``), not per input column."""
    return magnitude.shape[0] == out_features and magnitude.numel() == out_features


def magnitude_fits(magnitude: torch.Tensor, wd_on_out: bool, shape: tuple[int, ...]) -> bool:
    """Whether a magnitude has one value per output row (or input column) of a weight of ``shape``."""
    return len(shape) >= 2 and magnitude.numel() == (shape[0] if wd_on_out else shape[1])


def _shape(delta: torch.Tensor, weight_shape: tuple[int, ...] | None) -> torch.Tensor:
    if weight_shape is not None and delta.numel() == torch.Size(weight_shape).numel():
        return delta.reshape(weight_shape)
    return delta


class _AlphaOverRank(ABC):
    """A module scaled by ``alpha / rank`` (a LoRA pair, LoHa, DoRA); a file that gives no alpha means alpha = rank."""

    alpha: float | None

    @property
    @abstractmethod
    def rank(self) -> int:
        """The module's rank."""

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


@dataclass
class LohaModule(_AlphaOverRank):
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
    def out_features(self) -> int:
        return int(self.w1a.shape[1] if self.t1 is not None else self.w1a.shape[0])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.t1 is not None and self.t2 is not None:
            m1 = _tucker(self.t1.to(dtype), self.w1a.to(dtype), self.w1b.to(dtype))
            m2 = _tucker(self.t2.to(dtype), self.w2a.to(dtype), self.w2b.to(dtype))
        else:
            m1 = _product(self.w1a.to(dtype), self.w1b.to(dtype))
            m2 = _product(self.w2a.to(dtype), self.w2b.to(dtype))
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
        return _product(self.w1a.to(dtype), self.w1b.to(dtype))

    def _w2(self, dtype: torch.dtype) -> torch.Tensor:
        if self.w2 is not None:
            return self.w2.to(dtype)
        assert self.w2a is not None and self.w2b is not None
        if self.t2 is not None:
            return _tucker(self.t2.to(dtype), self.w2a.to(dtype), self.w2b.to(dtype))
        return _product(self.w2a.to(dtype), self.w2b.to(dtype))

    @property
    def out_features(self) -> int:
        return int(self._w1(torch.float32).shape[0] * self._w2(torch.float32).shape[0])

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w1, w2 = self._w1(dtype).contiguous(), self._w2(dtype).contiguous()
        if w2.dim() == 4 and w1.dim() == 2:
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


class _Decomposed(ABC):
    """DoRA's weight decomposition over a module's ``lora_delta`` (``magnitude``, ``wd_on_out``)."""

    magnitude: torch.Tensor
    wd_on_out: bool

    @abstractmethod
    def lora_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The low-rank (or LyCORIS) delta ``ΔW`` the decomposition is applied over."""

    def apply(self, base_weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """The DoRA-adapted weight ``W0 + strength · (m · V / ‖V‖ − W0)``, ``V = W0 + ΔW``."""
        return weight_decompose(
            base_weight, self.lora_delta(torch.float32), self.magnitude, self.wd_on_out, strength
        )

    def delta(
        self, dtype: torch.dtype = torch.float32, base_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        if base_weight is None:
            raise MismatchError("a DoRA module's delta depends on the base weight: pass base_weight")
        return (self.apply(base_weight.to(dtype)) - base_weight.to(dtype)).to(dtype)


@dataclass
class DoraModule(LowRankPair, _Decomposed, _AlphaOverRank):
    """A LoRA pair plus a DoRA magnitude. ``wd_on_out``: norms per output row (True) or per input column."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    magnitude: torch.Tensor
    wd_on_out: bool = True
    kind = "dora"

    def lora_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The pair's own delta, ``(alpha / r) · up @ down``, as a plain LoRA's (``LoraModule.delta``)."""
        return LoraModule(self.down, self.up, self.alpha).delta(dtype)

    def fits(self, shape: tuple[int, ...]) -> bool:
        flat = math.prod(self.lora_delta().shape)
        return (
            flat == math.prod(shape)
            and shape[0] == self.out_features
            and magnitude_fits(self.magnitude, self.wd_on_out, shape)
        )

    def to_kohya(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
        magnitude = self.magnitude
        if (
            magnitude.dim() == 1
        ):  # LyCORIS' shapes: [out, 1, …] or [1, in, …], one axis per weight axis (conv: 4)
            ones = [1] * (self.down.dim() - 2)
            magnitude = magnitude.reshape(-1, 1, *ones) if self.wd_on_out else magnitude.reshape(1, -1, *ones)
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


def _kohya_magnitude(magnitude: torch.Tensor, wd_on_out: bool, dims: int) -> torch.Tensor:
    """A magnitude in LyCORIS' stored shape: ``[out, 1, …]`` (``wd_on_out``) or ``[1, in, …]``, ``dims`` axes."""
    if magnitude.dim() == dims:
        return magnitude
    n = magnitude.numel()
    return (
        magnitude.reshape(n, *[1] * (dims - 1)) if wd_on_out else magnitude.reshape(1, n, *[1] * (dims - 2))
    )


@dataclass
class DecomposedModule(_Decomposed):
    """DoRA on top of another algorithm's delta (LyCORIS ``weight_decompose`` on LoHa, LoKr …: ``dora_scale`` beside
    ``hada_*`` / ``lokr_*``). ``inner`` gives ``ΔW``; the magnitude re-normalises ``W0 + ΔW`` as for a DoRA LoRA."""

    inner: LohaModule | LokrModule
    magnitude: torch.Tensor
    wd_on_out: bool = True

    @property
    def kind(self) -> str:
        return f"{self.inner.kind}+dora"

    @property
    def rank(self) -> int | None:
        return self.inner.rank

    @property
    def alpha(self) -> float | None:
        return self.inner.alpha

    @property
    def out_features(self) -> int:
        return int(self.inner.out_features)

    def lora_delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The inner algorithm's ``ΔW`` (before the magnitude re-normalisation)."""
        return self.inner.delta(dtype)

    def fits(self, shape: tuple[int, ...]) -> bool:
        delta = self.lora_delta()
        return (
            delta.numel() == math.prod(shape)
            and delta.shape[0] == shape[0]
            and magnitude_fits(self.magnitude, self.wd_on_out, shape)
        )

    def to_kohya(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = self.inner.to_kohya(dtype)
        dims = max(2, self.lora_delta().dim())
        magnitude = _kohya_magnitude(self.magnitude, self.wd_on_out, dims)
        out["dora_scale"] = (magnitude if dtype is None else magnitude.to(dtype)).contiguous()
        return out


@dataclass
class Ia3Module:
    """IA3 (LyCORIS ``ia3``, ``weight`` + ``on_input``): ``ΔW = W0 ⊙ w`` with ``w`` one factor per output row
    (``on_input`` False) or per input column (``on_input`` True)."""

    weight: torch.Tensor
    on_input: bool = False
    kind = "ia3"
    rank = None
    alpha = None

    @property
    def out_features(self) -> int:
        """The vector's length: the output size, or (``on_input``) the input size, which ``fits`` checks."""
        return int(self.weight.numel())

    def fits(self, shape: tuple[int, ...]) -> bool:
        return len(shape) >= 2 and self.weight.numel() == (shape[1] if self.on_input else shape[0])

    def _factor(self, w0: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(torch.float32).reshape(-1)
        rest = [1] * (w0.dim() - 2)
        return w.reshape(1, -1, *rest) if self.on_input else w.reshape(-1, 1, *rest)

    def apply(self, base_weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        w0 = base_weight.to(torch.float32)
        return (w0 + strength * (w0 * self._factor(w0))).to(base_weight.dtype)

    def delta(
        self, dtype: torch.dtype = torch.float32, base_weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        if base_weight is None:
            raise MismatchError("an IA3 module's delta depends on the base weight: pass base_weight")
        w0 = base_weight.to(torch.float32)
        return (w0 * self._factor(w0)).to(dtype)

    def to_kohya(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        weight = self.weight if dtype is None else self.weight.to(dtype)
        return {"weight": weight.contiguous(), "on_input": torch.tensor(int(self.on_input))}
