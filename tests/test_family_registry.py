"""A model family is one registered ``Family`` object: a toy fourth family, built here in the test suite alone, works
with inspect, convert and merge with no change to lorax's code.

The toy is an SD1 variant of its own widths (cross-attention and text encoder 48 wide, which no built-in family
has) and its own kohya base-model version; its full-size configs are tiny dicts, so its module tables are computed
from them. Oracles: hand computation of ``W0 + alpha · (lora_alpha / r) · up @ down``, and diffusers' own
``load_lora_weights`` + ``fuse_lora`` on the file ``lorax convert`` wrote.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

TOY = "toy1"
WIDTH = 48


def _toy_configs() -> tuple[dict, dict]:
    from lorax.zoo.tiny import tiny_text_config, tiny_unet_config

    unet = {"_class_name": "UNet2DConditionModel", **tiny_unet_config("sd1", cross_attention_dim=WIDTH)}
    text = {
        "_class_name": "CLIPTextModel",
        "architectures": ["CLIPTextModel"],
        **tiny_text_config("sd1", hidden_size=WIDTH),
    }
    return unet, text


@pytest.fixture(scope="module")
def toy_family():
    from lorax.io.checkpoint_layouts import SD1
    from lorax.models import families

    unet, text = _toy_configs()
    family = families.Family(
        name=TOY,
        components=(
            families.Component("unet", "unet", "UNet2DConditionModel", unet, "lora_unet_"),
            families.Component(
                "text_encoder", "text", "CLIPTextModel", text, "lora_te_", width=WIDTH, tokenizer="tokenizer"
            ),
        ),
        checkpoint=dataclasses.replace(SD1, family=TOY, cross_attention_dim=WIDTH, reference_repo=None),
        kohya_versions=("toy_v1",),
        kohya_version="toy_v1",
        pipelines=dict(families.get("sd1").pipelines),
    )
    families.register(family)
    yield family
    families.unregister(TOY)
    assert TOY not in families.names()


@pytest.fixture(scope="module")
def toy_model(toy_family, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A toy diffusers folder (random tiny weights)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorax.zoo.tiny import build_tokenizer, tiny_vae_config

    unet_config, text_config = _toy_configs()
    torch.manual_seed(0)
    tokenizer = build_tokenizer(())
    text_config = {k: v for k, v in text_config.items() if not k.startswith("_") and k != "architectures"}
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(**{k: v for k, v in unet_config.items() if k != "_class_name"}),
        vae=AutoencoderKL(**tiny_vae_config()),
        text_encoder=CLIPTextModel(CLIPTextConfig(**{**text_config, "vocab_size": len(tokenizer)})),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    folder = tmp_path_factory.mktemp("toy") / "model"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def toy_lora(toy_model: Path) -> Path:
    """A kohya LoRA on the toy's attention layers (UNet and text encoder), alpha ≠ rank, no family in its header."""
    from diffusers import StableDiffusionPipeline

    from lorax.formats import save_lora
    from lorax.zoo.random_lora import random_lora

    pipe = StableDiffusionPipeline.from_pretrained(toy_model, safety_checker=None)
    state = random_lora(pipe, rank=4, alpha=2.0, seed=3)
    out = toy_model.parent / "toy_lora.safetensors"
    save_lora(state, out, format="kohya")
    return out


def test_the_toy_is_detected_from_every_kind_of_evidence(toy_family, toy_model: Path, toy_lora: Path) -> None:
    from lorax.io.checkpoint import open_checkpoint
    from lorax.io.safetensors_io import read_header
    from lorax.models import families

    assert open_checkpoint(toy_model).family == TOY  # the folder's configs (cross-attention width)
    header = read_header(toy_lora)
    shapes = {k: v.shape for k, v in header.tensors.items()}
    assert families.detect(lora_keys=list(shapes), shapes=shapes) == TOY  # the LoRA's key widths
    assert families.detect(metadata={"ss_base_model_version": "toy_v1"}) == TOY
    assert (
        families.detect(metadata={"ss_base_model_version": "sd_v1"}) == "sd1"
    )  # the built-ins still win theirs
    assert families.get(TOY).base_model_version("epsilon") == "toy_v1"


