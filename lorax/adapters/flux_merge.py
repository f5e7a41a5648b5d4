"""Merging LoRAs into Flux single files (the BFL transformer file, all-in-one files), bf16/fp16/fp32 and fp8.

``lorax.services.merge`` streams the file as for SD (untouched tensors copied byte for byte) and hands each targeted
tensor to the contributions planned here. BFL fuses what diffusers splits, in slices of unequal size
(``single_blocks.N.linear1`` is ``to_q; to_k; to_v; proj_mlp`` in rows ``[h, h, h, 4h]``), and stores the final
layer's modulation as (shift, scale) where diffusers' ``norm_out.linear`` is (scale, shift): each module's delta goes
into its own row slice, the final layer's with its halves swapped, in the diffusers order its LoRA is written in.

fp8 weights (``F8_E4M3`` / ``F8_E5M2``) are dequantised, merged in fp32 and requantised by the file's own rule: a
plain fp8 tensor is cast back (round to nearest, saturating at the format's largest value); a "scaled fp8" tensor
(ComfyUI's ``scaled_fp8`` checkpoints: a per-tensor ``scale_weight`` beside the weight, ``W = W8 · scale``; ComfyUI's
``comfy/ops.py`` requantises a patched weight as ``W' / scale`` with the scale kept) is divided by its own scale,
which is kept as it is. Layouts that cannot be requantised exactly (GGUF's block quantisation, bitsandbytes nf4/int8)
are refused in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorax.errors import ConfigError
from lorax.io.model_layout import FP8_DTYPES

if TYPE_CHECKING:
    import torch

    from lorax.adapters.merge import Contribution
    from lorax.io.checkpoint import SingleFileCheckpoint
    from lorax.io.keymaps import Entry

FP8 = FP8_DTYPES
# A scaled-fp8 weight's scale: ``<module>.scale_weight`` (ComfyUI's scaled_fp8 files), ``<module>.weight_scale``
# (the newer quantised layout).
SCALE_SUFFIXES = ("scale_weight", "weight_scale")
# Keys of quantised layouts whose requantisation lorax cannot reproduce (bitsandbytes' nf4 / fp4 / int8).
_BNB_MARKERS = (".absmax", ".quant_map", ".quant_state.", ".SCB", ".nested_absmax")


def refuse_unrequantisable(base: Path) -> None:
    """One line for a base whose quantisation a merge cannot redo exactly (GGUF, bitsandbytes)."""
    if base.suffix.lower() == ".gguf":
        raise ConfigError(
            "a GGUF model is quantised in blocks that lorax cannot requantise exactly; merge into the bf16, fp16 "
            "or fp8 file and quantise the result to GGUF after",
            path=base,
        )
    if base.is_file() and base.suffix.lower() == ".safetensors":
        from lorax.io.safetensors_io import read_header

        bnb = next((k for k in read_header(base).tensors if any(m in k for m in _BNB_MARKERS)), None)
        if bnb is not None:
            raise ConfigError(
                f"this model is quantised by bitsandbytes (nf4 / int8: {bnb}), which lorax cannot requantise "
                "exactly; merge into the bf16, fp16 or fp8 file and quantise the result after",
                path=base,
            )


def needs_slicing(ckpt: SingleFileCheckpoint, targets: dict[str, list[Contribution]]) -> bool:
    """Whether the plan needs ``sliced_targets``: a file that fuses in unequal slices or swapped halves (Flux), or
    fp8 weights to requantise."""
    return any(e.sizes or e.reshape == "swap" for e in ckpt.keymap.entries) or any(
        ckpt.source.dtype(k) in FP8 for k in targets
    )


@dataclass
class _Sliced:
    """All contributions to one single-file tensor, as one module that ``apply_contributions`` applies whole: each
    diffusers part's delta lands in its row slice (swapped halves where the entry swaps), fp8 scales around it."""

    entry: Entry
    shape: tuple[int, ...]
    contributions: list[Contribution]
    scale: float | None = None  # scaled fp8: the weight's own per-tensor scale
    fp8: str | None = None  # the safetensors fp8 dtype, when the tensor is fp8
    kind = "sliced"

    def fits(self, slot: tuple[int, ...]) -> bool:
        return tuple(slot) == self.shape

    def apply(self, w: torch.Tensor, weight: float) -> torch.Tensor:
        """``w``: the tensor in fp32, a copy of its own (``apply_contributions`` made it), merged in place."""
        import torch

        from lorax.adapters.merge import apply_contributions
        from lorax.adapters.state import LoraModule
        from lorax.io.keymaps import part_shapes
        from lorax.io.keymaps.flux import swap_rows

        swap = self.entry.reshape == "swap"
        if self.scale is not None:
            w.mul_(self.scale)
        rows = [s[0] for s in part_shapes(self.entry, tuple(w.shape))]
        starts = [sum(rows[:i]) for i in range(len(rows))]
        rest: dict[int, list[Contribution]] = {}
        for c in self.contributions:
            view = w.narrow(0, starts[c.part], rows[c.part])
            if type(c.module) is LoraModule:  # up @ down into the slice in one pass, no delta tensor
                m = c.module
                up = m.up.to(torch.float32).reshape(m.up.shape[0], -1)
                flat = view.reshape(view.shape[0], -1)
                assert flat.data_ptr() == view.data_ptr()
                flat.addmm_(swap_rows(up) if swap else up, m.down.to(torch.float32).reshape(m.rank, -1),
                            alpha=c.weight * m.scale)  # fmt: skip
            else:  # DoRA, IA3, LyCORIS deltas: the generic rule on the slice, in diffusers' row order
                rest.setdefault(c.part, []).append(c)
        for part, group in rest.items():
            view = w.narrow(0, starts[part], rows[part])
            own = swap_rows(view) if swap else view
            merged = apply_contributions(own, [_whole(c) for c in group])
            view.copy_(swap_rows(merged) if swap else merged)
        if self.scale is not None:
            w.div_(self.scale)
        if self.fp8 is not None:
            limit = float(
                torch.finfo(torch.float8_e4m3fn if self.fp8 == "F8_E4M3" else torch.float8_e5m2).max
            )
            w.clamp_(-limit, limit)
        return w


