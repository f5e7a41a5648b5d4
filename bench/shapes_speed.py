"""Benchmark: images per second of the built-in ``shapes`` model on this machine's CPU.

Generates batches of prompts from the world with the model card's settings (DDIM, ``SAMPLE_STEPS`` steps,
classifier-free guidance) and reports images/s at batch 1 and at batch 16. The baseline, timed in the same run and
interleaved with the pipeline, is the bare denoising loop: the UNet alone on the same latents and text embeddings
for the same number of steps (guidance doubles its batch). pipeline ÷ UNet-loop shows what the text encoder, the
scheduler and the VAE decode add around the UNet.

    python -m bench.shapes_speed [--reps 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any


def _unet_loop(pipe: Any, batch: int, steps: int) -> None:
    import torch

    unet = pipe.unet
    size = unet.config.sample_size
    latents = torch.randn(2 * batch, unet.config.in_channels, size, size)
    context = torch.randn(2 * batch, pipe.tokenizer.model_max_length, unet.config.cross_attention_dim)
    with torch.no_grad():
        for t in torch.linspace(999, 0, steps).long():
            latents = latents - 0.01 * unet(latents, t, context).sample


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="images/s of the shapes model")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    import torch

    from lorax.zoo.shapes.pipeline import (
        GUIDANCE_SCALE,
        SAMPLE_STEPS,
        load_shapes_pipeline,
        sample,
        seen_prompts,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_shapes_pipeline()
    prompts = seen_prompts()
    print(
        f"shapes model, {SAMPLE_STEPS} steps, guidance {GUIDANCE_SCALE}, torch threads {torch.get_num_threads()}"
    )
    for batch in (1, 16):
        chunk = prompts[:batch]
        sample(pipe, chunk, steps=SAMPLE_STEPS)  # warm-up
        _unet_loop(pipe, batch, SAMPLE_STEPS)
        full, bare = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            sample(pipe, chunk, steps=SAMPLE_STEPS, batch_size=batch)
            full.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _unet_loop(pipe, batch, SAMPLE_STEPS)
            bare.append(time.perf_counter() - t0)
        f, b = statistics.median(full), statistics.median(bare)
        print(
            f"batch {batch:2d}: {batch / f:7.2f} images/s ({f / batch * 1000:7.1f} ms/image); "
            f"UNet loop alone {batch / b:7.2f} images/s; pipeline ÷ UNet loop {f / b:.2f}"
        )


if __name__ == "__main__":
    main()
