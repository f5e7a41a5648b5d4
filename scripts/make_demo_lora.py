"""Demo assets: a tiny random SD1 pipeline (diffusers folder) and a LoRA + embedding for it. Offline, seconds.

python scripts/make_demo_lora.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(out: Path) -> None:
    import torch

    from lorax.formats import save_embeddings, save_lora
    from lorax.zoo.random_lora import random_lora
    from lorax.zoo.tiny import tiny_pipeline

    out.mkdir(parents=True, exist_ok=True)
    pipe = tiny_pipeline("sd1", seed=0, words=["cat", "dog", "<s1>"])
    pipe.save_pretrained(out / "tiny-sd1")
    lora = random_lora(pipe, kinds=("attention", "ff"), rank=4, alpha=2.0, seed=1, family="sd1")
    lora.metadata["ss_network_dim"] = "4"
    lora.metadata["ss_network_alpha"] = "2"
    save_lora(lora, out / "demo-lora.safetensors", format="kohya", force=True)
    embedding = {"<s1>": {"text_encoder": torch.randn(2, 32, generator=torch.Generator().manual_seed(2))}}
    save_embeddings(embedding, out / "s1-embedding.pt", force=True)
    print(out / "tiny-sd1")
    print(out / "demo-lora.safetensors")
    print(out / "s1-embedding.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out"))