def test_inspect_convert_and_merge_work_on_the_toy(cli, toy_family, toy_model: Path, toy_lora: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    result = cli("inspect", "--json", toy_lora)
    assert result.exit_code == 0, result.stderr
    (report,) = json.loads(result.stdout)
    assert report["family"] == TOY and report["format"] == "kohya"
    assert report["components"] == ["unet", "text_encoder"]

    # convert: kohya's flat names resolve through the toy's own module tables (computed from its configs)
    converted = toy_model.parent / "toy_diffusers.safetensors"
    result = cli("convert", toy_lora, "--to", "diffusers", "-o", converted)
    assert result.exit_code == 0, result.stderr
    keys = set(load_file(converted))
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight"
    assert q in keys and any(k.startswith("text_encoder.") for k in keys)

    # merge: the toy folder is its own family; every merged weight is W0 + alpha · (lora_alpha / r) · up @ down
    merged = toy_model.parent / "merged"
    result = cli("merge", toy_model, f"{toy_lora}:0.5", "-o", merged, "--json")
    assert result.exit_code == 0, result.stderr
    kohya = load_file(toy_lora)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    down, up = kohya[f"{stem}.lora_down.weight"], kohya[f"{stem}.lora_up.weight"]
    scale = 0.5 * float(kohya[f"{stem}.alpha"]) / down.shape[0]
    w0 = load_file(toy_model / "unet" / "diffusion_pytorch_model.safetensors")
    w1 = load_file(merged / "unet" / "diffusion_pytorch_model.safetensors")
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    assert torch.allclose(w1[key], w0[key] + scale * up @ down, atol=1e-6)
    assert not torch.equal(w1[key], w0[key])

    # the oracle: diffusers loads lorax's converted file and fuses it to the weights lorax merged
    pipe = StableDiffusionPipeline.from_pretrained(toy_model, safety_checker=None)
    pipe.load_lora_weights(str(converted))
    pipe.fuse_lora(lora_scale=0.5)
    fused = {k.replace(".base_layer.", "."): v for k, v in pipe.unet.state_dict().items() if "lora_" not in k}
    assert torch.allclose(fused[key], w1[key], atol=1e-5)
    merged_te = load_file(merged / "text_encoder" / "model.safetensors")
    live_te = {
        k.replace(".base_layer.", "."): v
        for k, v in pipe.text_encoder.state_dict().items()
        if "lora_" not in k
    }
    te_key = next(k for k in merged_te if k.endswith("layers.0.self_attn.q_proj.weight"))
    assert torch.allclose(live_te[te_key], merged_te[te_key], atol=1e-5)
    te0 = load_file(toy_model / "text_encoder" / "model.safetensors")
    assert not torch.equal(te0[te_key], merged_te[te_key])


def test_a_toy_single_file_is_told_from_sd1_by_its_width(cli, toy_family, toy_model: Path) -> None:
    from safetensors.torch import load_file, save_file

    from lorax.io.checkpoint import open_checkpoint

    single = toy_model.parent / "toy.safetensors"
    result = cli("convert", toy_model, "-o", single)
    assert result.exit_code == 0, result.stderr
    assert open_checkpoint(single).family == TOY
    bare = toy_model.parent / "toy_bare.safetensors"  # the same tensors without lorax's header: SD1's layout
    save_file(load_file(single), bare)
    assert open_checkpoint(bare).family == TOY
    result = cli("inspect", "--json", bare)
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["family"] == TOY


def test_single_files_state_their_family_as_lorax_family_and_the_older_spelling_still_reads(
    cli, toy_family, toy_model: Path
) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from lorax.io.checkpoint import open_checkpoint

    single = toy_model.parent / "toy_meta.safetensors"
    assert cli("convert", toy_model, "-o", single).exit_code == 0
    with safe_open(single, "pt") as f:
        meta = f.metadata()
    assert meta["lorax_family"] == TOY and "lorax.family" not in meta
    # the same tensors (its keys say toy1) with a header in the older spelling that says sd1
    older = toy_model.parent / "toy_older.safetensors"
    save_file(load_file(single), older, metadata={"lorax.family": "sd1"})
    assert open_checkpoint(older).family == "sd1"
    result = cli("inspect", "--json", older)
    assert result.exit_code == 0 and json.loads(result.stdout)[0]["family"] == "sd1"
