"""Benchmark: time per image with a LoRA applied, fused and unfused, ÷ the base model's time, in one run.

A rank-16 LoRA on every attention projection of the UNet and the text encoder is put on the same pipeline three
ways — not at all (base), through PEFT at scale 1 (unfused), and merged into the weights (``--fuse``) — and each
way generates the same images; the runs are interleaved (base, unfused, fused, base, …) and the median per image is
kept, so machine load hits all three alike. Target: fused ÷ base ≤ 1.05; unfused ÷ base is reported.

    python -m bench.generate [--model tiny|shapes|full-sd1|PATH] [--steps 20] [--reps 5] [--device auto] [--threads N]

``tiny`` is the random test model (16×16 images; overhead-dominated), ``shapes`` the built-in model when installed,
``full-sd1`` an SD1.5-sized random pipeline (use it on a GPU, with ``--size 512``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

TARGET = 1.05
SD_VAE = {
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


def _full_sd1(dtype: Any) -> Any:
    """An SD1.5-sized pipeline with random weights (no download)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorax.models.families import family_config
    from lorax.zoo.tiny import build_tokenizer

    unet_cfg = {k: v for k, v in family_config("sd1", "unet").items() if not k.startswith("_")}
    text_cfg = {k: v for k, v in family_config("sd1", "text_encoder").items() if not k.startswith("_")}
    text_cfg.pop("architectures", None)
    torch.manual_seed(0)
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(**unet_cfg).to(dtype),
        vae=AutoencoderKL(**SD_VAE).to(dtype),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)).to(dtype),
        tokenizer=build_tokenizer(["a", "red", "circle"]),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load(model: str, device: str, dtype: Any) -> Any:
    if model == "tiny":
        from lorax.zoo.tiny import tiny_pipeline

        pipe = tiny_pipeline("sd1", seed=0).to(dtype=dtype)
    elif model == "full-sd1":
        pipe = _full_sd1(dtype)
    else:
        from lorax.services.generate import load_model

        pipe = load_model(model, dtype=dtype)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def attention_lora(pipe: Any, rank: int = 16, seed: int = 0) -> Any:
    """Rank-``rank`` LoRA on every attention projection (UNet to_q/k/v/out, text encoder q/k/v/out)."""
    import torch

    from lorax.adapters.state import LoraModule, LoraState
    from lorax.models.families import live_to_disk

    g = torch.Generator().manual_seed(seed)
    modules: dict[str, Any] = {}
    for component, suffixes in (
        ("unet", ("to_q", "to_k", "to_v", "to_out.0")),
        ("text_encoder", ("q_proj", "k_proj", "v_proj", "out_proj")),
    ):
        for name, m in getattr(pipe, component).named_modules():
            if name.endswith(suffixes) and isinstance(m, torch.nn.Linear):
                modules[f"{component}.{live_to_disk(component, name)}"] = LoraModule(
                    torch.randn(rank, m.in_features, generator=g) * 0.01,
                    torch.randn(m.out_features, rank, generator=g) * 0.01,
                    float(rank),
                )
    return LoraState(modules, family="sd1")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="tiny, shapes, full-sd1, or a model path/name")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions of each way")
    parser.add_argument("--n", type=int, default=1, help="images per pipeline call")
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from lorax.adapters.apply import LoraRequest, apply_loras, quiet_libraries
    from lorax.services.generate import default_size, resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    with quiet_libraries():
        pipe = load(args.model, device, dtype)
    side = args.size or default_size(pipe)[0]
    state = attention_lora(pipe)
    request = LoraRequest(state, "bench", unet_scale=1.0)

    def one_call() -> float:
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(args.n)]
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.inference_mode():
            pipe(
                "a red circle on a white background",
                num_inference_steps=args.steps,
                num_images_per_prompt=args.n,
                generator=generators,
                width=side,
                height=side,
                output_type="np",
            )
        if device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.n

    times: dict[str, list[float]] = {"base": [], "unfused": [], "fused": []}
    one_call()  # warm-up (allocator, kernels)
    with quiet_libraries():
        for _ in range(args.reps):
            times["base"].append(one_call())
            applied = apply_loras(pipe, [request])
            times["unfused"].append(one_call())
            applied.remove()
            applied = apply_loras(pipe, [request], fuse=True)
            times["fused"].append(one_call())
            applied.remove()

    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"model {args.model}  {side}x{side}  steps {args.steps}  device {device}  dtype {str(dtype).removeprefix('torch.')}"
        f"  threads {torch.get_num_threads()}  LoRA rank 16 on {len(state.modules)} attention projections"
    )
    for key in ("base", "unfused", "fused"):
        spread = f"{min(times[key]):.4f}–{max(times[key]):.4f}"
        print(f"  {key:8s} {med[key]:.4f} s per image (median of {args.reps}; range {spread})")
    fused_ratio = med["fused"] / med["base"]
    print(
        f"  fused ÷ base   {fused_ratio:.3f}  (target ≤ {TARGET}: {'met' if fused_ratio <= TARGET else 'NOT met'})"
    )
    print(f"  unfused ÷ base {med['unfused'] / med['base']:.3f}")


if __name__ == "__main__":
    main()
