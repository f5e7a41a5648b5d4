"""Quality on the built-in shapes model: DreamBooth LoRA teaches a held-out concept ("a sks circle" = purple circle,
a colour the base never saw). Scored by the shapes world's deterministic colour/shape readers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CONCEPT_PROMPT, TRUTH = "a sks circle", "a purple circle"
OTHERS = ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
N = 24


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def concept_score(pipe) -> float:
    """Fraction of N samples of the concept prompt read as a purple circle (colour and shape both right)."""
    from lorax.zoo.shapes.pipeline import sample
    from lorax.zoo.shapes.scorers import score_images

    result = score_images(sample(pipe, [CONCEPT_PROMPT] * N, seed=1), TRUTH)
    return (
        sum(r["seen"]["colour"] == "purple" and r["seen"]["shape"] == "circle" for r in result["readings"])
        / N
    )


def others_accuracy(pipe) -> float:
    from lorax.zoo.shapes.pipeline import sample
    from lorax.zoo.shapes.scorers import score_images

    prompts = [p for p in OTHERS for _ in range(6)]
    result = score_images(sample(pipe, prompts, seed=2), prompts)
    return (result["colour"] + result["shape"]) / 2


def with_lora(path: Path):
    from lorax.adapters.peft_bridge import to_pipeline_state_dict
    from lorax.formats import load_lora
    from lorax.zoo.shapes.pipeline import load_shapes_pipeline

    pipe = load_shapes_pipeline()
    pipe.load_lora_weights(to_pipeline_state_dict(load_lora(path), pipe))
    return pipe


def train_concept(tmp_path: Path, steps: int, **extra):
    from lorax.progress import NullProgress
    from lorax.services.train import train
    from lorax.training.config import TrainConfig
    from lorax.zoo.shapes import write_concept_dir

    data = tmp_path / "purple-circles"
    write_concept_dir(data, "circle", "purple", 8, caption=CONCEPT_PROMPT)
    cfg = TrainConfig(
        data_dir=data,
        output=tmp_path / "sks-circle.safetensors",
        model="shapes",
        steps=steps,
        batch_size=4,
        learning_rate=5e-3,
        snr_gamma=5.0,
        device="cpu",
        **extra,
    )
    return train(cfg, NullProgress())


def test_dreambooth_lora_teaches_a_heldout_colour(tmp_path):
    """CI variant (300 steps): the concept goes from never drawn to drawn in most samples; the LoRA file stays
    under 2% of the model. Measured here: base 0.00 → 0.62 (24 samples)."""
    from lorax.zoo.shapes.pipeline import load_shapes_pipeline

    base = load_shapes_pipeline()
    before = concept_score(base)
    result = train_concept(tmp_path, steps=300)
    after = concept_score(with_lora(result.output))
    assert before <= 0.1
    assert after >= 0.5, f"concept score {before:.2f} → {after:.2f}"
    assert result.file_bytes <= 0.02 * result.base_model_bytes


@pytest.mark.slow
def test_dreambooth_reaches_70_percent_and_prior_preservation_keeps_the_class(tmp_path):
    """Acceptance run (600 steps): ≥ 70% on the concept; with prior preservation ("a circle" class images from the
    base) the other prompts' accuracy stays within 10 points of the base's. The drop without it is printed."""
    from lorax.zoo.shapes.pipeline import load_shapes_pipeline

    base_others = others_accuracy(load_shapes_pipeline())
    plain = train_concept(tmp_path / "plain", steps=600)
    plain_pipe = with_lora(plain.output)
    assert concept_score(plain_pipe) >= 0.7
    prior = train_concept(tmp_path / "prior", steps=600, class_prompt="a circle", num_class_images=24)
    prior_pipe = with_lora(prior.output)
    assert concept_score(prior_pipe) >= 0.7
    print(
        f"others: base {base_others:.2f}, without prior {others_accuracy(plain_pipe):.2f}, "
        f"with prior {others_accuracy(prior_pipe):.2f}"
    )
    assert others_accuracy(prior_pipe) >= base_others - 0.10
