"""Benchmark: `lorax merge` into a full-size Flux.1-shaped BFL file (~23.8 GB of random bf16 weights: 19 double and
38 single blocks, hidden 3072, the guidance embedder) with a rank-16 kohya LoRA on every linear of every block
(`qkv`, `proj`, the MLPs, the modulations, `linear1`, `linear2`), then the same for the fp8 file (~11.9 GB: the
matrices in F8_E4M3, biases and norms in bf16, as `flux1-dev-fp8` is). Reports wall time ÷ `cp` of the same file,
measured in the same run (target ≤ 1.5), and the merge subprocess's peak RSS (target ≤ 2 GB).

    python -m bench.merge_flux [--keep] [--only bf16|fp8] [--double N --single M]

`--double` / `--single` shrink the model (a quick check of the script); the targets are for the full size. Files
go to bench/out/ (gitignored), one model at a time (the checkpoint and one output: 48 GB at most for bf16), and are
deleted afterwards unless --keep; skipped with a message when the disk has too little room. The random file is
written tensor by tensor from one pool of random values, never whole in memory.

A load-everything merge (diffusers' `FluxTransformer2DModel` loaded, `load_lora_weights` + `fuse_lora`, saved) needs
the whole bf16 transformer in memory (23.8 GB) plus the process; it is run only when the machine has that much
memory available, and reported as not run otherwise.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from bench.merge import time_cp, time_merge

OUT = Path(__file__).resolve().parent / "out"
WALL_TARGET = 1.5
RSS_TARGET_GB = 2.0
RANK = 16
POOL = 1 << 26  # random values reused cyclically: 64 Mi elements


def transformer_shapes(double: int, single: int) -> dict[str, tuple[int, ...]]:
    """The diffusers transformer's ``{key: shape}`` at full width, built on the meta device (no memory)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from lorax.models.families import family_config

    config = {k: v for k, v in family_config("flux", "transformer").items() if not k.startswith("_")}
    config |= {"num_layers": double, "num_single_layers": single}
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_bfl(path: Path, double: int, single: int, fp8: bool) -> int:
    """Write the random BFL file tensor by tensor (bounded memory); returns its size in bytes."""
    import torch

    from lorax.io.keymaps import single_shape
    from lorax.io.keymaps.flux import keymap_to_bfl
    from lorax.io.safetensors_io import StreamingWriter

    shapes = transformer_shapes(double, single)
    keymap, missed = keymap_to_bfl(list(shapes), "flux", "transformer")
    assert not missed, missed
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(POOL, generator=gen) * 0.02
    pools = {"BF16": pool.to(torch.bfloat16), "F8_E4M3": pool.to(torch.float8_e4m3fn)}
    specs = []
    for e in keymap.entries:
        shape = single_shape(e, [shapes[p] for p in e.parts])
        specs.append((e.single, "F8_E4M3" if fp8 and len(shape) == 2 else "BF16", shape))
    tmp = path.with_suffix(".tmp")
    offset = 0
    with StreamingWriter(tmp, specs, {}) as writer:
        for name, dtype, shape in specs:
            n = 1
            for d in shape:
                n *= d
            src, chunks = pools[dtype], []
            while n > 0:
                take = min(n, POOL - offset)
                chunks.append(src[offset : offset + take])
                offset, n = (offset + take) % POOL, n - take
            writer.write(name, (chunks[0] if len(chunks) == 1 else torch.cat(chunks)).reshape(shape))
    tmp.replace(path)
    return path.stat().st_size


