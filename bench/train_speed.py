"""Benchmark: s/step of `lorax train` on the built-in shapes model with and without each speed knob, beside
diffusers' reference LoRA recipe timed in the same run.

The reference is diffusers' ``examples/text_to_image/train_text_to_image_lora.py`` training step written out: PEFT
``unet.add_adapter(LoraConfig(r, init_lora_weights="gaussian", target_modules=[to_k, to_q, to_v, to_out.0]))``,
AdamW, the VAE's ``latent_dist.sample()`` and the text encoder run on every step, ``F.mse_loss`` on epsilon,
``accelerator.backward``, clipping at 1.0, the loss read every step. lorax trains the same model, images, batch size
and rank. The knobs: SDPA (the default; ``--no-sdpa`` is the plain attention processor), ``--channels-last``,
``--compile`` (torch.compile's default inductor backend; its compile time is in the warm-up steps left out),
``--cache-latents`` and ``--cache-latents-to-disk`` (timed on a second run that reads the files). Every case runs
in its own process with the same torch thread count; figures are medians over ``--reps`` repetitions, ratios are
against the reference of the same run.

    python -m bench.train_speed [--steps 40] [--warmup 10] [--reps 2] [--threads 1] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
CASES: dict[str, dict[str, Any]] = {
    "reference (diffusers + PEFT)": {"side": "reference"},
    "lorax (SDPA, default)": {},
    "lorax --no-sdpa": {"sdpa": False},
    "lorax --channels-last": {"channels_last": True},
    "lorax --compile": {"compile": True},
    "lorax --cache-latents": {"cache_latents": True},
    "lorax --cache-latents-to-disk": {"cache_latents_to_disk": True, "prefill": True},
}


def steady(times: list[float], warmup: int) -> float:
    """Seconds per step from cumulative step-end times, the first ``warmup`` steps left out."""
    times = times[warmup - 1 :] if warmup > 0 else [0.0, *times]
    return (times[-1] - times[0]) / (len(times) - 1)


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
            model="shapes",
            instance_prompt="a red star",
            resolution=32,
            steps=steps,
            batch_size=case["batch_size"],
            rank=case["rank"],
            device="cpu",
            force=True,
            **knobs,
        )
        return train(cfg, NullProgress())

    if case.get("prefill"):
        once(1, f"prefill-{case['key']}.safetensors")  # writes the latent files the timed run reads
    result = once(case["steps"], f"{case['key']}.safetensors")
    return steady([row[3] for row in result.losses], case["warmup"])


def run_reference(case: dict[str, Any]) -> float:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from peft import LoraConfig
    from PIL import Image

    from lorax.zoo.shapes.pipeline import load_shapes_pipeline

    accelerator = Accelerator(cpu=True)
    pipe = load_shapes_pipeline()
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=case["rank"], lora_alpha=case["rank"], init_lora_weights="gaussian", target_modules=TARGETS
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    files = sorted(Path(case["images"]).glob("*.png"))

    def pixels(i: int) -> torch.Tensor:  # Resize + CenterCrop + ToTensor + Normalize([0.5], [0.5])
        img = Image.open(files[i % len(files)]).convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)

    bs = case["batch_size"]
    ids = tokenizer(
        ["a red star"] * bs, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids  # fmt: skip
    times: list[float] = []
    start = time.perf_counter()
    unet.train()
    for step in range(case["steps"]):
        batch = torch.stack([pixels(step * bs + j) for j in range(bs)])
        with accelerator.accumulate(unet):
            latents = vae.encode(batch).latent_dist.sample() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bs,)).long()
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(ids, return_dict=False)[0]
            pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        float(loss.detach())
        times.append(time.perf_counter() - start)
    return steady(times, case["warmup"])


def _child(case: dict[str, Any]) -> None:
    import os

    import torch

    from lorax.training.base import quiet_libraries

    os.environ["LORAX_CACHE"] = case["cache"]
    quiet_libraries()
    torch.set_num_threads(case["threads"])
    seconds = run_reference(case) if case.get("side") == "reference" else run_lorax(case)
    print("RESULT " + json.dumps({"s_per_step": seconds}), flush=True)


def run_case(case: dict[str, Any]) -> float:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.train_speed", "--child", json.dumps(case)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return float(json.loads(line[len("RESULT ") :])["s_per_step"])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"case {case['name']} failed: " + " | ".join(tail))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out (compilation, caches)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--only", default="", help="comma-separated substrings of case names")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return
    from bench.train import write_images

    work = Path(tempfile.mkdtemp(prefix="lorax-bench-train-speed-"))
    images = write_images(work / "images", 8, 32)
    cases = {n: c for n, c in CASES.items() if not args.only or any(s in n for s in args.only.split(","))}
    print(
        f"train s/step: shapes model (32 px), batch {args.batch_size}, rank {args.rank}, CPU, {args.threads} torch "
        f"thread(s), {args.steps} steps per case ({args.warmup} warm-up left out), median of {args.reps}"
    )
    results: dict[str, list[float]] = {n: [] for n in cases}
    for rep in range(args.reps):  # interleaved, so a slow spell of the machine hits every case alike
        for i, (name, extra) in enumerate(cases.items()):
            case = {
                "name": name, "key": f"c{i}-r{rep}", "steps": args.steps, "warmup": args.warmup,
                "threads": args.threads, "batch_size": args.batch_size, "rank": args.rank,
                "images": str(images), "work": str(work), "cache": str(work / f"cache-{i}-{rep}"), **extra,
            }  # fmt: skip
            results[name].append(run_case(case))
    reference = next((n for n in results if n.startswith("reference")), None)
    ref = statistics.median(results[reference]) if reference else None
    for name, values in results.items():
        s = statistics.median(values)
        ratio = f"{s / ref:6.2f}× reference" if ref else ""
        print(f"  {name:32s} {s * 1000:8.1f} ms/step   {ratio}", flush=True)


if __name__ == "__main__":
    main()
