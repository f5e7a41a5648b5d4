"""LoRA layers through PEFT: inject into a component, read the weights back, restore them (for resume).

Injection uses ``peft.inject_adapter_in_model`` with an explicit module list for every component (transformers 5's own
``add_adapter`` asks for a newer PEFT than the registries serve; see DESIGN.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorax.adapters.state import LoraState

ADAPTER = "default"
LYCORIS_PREFIXES = ("hada_", "lokr_")  # PEFT's LoHa and LoKr parameters (lorax.training.algos)


def is_adapter_param(name: str) -> bool:
    """Whether a live parameter name is a LoRA, LoHa or LoKr weight."""
    return "lora_" in name or any(f".{p}" in name for p in LYCORIS_PREFIXES)


def inject_lora(
    model: Any,
    modules: list[str],
    *,
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    dora: bool = False,
    seed: int = 0,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
) -> list[Any]:
    """Add a trainable LoRA (or DoRA) to ``modules`` of ``model``; freeze everything else; return the LoRA parameters.

    The initial weights (PEFT's: Kaiming-uniform ``A``, zero ``B``) are drawn from ``seed``, so the update starts at 0.
    """
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    model.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,  # type: ignore[arg-type]  # PEFT scales by any float alpha
        lora_dropout=dropout,
        use_dora=dora,
        target_modules=list(modules),
        init_lora_weights=True,
        rank_pattern=dict(rank_pattern or {}),  # per-module ranks and alphas (--block-dims)
        alpha_pattern=dict(alpha_pattern or {}),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def lora_tensors(model: Any) -> dict[str, Any]:
    """The LoRA weights of ``model`` as PEFT names them (``<path>.lora_A.weight`` …), detached fp32 CPU copies."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    return {k: v.detach().float().cpu().clone() for k, v in state.items()}


def load_lora_tensors(model: Any, tensors: dict[str, Any]) -> None:
    """Put back weights read by ``lora_tensors``; every LoRA weight of ``model`` must be given, nothing else."""
    import torch

    from lorax.errors import MismatchError

    live = {n: p for n, p in model.named_parameters() if is_adapter_param(n)}
    by_key = {_peft_key(n): p for n, p in live.items()}
    missing = sorted(set(by_key) - set(tensors))
    extra = sorted(set(tensors) - set(by_key))
    if missing or extra:
        raise MismatchError(
            f"checkpoint LoRA does not fit the model (missing {missing[:3]}, unexpected {extra[:3]}); "
            "resume with the same --model, --rank and --targets"
        )
    with torch.no_grad():
        for key, param in by_key.items():
            param.copy_(tensors[key].to(param.dtype))


def _peft_key(name: str) -> str:
    # live parameter "x.lora_A.default.weight" → state-dict key "x.lora_A.weight"
    return name.replace(f".{ADAPTER}.", ".").replace(f".{ADAPTER}", "")


def lora_parameters(model: Any) -> list[Any]:
    return [p for n, p in model.named_parameters() if is_adapter_param(n) and p.requires_grad]


def trained_state(
    models: dict[str, Any],
    *,
    rank: int,
    alpha: float,
    family: str | None = None,
    alpha_patterns: dict[str, dict[str, float]] | None = None,
) -> LoraState:
    """``LoraState`` of the LoRA (or DoRA) trained in ``models`` (``{component: module}``), text paths on-disk style."""
    from lorax.adapters.lycoris import DoraModule
    from lorax.adapters.peft_bridge import lora_state_from_peft
    from lorax.adapters.state import LoraModule
    from lorax.models.families import live_to_disk

    pairs: dict[str, dict[str, Any]] = {}
    magnitudes: dict[str, Any] = {}
    for component, model in models.items():
        tensors = lora_tensors(model)
        pairs[component] = {k: v for k, v in tensors.items() if ".lora_magnitude_vector" not in k}
        for key, value in tensors.items():
            if key.endswith(".lora_magnitude_vector"):
                path = live_to_disk(component, key[: -len(".lora_magnitude_vector")])
                magnitudes[f"{component}.{path}"] = value
    configs: dict[str, dict[str, Any]] = {c: {"r": rank, "lora_alpha": alpha} for c in models}
    for component, pattern in (alpha_patterns or {}).items():  # per-module alphas (--block-dims)
        configs[component]["alpha_pattern"] = pattern
    state = lora_state_from_peft(pairs, configs, family=family)
    for key, magnitude in magnitudes.items():
        module = state.modules[key]
        assert isinstance(module, LoraModule) and module.alpha is not None
        # PEFT's DoRA magnitude is one norm per output row, like LyCORIS' default (wd_on_out).
        state.modules[key] = DoraModule(module.down, module.up, module.alpha, magnitude, True)
    return state
