"""``lorax generate`` on Flux.1 (issue 16): FluxPipeline / FluxImg2ImgPipeline, dev and schnell defaults, LoRAs.

The oracle is diffusers itself on the same tiny folder: ``FluxPipeline.from_pretrained`` + ``load_lora_weights`` of
the same kohya file (diffusers converts it itself) + ``set_adapters`` at the same scale, the same seed, steps,
guidance and T5 length; lorax's PNG must match its image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from test_flux_lora import TINY, bfl_shapes, kohya_file, tiny_pipeline

from lorax.gen.params import read_png_parameters

PROMPT = "a circle"
SIZE = 32

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build_flux(folder: Path, *, dev: bool) -> Path:
    """A whole tiny FluxPipeline (CLIP-L and T5 with real tokenizers, a 1-channel VAE) saved as a diffusers folder."""
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from lorax.zoo.tiny import build_tokenizer

    base = tiny_pipeline()  # test_flux_lora's CLIP-L (vocabulary 1000: the tokenizer's ids fit) and scheduler
    tok, tok2 = build_tokenizer(["circle"]), build_tokenizer(["circle"], model_max_length=512)
    t5 = T5EncoderModel(
        T5Config(vocab_size=len(tok2), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4)
    )
    vae = AutoencoderKL(
        block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=TINY["in_channels"] // 4, layers_per_block=1,
        norm_num_groups=8, sample_size=SIZE, shift_factor=0.0, scaling_factor=1.0, use_quant_conv=False,
        use_post_quant_conv=False,
    )  # fmt: skip
    transformer = FluxTransformer2DModel(**{**TINY, "guidance_embeds": dev})
    parts = {
        "vae": vae,
        "tokenizer": tok,
        "text_encoder_2": t5,
        "tokenizer_2": tok2,
        "transformer": transformer,
    }
    FluxPipeline(**{**base.components, **parts}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_flux(tmp_path_factory.mktemp("flux") / "tiny-flux-dev", dev=True)


@pytest.fixture(scope="module")
def schnell_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_flux(tmp_path_factory.mktemp("flux") / "tiny-flux-schnell", dev=False)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kohya Flux LoRA on the double and single blocks: without linear1, whose split diffusers' converter
    hard-codes at full size, and without CLIP-L, whose kohya keys diffusers 0.42's Flux loader cannot read."""
    path = tmp_path_factory.mktemp("lora") / "L.safetensors"
    tensors = kohya_file(bfl_shapes(with_linear1=False, with_top=False), seed=3, te=False)
    save_file({k: v * 20 if "lora_up" in k else v for k, v in tensors.items()}, path)  # a visible change
    return path


def diffusers_image(
    folder: Path,
    *,
    steps: int,
    guidance: float,
    length: int,
    lora: Path | None = None,
    scale: float = 1.0,
    seed: int = 1,
    init: Image.Image | None = None,
    strength: float = 0.6,
) -> np.ndarray:
    from diffusers import FluxImg2ImgPipeline, FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder)
    if init is not None:
        pipe = FluxImg2ImgPipeline.from_pipe(pipe)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(str(lora), adapter_name="x")
        pipe.set_adapters(["x"], [scale])
    extra = {"image": init, "strength": strength} if init is not None else {}
    with torch.inference_mode():
        image = pipe(
            PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE,
            max_sequence_length=length, generator=torch.Generator("cpu").manual_seed(seed), **extra,
        ).images[0]  # fmt: skip
    return np.asarray(image, dtype=np.int16)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def only_png(folder: Path) -> Path:
    (found,) = sorted(folder.glob("*.png"))
    return found


