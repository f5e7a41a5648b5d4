"""Block layouts of the UNet, VAE and text encoders, read from a diffusers config or from single-file keys.

The key tables in this package are computed from these layouts, so the same code maps the tiny test models and the
full-size ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lorax.errors import FormatError


@dataclass(frozen=True)
class UnetLayout:
    """Which levels hold attention, and how many resnets each level has (``layers_per_block``)."""

    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]
    layers_per_block: int
    mid_attention: bool = True

    @property
    def levels(self) -> int:
        return len(self.down_attention)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UnetLayout:
        lpb = config.get("layers_per_block", 2)
        if not isinstance(lpb, int):
            raise FormatError(f"UNet layers_per_block {lpb!r} is not supported (one integer expected)")
        down = tuple("CrossAttn" in t for t in config["down_block_types"])
        up = tuple("CrossAttn" in t for t in config["up_block_types"])
        mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2D"
        return cls(down, up, lpb, mid)

    @classmethod
    def from_single_keys(cls, keys: Iterable[str]) -> UnetLayout:
        """Infer the layout from original-layout keys with the ``model.diffusion_model.`` prefix removed."""
        inputs: dict[int, set[str]] = {}
        outputs: dict[int, set[str]] = {}
        mid: set[str] = set()
        for key in keys:
            parts = key.split(".")
            if parts[0] in ("input_blocks", "output_blocks") and len(parts) > 3:
                table = inputs if parts[0] == "input_blocks" else outputs
                table.setdefault(int(parts[1]), set()).add(f"{parts[2]}.{parts[3]}")
            elif parts[0] == "middle_block" and len(parts) > 1:
                mid.add(parts[1])
        if not inputs or not outputs:
            raise FormatError("not a Stable Diffusion UNet: no input_blocks/output_blocks keys")
        downsamples = sorted(i for i, subs in inputs.items() if "0.op" in subs)
        last = max(inputs)
        lpb = downsamples[0] - 1 if downsamples else last
        if lpb < 1:
            raise FormatError("unrecognised UNet layout (downsampler before any resnet)")
        levels = -(-last // (lpb + 1))
        down = tuple(
            any(s.startswith("1.") for s in inputs.get(1 + i * (lpb + 1), ())) for i in range(levels)
        )
        up = tuple(
            any(s.startswith("1.") and s != "1.conv" for s in outputs.get(i * (lpb + 1), ()))
            for i in range(levels)
        )
        return cls(down, up, lpb, "2" in mid)


@dataclass(frozen=True)
class VaeLayout:
    levels: int
    layers_per_block: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> VaeLayout:
        return cls(len(config["block_out_channels"]), int(config.get("layers_per_block", 2)))

    @classmethod
    def from_single_keys(cls, keys: Iterable[str]) -> VaeLayout:
        """Infer from keys with the ``first_stage_model.`` prefix removed."""
        levels: set[int] = set()
        blocks: set[int] = set()
        for key in keys:
            m = re.match(r"encoder\.down\.(\d+)\.block\.(\d+)\.", key)
            if m:
                levels.add(int(m.group(1)))
                if m.group(1) == "0":
                    blocks.add(int(m.group(2)))
        if not levels:
            raise FormatError("not a Stable Diffusion VAE: no encoder.down.* keys")
        return cls(max(levels) + 1, max(blocks) + 1)


@dataclass(frozen=True)
class TextLayout:
    """Number of transformer layers kept by the diffusers text encoder (SD2 drops OpenCLIP's last one)."""

    layers: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TextLayout:
        return cls(int(config["num_hidden_layers"]))
