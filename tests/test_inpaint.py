"""``lorax generate --init-image --mask-image``: inpainting on the shapes model (latent blending, 4-channel UNet) keeps
the unmasked region and repaints the masked one; a 9-channel inpainting pipeline built from config runs end to end,
with a LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _init_and_mask(folder: Path, size: int = 32) -> tuple[Path, Path]:
    from lorax.zoo.shapes.world import Scene, render

    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(render(Scene("circle", "red", "white", 12.0, 2.0, 10.0), size)).save(folder / "init.png")
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2 :] = 255  # repaint the right half
    Image.fromarray(mask).save(folder / "mask.png")
    return folder / "init.png", folder / "mask.png"


def test_inpainting_the_shapes_model_keeps_the_unmasked_half(cli, tmp_path):
    init, mask = _init_and_mask(tmp_path)
    out = tmp_path / "out"
    result = cli(
        "generate", "a blue square on a white background", "--init-image", init, "--mask-image", mask,
        "--strength", "1", "-n", "2", "--seed", "0", "--steps", "8", "-o", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2
    before = np.asarray(Image.open(init), dtype=np.float64)
    for row in rows:
        after = np.asarray(Image.open(row["path"]).convert("RGB"), dtype=np.float64)
        kept, repainted = np.abs(after - before)[:, :16], np.abs(after - before)[:, 16:]
        assert kept.mean() <= 1.0  # the unmasked half is the init image's
        assert repainted.mean() >= 10.0  # the masked half was painted anew


def test_mask_image_needs_an_init_image(cli, tmp_path):
    _, mask = _init_and_mask(tmp_path)
    result = cli("generate", "x", "--mask-image", mask, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "--mask-image needs --init-image" in result.stderr
    result = cli(
        "generate", "x", "--init-image", mask, "--mask-image", tmp_path / "none.png", "-o", tmp_path / "o"
    )
    assert result.exit_code == 1 and "none.png" in result.stderr and "--mask-image" in result.stderr


@pytest.fixture(scope="module")
def inpaint_model(tmp_path_factory) -> Path:
    """A tiny SD1 inpainting checkpoint (9-channel UNet) saved as a diffusers folder."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, UNet2DConditionModel

    from lorax.zoo.tiny import tiny_components, tiny_unet_config

    components = tiny_components("sd1", seed=0)
    torch.manual_seed(1)
    components["unet"] = UNet2DConditionModel(**{**tiny_unet_config("sd1"), "in_channels": 9})
    pipe = StableDiffusionInpaintPipeline(**components, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)  # fmt: skip
    folder = tmp_path_factory.mktemp("inpaint") / "tiny-inpaint"
    pipe.save_pretrained(folder)
    return folder


def test_a_nine_channel_inpainting_pipeline_runs_end_to_end_with_a_lora(cli, tmp_path, inpaint_model):
    from test_generate import make_lora

    from lorax.formats import save_lora
    from lorax.gen.inpaint import is_inpainting_model
    from lorax.services.generate import load_model

    pipe = load_model(str(inpaint_model))
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline" and is_inpainting_model(pipe)
    lora = tmp_path / "style.safetensors"
    save_lora(make_lora(pipe, 3, magnitude=0.5), lora)
    side = 8 * int(pipe.unet.config.sample_size)
    init, mask = _init_and_mask(tmp_path, side)
    outs = []
    for extra in ([], ["--lora", str(lora)]):
        out = tmp_path / f"out{len(outs)}"
        result = cli(
            "generate", "a cat", "--model", inpaint_model, "--init-image", init, "--mask-image", mask,
            "--strength", "1", "--steps", "3", "--seed", "2", "-o", out, *extra,
        )  # fmt: skip
        assert result.exit_code == 0, result.stderr
        (path,) = out.glob("*.png")
        image = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
        assert image.shape == (side, side, 3)
        before = np.asarray(Image.open(init), dtype=np.float64)
        assert np.abs(image - before)[:, : side // 2].mean() <= 1.0
        outs.append(image)
    assert np.abs(outs[0] - outs[1])[:, side // 2 :].mean() > 0.5  # the LoRA reaches the inpainting UNet
    result = cli("generate", "a cat", "--model", inpaint_model, "--steps", "2", "-o", tmp_path / "txt2img")
    assert result.exit_code == 1 and "inpainting model" in result.stderr and "--mask-image" in result.stderr


def test_sdxl_inpainting_runs_through_the_sdxl_inpaint_pipeline(cli, tmp_path):
    from checkpoint_helpers import tiny_folder

    from lorax.gen.inpaint import inpaint_pipeline
    from lorax.services.generate import load_model

    model = tiny_folder("sdxl")
    assert type(inpaint_pipeline(load_model(str(model)))).__name__ == "StableDiffusionXLInpaintPipeline"
    init, mask = _init_and_mask(tmp_path)
    out = tmp_path / "out"
    result = cli(
        "generate", "a red circle", "-m", model, "--init-image", init, "--mask-image", mask, "--strength", "1",
        "--steps", "2", "--seed", "3", "-o", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    path = json.loads(result.stdout.splitlines()[0])["path"]
    after = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)
    before = np.asarray(Image.open(init), dtype=np.float64)
    assert after.shape == (32, 32, 3)
    assert np.abs(after - before)[:, :16].mean() <= 1.0 and np.abs(after - before)[:, 16:].mean() >= 10.0
