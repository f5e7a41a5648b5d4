"""Apply LoRAs and learned tokens to a live diffusers pipeline, without touching any file.

Each LoRA gets its own UNet scale and text-encoder scale (the seed's ``alpha_unet`` / ``alpha_text``) and optional
block weights (``down`` / ``mid`` / ``up``). Plain low-rank modules go through PEFT (diffusers' own
``load_lora_weights`` fed a PEFT-named state dict), so scales can change between images or between denoising steps
at no cost; ``fuse`` merges them into the weights for speed. Modules that only produce a delta (LoHa, LoKr, DoRA …)
are added to the weights directly and taken back out by :meth:`AppliedLoras.remove`.

Block weights are ``lorax.adapters.blocks``; learned tokens (tokenizer and text-encoder rows) are
``lorax.adapters.live_tokens``. Their names stay importable from here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorax.adapters.blocks import (  # re-exported: generate and the CLI import them from here
    BlockWeights,
    block_weight,
    diffusers_block_dict,  # noqa: F401
    parse_blocks,  # noqa: F401
)
from lorax.adapters.live import component as _component
from lorax.adapters.live import pipeline_family
from lorax.adapters.live_tokens import (  # re-exported: generate imports them from here
    check_prompt_tokens,  # noqa: F401
    register_tokens,  # noqa: F401
)
from lorax.adapters.state import DeltaModule, LoraModule, LoraState
from lorax.errors import ConfigError, MismatchError
from lorax.libraries import quiet_libraries  # re-exported: gen and services import it from here


@dataclass
class LoraRequest:
    """One LoRA to apply and how strongly.

    ``text_scale`` ``None`` means the same as ``unet_scale``. ``name`` becomes the PEFT adapter name (made unique).
    """

    state: LoraState
    name: str = "lora"
    unet_scale: float = 1.0
    text_scale: float | None = None
    blocks: BlockWeights | None = None
    source: Path | None = None

    @property
    def effective_text_scale(self) -> float:
        return self.unet_scale if self.text_scale is None else self.text_scale


def _live_path(component: str, model: torch.nn.Module | None, path: str) -> str:
    """Map an on-disk text-encoder path (with ``text_model.``) to the live module path, and leave others alone."""
    from lorax.models.families import disk_to_live

    return disk_to_live(component, path, model)


def _lora_components(pipe: Any) -> tuple[str, ...]:
    """The LoRA-able components of ``pipe``'s family (UNet first)."""
    from lorax.models import families

    return families.get(pipeline_family(pipe)).component_names()


def _denoiser(pipe: Any) -> str:
    """The component that takes a LoRA's UNet scale: ``unet``, or Flux's ``transformer``."""
    from lorax.models import families

    return families.get(pipeline_family(pipe)).unet().name


def check_fits(pipe: Any, request: LoraRequest) -> list[str]:
    """Every module of the LoRA must name a weight of the model with the delta's shape; else one clear error.

    Returns warnings (a family label that differs from the model's although every shape fits).
    """
    state = request.state
    label = request.source or request.name
    family = pipeline_family(pipe)
    made_for = f"made for {state.family}, " if state.family else ""
    missing: list[str] = []
    wrong: list[str] = []
    for key, module in state.modules.items():
        component, _, path = key.partition(".")
        model = _component(pipe, component)
        if model is None:
            missing.append(key)
            continue
        try:
            target = model.get_submodule(_live_path(component, model, path))
        except AttributeError:
            missing.append(key)
            continue
        weight = getattr(target, "weight", None)
        if not isinstance(weight, torch.Tensor):
            missing.append(key)
            continue
        shape = tuple(weight.shape)
        if isinstance(module, LoraModule):
            kernel = tuple(module.down.shape[2:]) or (1, 1)
            target_kernel = tuple(shape[2:]) or (1, 1)
            if module.out_features != shape[0] or module.in_features != shape[1] or kernel != target_kernel:
                wrong.append(f"{key} {tuple(module.delta_shape())} vs {shape}")
        elif callable(getattr(module, "fits", None)):  # IA3, DoRA on LoHa/LoKr: they check themselves
            if not module.fits(shape):  # type: ignore[union-attr,attr-defined]
                wrong.append(f"{key} ({getattr(module, 'kind', 'module')}) vs {shape}")
        elif int(module.out_features) != shape[0]:
            wrong.append(f"{key} out {module.out_features} vs {shape[0]}")
    unfit = f"does not fit this model ({made_for}the model is {family}): "
    if missing:
        raise MismatchError(
            f"{unfit}it targets {_first(missing)}, which the model does not have; use a LoRA made for this model",
            path=label,
        )
    if wrong:
        raise MismatchError(
            f"{unfit}shapes differ at {_first(wrong)}; use a LoRA made for this model", path=label
        )
    if state.family and state.family != family:
        return [
            f"{label}: labelled for {state.family} but every module fits this {family} model; applying it"
        ]
    return []


