"""lorax generate on SDXL: the tiny SDXL model from a folder and from a single file loads as a
StableDiffusionXLPipeline; a kohya SDXL LoRA applied at generation time gives the images of the merged model (whose
weights test_sdxl checks against diffusers' own loader)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from checkpoint_helpers import save, scratch, tiny_folder, tiny_single
from PIL import Image
from test_sdxl import sdxl_lora

from lorax.services.merge import MergeConfig, merge


def _png(path: str | Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _generate(cli, model: Path, out: Path, *extra: str) -> dict:  # type: ignore[no-untyped-def]
    args = [
        "generate",
        "a red circle",
        "-m",
        model,
        "-o",
        out,
        "--steps",
        "2",
        "--size",
        "32x32",
        "--seed",
        "3",
    ]
    result = cli(*args, "--device", "cpu", "--json", *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout.splitlines()[0])


def _service(model: Path, out: Path) -> Path:
    from lorax.models.pipeline import load_pipeline
    from lorax.services.generate import GenerateConfig, generate

    config = GenerateConfig(
        ["a red circle"], str(model), steps=2, size=(32, 32), seed=3, out_dir=out, device="cpu"
    )
    (image,) = generate(config, pipe=load_pipeline(model)).images
    return image.path


def test_load_pipeline_picks_the_xl_pipeline() -> None:
    from diffusers import StableDiffusionXLPipeline

    from lorax.models.pipeline import load_pipeline

    for spec in (tiny_folder("sdxl"), tiny_single("sdxl")):
        pipe = load_pipeline(spec)
        assert isinstance(pipe, StableDiffusionXLPipeline), spec
        assert pipe.text_encoder_2 is not None and pipe.tokenizer_2 is not None
        assert pipe.unet.config.addition_embed_type == "text_time"


def test_generate_with_an_sdxl_lora_equals_the_merged_model(cli) -> None:  # type: ignore[no-untyped-def]
    d = scratch("sdxl-generate")
    lora = save(sdxl_lora(seed=21, conv=True), d / "l.safetensors")
    merged = d / "merged"
    merge(MergeConfig(str(tiny_folder("sdxl")), [str(lora)], merged, alpha=0.7, alpha_text=0.7))
    live = _generate(cli, tiny_folder("sdxl"), d / "live", "--lora", f"{lora}:0.7")
    assert live["width"] == live["height"] == 32
    b, lv, w = (
        _png(p)
        for p in (_service(tiny_folder("sdxl"), d / "base"), live["path"], _service(merged, d / "want"))
    )
    assert b.shape == (32, 32, 3)
    assert np.abs(lv - b).max() > 10  # the LoRA changes the image
    assert np.abs(lv - w).max() <= 1  # 8-bit rounding of fp-equal images


def test_sdxl_embedding_matches_diffusers_textual_inversion() -> None:
    """An SDXL embedding (clip_l + clip_g) through lorax generate gives the image diffusers' own
    load_textual_inversion (once per text encoder, as its docs show for SDXL) gives."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from lorax.formats import save_embeddings
    from lorax.models.pipeline import load_pipeline
    from lorax.services.generate import GenerateConfig, generate

    d = scratch("sdxl-embedding")
    gen = torch.Generator().manual_seed(4)
    vectors = {
        "text_encoder": torch.randn(1, 32, generator=gen),
        "text_encoder_2": torch.randn(1, 64, generator=gen),
    }
    path = save_embeddings({"xlstyle": vectors}, d / "xlstyle.safetensors", format="sdxl-embedding")
    prompt = "a xlstyle circle"  # an SDXL embedding file names its token by its file name, as in A1111
    config = GenerateConfig([prompt], str(tiny_folder("sdxl")), embeddings=[path], steps=2, size=(32, 32), seed=3,
                            out_dir=d / "lorax", device="cpu")  # fmt: skip
    (image,) = generate(config, pipe=load_pipeline(tiny_folder("sdxl"))).images
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_folder("sdxl"))
    pipe.load_textual_inversion(vectors["text_encoder"], token="xlstyle", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)  # fmt: skip
    pipe.load_textual_inversion(vectors["text_encoder_2"], token="xlstyle", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)  # fmt: skip
    # the same generate call on diffusers' TI-loaded pipeline (only the embedding loading differs)
    config_want = GenerateConfig([prompt], "diffusers-ti", steps=2, size=(32, 32), seed=3, out_dir=d / "want",
                                 device="cpu")  # fmt: skip
    (want,) = generate(config_want, pipe=pipe).images
    config_plain = GenerateConfig([prompt], "plain", steps=2, size=(32, 32), seed=3, out_dir=d / "plain",
                                  device="cpu")  # fmt: skip
    (plain,) = generate(config_plain, pipe=load_pipeline(tiny_folder("sdxl"))).images
    assert np.abs(_png(image.path) - _png(want.path)).max() <= 1
    assert np.abs(_png(image.path) - _png(plain.path)).max() > 10  # without the embedding the word is letters
