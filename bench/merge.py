"""Benchmark: `lorax merge` into a full-size SD1.5-shaped single file (~2 GB of random fp16 weights) with a rank-16
kohya LoRA on every attention projection (UNet and text encoder). Reports wall time ÷ `cp` of the same file (target
≤ 3) and the merge subprocess's peak RSS (target ≤ 1 GB), beside the load-everything way measured in the same run
(diffusers pipeline from a folder + load_lora_weights + fuse_lora + save_pretrained).

    python -m bench.merge [--skip-baseline] [--keep]

Files go to bench/out/ (gitignored); the checkpoint is reused between runs when present.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
WALL_TARGET = 3.0
RSS_TARGET_GB = 1.0
SD_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
}


PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")


def _meta_shapes(family: str) -> tuple[dict[str, dict[str, tuple[int, ...]]], dict[str, dict]]:
    """Every component's ``{on-disk key: shape}`` (no weights) and config, for a full-size ``family`` model."""
    import torch
    from diffusers import AutoencoderKL

    from lorax.models.families import FAMILIES, TEXT_COMPONENTS, family_config, live_to_disk, meta_model

    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for component in FAMILIES[family]:
        state = meta_model(family, component).state_dict()
        shapes[component] = {
            (live_to_disk(component, k) if component in TEXT_COMPONENTS else k): tuple(v.shape)
            for k, v in state.items()
            if not k.endswith("position_ids")
        }
    with torch.device("meta"):
        vae = AutoencoderKL(**{k: v for k, v in SD_VAE.items() if not k.startswith("_")})
    shapes["vae"] = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    configs = {c: family_config(family, c) for c in FAMILIES[family]}
    configs["vae"] = SD_VAE
    return shapes, configs


def build_checkpoint(path: Path, family: str = "sd1") -> int:
    """Write a random fp16 single-file checkpoint of ``family`` (original layout) tensor by tensor (bounded memory);
    returns its size in bytes."""
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
    from lorax.models.families import TEXT_COMPONENTS

    shapes, configs = _meta_shapes(family)
    layouts = Layouts(
        UnetLayout.from_config(configs["unet"]),
        VaeLayout.from_config(configs["vae"]),
        {c: TextLayout.from_config(configs[c]) for c in TEXT_COMPONENTS if c in configs},
    )
    keymap = keymap_from_diffusers({c: list(s) for c, s in shapes.items()}, family, layouts)
    specs = [
        (e.single, "F16", single_shape(e, [shapes[e.component][p] for p in e.parts])) for e in keymap.entries
    ]
    gen = torch.Generator().manual_seed(0)
    tmp = path.with_suffix(".tmp")
    with StreamingWriter(tmp, specs, {"lorax.family": family}) as writer:
        for name, _, shape in specs:
            writer.write(name, (torch.randn(shape, generator=gen) * 0.02).to(torch.float16))
    tmp.replace(path)
    return path.stat().st_size


def build_lora(path: Path, family: str = "sd1", rank: int = 16) -> int:
    """A random rank-``rank`` kohya LoRA on every attention projection of the UNet and text encoder(s)."""
    import torch

    from lorax.adapters.state import LoraModule, LoraState
    from lorax.formats import save_lora
    from lorax.models.families import FAMILIES, module_table

    gen = torch.Generator().manual_seed(1)
    modules = {}
    for component in FAMILIES[family]:
        for name, shape in module_table(family, component).items():
            if name.endswith(PROJECTIONS):
                out, inp = shape[0], shape[1]
                modules[f"{component}.{name}"] = LoraModule(
                    torch.randn(rank, inp, generator=gen) * 0.01,
                    torch.randn(out, rank, generator=gen) * 0.01,
                    rank,
                )
    save_lora(LoraState(modules, family=family), path, format="kohya", dtype=torch.float16, force=True)
    return len(modules)


def time_cp(base: Path, copy: Path, runs: int) -> float:
    """Best wall time of ``cp base copy`` over ``runs`` (the first one usually fills the page cache)."""
    walls = []
    for _ in range(runs):
        copy.unlink(missing_ok=True)
        walls.append(run_measured(["cp", str(base), str(copy)])[0])
    copy.unlink(missing_ok=True)
    print(f"cp (best of {runs}): {min(walls):.2f} s  [all: {', '.join(f'{w:.2f}' for w in walls)}]")
    return min(walls)


