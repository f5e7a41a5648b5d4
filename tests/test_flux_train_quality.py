"""Quality on the built-in shapes-flux model (issue 17's acceptance): a DreamBooth LoRA with prior preservation
teaches a held-out colour ("a sks circle" = a purple circle; the base never saw purple) while the class prompt
("a circle") keeps what it drew. Scored by the shapes world's deterministic readers, as test_train_quality.py does
for the SD shapes model; LoRAs loaded by diffusers' own ``FluxPipeline.load_lora_weights``."""

from __future__ import annotations

from pathlib import Path

import pytest

CONCEPT_PROMPT, CLASS_PROMPT = "a sks circle", "a circle"
N = 16

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def concept_colour(pipe, n: int = N) -> float:
    """Fraction of ``n`` samples of the concept prompt read as purple."""
    from lorax.zoo.shapes.scorers import score_images
    from lorax.zoo.shapes_flux.pipeline import sample

    return float(score_images(sample(pipe, [CONCEPT_PROMPT] * n, seed=1), "a purple circle")["colour"])


def class_accuracy(pipe, n: int = N) -> float:
    """Shape accuracy of ``n`` samples of the class prompt "a circle"."""
    from lorax.zoo.shapes.scorers import score_images
    from lorax.zoo.shapes_flux.pipeline import sample

    return float(score_images(sample(pipe, [CLASS_PROMPT] * n, seed=1), CLASS_PROMPT)["shape"])


def with_lora(path: Path):
    from lorax.zoo.shapes_flux.pipeline import load_shapes_flux_pipeline

    pipe = load_shapes_flux_pipeline()
    pipe.load_lora_weights(str(path))
    return pipe


def train_concept(tmp_path: Path, *, steps: int, class_images: int, **extra):
    from lorax.progress import NullProgress
    from lorax.services.train import train
    from lorax.training.config import TrainConfig
    from lorax.zoo.shapes import write_concept_dir

    data = tmp_path / "purple-circles"
    write_concept_dir(data, "circle", "purple", 8, caption=CONCEPT_PROMPT)
    flags = dict(
        data_dir=data,
        output=tmp_path / "sks-circle.safetensors",
        model="shapes-flux",
        steps=steps,
        class_prompt=CLASS_PROMPT,
        num_class_images=class_images,
        class_dir=tmp_path / "class",
        format="diffusers",
        device="cpu",
        **RECIPE,
        **extra,
    )
    # from_sources: the model's lorax.json train section applies (batch 4, T5 16 tokens), as on the command line
    return train(TrainConfig.from_sources(flags), NullProgress())


# The recipe of docs/train.md's Flux section; batch size and T5 length are the model's lorax.json train section.
FAST_CONCEPT_FLOOR = 0.40  # measured 0.56 (9 of 16)
RECIPE = dict(rank=8, targets="attn", learning_rate=3e-3, prior_weight=2.0)


def purple_share(pipe) -> float:
    """Fraction of the class prompt's samples read as purple: how far the concept leaks into its class."""
    from lorax.zoo.shapes.scorers import score_images
    from lorax.zoo.shapes_flux.pipeline import sample

    result = score_images(sample(pipe, [CLASS_PROMPT] * N, seed=1), CLASS_PROMPT)
    return sum(r["seen"]["colour"] == "purple" for r in result["readings"]) / N


def run(tmp_path: Path, steps: int, class_images: int) -> tuple[dict, dict]:
    from lorax.zoo.shapes_flux.pipeline import load_shapes_flux_pipeline

    base = load_shapes_flux_pipeline()
    before = {"concept": concept_colour(base), "class": class_accuracy(base), "purple": purple_share(base)}
    result = train_concept(tmp_path, steps=steps, class_images=class_images)
    pipe = with_lora(result.output)
    after = {"concept": concept_colour(pipe), "class": class_accuracy(pipe), "purple": purple_share(pipe)}
    print(f"before {before}; after {after}")
    return before, after


def test_dreambooth_with_prior_preservation_at_a_reduced_budget(tmp_path):
    """CI budget: 150 steps, 8 class images (about 25 s here). Measured here: concept 0.00 → 0.56, class 0.75 →
    0.81; the class images still turn purple half the time at this budget (0.56): the class test is the slow one."""
    before, after = run(tmp_path, steps=150, class_images=8)
    assert before["concept"] <= 0.20
    assert after["concept"] >= FAST_CONCEPT_FLOOR
    assert after["class"] >= before["class"] - 0.20


@pytest.mark.slow
def test_dreambooth_teaches_a_heldout_colour_and_keeps_the_class(tmp_path):
    """Issue 17's acceptance: ≥ 70% of 16 samples purple, from ≤ 20%, the class prompt's shape accuracy within 10
    points of the base's (300 steps, 32 class images; about 37 s here). Measured here: concept 0.00 → 0.75, class
    0.75 → 0.75, class samples read purple 0.00 → 0.12."""
    before, after = run(tmp_path, steps=300, class_images=32)
    assert before["concept"] <= 0.20
    assert after["concept"] >= 0.70
    assert after["class"] >= before["class"] - 0.10
