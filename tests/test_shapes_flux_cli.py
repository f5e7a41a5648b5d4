"""``--model shapes-flux`` through every command (issue 17, item 5): train (DreamBooth, prior preservation),
generate, merge, extract, convert, inspect. Oracles: diffusers' ``FluxPipeline`` (``load_lora_weights``,
``fuse_lora``) on the same packaged folder, and round trips that must be exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lorax.zoo.shapes import write_concept_dir
from lorax.zoo.shapes_flux import MODEL_DIR
from lorax.zoo.shapes_flux.pipeline import SAMPLE_STEPS, T5_LENGTH

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a sks circle"
SEED = 1


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short DreamBooth run with prior preservation on the built-in name, in diffusers' layout."""
    from typer.testing import CliRunner

    from lorax.cli.app import app

    root = tmp_path_factory.mktemp("db")
    data = root / "purple-circles"
    write_concept_dir(data, "circle", "purple", 4, caption=PROMPT)
    out = root / "sks.safetensors"
    result = CliRunner().invoke(app, [
        "train", str(data), "--model", "shapes-flux", "-o", str(out), "--steps", "6", "--learning-rate", "1e-2",
        "--rank", "4", "--targets", "all", "--class-prompt", "a circle", "--num-class-images", "2",
        "--class-dir", str(root / "class"), "--prior-weight", "1.0", "--format", "diffusers", "--device", "cpu",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list((root / "class").glob("*.png"))) == 2
    return out


def diffusers_image(lora: Path | None = None) -> np.ndarray:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(MODEL_DIR)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    with torch.inference_mode():
        image = pipe(
            PROMPT, num_inference_steps=SAMPLE_STEPS, height=32, width=32, max_sequence_length=T5_LENGTH,
            generator=torch.Generator("cpu").manual_seed(SEED),
        ).images[0]  # fmt: skip
    return np.asarray(image, dtype=np.int16)


def generated(cli, out: Path, *extra: str) -> np.ndarray:
    result = cli("generate", PROMPT, "--model", "shapes-flux", "--seed", str(SEED), "-o", str(out), "--device",
                 "cpu", *extra)  # fmt: skip
    assert result.exit_code == 0, result.output
    (png,) = sorted(out.glob("*.png"))
    return np.asarray(Image.open(png).convert("RGB"), dtype=np.int16)


def test_generate_and_the_lora_are_diffusers_own_images(cli, lora: Path, tmp_path: Path) -> None:
    """lorax generate (the model's lorax.json: 20 steps, 32 px, T5 16 tokens) = FluxPipeline at the same seed,
    without and with the DreamBooth LoRA (FluxPipeline.load_lora_weights), within 1/255."""
    plain = generated(cli, tmp_path / "plain")
    assert plain.shape == (32, 32, 3)
    assert np.abs(plain - diffusers_image()).max() <= 1
    ours = generated(cli, tmp_path / "lora", "--lora", str(lora))
    assert np.abs(ours - diffusers_image(lora)).max() <= 1
    assert np.abs(ours - plain).max() > 10  # the LoRA changes the image: the match above means something


def transformer_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


def test_merge_is_diffusers_fuse_and_extract_gives_it_back(cli, lora: Path, tmp_path: Path) -> None:
    from diffusers import FluxPipeline

    merged = tmp_path / "merged"
    result = cli("merge", "shapes-flux", str(lora), "-o", str(merged))
    assert result.exit_code == 0, result.output
    pipe = FluxPipeline.from_pretrained(MODEL_DIR)
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused = {k: v.detach() for k, v in pipe.transformer.state_dict().items()}
    ours = transformer_weights(merged)
    assert set(ours) == set(fused)
    base = transformer_weights(MODEL_DIR)
    changed = [k for k in ours if not torch.equal(ours[k], base[k])]
    assert len(changed) >= 20
    for k in ours:
        assert torch.allclose(ours[k], fused[k], atol=1e-5), k

    extracted = tmp_path / "extracted.safetensors"
    result = cli(
        "extract", "shapes-flux", str(merged), "-o", str(extracted), "--rank", "16", "--targets", "all"
    )
    assert result.exit_code == 0, result.output
    again = tmp_path / "again"
    assert cli("merge", "shapes-flux", str(extracted), "-o", str(again)).exit_code == 0
    back = transformer_weights(again)
    worst = max(float((back[k] - ours[k]).abs().max()) for k in changed)
    assert worst <= 1e-4, worst


def test_convert_to_a_bfl_file_and_back_exactly_and_inspect(cli, lora: Path, tmp_path: Path) -> None:
    bfl = tmp_path / "shapes-flux.safetensors"
    result = cli("convert", "shapes-flux", "-o", str(bfl))
    assert result.exit_code == 0, result.output
    assert "double_blocks.0.img_attn.qkv.weight" in load_file(bfl)
    back = tmp_path / "back"
    result = cli("convert", str(bfl), "-o", str(back))
    assert result.exit_code == 0, result.output
    a, b = transformer_weights(MODEL_DIR), transformer_weights(back)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    kohya = tmp_path / "sks.kohya.safetensors"
    result = cli("convert", str(lora), "--to", "kohya", "--model", "shapes-flux", "-o", str(kohya))
    assert result.exit_code == 0, result.output
    assert any(k.startswith("lora_unet_double_blocks_0_") for k in load_file(kohya))
    for path in (lora, kohya):
        result = cli("inspect", str(path), "--json")
        assert result.exit_code == 0, result.output
        assert '"flux"' in result.stdout


def test_class_and_validation_images_use_the_run_s_t5_length(tmp_path: Path) -> None:
    """FluxPipeline's own default (512 tokens here, no guidance embedding: 256) would pad T5 unlike training."""
    from lorax.training.config import TrainConfig
    from lorax.training.recipe import pipeline_call
    from lorax.zoo.shapes.pipeline import load_shapes_pipeline
    from lorax.zoo.shapes_flux.pipeline import load_shapes_flux_pipeline

    flux = TrainConfig.from_sources({"data_dir": tmp_path, "model": "shapes-flux"}, validate=False)
    assert flux.max_sequence_length == T5_LENGTH  # from the model's lorax.json
    assert pipeline_call(flux, load_shapes_flux_pipeline()) == {"max_sequence_length": T5_LENGTH}
    assert pipeline_call(flux.replace(max_sequence_length=None), load_shapes_flux_pipeline()) == {
        "max_sequence_length": 256
    }
    sd = TrainConfig.from_sources({"data_dir": tmp_path, "model": "shapes"}, validate=False)
    assert pipeline_call(sd, load_shapes_pipeline()) == {}
