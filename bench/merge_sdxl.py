"""Benchmark: `lorax merge` into a full-size SDXL-shaped single file (~7 GB of random fp16 weights, SGM layout:
`model.diffusion_model.*`, `first_stage_model.*`, `conditioner.embedders.0.transformer.*`,
`conditioner.embedders.1.model.*` with fused `in_proj`) with a rank-16 kohya LoRA (kohya's original SDXL naming) on
every attention projection of the UNet and both text encoders. Reports wall time ÷ `cp` of the same file, measured in
the same run (target ≤ 3), and the merge subprocess's peak RSS (target ≤ 1.5 GB).

    python -m bench.merge_sdxl [--keep]

Files go to bench/out/ (gitignored) and are deleted afterwards unless --keep. Needs 20 GB free on the disk (the
checkpoint, its copy and the merged output); skipped with a message otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from bench.merge import build_checkpoint, build_lora, time_cp, time_merge

OUT = Path(__file__).resolve().parent / "out"
WALL_TARGET = 3.0
RSS_TARGET_GB = 1.5
NEED_FREE_GB = 20.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.merge_sdxl")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs in bench/out/")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    base, lora = OUT / "sdxl-random-fp16.safetensors", OUT / "sdxl-lora-r16.safetensors"
    free_gb = shutil.disk_usage(OUT).free / 1e9 + (base.stat().st_size / 1e9 if base.is_file() else 0)
    if free_gb < NEED_FREE_GB:
        print(
            f"skipped: {free_gb:.0f} GB free under {OUT}, the SDXL merge benchmark needs {NEED_FREE_GB:.0f} GB"
        )
        return
    copy, merged = OUT / "sdxl-copy.safetensors", OUT / "sdxl-merged.safetensors"
    try:
        t = time.perf_counter()
        size = base.stat().st_size if base.is_file() else build_checkpoint(base, "sdxl")
        n = build_lora(lora, "sdxl")
        print(
            f"checkpoint: {base} ({size / 1e9:.2f} GB fp16, SDXL layout); kohya LoRA rank 16, {n} modules "
            f"(UNet + both text encoders; built in {time.perf_counter() - t:.0f} s)"
        )
        cp_wall = time_cp(base, copy, runs=2)
        wall, rss = time_merge(base, lora, merged)
        print(
            f"  ratio to cp: {wall / cp_wall:.2f} (target ≤ {WALL_TARGET}: {'met' if wall / cp_wall <= WALL_TARGET else 'MISSED'})"
            f"   peak RSS target ≤ {RSS_TARGET_GB} GB: {'met' if rss <= RSS_TARGET_GB else 'MISSED'}"
        )
    finally:
        copy.unlink(missing_ok=True)
        if not args.keep:
            for p in (merged, base, lora, base.with_suffix(".tmp")):
                p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
