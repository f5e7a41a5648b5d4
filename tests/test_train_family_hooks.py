"""A family's training is one ``TrainingHooks`` registration: its batches and its objective are what train, invert
and pivot use, with no change to the loop or the recipes."""

from __future__ import annotations

import pytest

from lorax.progress import NullProgress

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def counting_hooks():
    """SD1 trained through hooks whose objective and batches count their calls (the registration undone after)."""
    from lorax.training import family_hooks
    from lorax.training.family_hooks import CLIP, TrainingHooks, diffusion_objective, register
    from lorax.training.job import DiffusionBatches

    calls = {"loss": 0, "conditioning": 0, "objective": 0}

    class CountingObjective:
        def __init__(self, inner):
            self.inner = inner
            self.prediction_type = inner.prediction_type
            self.num_timesteps = inner.num_timesteps

        def loss(self, unet, step, generator):
            calls["loss"] += 1
            return self.inner.loss(unet, step, generator)

    class CountingBatches(DiffusionBatches):
        def conditioning(self, epoch, indices, captions):
            calls["conditioning"] += 1
            return super().conditioning(epoch, indices, captions)

    def objective(pipe, config):
        calls["objective"] += 1
        return CountingObjective(diffusion_objective(pipe, config))

    before = family_hooks._HOOKS["sd1"]
    register(
        "sd1",
        TrainingHooks(
            "counting", CLIP.prompt_encoder, lambda: CountingBatches, CLIP.masked_batches, objective
        ),
    )
    yield calls
    register("sd1", before)


def test_registered_hooks_give_the_batches_and_objective_of_train_and_invert(
    counting_hooks, star_model, star_images, tmp_path
):
    from lorax.services.invert import invert
    from lorax.services.train import train
    from lorax.training.config import TrainConfig
    from lorax.training.pivot_config import InvertConfig

    common = dict(data_dir=star_images, model=str(star_model), resolution=32, device="cpu", save_dtype="fp32")
    cfg = TrainConfig(output=tmp_path / "a.safetensors", instance_prompt="a sks star", steps=3, **common)
    result = train(cfg, NullProgress())
    assert counting_hooks == {"loss": 3, "conditioning": 3, "objective": 1}
    assert result.steps == 3 and result.output.is_file()

    cfg = InvertConfig(output=tmp_path / "e.safetensors", token_at_data="star|<s1>", steps=2, **common)
    invert(cfg, NullProgress())
    assert counting_hooks == {"loss": 5, "conditioning": 5, "objective": 2}


def test_a_family_without_hooks_trains_by_its_text_encoders():
    from lorax.training.family_hooks import CLIP, SDXL, hooks_for

    assert hooks_for("sd1") is CLIP and hooks_for("sd2") is CLIP and hooks_for("sdxl") is SDXL
    assert hooks_for("toy", encoders=[object()]) is CLIP
    assert hooks_for("toy", encoders=[object(), object()]) is SDXL


def test_masked_batches_keep_their_family():
    from lorax.training.family_hooks import CLIP, SDXL, hooks_of_batches
    from lorax.training.masks import MaskedBatches, MaskedSdxlBatches
    from lorax.training.sdxl import SdxlBatches

    def bare(cls):  # an instance without running the dataclass' __init__
        return cls.__new__(cls)

    assert hooks_of_batches(bare(SdxlBatches)) is SDXL
    assert hooks_of_batches(bare(MaskedSdxlBatches)) is SDXL
    assert hooks_of_batches(bare(MaskedBatches)) is CLIP
