"""``--algo``'s injection: which modules (the UNet's convs for locon/loha/lokr) and which PEFT tuner."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorax.training.config import TrainConfig


def _patterns(
    config: TrainConfig, modules: list[str], unet: Any, blocks: Any
) -> tuple[list[str], dict[str, Any]]:
    from lorax.training.algos import CONV_ALGOS, conv_patterns, conv_settings, conv_targets

    kwargs: dict[str, Any] = dict(blocks.inject_kwargs()) if blocks is not None else {}
    if config.algo not in CONV_ALGOS:
        return modules, kwargs
    convs = conv_targets(unet)
    modules = modules + [n for n in convs if n not in modules]
    conv_rank, conv_alpha = conv_settings(config)
    ranks, alphas = conv_patterns(modules, convs, conv_rank, conv_alpha)
    kwargs["rank_pattern"] = {**kwargs.get("rank_pattern", {}), **ranks}
    kwargs["alpha_pattern"] = {**kwargs.get("alpha_pattern", {}), **alphas}
    return modules, kwargs


def inject_unet(
    config: TrainConfig, unet: Any, modules: list[str], blocks: Any, seed: int, lora_kwargs: dict[str, Any]
) -> tuple[list[Any], list[str], dict[str, float]]:
    """Inject ``--algo``'s adapter into the UNet; return its parameters, the module paths it covers and PEFT's
    ``alpha_pattern`` (per-module alphas: ``--block-dims``, the convs' ``--conv-alpha``)."""
    from lorax.training.algos import LYCORIS_ALGOS, inject_lycoris
    from lorax.training.lora import inject_lora

    modules, kwargs = _patterns(config, modules, unet, blocks)
    if config.algo in LYCORIS_ALGOS:
        params = inject_lycoris(
            unet, modules, algo=config.algo, rank=config.rank, alpha=config.lora_alpha, seed=seed, **kwargs
        )
    else:
        params = inject_lora(unet, modules, seed=seed, **lora_kwargs, **kwargs)
    return params, modules, dict(kwargs.get("alpha_pattern", {}))


def text_injector(config: TrainConfig) -> Any:
    """``inject_lora`` for a LoRA; for ``--algo loha/lokr`` the same call injecting that algorithm."""
    from lorax.training.algos import LYCORIS_ALGOS, inject_lycoris
    from lorax.training.lora import inject_lora

    if config.algo not in LYCORIS_ALGOS:
        return inject_lora

    def inject(model: Any, modules: list[str], *, seed: int, rank: int, alpha: float, **_: Any) -> list[Any]:
        return inject_lycoris(model, modules, algo=config.algo, rank=rank, alpha=alpha, seed=seed)

    return inject
