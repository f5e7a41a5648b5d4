"""Benchmark: `lorax train` against a reference DreamBooth-LoRA loop, on a full-size SD1.5-shaped random model.

The reference is written from diffusers' documented ``examples/dreambooth/train_dreambooth_lora.py`` recipe: PEFT
``unet.add_adapter(LoraConfig(r, target_modules=[to_k, to_q, to_v, to_out.0]))``, AdamW, VAE ``latent_dist.sample()``,
the text encoder run on every step, ``F.mse_loss`` on epsilon, ``accelerator.backward``, clipping at 1.0. Both sides
train the same random-weight model (SD1.5's UNet / VAE / text-encoder configs), on the same images, batch size, rank
and precision. Each case runs in its own process so its peak RSS (or peak CUDA memory) is its own.

    python -m bench.train                         # 512 px, 2 steps per case (CPU: minutes per case)
    python -m bench.train --resolution 256 --steps 3
    python -m bench.train --tiny                  # the tiny test model: a smoke run in seconds

Figures: s/step excludes the first (warm-up) step; peak memory is the process's high-water mark.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}
TARGETS = [
    "to_k",
    "to_q",
    "to_v",
    "to_out.0",
]  # the recipe's UNet targets present in SD1.5 (= lorax's "attn")


def build_sd15(device: str = "cpu", dtype: Any = None, *, tiny: bool = False) -> Any:
    """A ``StableDiffusionPipeline`` of random weights with SD1.5's full-size shapes (or the tiny test model)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorax.zoo.tiny import build_tokenizer, tiny_pipeline

    if tiny:
        pipe = tiny_pipeline("sd1")
        return pipe.to(device)
    from lorax.models.families import family_config

    torch.manual_seed(0)
    unet_cfg = {k: v for k, v in family_config("sd1", "unet").items() if not k.startswith("_")}
    text_cfg = {
        k: v
        for k, v in family_config("sd1", "text_encoder").items()
        if k not in ("_class_name", "architectures")
    }
    with torch.device(device):
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(["sks", "star"]),
        unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    if dtype is not None:
        pipe.to(dtype=dtype)
    return pipe


