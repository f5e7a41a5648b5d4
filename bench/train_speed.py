"""Benchmark: s/step of `lorax train` with and without each speed knob, beside diffusers' reference LoRA recipe
timed in the same run, on the built-in shapes model or on full-size SD1.5 with random weights (CPU).

The reference is ``bench.train.run_reference``: diffusers' LoRA training step written out (PEFT
``unet.add_adapter(LoraConfig(r, init_lora_weights="gaussian", target_modules=[to_k, to_q, to_v, to_out.0]))``,
AdamW, the VAE's ``latent_dist.sample()`` and the text encoder run on every step, ``F.mse_loss`` on epsilon,
``accelerator.backward``, clipping at 1.0, the loss read every step). lorax trains the same model, images, batch
size and rank. The knobs: SDPA (the default; ``--no-sdpa`` is the plain attention processor), ``--channels-last``,
``--compile`` (torch.compile's default inductor backend; its compile time is in the warm-up steps left out),
``--cache-latents`` and ``--cache-latents-to-disk`` (timed on a second run that reads the files). Every case runs
in its own process with the same torch thread count; figures are medians over ``--reps`` repetitions, ratios are
against the reference of the same run.

    python -m bench.train_speed [--steps 40] [--warmup 10] [--reps 2] [--threads 1] [--batch-size 4]
    python -m bench.train_speed --model sd15       # full-size SD1.5, random weights: 256 px, batch 1, 4 steps
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

MODELS: dict[str, dict[str, Any]] = {  # each model's defaults; flags override them
    "shapes": {"resolution": 32, "steps": 40, "warmup": 10, "reps": 2, "batch_size": 4},
    "sd15": {"resolution": 256, "steps": 4, "warmup": 1, "reps": 1, "batch_size": 1},
}
PROMPT = "a red star"
CASES: dict[str, dict[str, Any]] = {
    "reference (diffusers + PEFT)": {"side": "reference"},
    "lorax (SDPA, default)": {},
    "lorax --no-sdpa": {"sdpa": False},
    "lorax --channels-last": {"channels_last": True},
    "lorax --cache-latents": {"cache_latents": True},
    "lorax --cache-latents-to-disk": {"cache_latents_to_disk": True, "prefill": True},
    "lorax --compile": {"compile": True},  # last: on a slow machine it may run past --case-timeout
}


def steady(times: list[float], warmup: int) -> float:
    """Seconds per step from cumulative step-end times, the first ``warmup`` steps left out."""
    times = times[warmup - 1 :] if warmup > 0 else [0.0, *times]
    return (times[-1] - times[0]) / (len(times) - 1)


def load_pipeline(model: str) -> Any:
    """The shapes model, or full-size SD1.5 with random weights (``bench.train.build_sd15``), on the CPU."""
    if model == "sd15":
        from bench.train import build_sd15

        return build_sd15("cpu")
    from lorax.zoo.shapes.pipeline import load_shapes_pipeline

    return load_shapes_pipeline()


def run_lorax(case: dict[str, Any]) -> float:
    from lorax.progress import NullProgress
    from lorax.services.train import train
    from lorax.training.config import TrainConfig

    work = Path(case["work"])
    knobs = {
        k: case[k]
        for k in ("sdpa", "channels_last", "compile", "cache_latents", "cache_latents_to_disk")
        if k in case
    }

    def once(steps: int, name: str) -> Any:
        cfg = TrainConfig(
            data_dir=Path(case["images"]),
            output=work / name,
            model="shapes" if case["model"] == "shapes" else "sd15-random",
            instance_prompt=PROMPT,
            resolution=case["resolution"],
            steps=steps,
            batch_size=case["batch_size"],
            rank=case["rank"],
            device="cpu",
            force=True,
            **knobs,
        )
        pipeline = None if case["model"] == "shapes" else load_pipeline(case["model"])
        return train(cfg, NullProgress(), pipeline=pipeline)

    if case.get("prefill"):
        once(1, f"prefill-{case['key']}.safetensors")  # writes the latent files the timed run reads
    result = once(case["steps"], f"{case['key']}.safetensors")
    return steady([row[3] for row in result.losses], case["warmup"])


def reference(case: dict[str, Any]) -> float:
    from bench.train import run_reference

    times = run_reference(load_pipeline(case["model"]), dict(case, prompt=PROMPT))
    return steady(times, case["warmup"])


def _child(case: dict[str, Any]) -> None:
    import os

    import torch

    from lorax.training.base import quiet_libraries

    os.environ["LORAX_CACHE"] = case["cache"]
    quiet_libraries()
    torch.set_num_threads(case["threads"])
    seconds = reference(case) if case.get("side") == "reference" else run_lorax(case)
    print("RESULT " + json.dumps({"s_per_step": seconds}), flush=True)


def run_case(case: dict[str, Any], timeout: float | None = None) -> float:
    """One case in its own process: its s/step, or NaN when it ran past ``timeout`` seconds (a compile that
    never finishes on a slow machine must not hold up the others)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.train_speed", "--child", json.dumps(case)],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return math.nan
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return float(json.loads(line[len("RESULT ") :])["s_per_step"])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"case {case['name']} failed: " + " | ".join(tail))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", choices=sorted(MODELS), default="shapes", help="sd15: full-size, random weights"
    )
    parser.add_argument("--resolution", type=int, help="px (shapes: 32; sd15: 256)")
    parser.add_argument("--steps", type=int, help="steps per case (shapes: 40; sd15: 4)")
    parser.add_argument(
        "--warmup", type=int, help="first steps left out: compilation, caches (shapes: 10; sd15: 1)"
    )
    parser.add_argument("--reps", type=int, help="repetitions of every case (shapes: 2; sd15: 1)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, help="shapes: 4; sd15: 1")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--only", default="", help="comma-separated substrings of case names")
    parser.add_argument(
        "--case-timeout", type=float, help="seconds a case may run before it is left unmeasured"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return
    from bench.train import write_images

    settings = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in MODELS[args.model].items()}
    work = Path(tempfile.mkdtemp(prefix="lorax-bench-train-speed-"))
    images = write_images(work / "images", 8, settings["resolution"])
    cases = {n: c for n, c in CASES.items() if not args.only or any(s in n for s in args.only.split(","))}
    model = "shapes model" if args.model == "shapes" else "full-size SD1.5 layout, random weights"
    print(
        f"train s/step: {model} ({settings['resolution']} px), batch {settings['batch_size']}, rank {args.rank}, "
        f"CPU, {args.threads} torch thread(s), {settings['steps']} steps per case ({settings['warmup']} warm-up "
        f"left out), median of {settings['reps']}",
        flush=True,
    )
    results: dict[str, list[float]] = {n: [] for n in cases}
    for rep in range(settings["reps"]):  # interleaved, so a slow spell of the machine hits every case alike
        for i, (name, extra) in enumerate(cases.items()):
            case = {
                "name": name, "key": f"c{i}-r{rep}", "model": args.model, "threads": args.threads,
                "rank": args.rank, "images": str(images), "work": str(work), "cache": str(work / f"cache-{i}-{rep}"),
                **{k: settings[k] for k in ("resolution", "steps", "warmup", "batch_size")}, **extra,
            }  # fmt: skip
            started = time.perf_counter()
            results[name].append(run_case(case, args.case_timeout))
            print(
                f"    {name}: {results[name][-1]:.3f} s/step (case wall {time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    reference = next((n for n in results if n.startswith("reference")), None)
    measured = {n: [v for v in values if not math.isnan(v)] for n, values in results.items()}
    ref = statistics.median(measured[reference]) if reference and measured[reference] else None
    for name, values in measured.items():
        if not values:
            print(f"  {name:32s} not measured: over --case-timeout {args.case_timeout:.0f} s", flush=True)
            continue
        s = statistics.median(values)
        ratio = f"{s / ref:6.2f}× reference" if ref else ""
        print(f"  {name:32s} {s:9.3f} s/step   {ratio}", flush=True)


if __name__ == "__main__":
    main()
