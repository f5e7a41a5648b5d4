"""GPU benchmark: lorax's training loop on a full-size SD1.5-shaped random-weight model, built on the device.

One prepared command, no downloads, a few minutes on one GPU:

    python -m bench.gpu_train                       # CUDA, 512 px, batch 1 and 4, fp16 and bf16, rank 4 (+ rank 128)
    python -m bench.gpu_train --device cpu --tiny   # smoke test of the same code path on the tiny model
    python -m bench.gpu_train --flux                # Flux.1-shaped (19 double + 38 single blocks), 512 px: the
                                                    # memory options of bench.train_memory on the GPU

Reports it/s (optimizer steps per second, warm-up steps left out), images/s and peak allocated device memory per
setting, plus diffusers' reference DreamBooth-LoRA loop (bench.train) at the same settings for the ratio.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.train import build_sd15, reference_case, steady_seconds_per_step, write_images


def _peak_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset(device: str) -> None:
    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_lorax(
    args: Any, images: Path, work: Path, precision: str, batch: int, rank: int, cache: bool
) -> dict[str, Any]:
    from lorax.progress import NullProgress
    from lorax.services.train import train
    from lorax.training.config import TrainConfig

    _reset(args.device)
    build_device = args.device if args.device.startswith("cuda") else "cpu"
    pipe = build_sd15(build_device, tiny=args.tiny)
    cfg = TrainConfig(
        data_dir=images,
        output=work / f"gpu-{precision}-b{batch}-r{rank}.safetensors",
        model="sd15-random",
        instance_prompt="a sks star",
        resolution=args.resolution,
        steps=args.steps,
        batch_size=batch,
        rank=rank,
        mixed_precision=precision,
        cache_latents=cache,
        gradient_checkpointing=args.gradient_checkpointing,
        device="cpu" if args.device == "cpu" else None,
        force=True,
    )
    result = train(cfg, NullProgress(), pipeline=pipe)
    times = [row[3] for row in result.losses][args.warmup - 1 :]
    s = steady_seconds_per_step(times)
    peak = _peak_mb(args.device)
    del pipe, result
    return {"s_per_step": s, "peak_mb": peak}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model (smoke test)")
    parser.add_argument("--resolution", type=int, default=None, help="default 512 (32 with --tiny)")
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per setting (default 25; 4 with --tiny)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--precisions", default=None, help="default fp16,bf16 (no,bf16 on CPU)")
    parser.add_argument(
        "--big-rank", type=int, default=128, help="an extra bf16 batch-1 run at this rank (0: none)"
    )
    parser.add_argument("--cache-latents", action="store_true", default=True)
    parser.add_argument("--no-cache-latents", dest="cache_latents", action="store_false")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--no-reference", dest="reference", action="store_false", default=True)
    parser.add_argument("--flux", action="store_true", help="Flux.1-shaped memory cases (bench.train_memory)")
    args = parser.parse_args(argv)
    import torch

    from lorax.training.base import quiet_libraries

    quiet_libraries()

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "bench.gpu_train: no CUDA device here, skipped (python -m bench.gpu_train --device cpu --tiny: smoke)"
        )
        return
    if args.flux:
        from bench import train_memory

        shape = ["--double", "1", "--single", "1"] if args.tiny else ["--double", "19", "--single", "38"]
        train_memory.main(
            ["--device", args.device, *shape, "--resolution", str(args.resolution or (128 if args.tiny else 512)),
             "--text-tokens", "512", "--steps", str(args.steps or 6), "--warmup", str(min(args.warmup, 2)),
             "--threads", str(torch.get_num_threads()), "--out", "bench/out/gpu_train_flux.json"]
        )  # fmt: skip
        return
    args.resolution = args.resolution or (32 if args.tiny else 512)
    args.steps = args.steps or (4 if args.tiny else 25)
    args.warmup = min(args.warmup, args.steps - 1) or 1
    precisions = (args.precisions or ("no,bf16" if args.device == "cpu" else "fp16,bf16")).split(",")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="lorax-gpu-bench-"))
    images = write_images(work / "images", 8, args.resolution)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    model = "tiny SD1" if args.tiny else "full-size SD1.5 layout, random weights"
    print(
        f"lorax train on {name}: {model}, {args.resolution} px, {args.steps} steps per setting "
        f"(first {args.warmup} left out), latents {'cached' if args.cache_latents else 'encoded each step'}, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}",
        flush=True,
    )
    started = time.perf_counter()
    settings = [(p, b, 4) for p in precisions for b in batches]
    if args.big_rank:
        settings.append((precisions[-1], 1, args.big_rank))
    for precision, batch, rank in settings:
        r = run_lorax(args, images, work, precision, batch, rank, args.cache_latents)
        line = (
            f"  lorax      {precision:4s} batch {batch} rank {rank:3d}: {1 / r['s_per_step']:6.2f} it/s "
            f"{batch / r['s_per_step']:7.2f} img/s  peak {r['peak_mb'] / 1024:6.2f} GiB"
        )
        if args.reference and rank == 4:
            _reset(args.device)
            ref = reference_case(
                {
                    "device": args.device,
                    "tiny": args.tiny,
                    "mixed_precision": precision,
                    "rank": rank,
                    "gradient_checkpointing": args.gradient_checkpointing,
                    "resolution": args.resolution,
                    "images": str(images),
                    "batch_size": batch,
                    "steps": args.steps,
                }
            )
            line += (
                f"   | reference {1 / ref['s_per_step']:6.2f} it/s peak {ref['peak_mb'] / 1024:6.2f} GiB"
                f"   | time ratio {r['s_per_step'] / ref['s_per_step']:.2f}×"
            )
        print(line, flush=True)
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
