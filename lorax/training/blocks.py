"""Per-block learning rates and ranks over kohya's UNet blocks (``--block-lr``, ``--block-dims``).

kohya's sd-scripts (``networks/lora.py``, ``get_block_index``) number the UNet's blocks:

- SD1/SD2, 25 blocks, on diffusers names: ``down_blocks.i.{resnets,attentions}.j`` → ``1 + 3i + j``,
  ``down_blocks.i.downsamplers`` → ``1 + 3i + 2``; ``mid_block`` → 12; ``up_blocks.i.{resnets,attentions}.j`` →
  ``13 + 3i + j``, ``up_blocks.i.upsamplers`` → ``13 + 3i + 2``. Block 0 (IN00, ``conv_in``) holds no LoRA.
- SDXL, 23 blocks, on the original (SGM) names: 0 ``time_embed`` / ``label_emb``, ``input_blocks.N`` → ``1 + N``
  (1–9), ``middle_block.N`` → ``10 + N`` (10–12), ``output_blocks.N`` → ``13 + N`` (13–21), 22 ``out``.

Flux (lorax's numbering, as kohya's ``lora_flux`` has none: it selects blocks by ``train_double_block_indices`` /
``train_single_block_indices``): the double-stream blocks ``transformer_blocks.N`` → ``N`` (19 at full size), then
the single-stream blocks ``single_transformer_blocks.N`` → ``19 + N`` (38), 57 in all (the model's own counts).

``--block-lr`` gives one multiplier of ``--lr`` per block (0: the block is not trained, as in kohya, where a zero
lr weight removes the block), ``--block-dims`` one rank per block (0: no LoRA there). The text encoders are not
blocks: they keep ``--rank`` and ``--text-lr``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from lorax.errors import ConfigError

SD_BLOCKS = 25
SDXL_BLOCKS = 23
_UPDOWN = re.compile(r"^(up|down)_blocks\.(\d+)\.(resnets|upsamplers|downsamplers|attentions)\.(\d+)\.")


_FLUX_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.")


def block_count(family: str, unet_config: Mapping[str, Any] | None = None) -> int:
    if family == "flux":
        assert unet_config is not None
        return int(unet_config["num_layers"]) + int(unet_config["num_single_layers"])
    return SDXL_BLOCKS if family == "sdxl" else SD_BLOCKS


def block_index(path: str, family: str, unet_config: Mapping[str, Any]) -> int | None:
    """kohya's block number of the UNet module at diffusers ``path`` (Flux: lorax's); ``None`` outside the
    numbered blocks."""
    if family == "flux":
        found = _FLUX_BLOCK.match(path)
        if found is None:
            return None
        offset = 0 if found.group(1) == "transformer_blocks" else int(unet_config["num_layers"])
        return offset + int(found.group(2))
    if family == "sdxl":
        from lorax.models.families import diffusers_to_sgm

        sgm = diffusers_to_sgm(path, unet_config)
        if sgm is None:
            return None
        head, _, rest = sgm.partition(".")
        if head in ("time_embed", "label_emb"):
            return 0
        if head == "out":
            return 22
        number = rest.split(".", 1)[0]
        offsets = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}
        return offsets[head] + int(number) if head in offsets and number.isdigit() else None
    m = _UPDOWN.match(path)
    if m is not None:
        updown, i, kind, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * i + (2 if kind in ("upsamplers", "downsamplers") else j)
        return 1 + idx if updown == "down" else 13 + idx
    if path.startswith("mid_block."):
        return 12
    return None


def _block_names(family: str, unet_config: Mapping[str, Any] | None) -> str:
    if family == "flux":
        assert unet_config is not None
        double, single = int(unet_config["num_layers"]), int(unet_config["num_single_layers"])
        return f"double blocks 0-{double - 1}, then single blocks 0-{single - 1}"
    return "base, IN00-IN08, MID0-2, OUT00-OUT08, out" if family == "sdxl" else "IN00-IN11, MID, OUT00-OUT11"


def parse_blocks(
    text: str, family: str, option: str, *, integer: bool, unet_config: Mapping[str, Any] | None = None
) -> list[float]:
    """``--block-lr`` / ``--block-dims``: as many comma-separated numbers as the family has blocks."""
    count = block_count(family, unet_config)
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(int(p)) if integer else float(p) for p in parts]
    except ValueError:
        kind = "whole numbers" if integer else "numbers"
        raise ConfigError(f"{option} takes {count} comma-separated {kind} (got {text!r})") from None
    if len(values) != count:
        raise ConfigError(
            f"{option} takes {count} values for {family} (kohya's blocks; got {len(values)}): "
            + _block_names(family, unet_config)
        )
    if any(v < 0 for v in values):
        raise ConfigError(f"{option} values must be ≥ 0 (got {text!r})")
    return values


def unet_blocks(
    targets: list[str], family: str, unet_config: Mapping[str, Any], option: str
) -> dict[str, int]:
    """``{live UNet module path: block}`` for every target; refuses a target outside the numbered blocks."""
    out: dict[str, int] = {}
    for path in targets:
        index = block_index(path, family, unet_config)
        if index is None:
            raise ConfigError(f"{option}: UNet module {path} is in none of kohya's blocks; narrow --targets")
        out[path] = index
    return out


class BlockPlan:
    """What ``--block-dims`` / ``--block-lr`` make of the UNet targets: the modules kept, their ranks and alphas (PEFT
    ``rank_pattern`` / ``alpha_pattern``, keys the escaped module paths) and their lr multipliers."""

    def __init__(
        self,
        targets: list[str],
        family: str,
        unet_config: Mapping[str, Any],
        *,
        rank: int,
        alpha: float | None,
        block_dims: str | None,
        block_lr: str | None,
    ) -> None:
        option = "--block-dims" if block_dims is not None else "--block-lr"
        blocks = unet_blocks(targets, family, unet_config, option)
        dims = (
            parse_blocks(block_dims, family, "--block-dims", integer=True, unet_config=unet_config)
            if block_dims
            else None
        )
        weights = (
            parse_blocks(block_lr, family, "--block-lr", integer=False, unet_config=unet_config)
            if block_lr
            else None
        )
        self.ranks = {p: int(dims[b]) if dims is not None else rank for p, b in blocks.items()}
        self.lr_weights = {p: weights[b] if weights is not None else 1.0 for p, b in blocks.items()}
        self.targets = [p for p in targets if self.ranks[p] > 0 and self.lr_weights[p] > 0]
        if not self.targets:
            raise ConfigError(f"{option} leaves no UNet module to train (every targeted block is 0)")
        # without --network-alpha each module's alpha is its rank (scale 1), as with one --rank
        self.alphas = {p: float(self.ranks[p] if alpha is None else alpha) for p in self.targets}

    def inject_kwargs(self) -> dict[str, Any]:
        return {
            "rank_pattern": {re.escape(p): self.ranks[p] for p in self.targets},
            "alpha_pattern": {re.escape(p): self.alphas[p] for p in self.targets},
        }

    def alpha_pattern(self) -> dict[str, float]:
        return {re.escape(p): self.alphas[p] for p in self.targets}

    def groups(self, unet: Any, lr: float) -> list[dict[str, Any]]:
        """The UNet's optimizer groups, one per lr multiplier."""
        by_weight: dict[float, list[Any]] = {}
        for name, param in unet.named_parameters():
            if ".lora_" not in name or not param.requires_grad:
                continue
            module = name.split(".lora_", 1)[0]
            by_weight.setdefault(self.lr_weights[module], []).append(param)
        return [{"params": params, "lr": lr * w} for w, params in sorted(by_weight.items())]


def block_network_args(block_dims: str | None, block_lr: str | None, family: str) -> dict[str, str]:
    """kohya's ``network_args`` for the same setting: ``block_dims`` and ``down/mid/up_lr_weight``."""
    out: dict[str, str] = {}
    if block_dims:
        out["block_dims"] = ",".join(p.strip() for p in block_dims.split(","))
    if block_lr:
        values = [p.strip() for p in block_lr.split(",")]
        down, mid, up = (
            (values[1:10], values[10:13], values[13:22])
            if family == "sdxl"
            else (values[:12], values[12:13], values[13:])
        )
        out.update(down_lr_weight=",".join(down), mid_lr_weight=",".join(mid), up_lr_weight=",".join(up))
    return out
