"""Acceptance on the built-in shapes model (slow): invert learns a held-out colour as a token, and pivot on a
held-out colour scores at least as high as plain DreamBooth LoRA with the same total step budget.

Run with ``pytest -m slow tests/test_invert_shapes.py -s`` (prints the figures). Both train on CPU for minutes.
The held-out colour is orange (the base model drew only red, yellow, green, cyan and blue); the token starts as
"red yellow" spread over four vectors (docs/invert.md has the figures, and purple's).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorax.progress import NullProgress

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

BACKGROUNDS = ("white", "black", "gray")
PER_BACKGROUND = 8
SEED = 5


def shapes_pipe():
    from lorax.zoo.shapes.pipeline import load_shapes_pipeline

    return load_shapes_pipeline()


def share(images, judge, want: str) -> float:
    return sum(judge(img) == want for img in images) / len(images)


COLOUR = "orange"
RECIPE = dict(  # the recipe docs/invert.md gives for a held-out colour
    token_at_data=f"{COLOUR}|<s1>",
    init_token="red yellow red yellow",
    vectors=4,
    auto_mask=True,
    learning_rate=5e-3,
    lr_scheduler="cosine",
    batch_size=4,
)
N_PLAIN = 48


def test_invert_learns_a_held_out_colour(tmp_path):
    from lorax.adapters.apply import register_tokens
    from lorax.formats import load_embeddings
    from lorax.services.invert import invert
    from lorax.training.pivot_config import InvertConfig
    from lorax.zoo.shapes import classify_colour, write_concept_dir
    from lorax.zoo.shapes.pipeline import sample

    data = tmp_path / "orange-squares"
    write_concept_dir(data, "square", COLOUR, 16, seed=3)  # captions: "a orange square on a … background"
    out = tmp_path / "s1.pt"
    result = invert(
        InvertConfig(data_dir=data, output=out, model="shapes", steps=400, device="cpu", **RECIPE),
        NullProgress(),
    )
    pipe = shapes_pipe()
    base = sample(pipe, [f"a {COLOUR} square"] * N_PLAIN, seed=SEED)
    with_bg = [f"a {{}} square on a {b} background" for b in BACKGROUNDS for _ in range(PER_BACKGROUND)]
    base_bg = sample(pipe, [p.format(COLOUR) for p in with_bg], seed=SEED)
    register_tokens(pipe, load_embeddings(out))
    learned = sample(pipe, ["a <s1> square"] * N_PLAIN, seed=SEED)
    learned_bg = sample(pipe, [p.format("<s1>") for p in with_bg], seed=SEED)
    figures = {
        "base": share(base, classify_colour, COLOUR),
        "learned": share(learned, classify_colour, COLOUR),
        "base_with_background": share(base_bg, classify_colour, COLOUR),
        "learned_with_background": {
            b: share(learned_bg[i * PER_BACKGROUND : (i + 1) * PER_BACKGROUND], classify_colour, COLOUR)
            for i, b in enumerate(BACKGROUNDS)
        },
        "train_seconds": round(result.seconds, 1),
        "file_bytes": result.file_bytes,
    }
    print(json.dumps(figures))
    assert figures["base"] <= 0.2
    assert figures["learned"] >= 0.7  # the prompt, "a <s1> square"


def test_pivot_beats_dreambooth_lora_at_the_same_step_budget(tmp_path):
    from lorax.adapters.apply import LoraRequest, apply_loras, register_tokens
    from lorax.formats import load_lora
    from lorax.services.pivot import pivot
    from lorax.services.train import train
    from lorax.training.config import TrainConfig
    from lorax.training.pivot_config import PivotConfig
    from lorax.zoo.shapes import classify_colour, write_concept_dir
    from lorax.zoo.shapes.pipeline import sample

    # The same 16 orange squares: pivot learns <s1> for "orange" (phase 1 as in invert's recipe), then a LoRA;
    # DreamBooth LoRA trains on "a sks square …" for the whole budget. Same lr, batch, seed and total steps.
    data = tmp_path / "orange-squares"
    write_concept_dir(data, "square", COLOUR, 16, seed=3)
    db_data = tmp_path / "orange-sks"
    write_concept_dir(db_data, "square", COLOUR, 16, seed=3)
    for txt in db_data.glob("*.txt"):
        txt.write_text(txt.read_text().replace(COLOUR, "sks"))
    budget, ti_steps = 200, 100
    common = dict(model="shapes", batch_size=4, device="cpu", learning_rate=1e-3, seed=0)
    piv = pivot(
        PivotConfig(
            data_dir=data,
            output=tmp_path / "pivot.safetensors",
            token_at_data=f"{COLOUR}|<s1>",
            init_token="red yellow red yellow",
            vectors=4,
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

    def score(path: Path, token: str) -> tuple[float, float]:
        """(share orange of "a TOKEN square", of "a TOKEN square on a … background")."""
        pipe = shapes_pipe()
        state = load_lora(path, model=pipe)
        if state.embeddings:
            register_tokens(pipe, state.embeddings)
        apply_loras(pipe, [LoraRequest(state)], fuse=True)
        plain = sample(pipe, [f"a {token} square"] * N_PLAIN, seed=SEED)
        with_bg = [
            f"a {token} square on a {b} background" for b in BACKGROUNDS for _ in range(PER_BACKGROUND)
        ]
        return (
            share(plain, classify_colour, COLOUR),
            share(sample(pipe, with_bg, seed=SEED), classify_colour, COLOUR),
        )

    pivot_plain, pivot_bg = score(piv.output, "<s1>")
    db_plain, db_bg = score(db.output, "sks")
    figures = {
        "pivot": pivot_plain,
        "dreambooth": db_plain,
        "pivot_with_background": pivot_bg,
        "dreambooth_with_background": db_bg,
        "pivot_bytes": piv.file_bytes,
        "dreambooth_bytes": db.file_bytes,
        "pivot_seconds": round(piv.seconds, 1),
        "dreambooth_seconds": round(db.seconds, 1),
    }
    print(json.dumps(figures))
    assert pivot_plain >= db_plain
    assert pivot_bg >= db_bg