def _first(items: list[str]) -> str:
    """The first of ``items``, and how many more there are."""
    return items[0] + (f" (and {len(items) - 1} more)" if len(items) > 1 else "")


def peft_state_dict(state: LoraState, pipe: Any) -> dict[str, torch.Tensor]:
    """The low-rank modules of ``state`` as one diffusers/PEFT-named dict for ``pipe.load_lora_weights``.

    Keys are ``<component>.<live module path>.lora_A.weight`` / ``.lora_B.weight`` (the PEFT bridge's naming) with
    ``alpha / r`` folded into ``lora_B``, so diffusers' default ``lora_alpha = r`` reproduces each delta exactly.
    A 2-D pair aimed at a 1×1 convolution (or the reverse) is reshaped to the layer it lands on.
    """
    from lorax.adapters.peft_bridge import to_pipeline_state_dict

    low_rank = LoraState(
        modules={k: m for k, m in state.modules.items() if isinstance(m, LoraModule)}, family=state.family
    )
    if not low_rank.modules:
        return {}
    out = to_pipeline_state_dict(low_rank, pipe)
    for key, tensor in out.items():
        component, _, rest = key.partition(".")
        model = _component(pipe, component)
        if model is None:
            continue
        target = model.get_submodule(rest.rsplit(".lora_", 1)[0])
        if isinstance(target, torch.nn.Conv2d) and tensor.dim() == 2:
            out[key] = tensor[:, :, None, None]
        elif isinstance(target, torch.nn.Linear) and tensor.dim() == 4:
            out[key] = tensor.flatten(1)
    return out


@dataclass
class _DeltaPatch:
    """A delta added in place to a weight (or bias); the weight's original lives in ``AppliedLoras._originals``."""

    name: str
    component: str
    path: str
    param: torch.nn.Parameter
    delta: torch.Tensor
    block: float


@dataclass
class AppliedLoras:
    """LoRAs live on a pipeline. Change their strength with :meth:`set_scales`; take them off with :meth:`remove`."""

    pipe: Any
    requests: list[LoraRequest]
    names: list[str]
    fused: bool = False
    warnings: list[str] = field(default_factory=list)
    _peft_names: list[str] = field(default_factory=list)
    _patches: list[_DeltaPatch] = field(default_factory=list)
    _originals: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=dict)
    _saved: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    _factors: tuple[float, float] = (1.0, 1.0)

    def scales(self) -> dict[str, tuple[float, float]]:
        """Each adapter's current (UNet, text-encoder) scale."""
        fu, ft = self._factors
        return {
            name: (fu * r.unet_scale, ft * r.effective_text_scale)
            for name, r in zip(self.names, self.requests, strict=True)
        }

    def set_scales(self, unet_factor: float = 1.0, text_factor: float = 1.0) -> None:
        """Multiply every LoRA's requested UNet / text-encoder scales by these factors (1, 1 = as requested)."""
        if self.fused and (unet_factor, text_factor) != self._factors:
            raise ConfigError("the LoRAs are fused: their scales cannot change (leave out --fuse)")
        self._factors = (unet_factor, text_factor)
        by_name = dict(zip(self.names, self.requests, strict=True))
        denoiser = _denoiser(self.pipe)  # the UNet, or Flux's transformer: it takes the UNet scale
        for component, module_path, layer, present in _tuner_layers(self.pipe, self._peft_names):
            layer.set_adapter(present)
            for name in present:
                request = by_name[name]
                if component == denoiser:
                    weight = unet_factor * request.unet_scale * block_weight(request.blocks, module_path)
                else:
                    weight = text_factor * request.effective_text_scale
                layer.set_scale(name, weight)
        with torch.no_grad():
            # every patched tensor from its original, then every delta on it (several LoRAs may share a weight)
            for param, original in self._originals.values():
                param.copy_(original)
            for patch in self._patches:
                request = by_name[patch.name]
                if patch.component == denoiser:
                    scale = unet_factor * request.unet_scale * patch.block
                else:
                    scale = text_factor * request.effective_text_scale
                if scale != 0.0:
                    patch.param.add_(patch.delta.to(patch.param.dtype), alpha=scale)

    def fuse(self) -> None:
        """Merge the low-rank adapters into the weights at their current scales and drop the PEFT wrappers."""
        if self.fused or not self._peft_names:
            self.fused = True
            return
        for component, module_path, layer, present in _tuner_layers(self.pipe, self._peft_names):
            self._saved[(component, module_path)] = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=present)
        with quiet_libraries():
            self.pipe.unload_lora_weights()
        self.fused = True

    def remove(self) -> None:
        """Take every LoRA off the pipeline: the weights are the base model's again."""
        with torch.no_grad():
            if self._saved:  # fused: the weights as they were before merging (patches still on them)
                for (component, path), original in self._saved.items():
                    model = _component(self.pipe, component)
                    if model is not None:
                        model.get_submodule(path).weight.copy_(original)
                self._saved.clear()
            elif self._peft_names:
                with quiet_libraries():
                    self.pipe.delete_adapters(self._peft_names)
            for param, original in self._originals.values():
                param.copy_(original)
            self._originals.clear()
            self._patches.clear()
        self._peft_names = []


