"""Acceptance on the built-in shapes model (slow): invert learns a held-out colour as a token, and pivot on a
held-out shape scores at least as high as plain DreamBooth LoRA with the same total step budget.

Run with ``pytest -m slow tests/test_invert_shapes.py -s`` (prints the figures). Both train on CPU for minutes.
The invert test holds the issue's target (≥ 70% purple); on the packaged model it measures about 21% (docs/invert.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorax.progress import NullProgress

pytestmark = pytest.mark.slow

BACKGROUNDS = ("white", "black", "gray")
PER_BACKGROUND = 8
SEED = 5


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shapes_pipe():
    from lorax.zoo.shapes.pipeline import load_shapes_pipeline

    return load_shapes_pipeline()


def share(images, judge, want: str) -> float:
    return sum(judge(img) == want for img in images) / len(images)


def test_invert_learns_a_held_out_colour(tmp_path):
    from lorax.adapters.apply import register_tokens
    from lorax.formats import load_embeddings
    from lorax.services.invert import invert
    from lorax.training.pivot_config import InvertConfig
    from lorax.zoo.shapes import classify_colour, write_concept_dir
    from lorax.zoo.shapes.pipeline import sample

    data = tmp_path / "purple-squares"
    write_concept_dir(data, "square", "purple", 16, seed=3)  # captions: "a purple square on a … background"
    out = tmp_path / "s1.pt"
    cfg = InvertConfig(
        data_dir=data,
        output=out,
        model="shapes",
        token_at_data="purple|<s1>",
        init_token="red blue",
        norm_decay=False,
        learning_rate=3e-2,
        auto_mask=True,
        steps=300,
        batch_size=4,
        device="cpu",
    )
    result = invert(cfg, NullProgress())
    prompts = [f"a <s1> square on a {b} background" for b in BACKGROUNDS for _ in range(PER_BACKGROUND)]
    pipe = shapes_pipe()
    base = sample(pipe, [p.replace("<s1>", "purple") for p in prompts], seed=SEED)
    register_tokens(pipe, load_embeddings(out))
    learned = sample(pipe, prompts, seed=SEED)
    figures = {
        "base_purple": share(base, classify_colour, "purple"),
        "learned_purple": share(learned, classify_colour, "purple"),
        "train_seconds": round(result.seconds, 1),
        "file_bytes": result.file_bytes,
    }
    print(json.dumps(figures))
    assert figures["base_purple"] <= 0.2
    assert figures["learned_purple"] >= 0.7


def test_pivot_beats_dreambooth_lora_at_the_same_step_budget(tmp_path):
    from lorax.adapters.apply import LoraRequest, apply_loras, register_tokens
    from lorax.formats import load_lora
    from lorax.services.pivot import pivot
    from lorax.services.train import train
    from lorax.training.config import TrainConfig
    from lorax.training.pivot_config import PivotConfig
    from lorax.zoo.shapes import classify_colour, write_concept_dir
    from lorax.zoo.shapes.pipeline import sample

    # The same 16 purple squares: pivot learns <s1> for "purple"; DreamBooth LoRA trains on "a sks square …".
    data = tmp_path / "purple-squares"
    write_concept_dir(data, "square", "purple", 16, seed=3)
    db_data = tmp_path / "purple-sks"
    write_concept_dir(db_data, "square", "purple", 16, seed=3)
    for txt in db_data.glob("*.txt"):
        txt.write_text(txt.read_text().replace("purple", "sks"))
    budget, ti_steps = 200, 100
    common = dict(model="shapes", batch_size=4, device="cpu", learning_rate=1e-3, seed=0)
    piv = pivot(
        PivotConfig(
            data_dir=data,
            output=tmp_path / "pivot.safetensors",
            token_at_data="purple|<s1>",
            ti_steps=ti_steps,
            steps=budget - ti_steps,
            **common,
        ),
        NullProgress(),
    )
    db = train(
        TrainConfig(
            data_dir=db_data,
            output=tmp_path / "db.safetensors",
            steps=budget,
            train_text=True,
            text_learning_rate=1e-5,
            **common,
        ),
        NullProgress(),
    )

    def score(path: Path, token: str) -> float:
        pipe = shapes_pipe()
        state = load_lora(path, model=pipe)
        if state.embeddings:
            register_tokens(pipe, state.embeddings)
        apply_loras(pipe, [LoraRequest(state)], fuse=True)
        prompts = [
            f"a {token} square on a {b} background" for b in BACKGROUNDS for _ in range(PER_BACKGROUND)
        ]
        return share(sample(pipe, prompts, seed=SEED), classify_colour, "purple")

    figures = {
        "pivot_purple": score(piv.output, "<s1>"),
        "dreambooth_purple": score(db.output, "sks"),
        "pivot_bytes": piv.file_bytes,
        "dreambooth_bytes": db.file_bytes,
        "pivot_seconds": round(piv.seconds, 1),
        "dreambooth_seconds": round(db.seconds, 1),
    }
    print(json.dumps(figures))
    assert figures["pivot_purple"] >= figures["dreambooth_purple"]