def write_images(folder: Path, count: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        arr = np.full((size, size, 3), 255, dtype=np.uint8)
        lo, hi = size // 4, 3 * size // 4
        arr[lo:hi, lo:hi] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(folder / f"{i}.png")
    return folder


def peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def steady_seconds_per_step(times: list[float]) -> float:
    """Seconds per step from cumulative step-end times, the first (warm-up) step left out when there are more."""
    if len(times) < 2:
        return times[0]
    return (times[-1] - times[0]) / (len(times) - 1)


# ----------------------------------------------------------------------------------------------------------------
# The two sides


def run_lorax(case: dict[str, Any]) -> dict[str, Any]:
    import torch

    from lorax.progress import NullProgress
    from lorax.services.train import train
    from lorax.training.config import TrainConfig

    device = case["device"]
    pipe = build_sd15("cpu", tiny=case["tiny"])
    work = Path(case["work"])
    cfg = TrainConfig(
        data_dir=Path(case["images"]),
        output=work / f"lorax-{os.getpid()}.safetensors",
        model="sd15-random",
        instance_prompt="a sks star",
        resolution=case["resolution"],
        steps=case["steps"],
        batch_size=case["batch_size"],
        rank=case["rank"],
        mixed_precision=case["mixed_precision"],
        gradient_checkpointing=case["gradient_checkpointing"],
        cache_latents=case["cache_latents"],
        device="cpu" if device == "cpu" else None,
        force=True,
    )
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = train(cfg, NullProgress(), pipeline=pipe)
    times = [row[3] for row in result.losses]
    times = times[max(0, case.get("warmup", 1) - 1) :]
    return {
        "s_per_step": steady_seconds_per_step(times),
        "peak_mb": peak_memory_mb(device),
        "steps": len(times),
    }


def run_reference(pipe: Any, case: dict[str, Any]) -> list[float]:
    """diffusers' DreamBooth-LoRA recipe, reduced to its training step, on ``pipe`` (any SD1-layout pipeline: the
    full-size random SD1.5 here, the shapes model in ``bench.train_speed``). Cumulative step-end times.

    ``case``: rank, resolution, batch_size, steps, images (a folder of PNGs), prompt, and optionally device
    ("cpu"), mixed_precision ("no") and gradient_checkpointing (False)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig
    from PIL import Image

    device = case.get("device", "cpu")
    mixed_precision = case.get("mixed_precision", "no")
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device == "cpu")
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    unet.add_adapter(
        LoraConfig(
            r=case["rank"], lora_alpha=case["rank"], init_lora_weights="gaussian", target_modules=TARGETS
        )
    )
    if case.get("gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
    if mixed_precision != "no":
        cast_training_params(unet, dtype=torch.float32)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    unet, optimizer = accelerator.prepare(unet, optimizer)

    res, bs = case["resolution"], case["batch_size"]
    files = sorted(Path(case["images"]).glob("*.png"))

    def pixels(i: int) -> torch.Tensor:  # Resize + CenterCrop + ToTensor + Normalize([0.5], [0.5])
        img = Image.open(files[i % len(files)]).convert("RGB").resize((res, res), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)

    ids = tokenizer(
        [case["prompt"]] * bs,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(accelerator.device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    start = time.perf_counter()
    unet.train()
    for step in range(case["steps"]):
        batch = torch.stack([pixels(step * bs + j) for j in range(bs)])
        with accelerator.accumulate(unet):
            model_input = vae.encode(batch.to(accelerator.device, weight_dtype)).latent_dist.sample()
            model_input = model_input * vae.config.scaling_factor
            noise = torch.randn_like(model_input)
            timesteps = torch.randint(
                0,
                noise_scheduler.config.num_train_timesteps,
                (model_input.shape[0],),
                device=model_input.device,
            ).long()
            noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
            encoder_hidden_states = text_encoder(ids, return_dict=False)[0]
            model_pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        float(loss.detach())  # the recipe logs the loss every step (a device sync, as lorax does)
        times.append(time.perf_counter() - start)
    return times


def reference_case(case: dict[str, Any]) -> dict[str, Any]:
    """The reference recipe on this bench's model: s/step and peak memory."""
    times = run_reference(build_sd15("cpu", tiny=case["tiny"]), dict(case, prompt="a sks star"))
    times = times[max(0, case.get("warmup", 1) - 1) :]
    return {
        "s_per_step": steady_seconds_per_step(times),
        "peak_mb": peak_memory_mb(case["device"]),
        "steps": len(times),
    }


# ----------------------------------------------------------------------------------------------------------------


def _child(case: dict[str, Any]) -> None:
    import torch

    from lorax.training.base import quiet_libraries

    quiet_libraries()

    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    out = run_lorax(case) if case["side"] == "lorax" else reference_case(case)
    print("RESULT " + json.dumps(out), flush=True)


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.train", "--child", json.dumps(case)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT ") :]))
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"case {case['name']} failed: " + " | ".join(tail))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", default="no")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--tiny", action="store_true", help="the tiny test model instead of full-size SD1.5")
    parser.add_argument("--only", default="", help="comma-separated case names to run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(json.loads(args.child))
        return
    work = Path(tempfile.mkdtemp(prefix="lorax-bench-train-"))
    images = write_images(work / "images", 4, args.resolution)
    common = {
        "resolution": args.resolution,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "rank": args.rank,
        "device": args.device,
        "mixed_precision": args.mixed_precision,
        "tiny": args.tiny,
        "images": str(images),
        "work": str(work),
        "threads": args.threads,
    }
    cases = [
        ("reference", "reference", False, False),
        ("lorax", "lorax", False, False),
        ("reference+gc", "reference", True, False),
        ("lorax+gc", "lorax", True, False),
        ("lorax+cache", "lorax", False, True),
        ("lorax+gc+cache", "lorax", True, True),
    ]
    if args.only:
        keep = set(args.only.split(","))
        cases = [c for c in cases if c[0] in keep]
    model = "tiny SD1" if args.tiny else "full-size SD1.5 layout, random weights"
    print(
        f"train step: {model}, {args.resolution} px, batch {args.batch_size}, rank {args.rank}, "
        f"{args.mixed_precision} precision, {args.device}, {args.steps} steps per case (first left out)"
    )
    results: dict[str, dict[str, Any]] = {}
    for name, side, gc, cache in cases:
        case = dict(common, name=name, side=side, gradient_checkpointing=gc, cache_latents=cache)
        started = time.perf_counter()
        results[name] = run_case(case)
        r = results[name]
        print(
            f"  {name:16s} {r['s_per_step']:8.3f} s/step   peak {r['peak_mb']:9.0f} MB   "
            f"(case wall {time.perf_counter() - started:.0f}s)",
            flush=True,
        )
    for lorax_name, ref_name in (("lorax", "reference"), ("lorax+gc", "reference+gc")):
        if lorax_name in results and ref_name in results:
            a, b = results[lorax_name], results[ref_name]
            print(
                f"  {lorax_name} ÷ {ref_name}: time {a['s_per_step'] / b['s_per_step']:.2f}×, "
                f"peak memory {a['peak_mb'] / b['peak_mb']:.2f}×"
            )


if __name__ == "__main__":
    main()
