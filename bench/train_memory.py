"""Memory options of Flux LoRA training: peak memory and s/step of each, as ratios to a baseline of the same run.

A Flux-shaped ``FluxTransformer2DModel`` with random weights at Flux.1's full width (hidden size 3072: 24 heads of
128, joint attention 4096, pooled 768) but few blocks (default 1 double + 1 single; Flux.1 has 19 + 38), a rank-16
LoRA on every attention and MLP linear, the flow-matching objective of ``lorax.training.flow``, AdamW. Each case runs
in its own process (peak RSS is a process's high-water mark):

* ``baseline``: fp32 base, conditioning read from a text cache (the encoders never built);
* ``bf16-base``: the frozen weights in bf16, the LoRA in fp32, under bf16 autocast (``--mixed-precision bf16``);
* ``gradient-checkpointing``; ``fp8-base`` (``lorax.training.quantized_base``); ``fp8-base + checkpointing``;
* ``block-swap`` (``lorax.training.block_swap``: the last block's frozen weights parked, with checkpointing);
* ``t5-every-step``: the baseline plus a T5-XXL-shaped encoder (width 4096, d_ff 10240, 64 heads, one layer)
  resident and run on every step's caption: what caching the text encoders' outputs and dropping them saves.

On the CPU the device is the host, so block swap cannot lower the process's memory there; its "weights on device"
column (the bytes left in the model's parameters and buffers) shows what it keeps off an accelerator, and its s/step
the cost of the hooks. With ``--device cuda`` the peak is ``torch.cuda.max_memory_allocated``.

    python -m bench.train_memory                     # CPU, writes bench/out/train_memory.json
    python -m bench.train_memory --device cuda --double 19 --single 38 --resolution 512   # full Flux.1 on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CASES = {
    "baseline": {},
    "bf16-base": {"bf16": True},
    "gradient-checkpointing": {"checkpointing": True},
    "fp8-base": {"fp8": True},
    "fp8-base + checkpointing": {"fp8": True, "checkpointing": True},
    "block-swap": {"swap": 1, "checkpointing": True},
    "t5-every-step": {"t5": True},
}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]  # fmt: skip


def run_case(case: str, args: argparse.Namespace) -> dict[str, Any]:
    """One case in this process: build, train ``args.steps`` steps, time those after ``args.warmup``."""
    import resource

    import torch
    from diffusers import FluxTransformer2DModel

    from lorax.training import flow
    from lorax.training.block_swap import install_block_swap, parked_bytes
    from lorax.training.lora import inject_lora
    from lorax.training.quantized_base import quantize_linears, weight_bytes

    torch.set_num_threads(args.threads)
    opts = CASES[case]
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single,
        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
        guidance_embeds=True, axes_dims_rope=[16, 56, 56],
    )  # fmt: skip
    model.requires_grad_(False)
    if opts.get("fp8"):
        quantize_linears(model)
    params = inject_lora(model, TARGETS, rank=16, alpha=16, seed=1)
    swap = install_block_swap(model, opts["swap"], device) if opts.get("swap") else None
    model.to(device, dtype=torch.bfloat16 if opts.get("bf16") else None)
    for p in params:
        p.data = p.data.float()  # the LoRA trains in fp32, as in lorax train
    if opts.get("checkpointing"):
        model.enable_gradient_checkpointing()
    model.train()
    encoder = None
    if opts.get("t5"):
        from transformers import T5Config, T5EncoderModel

        encoder = T5EncoderModel(
            T5Config(d_model=4096, d_ff=10240, num_layers=1, num_heads=64, d_kv=64, vocab_size=32128,
                     feed_forward_proj="gated-gelu")
        ).to(device).requires_grad_(False)  # fmt: skip
    on_device = weight_bytes(model) + (weight_bytes(encoder) if encoder is not None else 0)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    objective = flow.FlowObjective(flow.FlowConfig(sampling="sigmoid", guidance=1.0))
    side = args.resolution // 8
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 16, side, side, generator=g).to(device)
    text = torch.randn(1, args.text_tokens, 4096, generator=g).to(device)
    pooled = torch.randn(1, 768, generator=g).to(device)
    ids = torch.randint(0, 32128, (1, args.text_tokens), generator=g).to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        if encoder is not None:
            with torch.no_grad():
                text = encoder(ids).last_hidden_state
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(opts.get("bf16"))):
            loss = objective.loss(model, latents, flow.FluxCond(text, pooled), g).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    timed = times[args.warmup :]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "case": case,
        "s_per_step": sum(timed) / len(timed),
        "peak_mb": peak,
        "weights_on_device_mb": on_device / 2**20,
        "parked_mb": (parked_bytes(swap) / 2**20) if swap is not None else 0.0,
        "loss": float(loss.detach()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.train_memory", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--double", type=int, default=1, help="double blocks (Flux.1: 19)")
    parser.add_argument("--single", type=int, default=1, help="single blocks (Flux.1: 38)")
    parser.add_argument(
        "--resolution", type=int, default=128, help="image side in pixels (latents /8, packed 2×2)"
    )
    parser.add_argument("--text-tokens", type=int, default=32, help="T5 tokens (Flux.1 dev: 512)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print its JSON
    parser.add_argument("--out", type=Path, default=Path("bench/out/train_memory.json"))
    args = parser.parse_args(argv)
    if args.case is not None:
        print(json.dumps(run_case(args.case, args)))
        return
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if not a.startswith("--cases")]
    results = []
    for case in args.cases.split(","):
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        cmd = [sys.executable, "-m", "bench.train_memory", *forwarded, "--case", case]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            print(f"{case}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{case}: done", file=sys.stderr, flush=True)
    base = next((r for r in results if r["case"] == "baseline"), None)
    print(f"| case | s/step | peak MiB | weights on device MiB | ({args.device}) |")
    print("|---|---|---|---|---|")
    for r in results:
        ratio = (
            f"{r['s_per_step'] / base['s_per_step']:.2f}× time, {r['peak_mb'] / base['peak_mb']:.2f}× peak"
            if base
            else ""
        )
        print(
            f"| {r['case']} | {r['s_per_step']:.2f} | {r['peak_mb']:.0f} | {r['weights_on_device_mb']:.0f} | {ratio} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"args": vars(args) | {"out": str(args.out)}, "results": results}, indent=1)
    )


if __name__ == "__main__":
    main()
