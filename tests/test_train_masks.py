"""Loss masks in `lorax train` (issue 19 item 5): kohya's masked loss (mask × squared error), masks from
``NAME.mask.png`` beside the images, ``--mask-dir`` or ``--auto-mask``; mask files are never training images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class _Echo(torch.nn.Module):
    """A 'UNet' whose prediction is a trainable tensor, so the gradient reaching each latent pixel is visible."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.pred = torch.nn.Parameter(torch.randn(shape))

    def forward(self, noisy, timesteps, cond, return_dict=False):
        return (self.pred,)


def test_zero_half_of_the_mask_gives_zero_gradient_and_the_hand_loss():
    from diffusers import DDPMScheduler

    from lorax.training.masks import kohya_mask_weight
    from lorax.training.objective import DiffusionObjective, LossInputs

    objective = DiffusionObjective(DDPMScheduler(num_train_timesteps=100).config)
    mask = torch.ones(2, 32, 32)
    mask[:, :, :16] = 0.0  # the left half ignored
    weight = kohya_mask_weight(mask, (4, 4))
    assert torch.equal(weight[:, 0, :, :2], torch.zeros(2, 4, 2)) and torch.equal(
        weight[:, 0, :, 2:], torch.ones(2, 4, 2)
    )
    latents = torch.randn(2, 4, 4, 4)
    unet = _Echo((2, 4, 4, 4))
    gen = torch.Generator().manual_seed(0)
    step = LossInputs(latents, torch.zeros(2, 1, 8), weight=weight.sqrt())
    loss = objective.loss(unet, step, gen).mean()
    loss.backward()
    grad = unet.pred.grad
    assert torch.count_nonzero(grad[..., :2]) == 0
    assert torch.count_nonzero(grad[..., 2:]) == grad[..., 2:].numel()
    # the hand computation: mean over every element of mask × (pred - noise)^2, noise drawn from the same seed
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    hand = (weight * (unet.pred.detach() - noise) ** 2).mean()
    assert torch.allclose(loss.detach(), hand, atol=1e-6)


def test_mask_files_are_not_training_images(tmp_path):
    from lorax.data.images import ImageItem, find_images
    from lorax.training.masks import find_masks, mask_beside

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("L", (8, 8)).save(tmp_path / "a.mask.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "b.jpg")
    assert [p.name for p in find_images(tmp_path)] == ["a.png", "b.jpg"]
    assert mask_beside(tmp_path / "a.png") == tmp_path / "a.mask.png"
    assert mask_beside(tmp_path / "b.jpg") is None
    # --mask-dir takes NAME.mask.png as the mask of NAME too
    item = ImageItem(tmp_path / "a.png", "x", (8, 8))
    assert find_masks([item], tmp_path) == [tmp_path / "a.mask.png"]


def _images(folder: Path, *, beside: bool) -> Path:
    rng = np.random.default_rng(3)
    folder.mkdir()
    for i in range(2):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
        if beside:
            m = np.zeros((32, 32), np.uint8)
            m[:, 16:] = 255
            Image.fromarray(m, mode="L").save(folder / f"{i}.mask.png")
    return folder


def _weights_seen(monkeypatch) -> list[torch.Tensor]:
    from lorax.training.objective import DiffusionObjective

    seen: list[torch.Tensor] = []
    original = DiffusionObjective.loss

    def spy(self, unet, step, generator):
        seen.append(step.weight)
        return original(self, unet, step, generator)

    monkeypatch.setattr(DiffusionObjective, "loss", spy)
    return seen


def test_cli_train_with_masks_beside_the_images(cli, tmp_path, monkeypatch):
    images = _images(tmp_path / "imgs", beside=True)
    seen = _weights_seen(monkeypatch)
    out = tmp_path / "m.safetensors"
    args = ["train", images, "--model", "shapes", "--instance-prompt", "x", "--steps", "2", "-o", out]
    result = cli(*args, "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    assert "loss masks: 2 of 2 images have NAME.mask.png" in result.stderr
    assert "2 images" in result.stderr  # the mask files were not trained on
    assert len(seen) == 2 and all(w is not None for w in seen)
    for w in seen:  # the left half of each latent weighs 0, the right half 1
        half = w.shape[-1] // 2
        assert torch.count_nonzero(w[..., :half]) == 0 and torch.all(w[..., half:] == 1)
    assert out.is_file()


def test_cli_train_auto_mask_and_exclusive_flags(cli, tmp_path, monkeypatch):
    images = _images(tmp_path / "imgs", beside=False)
    seen = _weights_seen(monkeypatch)
    out = tmp_path / "a.safetensors"
    base = ["train", images, "--model", "shapes", "--instance-prompt", "x", "--steps", "1", "--device", "cpu"]
    result = cli(*base, "-o", out, "--auto-mask")
    assert result.exit_code == 0, result.stderr
    assert "loss masks: automatic" in result.stderr and seen[0] is not None
    seen.clear()
    result = cli(*base, "-o", tmp_path / "b.safetensors")  # no masks anywhere: plain MSE
    assert result.exit_code == 0 and seen == [None]
    result = cli(*base, "-o", tmp_path / "c.safetensors", "--auto-mask", "--mask-dir", images)
    assert result.exit_code == 1 and "--mask-dir and --auto-mask are exclusive" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
