"""lorax train on the tiny SDXL model: both text encoders condition (and train with --train-text), the pooled
embeddings and size/crop ids reach the UNet; checked against StableDiffusionXLPipeline's own encode_prompt and
add_time_ids, and the trained file names SDXL modules the kohya way."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_helpers import scratch, tiny_folder, tiny_pipe
from PIL import Image
from safetensors import safe_open

from lorax.formats import load_lora
from lorax.progress import NullProgress
from lorax.training.config import TrainConfig
from lorax.training.sdxl import SdxlPromptEncoder, time_ids_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images() -> Path:
    folder = scratch("sdxl-images")
    rng = np.random.default_rng(0)
    for i in range(2):
        arr = np.full((40, 48, 3), 255, dtype=np.uint8)  # 48 wide, 40 high
        arr[8:32, 10 + i : 34 + i] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(folder / f"star-{i}.png")
    return folder


def test_prompt_conditioning_equals_the_pipelines_encode_prompt() -> None:
    pipe = tiny_pipe("sdxl")
    prompts = ["a red circle", "a blue star on white"]
    encoder = SdxlPromptEncoder([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2],
                                "cpu", cache=True)  # fmt: skip
    with torch.no_grad():
        cond = encoder(prompts)
        want, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(cond.hidden, want)
    torch.testing.assert_close(cond.pooled, pooled)
    assert cond.hidden.shape[-1] == pipe.unet.config.cross_attention_dim
    again = encoder(prompts[::-1])  # cached rows come back in the asked order
    torch.testing.assert_close(again.hidden, want.flip(0))


def test_size_and_crop_ids_match_the_pipelines_add_time_ids() -> None:
    pipe = tiny_pipe("sdxl")
    # a 48x40 image trained at 32x32: resized by 0.8 to 38x32, centre crop at left 3, top 0
    ids = time_ids_of((48, 40), (32, 32), random_crop=False, rng=random.Random(0))
    assert ids == [40, 48, 0, 3, 32, 32]
    want = pipe._get_add_time_ids(
        (40, 48), (0, 3), (32, 32), dtype=torch.float32,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )  # fmt: skip
    assert torch.equal(torch.tensor([ids], dtype=torch.float32), want)
    # a random crop: the ids name the crop load_training_image really takes (same generator state)
    rng = random.Random(5)
    ids = time_ids_of((200, 40), (32, 32), random_crop=True, rng=rng)
    left = random.Random(5).randint(0, 160 - 32)
    assert ids == [40, 200, 0, left, 32, 32]
    assert rng.random() == random.Random(5).random()  # the example's generator is left untouched


def test_train_sdxl_with_both_text_encoders(images: Path, cli) -> None:  # type: ignore[no-untyped-def]
    from lorax.services.train import train

    out = scratch("sdxl-train") / "xl.safetensors"
    cfg = TrainConfig(data_dir=images, output=out, model=str(tiny_folder("sdxl")), instance_prompt="a sks star",
                      resolution=32, steps=3, learning_rate=1e-3, device="cpu", save_dtype="fp32",
                      train_text=True, validation_prompt=["a sks star"], validation_every=3, sample_steps=1)  # fmt: skip
    result = train(cfg, NullProgress())
    assert result.steps == 3 and result.final_loss is not None and np.isfinite(result.final_loss)
    assert set(result.modules) == {"unet", "text_encoder", "text_encoder_2"}
    assert result.modules["text_encoder_2"] == result.modules["text_encoder"] == 2 * 4  # 2 layers x q/k/v/out
    assert result.samples and all(Path(p).is_file() for p in result.samples)
    with safe_open(out, "pt") as f:
        keys = set(f.keys())
        metadata = f.metadata()
    assert metadata["ss_base_model_version"].startswith("sdxl")
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k") for k in keys)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_1_self_attn_q_proj") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_1_self_attn_q_proj") for k in keys)
    state = load_lora(out)
    assert state.family == "sdxl"
    ups = {c: max(float(m.up.abs().max()) for n, m in state.modules.items() if n.startswith(c + "."))
           for c in ("unet", "text_encoder", "text_encoder_2")}  # fmt: skip
    assert all(v > 0 for v in ups.values()), ups  # every component's LoRA moved off its zero init
    # the trained file applies at generation time on the same model
    gen = cli("generate", "a sks star", "-m", tiny_folder("sdxl"), "-o", out.parent / "img", "--steps", "1",
              "--size", "32x32", "--seed", "1", "--device", "cpu", "--lora", out)  # fmt: skip
    assert gen.exit_code == 0, gen.stderr
