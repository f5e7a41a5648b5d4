"""Block weights: a LoRA's UNet strength per block (``--blocks down=0.5,mid=1,up.1=0``), as a multiplier per module
path and in the form diffusers' ``set_adapters`` takes. Standard library only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from lorax.errors import ConfigError

# Block weights: ``down`` / ``mid`` / ``up`` for every block of that side, ``down.N`` / ``up.N`` for one block.
BlockWeights = Mapping[str, float]
_BLOCK_KEY = re.compile(r"^(down|up)(?:\.(\d+))?$|^mid$")


def parse_blocks(spec: str) -> dict[str, float]:
    """``"down=0.5,mid=1,up.1=0"`` → ``{"down": 0.5, "mid": 1.0, "up.1": 0.0}`` (``--blocks``)."""
    blocks: dict[str, float] = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip().lower()
        if not sep or not _BLOCK_KEY.match(key):
            raise ConfigError(
                f"--blocks {spec!r}: {item.strip()!r} is not BLOCK=SCALE with BLOCK one of down, mid, up, down.N, up.N"
            )
        try:
            blocks[key] = float(value)
        except ValueError:
            raise ConfigError(f"--blocks {spec!r}: {value.strip()!r} is not a number") from None
    return blocks


def block_weight(blocks: BlockWeights | None, module_path: str) -> float:
    """The block multiplier of a UNet module path (``down_blocks.1.…``, ``mid_block.…``, ``up_blocks.0.…``).

    The most specific key wins (``up.1`` over ``up``); modules outside the three block lists (``conv_in``,
    ``time_embedding`` …) and sides not named keep 1.
    """
    if not blocks:
        return 1.0
    parts = module_path.split(".")
    if parts[0] == "mid_block":
        return float(blocks.get("mid", 1.0))
    side = {"down_blocks": "down", "up_blocks": "up"}.get(parts[0])
    if side is None or len(parts) < 2:
        return 1.0
    specific = f"{side}.{parts[1]}"
    if specific in blocks:
        return float(blocks[specific])
    return float(blocks.get(side, 1.0))


def diffusers_block_dict(unet: Any, blocks: BlockWeights, scale: float = 1.0) -> dict[str, Any]:
    """The same block weights, times ``scale``, in the form ``pipe.set_adapters`` takes for ``unet``.

    diffusers applies such a dict to the attention layers of each block only (other modules keep 1), so the two
    agree exactly for LoRAs on attention layers.
    """
    out: dict[str, Any] = {"mid": scale * float(blocks.get("mid", 1.0))}
    for side, attr in (("down", "down_blocks"), ("up", "up_blocks")):
        out[side] = {
            f"block_{i}": scale * block_weight(blocks, f"{attr}.{i}")
            for i, block in enumerate(getattr(unet, attr))
            if hasattr(block, "attentions")
        }
    return out
