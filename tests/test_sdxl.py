"""SDXL LoRAs on the tiny SDXL pipeline: lorax merge against diffusers' own StableDiffusionXLPipeline loader,
kohya's original (SGM) naming against diffusers naming, exact round trips through every LoRA format lorax writes."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import save, scratch, tiny_folder, tiny_pipe
from safetensors.torch import load_file, save_file

from lorax.adapters.state import LoraModule, LoraState
from lorax.formats import load_lora
from lorax.services.merge import MergeConfig, merge

# The tiny SDXL UNet (lorax.zoo.tiny): level 0 plain (32 wide), level 1 cross attention (64 wide, 2 transformer
# layers), context 96 wide (32 + 64). Text encoder 1 is 32 wide, text encoder 2 is 64 wide.
DOWN = "unet.down_blocks.1.attentions.0.transformer_blocks"
MID = "unet.mid_block.attentions.0.transformer_blocks"
UP = "unet.up_blocks.0.attentions.1.transformer_blocks"
# The same blocks in the original (SGM) naming, as kohya's SDXL trainer writes them: SDXL's first level has two
# resnets and no attention (input_blocks 1-2), a downsampler (3), then level 1 (input_blocks 4-5, attention at .1);
# the middle block is resnet, attention, resnet; the first up level is output_blocks 0-2 with attention at .1.
SGM = {
    "down_blocks.1.attentions.0.": "input_blocks.4.1.",
    "mid_block.attentions.0.": "middle_block.1.",
    "up_blocks.0.attentions.1.": "output_blocks.1.1.",
    "down_blocks.0.resnets.1.conv2": "input_blocks.2.0.out_layers.3",
}


def _pair(
    out: int, inp: int, rank: int, gen: torch.Generator, conv: bool = False
) -> tuple[torch.Tensor, ...]:
    if conv:
        return torch.randn(rank, inp, 3, 3, generator=gen) * 0.1, torch.randn(
            out, rank, 1, 1, generator=gen
        ) * 0.1
    return torch.randn(rank, inp, generator=gen) * 0.1, torch.randn(out, rank, generator=gen) * 0.1


def sdxl_lora(seed: int = 0, rank: int = 4, alpha: float = 2.0, conv: bool = False) -> LoraState:
    """A random LoRA over UNet attention (down, mid, up; self and cross), a feed-forward layer, and both text
    encoders' attention and MLP (optionally a UNet conv)."""
    gen = torch.Generator().manual_seed(seed)
    modules: dict[str, LoraModule] = {}

    def add(path: str, out: int, inp: int, is_conv: bool = False) -> None:
        down, up = _pair(out, inp, rank, gen, is_conv)
        modules[path] = LoraModule(down, up, alpha)

    for block in (f"{DOWN}.0", f"{DOWN}.1", f"{MID}.1", f"{UP}.0"):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            add(f"{block}.attn1.{proj}", 64, 64)
        add(f"{block}.attn2.to_q", 64, 64)
        add(f"{block}.attn2.to_k", 64, 96)
        add(f"{block}.attn2.to_v", 64, 96)
    add(f"{DOWN}.1.ff.net.2", 64, 256)
    if conv:
        add("unet.down_blocks.0.resnets.1.conv2", 32, 32, True)
    for component, width in (("text_encoder", 32), ("text_encoder_2", 64)):
        for i in range(2):
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                add(f"{component}.text_model.encoder.layers.{i}.self_attn.{proj}", width, width)
        add(f"{component}.text_model.encoder.layers.1.mlp.fc1", 37, width)
    return LoraState(modules, family="sdxl")


@cache
def base_weights() -> dict[str, dict[str, torch.Tensor]]:
    pipe = tiny_pipe("sdxl")
    return {
        c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()}
        for c in ("unet", "vae", "text_encoder", "text_encoder_2")
    }


def _live(component: str, path: str) -> str:
    """lorax's on-disk text path → the key in the live model's state dict (transformers 5: CLIPTextModel has no
    ``text_model`` level, CLIPTextModelWithProjection keeps it)."""
    if component == "text_encoder":
        return path.removeprefix("text_model.")
    return path


