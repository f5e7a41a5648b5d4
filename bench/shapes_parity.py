"""Shapes-world figures for issue 19's training options: LoRA+ on/off and EMA on/off, same run otherwise.

Each variant trains the quality test's DreamBooth concept ("a sks circle" = a purple circle, a colour the base model
never saw; 8 images, batch 4, lr 5e-3, min-SNR 5, seed 0) and is scored by the shapes world's deterministic readers:
concept = fraction of 24 samples of the concept prompt read as a purple circle; drift = colour/shape accuracy of 24
samples of four other prompts (the base model's own figure printed first). Variants named ``-lr5e-4`` use that
learning rate instead.

    python -m bench.shapes_parity                 # 300 steps per variant (a few minutes on 2 CPU cores)
    python -m bench.shapes_parity --steps 150
    python -m bench.shapes_parity --only algo-lora-r4 algo-dora-r4 algo-locon-r1 algo-loha-r1 algo-lokr-r4

The ``algo-*`` variants are loaded through lorax's own apply (``apply_loras``, fused; diffusers' loader has no
LoHa/LoKr) and report their trained parameter count.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

CONCEPT_PROMPT, TRUTH = "a sks circle", "a purple circle"
OTHERS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
N = 24

VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "loraplus-16": {"loraplus_ratio": 16.0},
    "loraplus-4": {"loraplus_ratio": 4.0},
    "plain-lr5e-4": {"learning_rate": 5e-4},
    "loraplus-16-lr5e-4": {"loraplus_ratio": 16.0, "learning_rate": 5e-4},
    "ema-0.99": {"ema_decay": 0.99},
    # --algo at about equal parameter count (the UNet's convs dominate: LoCon and LoHa at their smallest ranks)
    "algo-lora-r4": {"algo": "lora", "rank": 4},
    "algo-dora-r4": {"algo": "dora", "rank": 4},
    "algo-locon-r1": {"algo": "locon", "rank": 1},
    "algo-loha-r1": {"algo": "loha", "rank": 1},
    "algo-lokr-r4": {"algo": "lokr", "rank": 4},
}


def concept_score(pipe: Any) -> float:
    from lorax.zoo.shapes.pipeline import sample
    from lorax.zoo.shapes.scorers import score_images

    result = score_images(sample(pipe, [CONCEPT_PROMPT] * N, seed=1), TRUTH)
    hits = sum(r["seen"]["colour"] == "purple" and r["seen"]["shape"] == "circle" for r in result["readings"])
    return hits / N


def others_accuracy(pipe: Any) -> float:
    from lorax.zoo.shapes.pipeline import sample
    from lorax.zoo.shapes.scorers import score_images

    prompts = [p for p in OTHERS for _ in range(N // len(OTHERS))]
    result = score_images(sample(pipe, prompts, seed=2), prompts)
    return float((result["colour"] + result["shape"]) / 2)


def with_lora(path: Path) -> Any:
    from lorax.adapters.peft_bridge import to_pipeline_state_dict
    from lorax.formats import load_lora
    from lorax.zoo.shapes.pipeline import load_shapes_pipeline

    pipe = load_shapes_pipeline()
    pipe.load_lora_weights(to_pipeline_state_dict(load_lora(path), pipe))
    return pipe


def fused(path: Path) -> Any:
    from lorax.adapters.apply import LoraRequest, apply_loras
    from lorax.formats import load_lora
    from lorax.zoo.shapes.pipeline import load_shapes_pipeline

    pipe = load_shapes_pipeline()
    apply_loras(pipe, [LoraRequest(load_lora(path))], fuse=True)
    return pipe


def parameters(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return sum(_numel(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(".alpha"))  # noqa: SIM118


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def run(name: str, extra: dict[str, Any], folder: Path, data: Path, steps: int) -> dict[str, Any]:
    from lorax.progress import NullProgress
    from lorax.services.train import train
    from lorax.training.config import TrainConfig

    values: dict[str, Any] = dict(
        data_dir=data,
        output=folder / f"{name}.safetensors",
        model="shapes",
        steps=steps,
        batch_size=4,
        learning_rate=5e-3,
        snr_gamma=5.0,
        device="cpu",
    )
    cfg = TrainConfig(**{**values, **extra})
    started = time.perf_counter()
    result = train(cfg, NullProgress())
    pipe = fused(result.output) if name.startswith("algo-") else with_lora(result.output)
    return {
        "variant": name,
        "parameters": parameters(result.output),
        "concept": concept_score(pipe),
        "others": others_accuracy(pipe),
        "final_loss": result.final_loss,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="variants to run (default: all)")
    args = parser.parse_args()
    import torch

    from lorax.zoo.shapes import write_concept_dir
    from lorax.zoo.shapes.pipeline import load_shapes_pipeline

    torch.set_num_threads(1)
    base = load_shapes_pipeline()
    print(json.dumps({"variant": "base", "concept": concept_score(base), "others": others_accuracy(base)}))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "purple-circles"
        write_concept_dir(data, "circle", "purple", 8, caption=CONCEPT_PROMPT)
        for name in args.only or list(VARIANTS):
            print(json.dumps(run(name, VARIANTS[name], Path(tmp), data, args.steps)), flush=True)


if __name__ == "__main__":
    main()
