"""``lorax train``'s options for a frozen base that does not fit the device (issue 17): ``--fp8-base``,
``--blocks-to-swap``, ``--cache-text-to-disk`` (``lorax.training.quantized_base``, ``block_swap``, ``text_cache``)."""

from __future__ import annotations

from typing import Annotated

from lorax.cli.training_options import in_speed

Fp8BaseOpt = Annotated[
    bool,
    in_speed(
        "--fp8-base",
        help="Store the frozen denoiser's linear weights in fp8 (float8_e4m3fn, a scale per tensor; kohya's "
        "fp8_base): a byte a weight; the LoRA trains in fp32.",
    ),
]
BlocksToSwapOpt = Annotated[
    int,
    in_speed(
        "--blocks-to-swap",
        min=0,
        help="Keep the frozen weights of the denoiser's last N blocks in CPU memory, copied to the device layer by "
        "layer as they run (kohya's blocks_to_swap; needs --gradient-checkpointing).",
    ),
]
CacheTextToDiskOpt = Annotated[
    bool,
    in_speed(
        "--cache-text-to-disk",
        help="Cached text-encoder outputs kept as safetensors in the lorax cache (by caption and encoder), reused "
        "by later runs.",
    ),
]
