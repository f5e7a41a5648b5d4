"""SGM (original Stable Diffusion) UNet naming ⇄ diffusers naming.

Kohya's SDXL trainer names UNet modules the original way (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``);
``diffusers_to_sgm`` / ``sgm_to_diffusers`` map whole module paths both ways from the UNet config's block layout.
A family says it uses this naming with ``Family.kohya_unet_names == "sgm"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

_RESNET_SGM = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_RESNET_DIFFUSERS = {v: k for k, v in _RESNET_SGM.items()}
_TOP_SGM = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "input_blocks.0.0": "conv_in",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def _block_map(unet_config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """``(diffusers prefix, sgm prefix, kind)`` for every UNet block; kind is resnet, attention or plain."""
    down = list(unet_config["down_block_types"])
    up = list(unet_config["up_block_types"])
    layers = int(unet_config.get("layers_per_block", 2))
    rows: list[tuple[str, str, str]] = []
    n = 1
    for i, block in enumerate(down):
        for j in range(layers):
            rows.append((f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0", "resnet"))
            if "CrossAttn" in block:
                rows.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1", "attention"))
            n += 1
        if i < len(down) - 1:
            rows.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{n}.0.op", "plain"))
            n += 1
    rows += [
        ("mid_block.resnets.0", "middle_block.0", "resnet"),
        ("mid_block.attentions.0", "middle_block.1", "attention"),
        ("mid_block.resnets.1", "middle_block.2", "resnet"),
    ]
    n = 0
    for i, block in enumerate(up):
        attn = "CrossAttn" in block
        for j in range(layers + 1):
            rows.append((f"up_blocks.{i}.resnets.{j}", f"output_blocks.{n}.0", "resnet"))
            if attn:
                rows.append((f"up_blocks.{i}.attentions.{j}", f"output_blocks.{n}.1", "attention"))
            if j == layers and i < len(up) - 1:
                rows.append(
                    (
                        f"up_blocks.{i}.upsamplers.0.conv",
                        f"output_blocks.{n}.{2 if attn else 1}.conv",
                        "plain",
                    )
                )
            n += 1
    return rows


def _translate(
    path: str, rows: Iterable[tuple[str, str, str]], top: Mapping[str, str], inner: Mapping[str, str]
) -> str | None:
    for prefix, target in top.items():
        if path == prefix or path.startswith(prefix + "."):
            return target + path[len(prefix) :]
    for src, dst, kind in rows:
        if path == src or path.startswith(src + "."):
            rest = path[len(src) + 1 :] if path != src else ""
            if kind == "resnet":
                for a, b in inner.items():
                    if rest == a or rest.startswith(a + "."):
                        rest = b + rest[len(a) :]
                        break
            return f"{dst}.{rest}" if rest else dst
    return None


def diffusers_to_sgm(path: str, unet_config: Mapping[str, Any]) -> str | None:
    """A diffusers UNet module path in SGM naming (``down_blocks.1.attentions.0…`` → ``input_blocks.4.1…``)."""
    rows = [(d, s, k) for d, s, k in _block_map(unet_config)]
    return _translate(path, rows, {v: k for k, v in _TOP_SGM.items()}, _RESNET_DIFFUSERS)


def sgm_to_diffusers(path: str, unet_config: Mapping[str, Any]) -> str | None:
    """An SGM UNet module path in diffusers naming; ``None`` when it names no known block."""
    rows = [(s, d, k) for d, s, k in _block_map(unet_config)]
    return _translate(path, rows, _TOP_SGM, _RESNET_SGM)
