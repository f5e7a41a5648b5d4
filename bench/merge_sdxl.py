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
import sys
import time
from pathlib import Path

from bench.merge import SD_VAE, run_measured

OUT = Path(__file__).resolve().parent / "out"
WALL_TARGET = 3.0
RSS_TARGET_GB = 1.5
NEED_FREE_GB = 20.0
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _meta_shapes() -> tuple[dict[str, dict[str, tuple[int, ...]]], dict[str, dict]]:
    import torch
    from diffusers import AutoencoderKL

    from lorax.models.families import family_config, meta_model

    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for component in COMPONENTS:
        state = meta_model("sdxl", component).state_dict()
        shapes[component] = {
            (
                "text_model." + k
                if component != "unet" and k.startswith(("embeddings.", "encoder.", "final_layer_norm."))
                else k
            ): tuple(v.shape)
            for k, v in state.items()
            if not k.endswith("position_ids")
        }
    with torch.device("meta"):
        vae = AutoencoderKL(**{k: v for k, v in SD_VAE.items() if not k.startswith("_")})
    shapes["vae"] = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    configs = {c: family_config("sdxl", c) for c in COMPONENTS}
    configs["vae"] = SD_VAE
    return shapes, configs


def build_checkpoint(path: Path) -> int:
    """Write the random fp16 SDXL checkpoint tensor by tensor (bounded memory); returns its size in bytes."""
    import torch

    from lorax.io.keymaps import (
        Layouts,
        TextLayout,
        UnetLayout,
        VaeLayout,
        keymap_from_diffusers,
        single_shape,
    )
    from lorax.io.safetensors_io import StreamingWriter

    shapes, configs = _meta_shapes()
    layouts = Layouts(
        UnetLayout.from_config(configs["unet"]),
        VaeLayout.from_config(configs["vae"]),
        {c: TextLayout.from_config(configs[c]) for c in ("text_encoder", "text_encoder_2")},
    )
    keymap = keymap_from_diffusers({c: list(s) for c, s in shapes.items()}, "sdxl", layouts)
    specs = [
        (e.single, "F16", single_shape(e, [shapes[e.component][p] for p in e.parts])) for e in keymap.entries
    ]
    gen = torch.Generator().manual_seed(0)
    tmp = path.with_suffix(".tmp")
    with StreamingWriter(tmp, specs, {"lorax.family": "sdxl"}) as writer:
        for name, _, shape in specs:
            writer.write(name, (torch.randn(shape, generator=gen) * 0.02).to(torch.float16))
    tmp.replace(path)
    return path.stat().st_size


def build_lora(path: Path, rank: int = 16) -> int:
    import torch

    from lorax.adapters.state import LoraModule, LoraState
    from lorax.formats import save_lora
    from lorax.models.families import module_table

    gen = torch.Generator().manual_seed(1)
    modules = {}
    for component in COMPONENTS:
        for name, shape in module_table("sdxl", component).items():
            if name.endswith(("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")):
                out, inp = shape[0], shape[1]
                modules[f"{component}.{name}"] = LoraModule(
                    torch.randn(rank, inp, generator=gen) * 0.01,
                    torch.randn(out, rank, generator=gen) * 0.01,
                    rank,
                )
    save_lora(LoraState(modules, family="sdxl"), path, format="kohya", dtype=torch.float16, force=True)
    return len(modules)


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
        size = base.stat().st_size if base.is_file() else build_checkpoint(base)
        n = build_lora(lora)
        print(
            f"checkpoint: {base} ({size / 1e9:.2f} GB fp16, SDXL layout); kohya LoRA rank 16, {n} modules "
            f"(UNet + both text encoders; built in {time.perf_counter() - t:.0f} s)"
        )
        walls = []
        for _ in range(2):
            copy.unlink(missing_ok=True)
            walls.append(run_measured(["cp", str(base), str(copy)])[0])
        copy.unlink(missing_ok=True)
        cp_wall = min(walls)
        print(f"cp (best of 2): {cp_wall:.2f} s  [all: {', '.join(f'{w:.2f}' for w in walls)}]")
        runs = []
        for _ in range(2):
            cmd = [
                sys.executable,
                "-m",
                "lorax",
                "-q",
                "merge",
                str(base),
                str(lora),
                "-o",
                str(merged),
                "--force",
            ]
            runs.append(run_measured(cmd))
        wall, rss = min(runs)
        print(
            f"lorax merge: {wall:.2f} s wall, peak RSS {rss:.2f} GB   "
            f"[runs: {', '.join(f'{w:.2f} s / {r:.2f} GB' for w, r in runs)}]"
        )
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