def build_lora(path: Path, double: int, single: int) -> int:
    """A random rank-16 kohya Flux LoRA (bf16) on every linear of every block; returns its module count."""
    import torch
    from safetensors.torch import save_file

    h = 3072
    modules = {}
    for i in range(double):
        for stream in ("img", "txt"):
            modules |= {f"double_blocks_{i}_{stream}_attn_qkv": (3 * h, h), f"double_blocks_{i}_{stream}_attn_proj": (h, h),
                        f"double_blocks_{i}_{stream}_mlp_0": (4 * h, h), f"double_blocks_{i}_{stream}_mlp_2": (h, 4 * h),
                        f"double_blocks_{i}_{stream}_mod_lin": (6 * h, h)}  # fmt: skip
    for i in range(single):
        modules |= {f"single_blocks_{i}_linear1": (7 * h, h), f"single_blocks_{i}_linear2": (h, 5 * h),
                    f"single_blocks_{i}_modulation_lin": (3 * h, h)}  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, (rows, width) in modules.items():
        stem = f"lora_unet_{name}"
        tensors[f"{stem}.lora_down.weight"] = (torch.randn(RANK, width, generator=gen) * 0.01).to(
            torch.bfloat16
        )
        tensors[f"{stem}.lora_up.weight"] = (torch.randn(rows, RANK, generator=gen) * 0.01).to(torch.bfloat16)
        tensors[f"{stem}.alpha"] = torch.tensor(float(RANK))
    save_file(tensors, path, {"ss_base_model_version": "flux1"})
    return len(modules)


def available_memory_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024 / 1024
    return 0.0


def bench_one(label: str, double: int, single: int, fp8: bool, lora: Path, keep: bool) -> None:
    base = OUT / f"flux-random-{label}.safetensors"
    copy, merged = OUT / f"flux-{label}-copy.safetensors", OUT / f"flux-{label}-merged.safetensors"
    expected = 23.8 * (0.5 if fp8 else 1.0) * (double * 2 + single) / (19 * 2 + 38)
    free_gb = shutil.disk_usage(OUT).free / 1e9 + (base.stat().st_size / 1e9 if base.is_file() else 0)
    if free_gb < 2.1 * expected:
        print(f"{label}: skipped, {free_gb:.0f} GB free under {OUT} and it needs {2.1 * expected:.0f} GB")
        return
    try:
        t = time.perf_counter()
        size = base.stat().st_size if base.is_file() else build_bfl(base, double, single, fp8)
        print(f"{label}: {base} ({size / 1e9:.2f} GB, built in {time.perf_counter() - t:.0f} s)")
        cp_wall = time_cp(base, copy, runs=1)
        wall, rss = time_merge(base, lora, merged, runs=1)
        ratio = wall / cp_wall
        print(
            f"  {label}: merge ÷ cp {ratio:.2f} (target ≤ {WALL_TARGET}: {'met' if ratio <= WALL_TARGET else 'MISSED'})"
            f"   peak RSS {rss:.2f} GB (target ≤ {RSS_TARGET_GB} GB: {'met' if rss <= RSS_TARGET_GB else 'MISSED'})"
        )
        need = size / 1e9 + 4
        if available_memory_gb() < need:
            print(
                f"  {label}: load-everything merge (diffusers load + fuse_lora + save) not run: it holds the whole "
                f"transformer ({size / 1e9:.1f} GB) in memory and {available_memory_gb():.1f} GB is available "
                f"(needs about {need:.0f} GB)"
            )
    finally:
        copy.unlink(missing_ok=True)
        merged.unlink(missing_ok=True)
        if not keep:
            for p in (base, base.with_suffix(".tmp")):
                p.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.merge_flux")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints in bench/out/")
    parser.add_argument("--double", type=int, default=19, help="double blocks (full size: 19)")
    parser.add_argument("--single", type=int, default=38, help="single blocks (full size: 38)")
    parser.add_argument("--only", choices=("bf16", "fp8"), help="one of the two files")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    lora = OUT / "flux-lora-r16.safetensors"
    try:
        n = build_lora(lora, args.double, args.single)
        print(f"kohya Flux LoRA: rank {RANK}, {n} modules, {lora.stat().st_size / 1e6:.0f} MB")
        for label in ("bf16", "fp8"):
            if args.only in (None, label):
                bench_one(label, args.double, args.single, label == "fp8", lora, args.keep)
    finally:
        if not args.keep:
            lora.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
