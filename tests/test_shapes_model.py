"""The packaged ``shapes`` model: SD component types, size, untrained held-out words, and its quality bar."""

from __future__ import annotations

import json

import pytest
import torch

from lorax.models.registry import BUILTIN_MODELS, resolve_builtin
from lorax.zoo.shapes import MODEL_DIR, world
from lorax.zoo.shapes.pipeline import (
    GUIDANCE_SCALE,
    SAMPLE_STEPS,
    build_components,
    heldout_prompts,
    load_shapes_pipeline,
    sample,
    seen_prompts,
)
from lorax.zoo.shapes.scorers import score_images


@pytest.fixture(scope="session")
def shapes_pipe():
    torch.manual_seed(0)
    return load_shapes_pipeline()


def test_registry_resolves_the_packaged_folder(tmp_path, monkeypatch):
    assert resolve_builtin("shapes") == MODEL_DIR == BUILTIN_MODELS["shapes"]
    assert resolve_builtin("not-a-builtin") is None
    from lorax.errors import ModelNotFoundError
    from lorax.models import registry

    monkeypatch.setitem(registry.BUILTIN_MODELS, "shapes", tmp_path / "gone")
    with pytest.raises(ModelNotFoundError, match="missing from this install"):
        resolve_builtin("shapes")


def test_folder_is_a_small_sd_pipeline_of_float32_safetensors():
    index = json.loads((MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"][1] in ("CLIPTokenizer", "CLIPTokenizerFast")
    assert index.get("safety_checker") in (None, [None, None])
    files = [p for p in MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pkl")]
    from lorax.io.safetensors_io import read_header

    for weights in MODEL_DIR.rglob("*.safetensors"):
        assert {info.dtype for info in read_header(weights).tensors.values()} == {"F32"}, weights


def test_loaded_components_have_the_sd_types_and_sd1_layout(shapes_pipe):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    assert isinstance(shapes_pipe.unet, UNet2DConditionModel)
    assert isinstance(shapes_pipe.vae, AutoencoderKL)
    assert isinstance(shapes_pipe.text_encoder, CLIPTextModel)
    assert type(shapes_pipe.tokenizer).__name__.startswith("CLIPTokenizer")
    cfg = shapes_pipe.unet.config
    assert cfg.cross_attention_dim == shapes_pipe.text_encoder.config.hidden_size
    assert cfg.layers_per_block == 2 and cfg.down_block_types[-1] == "DownBlock2D"
    assert all(t == "CrossAttnDownBlock2D" for t in cfg.down_block_types[:-1])
    assert shapes_pipe.text_encoder.config.hidden_act == "quick_gelu"  # SD1's CLIP ViT-L activation
    assert shapes_pipe.unet.config.sample_size * shapes_pipe.vae_scale_factor == world.RESOLUTION


def test_held_out_words_are_untrained_single_tokens(shapes_pipe):
    """Rows of words no caption used are still exactly their initialisation; caption words moved."""
    tokenizer = shapes_pipe.tokenizer
    trained = shapes_pipe.text_encoder.get_input_embeddings().weight.detach()
    fresh = build_components(seed=0)["text_encoder"].get_input_embeddings().weight.detach()
    assert trained.shape == fresh.shape

    def row(word: str) -> int:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (word, ids)
        return ids[0]

    for word in [*world.HELDOUT_SHAPES, *world.HELDOUT_COLOURS, world.RARE_TOKEN]:
        assert torch.equal(trained[row(word)], fresh[row(word)]), word
    for word in [*world.BASE_SHAPES, *world.BASE_COLOURS, *world.BACKGROUNDS]:
        assert not torch.allclose(trained[row(word)], fresh[row(word)]), word


@pytest.fixture(scope="session")
def base_scores(shapes_pipe):
    seen = seen_prompts()
    held = heldout_prompts()
    prompts = seen + held["shape"] + held["colour"]
    images = sample(shapes_pipe, prompts, seed=0, steps=SAMPLE_STEPS, guidance_scale=GUIDANCE_SCALE)
    a, b = len(seen), len(seen) + len(held["shape"])
    return {
        "seen": score_images(images[:a], seen),
        "heldout_shape": score_images(images[a:b], held["shape"]),
        "heldout_colour": score_images(images[b:], held["colour"]),
    }


# The project's bar for the base model (issue 3): seen prompts colour >= 0.85 and shape >= 0.70.
SEEN_COLOUR_FLOOR = 0.85
SEEN_SHAPE_FLOOR = 0.70


def test_base_model_draws_the_seen_world(base_scores):
    seen = base_scores["seen"]
    print("seen scores:", {k: seen[k] for k in ("colour", "shape", "background", "n")})
    assert SAMPLE_STEPS <= 25 and GUIDANCE_SCALE > 1.0
    assert seen["n"] >= 48 and seen["n_colour"] == seen["n"] and seen["n_shape"] == seen["n"]
    assert seen["colour"] >= SEEN_COLOUR_FLOOR, seen["colour"]
    assert seen["shape"] >= SEEN_SHAPE_FLOOR, seen["shape"]
    # far above chance (1/5 colours, 1/4 shapes): the text conditioning works
    assert seen["colour"] > 2 * (1 / 5) and seen["shape"] > 2 * (1 / 4)


def test_base_model_cannot_draw_held_out_concepts(base_scores):
    print("held-out:", base_scores["heldout_shape"]["shape"], base_scores["heldout_colour"]["colour"])
    assert base_scores["heldout_shape"]["n_shape"] >= 24
    assert base_scores["heldout_colour"]["n_colour"] >= 24
    assert base_scores["heldout_shape"]["shape"] <= 0.20
    assert base_scores["heldout_colour"]["colour"] <= 0.20


def test_converts_to_a_single_file_and_back_exactly(cli, tmp_path, shapes_pipe):
    single = tmp_path / "shapes.safetensors"
    result = cli("convert", str(MODEL_DIR), "-o", str(single))
    assert result.exit_code == 0, result.stderr
    from lorax.io.safetensors_io import read_header

    names = read_header(single).tensors
    assert any(k.startswith("model.diffusion_model.") for k in names)
    assert any(k.startswith("first_stage_model.") for k in names)
    assert any(k.startswith("cond_stage_model.transformer.") for k in names)
    back = tmp_path / "again"
    result = cli("convert", str(single), "-o", str(back))
    assert result.exit_code == 0, result.stderr
    again = load_shapes_pipeline(back)
    for name in ("unet", "vae", "text_encoder"):
        want = getattr(shapes_pipe, name).state_dict()
        got = getattr(again, name).state_dict()
        assert want.keys() == got.keys(), name
        for key, tensor in want.items():
            assert torch.equal(tensor, got[key]), (name, key)
    words = " ".join(world.vocabulary())
    assert again.tokenizer(words).input_ids == shapes_pipe.tokenizer(words).input_ids
