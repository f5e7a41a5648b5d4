"""``--algo``: the adapter trained, through PEFT, and its LyCORIS (kohya key name) form.

* ``lora``: PEFT's LoRA on ``--targets``; ``dora``: the same with ``use_dora`` (``--dora`` is its alias).
* ``locon``: a LoRA on ``--targets`` plus the UNet's convs (resnet 3×3 and 1×1, samplers, transformer in/out
  projections), these at ``--conv-rank`` / ``--conv-alpha`` (kohya's ``conv_dim`` / ``conv_alpha``).
* ``loha`` / ``lokr``: PEFT's ``LoHaConfig`` / ``LoKrConfig`` on the same modules. The file is LyCORIS': per module
  ``hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b`` or ``lokr_w1(_a/_b), lokr_w2(_a/_b)``, and ``alpha``.

Scales: PEFT's LoHa and LoKr multiply by ``alpha / r`` like LyCORIS (``r``: the inner size of a factored matrix),
except that LyCORIS (and ComfyUI, A1111) take 1 for a LoKr whose two Kronecker factors are both full — PEFT still
scales those by ``alpha / r``, so that scale is folded into ``lokr_w1`` when the file is written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lorax.training.lora import ADAPTER, is_adapter_param

if TYPE_CHECKING:
    from lorax.adapters.state import LoraState
    from lorax.training.config import TrainConfig

ALGOS = ("lora", "locon", "loha", "lokr", "dora")
CONV_ALGOS = ("locon", "loha", "lokr")  # these add the UNet's convs to --targets
LYCORIS_ALGOS = ("loha", "lokr")  # trained with PEFT's LoHa / LoKr, written in LyCORIS' keys


def conv_targets(unet: Any) -> list[str]:
    """The UNet's Conv2d modules kohya's LoCon and LyCORIS train (``--targets all``'s convs)."""
    from torch import nn

    from lorax.training.targets import find_targets

    return [n for n in find_targets(unet, "all", "unet") if isinstance(unet.get_submodule(n), nn.Conv2d)]


def conv_patterns(
    modules: list[str], convs: list[str], conv_rank: int | None, conv_alpha: float | None
) -> tuple[dict[str, int], dict[str, float]]:
    """PEFT ``rank_pattern`` / ``alpha_pattern`` giving ``convs`` (those in ``modules``) their rank and alpha."""
    import re

    ranks = {re.escape(n): conv_rank for n in convs if n in modules and conv_rank is not None}
    alphas = {re.escape(n): conv_alpha for n in convs if n in modules and conv_alpha is not None}
    return ranks, alphas  # type: ignore[return-value]


def inject_lycoris(
    model: Any,
    modules: list[str],
    *,
    algo: str,
    rank: int,
    alpha: float,
    seed: int = 0,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
) -> list[Any]:
    """Add a trainable LoHa or LoKr (PEFT's, initialised so the update starts at 0) to ``modules``; freeze the rest."""
    import torch
    from peft import LoHaConfig, LoKrConfig, inject_adapter_in_model

    model.requires_grad_(False)
    kind = LoHaConfig if algo == "loha" else LoKrConfig
    config = kind(
        r=rank,
        alpha=alpha,  # type: ignore[arg-type]  # PEFT scales by any float alpha
        target_modules=list(modules),
        init_weights=True,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    params = [p for n, p in model.named_parameters() if is_adapter_param(n)]
    for p in params:
        p.requires_grad_(True)
    return params


def live_deltas(model: Any) -> dict[str, Any]:
    """``{live module path: PEFT's get_delta_weight}`` of every LoHa/LoKr layer of ``model`` (fp32, detached)."""
    from peft.tuners.loha.layer import LoHaLayer
    from peft.tuners.lokr.layer import LoKrLayer

    return {
        name: module.get_delta_weight(ADAPTER).detach().float().cpu()
        for name, module in model.named_modules()
        if isinstance(module, LoHaLayer | LoKrLayer)
    }


def lycoris_state(models: dict[str, Any], family: str | None = None) -> LoraState:
    """``LoraState`` of the LoHa/LoKr trained in ``models`` (``{component: module}``): ``LohaModule`` /
    ``LokrModule`` per layer with PEFT's alpha, kohya paths (text paths on-disk style)."""
    from peft.tuners.loha.layer import LoHaLayer
    from peft.tuners.lokr.layer import LoKrLayer

    from lorax.adapters.lycoris import LohaModule, LokrModule
    from lorax.adapters.state import LoraState
    from lorax.models.families import live_to_disk

    state = LoraState(family=family)
    for component, model in models.items():
        for name, layer in model.named_modules():
            if not isinstance(layer, LoHaLayer | LoKrLayer):
                continue

            def get(attr: str, layer: Any = layer) -> Any:
                table = getattr(layer, attr)
                return table[ADAPTER].detach().float().cpu().clone() if ADAPTER in table else None

            shape = tuple(int(n) for n in layer.get_base_layer().weight.shape)  # type: ignore[union-attr]
            alpha = float(layer.alpha[ADAPTER])
            key = f"{component}.{live_to_disk(component, name)}"
            if isinstance(layer, LoHaLayer):
                if get("hada_t1") is not None:  # use_effective_conv2d is never set here
                    raise AssertionError("Tucker LoHa is not trained by lorax")
                state.modules[key] = LohaModule(
                    get("hada_w1_a"), get("hada_w1_b"), get("hada_w2_a"), get("hada_w2_b"), alpha,
                    weight_shape=shape,
                )  # fmt: skip
                continue
            w1, w2 = get("lokr_w1"), get("lokr_w2")
            if w1 is not None and w2 is not None:  # LyCORIS' scale is 1 here; PEFT's alpha / r goes into w1
                w1 = w1 * float(layer.scaling[ADAPTER])
                alpha = float(layer.r[ADAPTER])  # and LyCORIS writes alpha = its dim then
            state.modules[key] = LokrModule(
                w1, get("lokr_w1_a"), get("lokr_w1_b"), w2, get("lokr_w2_a"), get("lokr_w2_b"), get("lokr_t2"),
                alpha, weight_shape=shape,
            )  # fmt: skip
    return state


def conv_settings(config: TrainConfig) -> tuple[int, float]:
    """The convs' rank and alpha: ``--conv-rank`` (default ``--rank``) and ``--conv-alpha`` (default: ``--alpha``
    without ``--conv-rank``, else the conv rank)."""
    rank = config.conv_rank if config.conv_rank is not None else config.rank
    if config.conv_alpha is not None:
        return rank, float(config.conv_alpha)
    return rank, (config.lora_alpha if config.conv_rank is None else float(rank))


def algo_metadata(config: TrainConfig) -> tuple[str, dict[str, Any]]:
    """``ss_network_module`` and the ``ss_network_args`` ``--algo`` adds: kohya's ``networks.lora`` for a LoRA or
    DoRA (kohya's LoCon: ``conv_dim`` / ``conv_alpha``), LyCORIS' ``lycoris.kohya`` with ``algo`` for LoHa / LoKr
    (string values, as kohya records its network_args ``algo=loha conv_dim=4``)."""
    algo = config.algo
    if algo not in CONV_ALGOS:
        return "networks.lora", {}
    conv_rank, conv_alpha = conv_settings(config)
    if algo == "locon":
        return "networks.lora", {"conv_dim": conv_rank, "conv_alpha": conv_alpha}
    return "lycoris.kohya", {"algo": algo, "conv_dim": str(conv_rank), "conv_alpha": f"{conv_alpha:g}"}