def hand_merged(state: LoraState, alpha: float, alpha_text: float) -> dict[str, dict[str, torch.Tensor]]:
    """W0 + alpha·(lora_alpha/r)·up@down, in float64, on the pipeline's own state dicts."""
    out = {c: dict(ws) for c, ws in base_weights().items()}
    for name, m in state.modules.items():
        component, _, path = name.partition(".")
        key = _live(component, path) + ".weight"
        w = out[component][key]
        up = m.up.reshape(m.up.shape[0], -1).double()
        down = m.down.reshape(m.down.shape[0], -1).double()
        a = alpha if component == "unet" else alpha_text
        out[component][key] = (w.double() + a * (m.alpha / m.rank) * (up @ down).reshape(w.shape)).to(w.dtype)
    return out


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(want), what
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=f"{what}.{k}")


@cache
def merged_folder(fmt: str, alpha: float) -> tuple[Path, Path, LoraState]:
    d = scratch(f"sdxl-{fmt}")
    state = sdxl_lora(seed=3, conv=fmt == "kohya")
    lora = save(state, d / "pytorch_lora_weights.safetensors", fmt=fmt)
    out = d / "merged"
    result = merge(MergeConfig(str(tiny_folder("sdxl")), [str(lora)], out, alpha=alpha))
    assert result.modules_merged == len(state.modules)
    assert not result.unmatched
    return lora, out, state


def _diffusers_fused(lora: Path, alpha: float, components: list[str]):  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_folder("sdxl"))
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=alpha, components=components)
    pipe.unload_lora_weights()
    return pipe


