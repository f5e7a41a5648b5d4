"""Run by tests/test_train_distributed.py under ``torchrun --nproc_per_node 2``: LoRA on a sharded frozen denoiser
(``lorax.training.distributed.shard_frozen``) against the same LoRA trained in one process on the whole batch.

Every process builds the same tiny model and the same fixed batch of ``2 × per_rank`` examples. The reference (an
unsharded copy, trained by plain PyTorch in this process, no communication) takes the whole batch each step; the
sharded model takes this process's ``per_rank`` examples as ``accum`` micro-batches (all but the last under
``no_sync``, as the training loop does). Same optimizer, same steps: the LoRA weights must agree. Writes
``result-RANK.json`` (max abs difference, frozen bytes held and in all, the LoRA's checksum) into ``sys.argv[1]``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def _model(family: str) -> tuple[torch.nn.Module, list[str]]:
    from lorax.training.targets import find_targets

    if family == "flux":
        from diffusers import FluxTransformer2DModel

        from tests.test_flux_generate import TINY

        model = FluxTransformer2DModel(**{**TINY, "guidance_embeds": True})
        linear = torch.nn.Linear
        return model, [n for n, m in model.named_modules() if isinstance(m, linear) and ".attn." in n]
    else:
        from lorax.zoo.tiny import tiny_pipeline

        model = tiny_pipeline(family).unet
    return model, find_targets(model, "attn", "unet")


def _batch(model: torch.nn.Module, family: str, n: int) -> list[dict[str, torch.Tensor]]:
    """``n`` fixed examples (each a dict of the model's keyword inputs) and their targets."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        if family == "flux":
            cfg = model.config
            tokens = 16
            ex = {
                "hidden_states": torch.randn(1, tokens, cfg.in_channels, generator=g),
                "encoder_hidden_states": torch.randn(1, 8, cfg.joint_attention_dim, generator=g),
                "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g),
                "timestep": torch.rand(1, generator=g),
                "img_ids": torch.stack(
                    [torch.zeros(tokens), torch.arange(tokens) // 4, torch.arange(tokens) % 4], -1
                ).float(),
                "txt_ids": torch.zeros(8, 3),
            }
            if cfg.guidance_embeds:
                ex["guidance"] = torch.ones(1)
            ex["target"] = torch.randn(1, tokens, cfg.in_channels, generator=g)
        else:
            cfg = model.config
            size = cfg.sample_size if isinstance(cfg.sample_size, int) else 8
            ex = {
                "sample": torch.randn(1, cfg.in_channels, size, size, generator=g),
                "timestep": torch.randint(0, 1000, (1,), generator=g),
                "encoder_hidden_states": torch.randn(1, 8, cfg.cross_attention_dim, generator=g),
            }
            ex["target"] = torch.randn(1, cfg.out_channels, size, size, generator=g)
        out.append(ex)
    return out


def _loss(model: torch.nn.Module, examples: list[dict[str, torch.Tensor]], family: str) -> torch.Tensor:
    inputs = {
        k: torch.cat([e[k] for e in examples])
        for k in examples[0]
        if k not in ("target", "img_ids", "txt_ids")
    }
    if family == "flux":
        inputs["img_ids"], inputs["txt_ids"] = examples[0]["img_ids"], examples[0]["txt_ids"]
    target = torch.cat([e["target"] for e in examples])
    pred = model(**inputs, return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), target.float())


def _lora(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from lorax.training.lora import lora_tensors

    return lora_tensors(model)


def main() -> None:
    from lorax.training import distributed
    from lorax.training.lora import inject_lora, lora_parameters

    out, family = Path(sys.argv[1]), sys.argv[2]
    per_rank, accum, steps = int(sys.argv[3]), int(sys.argv[4]), 3
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model, targets = _model(family)
    model.requires_grad_(False)
    inject_lora(model, targets, rank=4, alpha=4.0, seed=1)
    with torch.no_grad():  # B starts at zero: give it a value so that A's gradients are not zero at the start
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.01)
    reference = copy.deepcopy(model)
    start = _lora(model)
    examples = _batch(model, family, world * per_rank)

    sync = distributed.shard_frozen(model, "cpu", distributed.ShardPlan(reshard_after_forward=True))
    local, total = distributed.frozen_bytes(model)
    sharded_opt = torch.optim.SGD(lora_parameters(model), lr=2.0)
    reference_opt = torch.optim.SGD(lora_parameters(reference), lr=2.0)
    mine = examples[rank * per_rank : (rank + 1) * per_rank]
    chunk = per_rank // accum
    for _ in range(steps):
        for a in range(accum):
            micro = mine[a * chunk : (a + 1) * chunk]
            context = model.no_sync() if a < accum - 1 else torch.enable_grad()  # type: ignore[operator]
            with context:
                (_loss(model, micro, family) / accum).backward()
        sharded_opt.step()
        sharded_opt.zero_grad(set_to_none=True)
        # the reference: the whole global batch at once (the mean over the same examples)
        _loss(reference, examples, family).backward()
        reference_opt.step()
        reference_opt.zero_grad(set_to_none=True)

    got, want = _lora(model), _lora(reference)
    assert got.keys() == want.keys()
    diff = max(float((got[k] - want[k]).abs().max()) for k in got)
    moved = max(float((want[k] - start[k]).abs().max()) for k in want)  # how far training took the weights
    checksum = float(sum(float(t.double().sum()) for t in got.values()))
    (out / f"result-{rank}.json").write_text(
        json.dumps(
            {
                "max_abs_diff": diff,
                "max_abs_moved": moved,
                "frozen_local": local,
                "frozen_total": total,
                "checksum": checksum,
                "world": world,
                "reductions": sync.reductions,
            }
        )
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
