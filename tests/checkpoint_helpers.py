"""Tiny SD models and LoRAs for the checkpoint tests (merge, mix, convert, extract), built once per session.

Each tiny pipeline is saved as a diffusers folder and converted (by lorax) into a single file in the original
layout; ``test_checkpoint_keymaps`` checks that single file against diffusers' own single-file converters.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from functools import cache
from pathlib import Path

import torch

from lorax.adapters.state import LoraModule, LoraState

_ROOT = Path(tempfile.mkdtemp(prefix="lorax-ckpt-tests-"))
atexit.register(shutil.rmtree, _ROOT, True)


@cache
def tiny_pipe(family: str):  # type: ignore[no-untyped-def]
    from lorax.zoo.tiny import tiny_pipeline

    return tiny_pipeline(family, seed=0 if family == "sd1" else 1)


@cache
def tiny_folder(family: str) -> Path:
    folder = _ROOT / family / "folder"
    tiny_pipe(family).save_pretrained(folder)
    return folder


@cache
def tiny_single(family: str, dtype: str | None = None) -> Path:
    from lorax.io.checkpoint import open_checkpoint
    from lorax.io.model_layout import write_single_file

    path = _ROOT / family / f"single-{dtype or 'native'}.safetensors"
    ckpt = open_checkpoint(tiny_folder(family))
    write_single_file(ckpt, path, dtype=dtype)  # type: ignore[arg-type]
    return path


def scratch(name: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=_ROOT))
    return path


def _module(
    out: int, inp: int, rank: int, alpha: float, gen: torch.Generator, conv: bool = False
) -> LoraModule:
    if conv:
        down = torch.randn(rank, inp, 3, 3, generator=gen) * 0.1
        up = torch.randn(out, rank, 1, 1, generator=gen) * 0.1
    else:
        down = torch.randn(rank, inp, generator=gen) * 0.1
        up = torch.randn(out, rank, generator=gen) * 0.1
    return LoraModule(down, up, alpha)


ATTN = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
UP_ATTN = "unet.up_blocks.1.attentions.2.transformer_blocks.0"


def tiny_lora(family: str, seed: int = 0, rank: int = 4, alpha: float = 2.0, conv: bool = True) -> LoraState:
    """A random LoRA over attention (UNet and text encoder), a feed-forward layer and (optionally) a conv."""
    gen = torch.Generator().manual_seed(seed)
    modules: dict[str, LoraModule] = {}
    for proj in (
        "to_q",
        "to_k",
        "to_v",
        "to_out.0",
    ):  # the tiny UNet's attention is 32 wide, as is its context
        modules[f"{ATTN}.attn1.{proj}"] = _module(32, 32, rank, alpha, gen)
        modules[f"{UP_ATTN}.attn2.{proj}"] = _module(32, 32, rank, alpha, gen)
    modules[f"{ATTN}.ff.net.2"] = _module(32, 128, rank, alpha, gen)
    if conv:
        modules["unet.down_blocks.0.resnets.1.conv2"] = _module(32, 32, rank, alpha, gen, conv=True)
    for i in range(2):
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            modules[f"text_encoder.text_model.encoder.layers.{i}.self_attn.{proj}"] = _module(
                32, 32, rank, alpha, gen
            )
    modules["text_encoder.text_model.encoder.layers.1.mlp.fc1"] = _module(37, 32, rank, alpha, gen)
    return LoraState(dict(modules), family=family)  # type: ignore[arg-type]


def save(state: LoraState, path: Path, fmt: str = "kohya") -> Path:
    from lorax.formats import save_lora

    return save_lora(state, path, format=fmt, force=True)


def unet_weight_key(module: str) -> str:
    return module.split(".", 1)[1] + ".weight"