def test_tiny_sdxl_pipeline_is_sdxl_shaped() -> None:
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipe = tiny_pipe("sdxl")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert type(pipe.text_encoder) is CLIPTextModel
    assert type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    cfg = pipe.unet.config
    assert cfg.addition_embed_type == "text_time"
    width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert cfg.cross_attention_dim == width
    assert (
        cfg.projection_class_embeddings_input_dim
        == 6 * cfg.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim
    )
    # the whole pipeline runs: both encoders, pooled projection and the size/crop ids reach the UNet
    image = pipe(
        "a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images  # fmt: skip
    assert image.shape == (1, 32, 32, 3)
    assert torch.isfinite(torch.from_numpy(image)).all()


def test_diffusers_file_merge_equals_diffusers_fuse_lora() -> None:
    """diffusers' own StableDiffusionXLPipeline.load_lora_weights + fuse_lora is the oracle, all three components."""
    alpha = 0.6
    lora, out, state = merged_folder("diffusers", alpha)
    from diffusers import StableDiffusionXLPipeline

    merged = StableDiffusionXLPipeline.from_pretrained(out)
    pipe = _diffusers_fused(lora, alpha, ["unet", "text_encoder", "text_encoder_2"])
    for component in ("unet", "text_encoder", "text_encoder_2", "vae"):
        _close(getattr(merged, component).state_dict(), getattr(pipe, component).state_dict(), component)
    # and both agree with the hand computation (the merge changed every targeted weight)
    want = hand_merged(state, alpha, alpha)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        _close(getattr(merged, component).state_dict(), want[component], component)
    key = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight"
    assert not torch.equal(base_weights()["unet"][key], merged.unet.state_dict()[key])


def test_kohya_file_merge_equals_diffusers_fuse_lora_on_the_unet() -> None:
    """A lorax-written kohya SDXL file (SGM names, lora_te1_/lora_te2_): diffusers' loader is the oracle for the UNet;
    the text encoders (whose kohya attention LoRA diffusers + transformers 5 drops) are checked by hand."""
    alpha = 0.8
    lora, out, state = merged_folder("kohya", alpha)
    keys = set(load_file(lora))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0") for k in keys)
    from diffusers import StableDiffusionXLPipeline

    merged = StableDiffusionXLPipeline.from_pretrained(out)
    pipe = _diffusers_fused(lora, alpha, ["unet"])
    _close(merged.unet.state_dict(), pipe.unet.state_dict(), "unet")
    want = hand_merged(state, alpha, alpha)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        _close(getattr(merged, component).state_dict(), want[component], component)
    conv = "down_blocks.0.resnets.1.conv2.weight"
    assert not torch.equal(base_weights()["unet"][conv], merged.unet.state_dict()[conv])


def _kohya_diffusers_named(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A kohya file's keys renamed from SGM to diffusers block names (as non-kohya trainers write SDXL)."""
    out = {}
    for key, t in tensors.items():
        for diffusers_name, sgm in SGM.items():
            flat_sgm = "lora_unet_" + sgm.replace(".", "_")
            if key.startswith(flat_sgm):
                key = "lora_unet_" + diffusers_name.replace(".", "_") + key[len(flat_sgm) :]
                break
        else:
            assert not key.startswith("lora_unet_"), key
        out[key] = t
    return out


def test_kohya_original_naming_and_diffusers_naming_map_to_the_same_modules() -> None:
    state = sdxl_lora(seed=5, conv=True)
    d = scratch("sdxl-naming")
    sgm_file = save(state, d / "sgm.safetensors", fmt="kohya")
    tensors = load_file(sgm_file)
    assert any(k.startswith("lora_unet_middle_block_1_") for k in tensors)
    assert any(k.startswith("lora_unet_output_blocks_1_1_") for k in tensors)
    assert "lora_unet_input_blocks_2_0_out_layers_3.lora_up.weight" in tensors
    diffusers_named = d / "diffusers-named.safetensors"
    save_file(_kohya_diffusers_named(tensors), diffusers_named)
    a, b = load_lora(sgm_file), load_lora(diffusers_named)
    assert a.family == b.family == "sdxl"
    assert set(a.modules) == set(b.modules) == set(state.modules)
    for name, m in state.modules.items():
        for got in (a.modules[name], b.modules[name]):
            assert isinstance(got, LoraModule)
            assert torch.equal(got.down, m.down) and torch.equal(got.up, m.up) and got.alpha == m.alpha
    # resolved against the live tiny model too (not only the full-size SDXL table)
    c = load_lora(diffusers_named, model=tiny_pipe("sdxl"))
    assert set(c.modules) == set(state.modules)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_round_trips_are_exact(fmt: str) -> None:
    state = sdxl_lora(seed=7, rank=3, alpha=1.5, conv=fmt == "kohya")
    state.embeddings = {
        "<s1>": {"text_encoder": torch.randn(2, 32), "text_encoder_2": torch.randn(2, 64)}
    } if fmt == "kohya" else {}  # fmt: skip
    d = scratch("sdxl-rt")
    path = save(state, d / f"l-{fmt}.safetensors", fmt=fmt)
    back = load_lora(path)
    assert back.family == "sdxl"
    assert set(back.modules) == set(state.modules)
    for name, m in state.modules.items():
        got = back.modules[name]
        assert isinstance(got, LoraModule)
        if fmt == "diffusers":  # alpha / r is folded into lora_B (diffusers' lora_alpha = r): the same delta
            assert got.alpha == got.rank, name
            torch.testing.assert_close(got.delta(), m.delta(), atol=1e-6, rtol=1e-5)
            continue
        assert torch.equal(got.down, m.down) and torch.equal(got.up, m.up), name
        assert got.alpha == m.alpha, name
    for token, per in state.embeddings.items():
        assert set(back.embeddings[token]) == set(per)
        for component, t in per.items():
            assert torch.equal(back.embeddings[token][component], t)
    again = save(back, d / f"again-{fmt}.safetensors", fmt=fmt)
    first, second = load_file(path), load_file(again)
    assert set(first) == set(second)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_convert_cli_kohya_to_diffusers_and_back(cli) -> None:  # type: ignore[no-untyped-def]
    state = sdxl_lora(seed=9, conv=True)
    d = scratch("sdxl-convert-lora")
    kohya = save(state, d / "k.safetensors", fmt="kohya")
    r = cli("convert", kohya, "--to", "diffusers", "-o", d / "d.safetensors")
    assert r.exit_code == 0, r.stderr
    keys = set(load_file(d / "d.safetensors"))
    assert any(k.startswith("text_encoder_2.") for k in keys)
    assert any(k.startswith("unet.down_blocks.1.attentions.0.") for k in keys)
    r = cli("convert", d / "d.safetensors", "--to", "kohya", "-o", d / "k2.safetensors")
    assert r.exit_code == 0, r.stderr
    a, b = load_file(kohya), load_file(d / "k2.safetensors")
    assert set(a) == set(b)
    # the diffusers file folds alpha / r into its factors: the same deltas come back, with alpha = rank
    first, second = load_lora(kohya), load_lora(d / "k2.safetensors")
    for name, m in first.modules.items():
        torch.testing.assert_close(second.modules[name].delta(), m.delta(), atol=1e-6, rtol=1e-5)