def time_merge(base: Path, lora: Path, merged: Path, runs: int = 2) -> tuple[float, float]:
    """Best (wall seconds, peak RSS GB) of ``lorax merge base lora -o merged`` in a fresh interpreter."""
    cmd = [sys.executable, "-m", "lorax", "-q", "merge", str(base), str(lora), "-o", str(merged), "--force"]
    results = []
    for _ in range(
        runs
    ):  # each into a new file, as cp: replacing the last one's costs its unlink (1-5 s here)
        merged.unlink(missing_ok=True)
        results.append(run_measured(cmd))
    wall, rss = min(results)
    print(
        f"lorax merge: {wall:.2f} s wall, peak RSS {rss:.2f} GB   "
        f"[runs: {', '.join(f'{w:.2f} s / {r:.2f} GB' for w, r in results)}]"
    )
    return wall, rss


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of a subprocess. The peak comes from GNU time (``/usr/bin/time -f %M``), which
    forks the command from its own small process: a child forked from this one (holding torch and the random pools)
    would count this process's pages in its own ``ru_maxrss`` (every merge read ~1 GB that way). Without GNU time,
    wait4's rusage of the direct child, an upper bound."""
    timer = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").is_file() else None)
    wrapped = [timer, "-f", "lorax-bench-rss %M", *cmd] if timer else cmd
    start = time.perf_counter()
    proc = subprocess.Popen(wrapped, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{err[-2000:]}")
    marks = [line.split()[1] for line in err.splitlines() if line.startswith("lorax-bench-rss ")]
    kb = int(marks[-1]) if marks else usage.ru_maxrss
    return wall, kb / 1024 / 1024


BASELINE = """
import sys, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], torch_dtype=torch.float16, safety_checker=None)
pipe.load_lora_weights(sys.argv[2])
pipe.fuse_lora(lora_scale=1.0)
pipe.unload_lora_weights()
pipe.save_pretrained(sys.argv[3])
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.merge")
    parser.add_argument("--skip-baseline", action="store_true", help="only lorax merge and cp")
    parser.add_argument("--keep", action="store_true", help="keep the outputs in bench/out/")
    args = parser.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    base, lora = OUT / "sd15-random-fp16.safetensors", OUT / "lora-r16.safetensors"
    t = time.perf_counter()
    size = base.stat().st_size if base.is_file() else build_checkpoint(base)
    n = build_lora(lora)
    print(
        f"checkpoint: {base} ({size / 1e9:.2f} GB fp16); LoRA rank 16, {n} modules (built in {time.perf_counter() - t:.0f} s)"
    )

    cp_wall = time_cp(base, OUT / "copy.safetensors", runs=3)
    merged = OUT / "merged.safetensors"
    wall, rss = time_merge(base, lora, merged)
    startup = [sys.executable, "-c", "import lorax.cli.app, lorax.services.merge"]  # what the merge imports
    imports = min(run_measured(startup)[0] for _ in range(2))
    print(
        f"  of which starting Python and importing lorax's CLI (no torch): {imports:.2f} s; the merge proper "
        f"{wall - imports:.2f} s ({(wall - imports) / cp_wall:.2f} × cp)"
    )
    print(
        f"  ratio to cp: {wall / cp_wall:.2f} (target ≤ {WALL_TARGET})   peak RSS target ≤ {RSS_TARGET_GB} GB: "
        f"{'met' if rss <= RSS_TARGET_GB else 'MISSED'}"
    )

    if not args.skip_baseline:
        from lorax.io.checkpoint import open_checkpoint

        folder = OUT / "sd15-random-fp16-diffusers"
        if not (folder / "model_index.json").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            _, configs = _meta_shapes("sd1")
            ckpt = open_checkpoint(base)
            configs["text_encoder"] = {**configs["text_encoder"], "architectures": ["CLIPTextModel"]}
            configs["scheduler"] = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
                                    "beta_start": 0.00085, "beta_end": 0.012}  # fmt: skip
            _write_reference_folder(ckpt, folder, configs)
        diffusers_lora = OUT / "lora-r16-diffusers.safetensors"
        subprocess.run(
            [sys.executable, "-m", "lorax", "-q", "convert", str(lora), "--to", "diffusers", "-o", str(diffusers_lora),
             "--force"], check=True)  # fmt: skip
        out_dir = OUT / "baseline-out"
        shutil.rmtree(out_dir, ignore_errors=True)
        b_wall, b_rss = run_measured(
            [sys.executable, "-c", BASELINE, str(folder), str(diffusers_lora), str(out_dir)]
        )
        print(
            f"load-everything (diffusers from_pretrained + fuse_lora + save_pretrained): {b_wall:.2f} s wall, "
            f"peak RSS {b_rss:.2f} GB; ratio to cp {b_wall / cp_wall:.2f}"
        )
        print(f"  lorax merge is {b_wall / wall:.1f}x faster and uses {b_rss / rss:.1f}x less memory")
        shutil.rmtree(out_dir, ignore_errors=True)
    if not args.keep:
        merged.unlink(missing_ok=True)


def _write_reference_folder(ckpt, folder: Path, configs: dict) -> None:  # type: ignore[no-untyped-def]
    """A diffusers folder of the same random weights (tokenizer: a small offline one; it is not timed)."""
    import json

    from lorax.io.checkpoint import META_CONFIGS
    from lorax.io.model_layout import write_diffusers_folder
    from lorax.zoo.tiny import build_tokenizer

    ckpt.source.files[0].header.metadata[META_CONFIGS] = json.dumps(configs)
    write_diffusers_folder(ckpt, folder)
    build_tokenizer().save_pretrained(folder / "tokenizer")


if __name__ == "__main__":
    main()
