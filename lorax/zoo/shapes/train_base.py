"""Train the built-in ``shapes`` model from scratch: ``python -m lorax.zoo.shapes.train_base --out DIR --seed 0``.

Three phases, deterministic in the seed:

1. **VAE** (an image codec, like SD's): reconstruction (L1 + MSE) plus a small KL term, on renders of the *whole*
   world — held-out shapes and colours included, since a codec that cannot even write a purple star would leave
   nothing for LoRA training to teach. Its ``scaling_factor`` is set so latents have unit variance.
2. **UNet + text encoder**, jointly, on cached latents of renders of the *base* world only, with captions that
   sometimes leave out the background, the colour or the shape, and are dropped to ``""`` 10% of the time (for
   classifier-free guidance). Epsilon prediction on SD1's noise schedule, min-SNR-5 loss weights, an EMA of the
   weights (saved). Held-out words never occur in a caption, so their embedding rows keep their random start.
3. **Evaluation**: samples for seen and held-out prompts, scored; the report lands in ``DIR/training.json``.

The output is a diffusers ``StableDiffusionPipeline`` folder (float32 safetensors, no safety checker).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lorax.zoo.shapes import world
from lorax.zoo.shapes.pipeline import assemble, build_components, evaluate


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _images_tensor(images: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def train_vae(
    vae: Any, images: np.ndarray, steps: int, batch: int, lr: float, seed: int, device: str
) -> float:
    """Fit the VAE to ``images`` (uint8 [n, H, W, 3]); returns the final reconstruction MSE (in [-1, 1] units)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    data = _images_tensor(images)
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine_lr(s, steps, 50))
    mse_avg = 0.0
    for step in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=gen)
        x = data[idx].to(device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen).to(device)
        recon = vae.decode(z).sample
        mse = torch.nn.functional.mse_loss(recon, x)
        loss = mse + (recon - x).abs().mean() + 1e-4 * posterior.kl().mean() / z[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        mse_avg = 0.98 * mse_avg + 0.02 * float(mse.detach()) if step else float(mse.detach())
        if step % 200 == 0 or step == steps - 1:
            _log(f"vae step {step}/{steps} mse {mse_avg:.5f}")
    vae.eval()
    return mse_avg


def encode(vae: Any, images: np.ndarray, device: str, batch: int = 256) -> tuple[Any, Any]:
    """Posterior means and standard deviations of ``images`` (unscaled latents)."""
    import torch

    means, stds = [], []
    data = _images_tensor(images)
    with torch.no_grad():
        for i in range(0, len(data), batch):
            posterior = vae.encode(data[i : i + batch].to(device)).latent_dist
            means.append(posterior.mean.cpu())
            stds.append(posterior.std.cpu())
    return torch.cat(means), torch.cat(stds)


def caption_variants(scene: world.Scene) -> list[str]:
    """Full caption first, then the ones leaving out the background, the colour, the shape."""
    return [
        world.caption(scene.shape, scene.colour, scene.background),
        world.caption(scene.shape, scene.colour, None),
        world.caption(scene.shape, None, scene.background),
        world.caption(None, scene.colour, scene.background),
    ]


def optimizer_step(
    opt: Any, sched: Any, loss: Any, live: dict[str, Any], ema: dict[str, Any], ema_decay: float, step: int
) -> None:
    """Backward, clip the gradients to norm 1, step the optimizer and schedule, move each EMA copy toward ``live``
    (decay warming up as ``(1 + step) / (10 + step)`` to ``ema_decay``)."""
    import torch

    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
    opt.step()
    sched.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for name, model in live.items():
            for pe, p in zip(ema[name].parameters(), model.parameters(), strict=True):
                pe.lerp_(p, 1 - decay)


CAPTION_WEIGHTS = (0.6, 0.15, 0.1, 0.05)  # full, no background, no colour, no shape; the rest (0.1): ""


def train_denoiser(
    components: dict[str, Any],
    latents: tuple[Any, Any],
    scene_list: Sequence[world.Scene],
    steps: int,
    batch: int,
    lr: float,
    text_lr: float,
    seed: int,
    device: str,
    ema_decay: float = 0.999,
    deadline: float | None = None,
    stop_after: int | None = None,
) -> tuple[float, int, dict[str, Any]]:
    """Train UNet and text encoder jointly; returns the final loss, the steps done and the EMA copies of both.

    With a ``deadline`` (a ``time.time()`` value) or ``stop_after`` steps, training stops early, part-way through
    the learning-rate schedule planned for ``steps``; the steps done are reported.
    """
    import torch

    unet, text_encoder, tokenizer, scheduler = (
        components["unet"],
        components["text_encoder"],
        components["tokenizer"],
        components["scheduler"],
    )
    scaling = float(components["vae"].config.scaling_factor)
    gen = torch.Generator().manual_seed(seed + 1)
    mean, std = latents

    # every distinct caption, tokenized once
    variants = [caption_variants(s) for s in scene_list]
    texts = sorted({t for v in variants for t in v} | {""})
    text_index = {t: i for i, t in enumerate(texts)}
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    all_ids = ids.input_ids.to(device)
    choice = torch.tensor([[text_index[t] for t in v] for v in variants])
    probs = torch.tensor([*CAPTION_WEIGHTS, 1 - sum(CAPTION_WEIGHTS)])
    empty = text_index[""]

    alphas_cumprod = torch.as_tensor(
        np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2),
        dtype=torch.float32,
    )
    snr = alphas_cumprod / (1 - alphas_cumprod)
    weights = (torch.clamp(snr, max=5.0) / snr).to(device)
    sqrt_a = alphas_cumprod.sqrt().to(device)
    sqrt_1ma = (1 - alphas_cumprod).sqrt().to(device)
    assert np.allclose(scheduler.alphas_cumprod.numpy(), alphas_cumprod.numpy(), atol=1e-6)

    unet.to(device).train()
    text_encoder.to(device).train()
    embed_params = list(text_encoder.get_input_embeddings().parameters())
    embed_ids = {id(p) for p in embed_params}
    other_text = [p for p in text_encoder.parameters() if id(p) not in embed_ids]
    opt = torch.optim.AdamW(
        [
            {"params": list(unet.parameters()), "lr": lr, "weight_decay": 1e-2},
            {"params": other_text, "lr": text_lr, "weight_decay": 1e-2},
            # no decay on token embeddings: rows of words no caption uses must keep their random start
            {"params": embed_params, "lr": text_lr, "weight_decay": 0.0},
        ]
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _cosine_lr(s, steps, min(100, max(1, steps // 10)))
    )
    ema = {"unet": copy.deepcopy(unet).eval(), "text_encoder": copy.deepcopy(text_encoder).eval()}
    for m in ema.values():
        m.requires_grad_(False)
    live = {"unet": unet, "text_encoder": text_encoder}
    loss_avg = 0.0
    done = 0
    for step in range(steps):
        if deadline is not None and time.time() > deadline:
            _log(f"time limit reached after {step} steps")
            break
        if stop_after is not None and step >= stop_after:
            break
        idx = torch.randint(0, len(mean), (batch,), generator=gen)
        noise_z = torch.randn(mean[idx].shape, generator=gen)
        z0 = ((mean[idx] + std[idx] * noise_z) * scaling).to(device)
        pick = torch.multinomial(probs, batch, replacement=True, generator=gen)
        text_ids = torch.where(
            pick < 4, choice[idx, pick.clamp(max=3)], torch.full((batch,), empty, dtype=torch.long)
        ).to(device)
        t = torch.randint(0, 1000, (batch,), generator=gen).to(device)
        eps = torch.randn(z0.shape, generator=gen).to(device)
        zt = sqrt_a[t, None, None, None] * z0 + sqrt_1ma[t, None, None, None] * eps
        hidden = text_encoder(all_ids[text_ids])[0]
        pred = unet(zt, t, hidden).sample
        per_sample = (pred - eps).pow(2).mean(dim=(1, 2, 3))
        loss = (per_sample * weights[t]).mean()
        optimizer_step(opt, sched, loss, live, ema, ema_decay, step)
        loss_avg = 0.98 * loss_avg + 0.02 * float(loss.detach()) if step else float(loss.detach())
        done = step + 1
        if step % 200 == 0 or step == steps - 1:
            _log(f"unet step {step}/{steps} loss {loss_avg:.4f}")
    return loss_avg, done, ema


def start_run(seed: int, threads: int | None) -> float:
    """Seed torch and numpy, set torch's threads; the run's start time."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    np.random.seed(seed)
    return time.time()


def render_world(n_images: int, seed: int) -> tuple[np.ndarray, list[world.Scene], np.ndarray]:
    """The training renders: the VAE's (every shape and colour, held-out ones too: it must draw any image, and no
    caption goes with it) and the denoiser's base-world scenes with their images."""
    _log("rendering the world")
    vae_scenes = list(world.scenes(n_images // 2, seed + 100, world.SHAPES, tuple(world.COLOURS)))
    base_scenes = list(world.scenes(n_images, seed + 200))
    vae_images = world.render_batch(vae_scenes + base_scenes[: n_images // 2])
    return vae_images, base_scenes, world.render_batch(base_scenes)


def train(
    out: Path,
    seed: int = 0,
    vae_steps: int = 1000,
    unet_steps: int = 3500,
    batch: int = 64,
    vae_batch: int = 32,
    lr: float = 2e-3,
    text_lr: float = 1e-3,
    n_images: int = 8000,
    device: str = "cpu",
    threads: int | None = None,
    time_limit: float | None = None,
    ema_decay: float = 0.999,
    resume: Path | None = None,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train the shapes model and write it, with ``training.json``, to the folder ``out``.

    With ``resume`` (a folder this function wrote), training continues from its weights: the VAE is kept as it
    is and only the UNet + text encoder phase runs, with a fresh optimizer and learning-rate schedule.
    """
    import torch

    started = start_run(seed, threads)
    previous = None
    if resume is not None:
        components = _load_components(Path(resume))
        previous = json.loads((Path(resume) / "training.json").read_text())
        vae_steps = 0
    else:
        components = build_components(seed)
    vae_images, base_scenes, base_images = render_world(n_images, seed)

    t0 = time.time()
    vae_mse = (
        train_vae(components["vae"], vae_images, vae_steps, vae_batch, 1e-3, seed, device)
        if vae_steps
        else None
    )
    vae_seconds = time.time() - t0
    components["vae"].to(device).eval()
    mean, std = encode(components["vae"], base_images, device)
    if vae_steps:
        components["vae"].register_to_config(scaling_factor=float(1.0 / mean.std()))
    scaling = float(components["vae"].config.scaling_factor)
    _log(f"vae done in {vae_seconds:.0f}s, mse {vae_mse}, scaling_factor {scaling:.4f}")

    t0 = time.time()
    deadline = started + time_limit if time_limit else None
    loss, steps_done, ema = train_denoiser(
        components,
        (mean, std),
        base_scenes,
        unet_steps,
        batch,
        lr,
        text_lr,
        seed,
        device,
        ema_decay=ema_decay,
        deadline=deadline,
        stop_after=stop_after,
    )
    unet_seconds = time.time() - t0
    components.update(ema)
    train_seconds = time.time() - started
    _log(f"unet + text encoder done in {unet_seconds:.0f}s, loss {loss:.4f}")

    for name in ("unet", "vae", "text_encoder"):
        components[name].to("cpu").eval()
    pipe = assemble(components)
    pipe.set_progress_bar_config(disable=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    from lorax.models.defaults import parse_defaults, write_folder_defaults
    from lorax.zoo.shapes.pipeline import LORAX_DEFAULTS

    write_folder_defaults(out, parse_defaults(LORAX_DEFAULTS, "LORAX_DEFAULTS"))

    from lorax.zoo.shapes.pipeline import load_shapes_pipeline

    t0 = time.time()
    scores = evaluate(load_shapes_pipeline(out), seed=seed)
    report = {
        "seed": seed,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "images": {"vae": len(vae_images), "unet": len(base_images)},
        "vae": {"steps": vae_steps, "batch": vae_batch, "seconds": round(vae_seconds, 1), "mse": vae_mse},
        "unet": {
            "steps": steps_done,
            "planned_steps": unet_steps,
            "batch": batch,
            "lr": lr,
            "text_lr": text_lr,
            "seconds": round(unet_seconds, 1),
            "loss": loss,
        },
        "train_seconds": round(train_seconds, 1),
        "scores": scores,
        "eval_seconds": round(time.time() - t0, 1),
        "ema_decay": ema_decay,
    }
    if previous is not None:
        report["resumed_from"] = previous
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    _log(f"scores {json.dumps(scores)}")
    return report


def _load_components(folder: Path) -> dict[str, Any]:
    from lorax.zoo.shapes.pipeline import load_shapes_pipeline

    pipe = load_shapes_pipeline(folder)
    return {
        "unet": pipe.unet,
        "vae": pipe.vae,
        "text_encoder": pipe.text_encoder,
        "tokenizer": pipe.tokenizer,
        "scheduler": pipe.scheduler,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (a diffusers pipeline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1000)
    parser.add_argument("--unet-steps", type=int, default=3500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--text-lr", type=float, default=1e-3)
    parser.add_argument(
        "--images",
        dest="n_images",
        metavar="IMAGES",
        type=int,
        default=8000,
        help="renders of the base world",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop the UNet phase after this many steps of its schedule",
    )
    parser.add_argument("--resume", type=Path, default=None, help="continue from a folder this script wrote")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds; stop the UNet phase early (steps done are recorded)",
    )
    train(**vars(parser.parse_args(argv)))  # every flag is the parameter of its name


if __name__ == "__main__":
    main()