def test_dev_with_a_lora_is_diffusers_own_image(cli, dev_dir: Path, lora_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli("generate", PROMPT, "--model", str(dev_dir), "--lora", f"{lora_file}:0.8", "--seed", "1",
                 "--size", f"{SIZE}x{SIZE}", "-o", str(out), "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    png = only_png(out)
    # dev's defaults: 28 steps, distilled guidance 3.5, T5 reads 512 tokens
    ours = pixels(png)
    oracle = diffusers_image(dev_dir, steps=28, guidance=3.5, length=512, lora=lora_file, scale=0.8)
    plain = diffusers_image(dev_dir, steps=28, guidance=3.5, length=512)
    assert np.abs(ours - oracle).max() <= 1
    assert np.abs(ours - plain).max() > 10  # the LoRA changes the picture: the match above means something
    params = read_png_parameters(png)
    assert params.prompt == f"{PROMPT} <lora:L:0.8>"
    assert params.fields["Steps"] == "28"
    assert params.fields["CFG scale"] == "1" and params.fields["Distilled CFG Scale"] == "3.5"
    assert params.fields["Lora scales"] == "L: 0.8/0.8" and "L: " in params.fields["Lora hashes"]


def test_schnell_defaults_and_ignored_guidance(cli, schnell_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli("generate", PROMPT, "--model", str(schnell_dir), "--seed", "1", "--guidance", "7",
                 "--size", f"{SIZE}x{SIZE}", "-o", str(out), "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "no guidance embedding (schnell): --guidance is ignored" in result.output
    png = only_png(out)
    params = read_png_parameters(png)
    assert params.fields["Steps"] == "4" and params.fields["CFG scale"] == "1"
    assert "Distilled CFG Scale" not in params.fields
    # schnell: 4 steps, T5 reads 256 tokens; any guidance gives the same image (the model has no embedding)
    oracle = diffusers_image(schnell_dir, steps=4, guidance=0.0, length=256)
    assert np.abs(pixels(png) - oracle).max() <= 1


def test_sweep_and_img2img(cli, dev_dir: Path, lora_file: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = cli("generate", PROMPT, "--model", str(dev_dir), "--lora", str(lora_file), "--seed", "2",
                 "--steps", "3", "--size", f"{SIZE}x{SIZE}", "--sweep-scale", "0,1", "-o", str(sweep),
                 "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    zero = pixels(sweep / "a-circle-2-s0.png")
    one = pixels(sweep / "a-circle-2-s1.png")
    assert np.abs(zero - diffusers_image(dev_dir, steps=3, guidance=3.5, length=512, seed=2)).max() <= 1
    assert (
        np.abs(
            one - diffusers_image(dev_dir, steps=3, guidance=3.5, length=512, seed=2, lora=lora_file)
        ).max()
        <= 1
    )
    assert (sweep / "a-circle-2-sweep.png").exists()

    init = sweep / "a-circle-2-s1.png"
    out = tmp_path / "img2img"
    result = cli("generate", PROMPT, "--model", str(dev_dir), "--init-image", str(init), "--strength", "0.6",
                 "--steps", "5", "--seed", "3", "--max-sequence-length", "64", "-o", str(out), "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    png = only_png(out)
    assert read_png_parameters(png).fields["Denoising strength"] == "0.6"
    oracle = diffusers_image(
        dev_dir, steps=5, guidance=3.5, length=64, seed=3, init=Image.open(init).convert("RGB"), strength=0.6
    )
    assert np.abs(pixels(png) - oracle).max() <= 1


def test_flags_flux_has_no_meaning_for_are_refused(cli, dev_dir: Path, tmp_path: Path) -> None:
    result = cli("generate", PROMPT, "--model", str(dev_dir), "--negative", "blurry", "--scheduler", "ddim",
                 "-o", str(tmp_path), "--device", "cpu")  # fmt: skip
    assert result.exit_code != 0
    assert "--negative: Flux is guidance-distilled" in result.output and "--scheduler" in result.output
    assert not list(tmp_path.glob("*.png"))


def test_the_transformer_takes_the_unet_scale_not_the_text_scale(
    cli, dev_dir: Path, lora_file: Path, tmp_path: Path
) -> None:
    """``FILE:0.8:0.3``: Flux's transformer is the UNet-kind component, so it runs at 0.8 (the text scale is CLIP's)."""
    out = tmp_path / "out"
    result = cli("generate", PROMPT, "--model", str(dev_dir), "--lora", f"{lora_file}:0.8:0.3", "--seed", "4",
                 "--steps", "3", "--size", f"{SIZE}x{SIZE}", "-o", str(out), "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    ours = pixels(only_png(out))
    at = {
        s: diffusers_image(dev_dir, steps=3, guidance=3.5, length=512, seed=4, lora=lora_file, scale=s)
        for s in (0.8, 0.3)
    }
    assert np.abs(ours - at[0.8]).max() <= 1
    assert np.abs(ours - at[0.3]).max() > 10


def test_a_bfl_transformer_file_generates_with_the_rest_from_config_from(
    cli, dev_dir: Path, lora_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file ComfyUI users keep (flux1-dev.safetensors: the transformer alone, BFL names) generates with the VAE,
    text encoders and tokenizers of --config-from, and draws diffusers' own image of the folder it came from; `lorax
    inspect` names it a Flux single-file model; without --config-from (and no reference model here) the error says
    what to pass."""
    bfl = tmp_path / "flux1-dev.safetensors"
    assert cli("convert", str(dev_dir), "-o", str(bfl)).exit_code == 0
    found = cli("inspect", str(bfl), "--json")
    assert found.exit_code == 0, found.output
    import json

    report = json.loads(found.stdout)
    report = report[0] if isinstance(report, list) else report
    assert (report["kind"], report["format"], report["family"]) == ("model", "single-file", "flux")
    assert report["components"] == ["transformer"]

    out = tmp_path / "out"
    result = cli("generate", PROMPT, "--model", str(bfl), "--config-from", str(dev_dir), "--lora",
                 f"{lora_file}:0.8", "--seed", "1", "--size", f"{SIZE}x{SIZE}", "-o", str(out), "--steps", "4")  # fmt: skip
    assert result.exit_code == 0, result.output
    oracle = diffusers_image(dev_dir, steps=4, guidance=3.5, length=512, lora=lora_file, scale=0.8)
    assert np.abs(pixels(only_png(out)) - oracle).max() <= 1

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    refused = cli("generate", PROMPT, "--model", str(bfl), "-o", str(tmp_path / "none"), "--steps", "1")
    assert refused.exit_code != 0
    assert "flux1-dev.safetensors" in refused.stderr and "--config-from" in refused.stderr
    assert "\n" not in refused.stderr.strip() and "Traceback" not in refused.stderr
    assert not (tmp_path / "none").exists()