def _whole(c: Contribution) -> Contribution:
    from dataclasses import replace

    return replace(c, part=0, parts=1)


def sliced_targets(
    ckpt: SingleFileCheckpoint, targets: dict[str, list[Contribution]]
) -> dict[str, list[Contribution]]:
    """The plan of ``merge.plan_targets`` (contributions by single-file key, ``part`` the diffusers part's index)
    folded into one ``_Sliced`` contribution per tensor, with the fp8 rule of the file."""
    from lorax.adapters.merge import Contribution

    src = ckpt.source
    out: dict[str, list[Contribution]] = {}
    for key, contributions in targets.items():
        entry = ckpt.keymap.by_single[key]
        dtype = src.dtype(key)
        scale = _scale_of(ckpt, key) if dtype in FP8 else None
        module = _Sliced(entry, tuple(src.shape(key)), contributions, scale, dtype if dtype in FP8 else None)
        label = ", ".join(dict.fromkeys(c.lora for c in contributions if c.lora))
        names = ", ".join(dict.fromkeys(c.module_name for c in contributions))
        out[key] = [Contribution(names, module, 1.0, 0, 1, label)]  # type: ignore[arg-type]
    return out


def _scale_of(ckpt: SingleFileCheckpoint, key: str) -> float | None:
    """A scaled-fp8 weight's per-tensor scale (``None``: plain fp8); anything but one number is refused."""
    stem = key.rsplit(".", 1)[0]
    names = [f"{stem}.{s}" for s in SCALE_SUFFIXES if key.endswith(".weight")]
    found = next((n for n in names if n in ckpt.source), None)
    if found is None:
        return None
    scale = ckpt.source.get(found)
    if scale.numel() != 1:
        raise ConfigError(
            f"{found} holds {scale.numel()} scales; lorax requantises scaled fp8 with one scale per tensor only",
            path=ckpt.path,
        )
    return float(scale.float().reshape(()))