def _tuner_layers(pipe: Any, names: list[str]) -> Iterator[tuple[str, str, Any, list[str]]]:
    """Each PEFT layer on ``pipe``'s LoRA components that holds any adapter of ``names``: (component, module path,
    layer, the adapters of ``names`` it holds)."""
    if not names:
        return
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component in _lora_components(pipe):
        model = _component(pipe, component)
        if model is None:
            continue
        for module_path, module in model.named_modules():
            if not isinstance(module, BaseTunerLayer):
                continue
            present = [n for n in names if n in getattr(module, "scaling", {})]
            if present:
                yield component, module_path, module, present


def _unique_names(requests: Iterable[LoraRequest]) -> list[str]:
    names: list[str] = []
    for request in requests:
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", request.name).strip("_") or "lora"
        name, i = base, 2
        while name in names:
            name, i = f"{base}_{i}", i + 1
        names.append(name)
    return names


def apply_loras(pipe: Any, requests: list[LoraRequest], *, fuse: bool = False) -> AppliedLoras:
    """Put ``requests`` on ``pipe`` at their scales; with ``fuse`` merge them into the weights.

    Raises:
        MismatchError: a LoRA targets modules the model lacks, or with other shapes (a LoRA for another family).
    """
    warnings: list[str] = []
    for request in requests:
        warnings += check_fits(pipe, request)
    names = _unique_names(requests)
    applied = AppliedLoras(pipe, list(requests), names, warnings=warnings)
    for name, request in zip(names, requests, strict=True):
        low_rank = peft_state_dict(request.state, pipe)
        if low_rank:
            with quiet_libraries():
                pipe.load_lora_weights(low_rank, adapter_name=name)
            _check_loaded(pipe, name, low_rank, request)
            applied._peft_names.append(name)
        for key, module in request.state.modules.items():
            if isinstance(module, LoraModule):
                continue
            component, _, path = key.partition(".")
            model = _component(pipe, component)
            assert model is not None  # checked by check_fits
            live = _live_path(component, model, path)
            target = model.get_submodule(live)
            block = block_weight(request.blocks, live) if component == _denoiser(pipe) else 1.0
            pairs = [(target.weight, _delta_of(module, target.weight, key, request.source or request.name))]
            bias_delta = getattr(module, "diff_b", None)  # a full difference may carry the bias's too
            if isinstance(bias_delta, torch.Tensor):
                if target.bias is None or target.bias.numel() != bias_delta.numel():
                    raise MismatchError(
                        f"{key}: a bias difference for a layer without that bias", path=request.source
                    )
                pairs.append((target.bias, bias_delta.float().reshape(target.bias.shape)))
            for param, delta in pairs:
                applied._originals.setdefault(id(param), (param, param.detach().clone()))
                applied._patches.append(
                    _DeltaPatch(
                        name=name,
                        component=component,
                        path=live,
                        param=param,
                        delta=delta.to(param.device),
                        block=block,
                    )
                )
    applied.set_scales(1.0, 1.0)
    if fuse:
        applied.fuse()
    return applied


def _delta_of(module: DeltaModule | LoraModule, param: torch.Tensor, key: str, source: Any) -> torch.Tensor:
    if hasattr(module, "apply"):  # DoRA: the delta depends on the base weight
        delta = module.delta(torch.float32, base_weight=param.detach().float())  # type: ignore[call-arg]
    else:
        delta = module.delta(torch.float32)
    if delta.numel() != param.numel():
        raise MismatchError(
            f"{key}: a delta of shape {tuple(delta.shape)} does not fit the weight {tuple(param.shape)}; "
            "use a LoRA made for this model",
            path=source,
        )
    return delta.reshape(param.shape)


def _check_loaded(pipe: Any, name: str, low_rank: Mapping[str, torch.Tensor], request: LoraRequest) -> None:
    """diffusers only warns about keys it could not place: count the wrapped layers and refuse a partial load."""
    expected = sum(1 for key in low_rank if key.endswith(".lora_A.weight"))
    found = sum(1 for _ in _tuner_layers(pipe, [name]))
    if found != expected:
        raise MismatchError(
            f"only {found} of {expected} LoRA layers could be placed on the model",
            path=request.source or request.name,
        )
