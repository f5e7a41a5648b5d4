"""Merge math: where each LoRA module lands in a model's tensors (``plan_targets`` over a layout's ``Locator``), the
merged weight ``W0 + Σ alpha·delta`` in fp32 (``apply_contributions``), the overflow checks before and after the
cast back to the output dtype, and the streaming merge of one tensor file (``merge_tensor_file``, through
``lorax.io.rewrite``). ``lorax merge`` orchestrates these.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, cast

from lorax.errors import MismatchError
from lorax.io.checkpoint import DiffusersCheckpoint, PickleSource, SafetensorsSource, SingleFileCheckpoint
from lorax.io.keymaps import part_shapes
from lorax.io.model_layout import st_to_torch
from lorax.io.rewrite import rewrite_tensor_file
from lorax.progress import Task

if TYPE_CHECKING:
    import torch

    from lorax.adapters.array_merge import ArrayState
    from lorax.adapters.state import DeltaModule, LoraModule, LoraState


@dataclass
class Contribution:
    module_name: str
    module: LoraModule | DeltaModule
    weight: float
    part: int = 0
    parts: int = 1
    lora: str = ""  # the file it comes from, for messages


@dataclass
class Slot:
    """Where a module's weight lives: a tensor key in one file, a row slice of it, and the slice's shape."""

    key: str
    part: int
    parts: int
    shape: tuple[int, ...]


Locator = Callable[[str, str], Slot | None]


def _delta_shape(module: LoraModule | DeltaModule) -> tuple[int, ...]:
    shape = getattr(module, "delta_shape", None)
    if callable(shape):
        return tuple(shape())
    lora_delta = getattr(module, "lora_delta", None)  # DoRA: the delta proper needs the base weight
    if callable(lora_delta):
        return tuple(lora_delta().shape)
    return tuple(module.delta().shape)


@dataclass
class _BiasDelta:
    """A bias difference as a delta module (LyCORIS ``diff_b``)."""

    diff_b: torch.Tensor
    kind = "bias"

    @property
    def out_features(self) -> int:
        return int(self.diff_b.shape[0])

    def delta(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return self.diff_b if dtype is None else self.diff_b.to(dtype)


def _fits(delta: tuple[int, ...], slot: tuple[int, ...]) -> bool:
    if delta == slot:
        return True
    strip = lambda s: tuple(s[: len(s) - next((i for i, d in enumerate(reversed(s)) if d != 1), 0)])  # noqa: E731
    return math.prod(delta) == math.prod(slot) and strip(delta) == strip(slot)


def module_fits(module: LoraModule | DeltaModule, slot: tuple[int, ...]) -> bool:
    """Whether a module's delta lands on a weight of shape ``slot`` (modules that scale or re-normalise the base
    weight, IA3 and DoRA, say so themselves: ``fits``)."""
    fits = getattr(module, "fits", None)
    if callable(fits):
        return bool(fits(slot))
    return _fits(_delta_shape(module), slot)


def _described_shape(module: LoraModule | DeltaModule) -> str:
    if getattr(module, "kind", None) == "ia3":
        side = "input columns" if getattr(module, "on_input", False) else "output rows"
        return f"IA3 over {module.out_features} {side}"
    return str(list(_delta_shape(module)))


def plan_targets(
    loras: list[tuple[str, LoraState | ArrayState, float, float]], locate: Locator
) -> tuple[dict[str, list[Contribution]], list[str], list[str], dict[str, int]]:
    """targets by tensor key, unmatched module names, shape mismatches, matched count per LoRA."""
    targets: dict[str, list[Contribution]] = {}
    unmatched: list[str] = []
    mismatches: list[str] = []
    matched: dict[str, int] = {}
    for label, state, alpha, alpha_text in loras:
        matched[label] = 0
        modules = cast("dict[str, LoraModule | DeltaModule]", state.modules)  # ArrayLora: LoraModule's shapes
        for name, module in modules.items():
            component, _, path = name.partition(".")
            slot = locate(component, path + ".weight")
            if slot is None:
                unmatched.append(name)
                continue
            if not module_fits(module, slot.shape):
                shape = _described_shape(module)
                mismatches.append(f"{name} (LoRA {shape}, model {list(slot.shape)})")
                continue
            weight = alpha_text if component.startswith("text_encoder") else alpha
            targets.setdefault(slot.key, []).append(
                Contribution(name, module, weight, slot.part, slot.parts, label)
            )
            matched[label] += 1
            bias = getattr(module, "diff_b", None)  # LyCORIS full-difference modules may carry a bias delta
            if bias is not None:
                bias_slot = locate(component, path + ".bias")
                if bias_slot is None or math.prod(bias_slot.shape) != bias.numel():
                    mismatches.append(f"{name} bias (LoRA {list(bias.shape)}, model has no matching bias)")
                    continue
                targets.setdefault(bias_slot.key, []).append(
                    Contribution(
                        name + ".bias", _BiasDelta(bias), weight, bias_slot.part, bias_slot.parts, label
                    )
                )
    return targets, unmatched, mismatches, matched


def apply_contributions(
    weight: torch.Tensor, contributions: list[Contribution], *, check: bool = True
) -> torch.Tensor:
    """``W0 + Σ alpha·delta`` in fp32, each delta into its row slice (OpenCLIP's fused q;k;v). ``check=False``
    leaves the finiteness check to a caller that checks the weight it writes anyway (``_merged``)."""
    import torch

    from lorax.adapters.state import LoraModule

    w = weight.to(torch.float32)
    if w.data_ptr() == weight.data_ptr():
        w = w.clone()
    for c in contributions:
        rows = w.shape[0] // c.parts
        view = w.narrow(0, c.part * rows, rows)
        apply = getattr(c.module, "apply", None)
        if callable(apply):  # DoRA and IA3: W0 + weight·(W'(W0) − W0), they need W0 itself
            view.copy_(apply(view, c.weight).to(torch.float32).reshape(view.shape))
        elif isinstance(c.module, LoraModule):  # W += alpha·scale·up@down in one fused pass, no delta tensor
            up = c.module.up.to(torch.float32).reshape(c.module.up.shape[0], -1)
            down = c.module.down.to(torch.float32).reshape(c.module.rank, -1)
            flat = view.view(view.shape[0], -1)
            if flat.shape != (up.shape[0], down.shape[1]):
                flat = view.view(up.shape[0], down.shape[1])
            flat.addmm_(up, down, alpha=c.weight * c.module.scale)
        else:
            view.add_(c.module.delta(torch.float32).reshape(view.shape), alpha=c.weight)
    if check and not bool(
        torch.isfinite(w).all()
    ):  # one pass over the merged weight (a sum could overflow alone)
        raise MismatchError(_not_finite(contributions, NOT_FINITE))
    return w


NOT_FINITE = "weights that are not finite (lower the LoRA's scale)"


def check_plan(
    unmatched: list[str], mismatches: list[str], family: str | None, base: str, allow_unmatched: bool
) -> None:
    """A plan with modules that do not fit is refused; one with modules that match nothing unless allowed."""
    if mismatches:
        shown = "; ".join(mismatches[:3])
        raise MismatchError(
            f"{len(mismatches)} LoRA modules do not fit the {family} base {base}: {shown}"
            + (" …" if len(mismatches) > 3 else "")
        )
    if unmatched and not allow_unmatched:
        shown = ", ".join(unmatched[:3])
        raise MismatchError(
            f"{len(unmatched)} LoRA modules match no weight of the base {base}: {shown}"
            + (" …" if len(unmatched) > 3 else "")
            + "; is the LoRA for this model? pass --allow-unmatched to merge the rest"
        )


def _not_finite(contributions: list[Contribution], what: str) -> str:
    """Names the LoRA file(s) and the module whose merge gives non-finite weights."""
    files = ", ".join(dict.fromkeys(c.lora for c in contributions if c.lora))
    modules = ", ".join(dict.fromkeys(c.module_name for c in contributions))
    return (
        f"{files}: merging module {modules} gives {what}"
        if files
        else f"merging module {modules} gives {what}"
    )


def merge_tensor_file(
    source: SafetensorsSource | PickleSource,
    out: Path,
    targets: dict[str, list[Contribution]],
    *,
    dtype: str | None = None,
    metadata: dict[str, str] | None = None,
    replacements: dict[str, torch.Tensor] | None = None,
    task: Task | None = None,
) -> tuple[int, int]:
    """Write ``source`` to ``out`` with ``targets`` merged; every other tensor copied byte for byte when its dtype
    stays. Returns (tensors merged, tensors copied)."""
    changes = {k: partial(_merged, k, contributions) for k, contributions in targets.items()}
    return rewrite_tensor_file(
        source, out, changes, dtype=dtype, metadata=metadata, replacements=replacements, task=task
    )


def _merged(key: str, contributions: list[Contribution], weight: torch.Tensor, dt: str) -> torch.Tensor:
    import torch

    from lorax.adapters.merge_rows import merge_rows, plan_rows

    plan = plan_rows(contributions, tuple(weight.shape))
    fast = None if plan is None else merge_rows(weight, plan, dt)
    if (
        fast is not None
    ):  # plain LoRA pairs, in blocks of rows: the same values as below (lorax.adapters.merge_rows)
        return fast
    merged = apply_contributions(weight, contributions, check=False)
    w = merged.to(st_to_torch(dt))
    # One pass over the weight as written: a non-finite fp32 sum stays non-finite in any dtype, and fp16 overflows
    # to inf in the cast; which of the two it was decides the message.
    if not bool(
        torch.isfinite(w if w.element_size() > 1 else w.float()).all()
    ):  # fp8 has no isfinite of its own
        if not bool(torch.isfinite(merged).all()):
            raise MismatchError(_not_finite(contributions, NOT_FINITE))
        raise MismatchError(
            _not_finite(
                contributions,
                f"weights that are not finite in {dt} in {key} "
                "(lower the LoRA's scale or merge to a wider --dtype)",
            )
        )
    return w


# ---------------------------------------------------------------------------------------------------------------
# Locators: a model layout's tensor (and row slice) for a module's weight


def single_file_locator(ckpt: SingleFileCheckpoint) -> Locator:
    keymap = ckpt.keymap
    src = ckpt.source

    def locate(component: str, key: str) -> Slot | None:
        found = keymap.locate(component, key)
        if found is None:
            return None
        entry, i = found
        if entry.reshape == "transpose":
            return None
        shape = src.shape(entry.single)
        if len(entry.parts) > 1:
            rows = part_shapes(entry, shape)[i][0]
            return Slot(entry.single, i, len(entry.parts), (rows, *shape[1:]))
        return Slot(entry.single, 0, 1, shape)

    return locate


def component_locator(
    component: str, source: SafetensorsSource | PickleSource
) -> Callable[[str], Slot | None]:
    """One component folder's weights, by diffusers key (a text encoder's saved with or without ``text_model.``)."""
    keys = set(source.keys())

    def locate(key: str) -> Slot | None:
        disk = key
        if disk not in keys and component.startswith("text_encoder") and disk.startswith("text_model."):
            disk = disk[len("text_model.") :]
        if disk not in keys:
            return None
        return Slot(disk, 0, 1, source.shape(disk))

    return locate


def folder_locator(ckpt: DiffusersCheckpoint) -> Locator:
    """A diffusers folder's weights; a slot's key is ``component/key`` (``by_component`` splits a plan by folder)."""
    locators = {c: component_locator(c, ckpt.source(c)) for c in ckpt.components()}

    def locate(component: str, key: str) -> Slot | None:
        loc = locators.get(component)
        slot = loc(key) if loc else None
        return None if slot is None else Slot(f"{component}/{slot.key}", 0, 1, slot.shape)

    return locate


def by_component(targets: dict[str, list[Contribution]]) -> dict[str, dict[str, list[Contribution]]]:
    """A folder plan (keys ``component/key``) as ``{component: {key: contributions}}``."""
    out: dict[str, dict[str, list[Contribution]]] = {}
    for key, contributions in targets.items():
        component, _, disk = key.partition("/")
        out.setdefault(component, {})[disk] = contributions
    return out
