"""Train the built-in ``shapes-flux`` model: ``python -m lorax.zoo.shapes_flux.train_base --out DIR --seed 0``.

The SD shapes model's recipe (``lorax.zoo.shapes.train_base``), on Flux's objective. Deterministic in the seed:

1. **VAE** (16 latent channels): ``lorax.zoo.shapes.train_base.train_vae`` on renders of the whole world, held-out
   shapes and colours included (a codec must be able to write what a LoRA will teach). Its ``shift_factor`` and
   ``scaling_factor`` are set so latents have zero mean and unit variance, as Flux's VAE config does.
2. **Transformer + CLIP + T5**, jointly, on renders of the *base* world only, with the shapes model's caption
   variants (full; no background; no colour; no shape; 10% empty). Rectified flow: ``x_t = (1 − σ)·x0 + σ·ε``, the
   transformer's velocity against ``ε − x0``, σ logit-normal (SD3 / Flux trainers' ``logit_normal``), AdamW with a
   cosine schedule, an EMA of the weights (saved). No caption names a held-out shape or colour (checked), so their
   embedding rows in both text encoders keep their random start.
3. **Evaluation** with the shapes world's scorers (``evaluate``) of the EMA weights every ``eval_every`` steps (each
   written as a checkpoint folder under ``DIR/checkpoints/``) and at the end; the report lands in ``training.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lorax.zoo.shapes import world
from lorax.zoo.shapes.train_base import (
    CAPTION_WEIGHTS,
    _cosine_lr,
    _log,
    caption_variants,
    encode,
    optimizer_step,
    render_world,
    start_run,
    train_vae,
)
from lorax.zoo.shapes_flux.pipeline import LORAX_DEFAULTS, T5_LENGTH, assemble, build_components, evaluate

TRAINED = ("transformer", "text_encoder", "text_encoder_2")


def check_captions(texts: Sequence[str]) -> None:
    """Refuse a caption that names a held-out word: the base model must never see one."""
    held = set(world.HELDOUT_SHAPES) | set(world.HELDOUT_COLOURS) | {world.RARE_TOKEN}
    bad = [t for t in texts if held & set(t.split())]
    if bad:
        raise ValueError(f"held-out words in training captions: {bad[:3]}")


def _token_ids(tokenizer: Any, texts: Sequence[str], length: int) -> Any:
    return tokenizer(
        list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt"
    ).input_ids


class FlowStep:
    """One rectified-flow step's loss on a batch of latents and caption ids, as FluxPipeline runs the transformer."""

    def __init__(self, components: dict[str, Any], device: str) -> None:
        from diffusers import FluxPipeline

        self.c = components
        self.device = device
        side = int(components["transformer"].config.in_channels // 4)
        self.channels = side
        self.pack = FluxPipeline._pack_latents
        self.image_ids = None
        self.prepare_ids = FluxPipeline._prepare_latent_image_ids

    def loss(self, x0: Any, clip_ids: Any, t5_ids: Any, generator: Any) -> Any:
        import torch

        b, ch, h, w = x0.shape
        sigma = torch.sigmoid(torch.randn(b, generator=generator)).to(self.device)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        s = sigma[:, None, None, None]
        xt = (1 - s) * x0 + s * noise
        if self.image_ids is None:
            self.image_ids = self.prepare_ids(b, h // 2, w // 2, self.device, x0.dtype)
        pooled = self.c["text_encoder"](clip_ids).pooler_output
        t5 = self.c["text_encoder_2"](t5_ids)[0]
        pred = self.c["transformer"](
            hidden_states=self.pack(xt, b, ch, h, w),
            timestep=sigma,
            guidance=None,
            pooled_projections=pooled,
            encoder_hidden_states=t5,
            txt_ids=torch.zeros(t5.shape[1], 3, device=self.device, dtype=x0.dtype),
            img_ids=self.image_ids,
            return_dict=False,
        )[0]
        return (pred - self.pack(noise - x0, b, ch, h, w)).pow(2).mean()


@dataclass(frozen=True)
class Recipe:
    """The shipped recipe (docs/model-card-flux.md): each field is an option of ``main``, with this default."""

    seed: int = 0
    vae_steps: int = field(default=600, metadata={"help": "VAE steps (on renders of every shape and colour)"})
    steps: int = field(default=3200, metadata={"help": "transformer + text encoder steps"})
    batch: int = 32
    lr: float = 1e-3
    text_lr: float = 5e-4
    images: int = field(default=8000, metadata={"help": "renders of the base world"})
    device: str = "cpu"
    threads: int = field(default=1, metadata={"help": "torch CPU threads (1: measured faster here)"})
    ema_decay: float = 0.998
    eval_every: int = field(default=400, metadata={"help": "checkpoint and score every N steps (0: never)"})


def train_transformer(
    components: dict[str, Any],
    latents: Any,
    scene_list: Sequence[world.Scene],
    recipe: Recipe,
    on_checkpoint: Any = None,
) -> tuple[float, int, dict[str, Any]]:
    """Train the transformer and both text encoders jointly; returns the final loss, steps done and the EMA copies."""
    import torch

    steps, batch, lr, text_lr, seed, device = (
        recipe.steps, recipe.batch, recipe.lr, recipe.text_lr, recipe.seed, recipe.device
    )  # fmt: skip
    ema_decay, eval_every = recipe.ema_decay, recipe.eval_every

    gen = torch.Generator().manual_seed(seed + 1)
    variants = [caption_variants(s) for s in scene_list]
    texts = sorted({t for v in variants for t in v} | {""})
    check_captions(texts)
    text_index = {t: i for i, t in enumerate(texts)}
    clip_ids = _token_ids(components["tokenizer"], texts, components["tokenizer"].model_max_length).to(device)
    t5_ids = _token_ids(components["tokenizer_2"], texts, T5_LENGTH).to(device)
    choice = torch.tensor([[text_index[t] for t in v] for v in variants])
    probs = torch.tensor([*CAPTION_WEIGHTS, 1 - sum(CAPTION_WEIGHTS)])
    empty = text_index[""]

    live = {name: components[name].to(device).train() for name in TRAINED}
    groups = [{"params": list(live["transformer"].parameters()), "lr": lr, "weight_decay": 1e-2}]
    for name in ("text_encoder", "text_encoder_2"):
        embed = list(live[name].get_input_embeddings().parameters())
        embed_ids = {id(p) for p in embed}
        rest = [p for p in live[name].parameters() if id(p) not in embed_ids]
        groups.append({"params": rest, "lr": text_lr, "weight_decay": 1e-2})
        # no decay on token embeddings: rows of words no caption uses must keep their random start
        groups.append({"params": embed, "lr": text_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _cosine_lr(s, steps, min(200, max(1, steps // 10)))
    )
    ema = {name: copy.deepcopy(m).eval().requires_grad_(False) for name, m in live.items()}
    flow = FlowStep(components, device)
    mean, std = latents
    shift = float(components["vae"].config.shift_factor)
    scale = float(components["vae"].config.scaling_factor)
    loss_avg, done = 0.0, 0
    for step in range(steps):
        idx = torch.randint(0, len(mean), (batch,), generator=gen)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        x0 = ((z - shift) * scale).to(device)
        pick = torch.multinomial(probs, batch, replacement=True, generator=gen)
        rows = torch.where(pick < 4, choice[idx, pick.clamp(max=3)], torch.full((batch,), empty)).to(device)
        loss = flow.loss(x0, clip_ids[rows], t5_ids[rows], gen)
        optimizer_step(opt, sched, loss, live, ema, ema_decay, step)
        loss_avg = 0.98 * loss_avg + 0.02 * float(loss.detach()) if step else float(loss.detach())
        done = step + 1
        if step % 100 == 0 or done == steps:
            _log(f"transformer step {step}/{steps} loss {loss_avg:.4f}")
        if on_checkpoint is not None and eval_every and done % eval_every == 0 and done < steps:
            on_checkpoint(done, ema, loss_avg)
    return loss_avg, done, ema


def save_pipeline(components: dict[str, Any], out: Path) -> Any:
    """Write ``components`` as a diffusers ``FluxPipeline`` folder (float32 safetensors) with its ``lorax.json``."""
    from lorax.models.defaults import parse_defaults, write_folder_defaults

    for name in (*TRAINED, "vae"):
        components[name].to("cpu").eval()
    pipe = assemble(components)
    pipe.set_progress_bar_config(disable=True)
    out.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    write_folder_defaults(out, parse_defaults(LORAX_DEFAULTS, "LORAX_DEFAULTS"))
    return pipe


def train(out: Path, recipe: Recipe = Recipe()) -> dict[str, Any]:
    """Train the shapes-flux model and write it, with ``training.json``, to the folder ``out``."""
    import torch

    seed, device = recipe.seed, recipe.device
    started = start_run(seed, recipe.threads)
    out = Path(out)
    components = build_components(seed)
    vae_images, base_scenes, base_images = render_world(recipe.images, seed)

    t0 = time.time()
    vae_mse = train_vae(components["vae"], vae_images, recipe.vae_steps, 32, 1e-3, seed, device)
    vae_seconds = time.time() - t0
    components["vae"].to(device).eval()
    mean, std = encode(components["vae"], base_images, device)
    components["vae"].register_to_config(
        shift_factor=float(mean.mean()), scaling_factor=float(1.0 / mean.std())
    )
    _log(f"vae done in {vae_seconds:.0f}s, mse {vae_mse:.5f}, config {dict(components['vae'].config)}")

    history: list[dict[str, Any]] = []

    def checkpoint(step: int, ema: dict[str, Any], loss: float) -> None:
        t = time.time()
        folder = out / "checkpoints" / f"step-{step}"
        pipe = save_pipeline({**components, **{k: copy.deepcopy(v) for k, v in ema.items()}}, folder)
        scores = evaluate(pipe, seed=seed)
        history.append(
            {"step": step, "loss": loss, "seconds": round(time.time() - started, 1), "scores": scores}
        )
        (out / "checkpoints" / "history.json").write_text(json.dumps(history, indent=2) + "\n")
        for name in TRAINED:
            ema[name].to(device)
        _log(f"checkpoint {step}: {json.dumps(scores)} ({time.time() - t:.0f}s)")

    t0 = time.time()
    loss, done, ema = train_transformer(
        components, (mean, std), base_scenes, recipe, on_checkpoint=checkpoint
    )
    transformer_seconds = time.time() - t0
    components.update(ema)
    train_seconds = time.time() - started
    pipe = save_pipeline(components, out)
    t0 = time.time()
    scores = evaluate(pipe, seed=seed)
    report = {
        "seed": seed,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "images": {"vae": len(vae_images), "transformer": len(base_images)},
        "vae": {"steps": recipe.vae_steps, "batch": 32, "seconds": round(vae_seconds, 1), "mse": vae_mse},
        "transformer": {
            "steps": done,
            "batch": recipe.batch,
            "lr": recipe.lr,
            "text_lr": recipe.text_lr,
            "ema_decay": recipe.ema_decay,
            "sigma": "logit-normal(0, 1)",
            "seconds": round(transformer_seconds, 1),
            "loss": loss,
        },
        "train_seconds": round(train_seconds, 1),
        "scores": scores,
        "eval_seconds": round(time.time() - t0, 1),
        "checkpoints": history,
    }
    (out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    _log(f"scores {json.dumps(scores)}")
    return report


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (a diffusers FluxPipeline)")
    for f in fields(Recipe):
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        parser.add_argument(
            flag, dest=f.name, type=type(f.default), default=f.default, help=f.metadata.get("help")
        )
    args = vars(parser.parse_args(argv))
    train(args.pop("out"), Recipe(**args))


if __name__ == "__main__":
    main()
