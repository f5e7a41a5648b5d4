"""Flux.1 LoRAs (issue 16): the family, every layout lorax reads and writes, exact fused ⇄ split conversions.

The oracle is diffusers' own ``FluxPipeline.load_lora_weights`` + ``fuse_lora`` on a tiny FluxPipeline built from
config (it converts kohya and XLabs files itself), and hand computations from the published definitions where
diffusers' converters hard-code the full-size widths (``single_blocks.N.linear1`` as 3072/12288) or drop modules
(the embedders and ``final_layer`` of kohya files).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorax.formats import detect_format, load_lora, save_lora
from lorax.formats import flux as fluxfmt
from lorax.models import families

H = 32  # num_attention_heads * attention_head_dim
TINY = dict(
    patch_size=1,
    in_channels=4,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=[4, 4, 8],
    guidance_embeds=True,
)


def tiny_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**TINY)
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
            vocab_size=1000,
        )
    )  # fmt: skip
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=None,
        text_encoder=text,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


def _pair(g: torch.Generator, out: int, inp: int, r: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(r, inp, generator=g) * 0.1, torch.randn(out, r, generator=g) * 0.1


# BFL module → (out rows, in width) on the tiny transformer.
def bfl_shapes(with_linear1: bool = True, with_top: bool = True) -> dict[str, tuple[int, int]]:
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(2):
        shapes |= {
            f"double_blocks.{i}.img_attn.qkv": (3 * H, H),
            f"double_blocks.{i}.img_attn.proj": (H, H),
            f"double_blocks.{i}.img_mlp.0": (4 * H, H),
            f"double_blocks.{i}.img_mlp.2": (H, 4 * H),
            f"double_blocks.{i}.img_mod.lin": (6 * H, H),
            f"double_blocks.{i}.txt_attn.qkv": (3 * H, H),
            f"double_blocks.{i}.txt_attn.proj": (H, H),
            f"double_blocks.{i}.txt_mlp.0": (4 * H, H),
            f"double_blocks.{i}.txt_mlp.2": (H, 4 * H),
            f"double_blocks.{i}.txt_mod.lin": (6 * H, H),
            f"single_blocks.{i}.linear2": (H, 5 * H),
            f"single_blocks.{i}.modulation.lin": (3 * H, H),
        }
        if with_linear1:
            shapes[f"single_blocks.{i}.linear1"] = (7 * H, H)
    if with_top:
        shapes |= {"img_in": (H, 4), "txt_in": (H, 32), "final_layer.adaLN_modulation.1": (2 * H, H),
                   "final_layer.linear": (4, H), "time_in.in_layer": (H, 256), "guidance_in.out_layer": (H, H)}  # fmt: skip
    return shapes


def kohya_file(shapes: dict[str, tuple[int, int]], seed: int = 0, te: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for bfl, (rows, width) in shapes.items():
        stem = "lora_unet_" + bfl.replace(".", "_")
        down, up = _pair(g, rows, width)
        out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = down, up
        out[f"{stem}.alpha"] = torch.tensor(2.0)
    if te:
        for layer in range(2):
            for proj in ("q_proj", "v_proj"):
                stem = f"lora_te1_text_model_encoder_layers_{layer}_self_attn_{proj}"
                down, up = _pair(g, 32, 32)
                out[f"{stem}.lora_down.weight"], out[f"{stem}.lora_up.weight"] = down, up
                out[f"{stem}.alpha"] = torch.tensor(8.0)
    return out


def fused_deltas(pipe, lora: dict[str, torch.Tensor] | Path, components=("transformer", "text_encoder")):
    """diffusers' own load + fuse: ``{component.module path: W' - W}`` for every weight that changed."""
    before = {f"{c}.{k}": v.clone() for c in components for k, v in getattr(pipe, c).state_dict().items()}
    arg = lora if isinstance(lora, dict) else str(lora)
    pipe.load_lora_weights(dict(arg) if isinstance(arg, dict) else arg, adapter_name="x")
    pipe.fuse_lora(components=list(components), lora_scale=1.0)
    pipe.unload_lora_weights()
    out = {}
    for c in components:
        for k, v in getattr(pipe, c).state_dict().items():
            name = f"{c}.{k}"
            if name in before and not torch.equal(v, before[name]):
                out[name.removesuffix(".weight")] = v - before[name]
    pipe.unfuse_lora(components=list(components))
    for c in components:  # restore exactly
        getattr(pipe, c).load_state_dict(
            {k[len(c) + 1 :]: v for k, v in before.items() if k.startswith(c + ".")}
        )
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def live_key(name: str) -> str:
    # transformers ≥ 5's CLIPTextModel has no text_model level; lorax keys keep it (the on-disk convention)
    return name.replace("text_encoder.text_model.", "text_encoder.")


def assert_state_matches(state, fused: dict[str, torch.Tensor], *, only: set[str] | None = None) -> None:
    names = {n for n in state.modules if only is None or n in only}
    assert {live_key(n) for n in names} == set(fused), (sorted(names)[:5], sorted(fused)[:5])
    for name in names:
        delta = state.modules[name].delta(torch.float32)
        assert rel(delta, fused[live_key(name)]) <= 1e-5, name


@pytest.fixture(scope="module")
def pipe(one_torch_thread):
    return tiny_pipeline()


# ---------------------------------------------------------------------------------------------------------------
# The family


def test_family_and_tables():
    fam = families.get("flux")
    assert fam.component_names() == ("transformer", "text_encoder", "text_encoder_2")
    assert fam.unet().model_class == "FluxTransformer2DModel"
    table = families.module_table("flux", "transformer")
    assert table["transformer_blocks.18.attn.to_q"] == (3072, 3072)
    assert "transformer_blocks.19.attn.to_q" not in table
    assert table["single_transformer_blocks.37.proj_mlp"] == (12288, 3072)
    assert "single_transformer_blocks.38.proj_out" not in table
    assert "time_text_embed.guidance_embedder.linear_1" in table  # dev's config
    assert families.family_config("flux", "transformer")["guidance_embeds"] is True
    assert families.module_table("flux", "text_encoder_2")["encoder.block.23.layer.1.DenseReluDense.wo"] == (
        4096,
        10240,
    )
    # SD's kohya prefix still names SD's UNet; Flux reads its kohya names itself
    assert families.kohya_prefixes()["lora_unet_"] == "unet"


def test_detection_from_every_kind_of_evidence(pipe):
    kohya = kohya_file(bfl_shapes())
    assert families.detect(lora_keys=list(kohya)) == "flux"
    assert families.detect(lora_keys=["diffusion_model.single_blocks.3.linear1.lora_A.weight"]) == "flux"
    assert (
        families.detect(lora_keys=["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"])
        == "flux"
    )
    assert (
        families.detect(lora_keys=["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"])
        == "flux"
    )
    assert families.detect(metadata={"ss_base_model_version": "flux1"}) == "flux"
    index = dict(families.get("flux").checkpoint.model_index)
    assert families.detect(model_index=index) == "flux"
    assert families.detect(model_index={**index, "_class_name": "DiffusionPipeline"}) == "flux"
    assert families.detect(pipeline=pipe) == "flux"
    # SDXL is still SDXL (its second text encoder beside a UNet)
    sdxl = {"_class_name": "DiffusionPipeline", "unet": [], "text_encoder": [], "text_encoder_2": []}
    assert families.detect(model_index=sdxl) == "sdxl"
    assert (
        families.detect(lora_keys=["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]) != "flux"
    )


# ---------------------------------------------------------------------------------------------------------------
# Reading, against diffusers' own loader


def test_kohya_read_equals_diffusers_fuse(pipe, tmp_path):
    tensors = kohya_file(bfl_shapes(with_linear1=False, with_top=False), te=False)
    path = tmp_path / "k.safetensors"
    save_file(tensors, path)
    assert detect_format(path) == "kohya"
    state = load_lora(path)
    assert state.family == "flux"
    assert "transformer.transformer_blocks.1.attn.add_k_proj" in state.modules
    assert_state_matches(state, fused_deltas(pipe, path))


def test_kohya_clip_l_reads_as_sd_kohya_does():
    """diffusers 0.42's Flux loader fails on kohya ``lora_te1_`` keys ("Could not automatically infer state dict
    type"); lorax reads them as its SD kohya reader does (which diffusers' SD loader checks in test_formats_lora)."""
    from lorax.formats import kohya

    te = {k: v for k, v in kohya_file({}, te=True).items() if k.startswith("lora_te1_")}
    flux_state = fluxfmt.read({**kohya_file(bfl_shapes(with_top=False), te=False), **te}, {})
    sd_state = kohya.read(te, {}, family="sd1")
    assert set(sd_state.modules) <= set(flux_state.modules)
    for name, m in sd_state.modules.items():
        assert torch.equal(flux_state.modules[name].delta(), m.delta())


def test_kohya_linear1_final_layer_and_embedders_by_hand(tmp_path):
    """What diffusers cannot check on a tiny model: linear1 splits [h, h, h, rest] by shapes, the final layer's
    halves swap (diffusers' ``swap_scale_shift``), the embedders map one to one."""
    from diffusers.loaders.lora_conversion_utils import swap_scale_shift

    tensors = kohya_file(bfl_shapes(), te=False)
    state = fluxfmt.read(tensors, {})

    def file_delta(stem: str) -> torch.Tensor:
        d, u = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
        return float(tensors[f"{stem}.alpha"]) / d.shape[0] * u @ d

    full = file_delta("lora_unet_single_blocks_1_linear1")
    parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    stacked = torch.cat(
        [state.modules[f"transformer.single_transformer_blocks.1.{p}"].delta() for p in parts]
    )
    assert stacked.shape == (7 * H, H) and rel(stacked, full) <= 1e-6
    assert state.modules["transformer.single_transformer_blocks.1.proj_mlp"].up.shape == (4 * H, 4)
    final = state.modules["transformer.norm_out.linear"].delta()
    assert rel(final, swap_scale_shift(file_delta("lora_unet_final_layer_adaLN_modulation_1"))) <= 1e-6
    assert not torch.allclose(final, file_delta("lora_unet_final_layer_adaLN_modulation_1"))
    assert rel(state.modules["transformer.x_embedder"].delta(), file_delta("lora_unet_img_in")) <= 1e-6
    assert (
        rel(
            state.modules["transformer.time_text_embed.guidance_embedder.linear_2"].delta(),
            file_delta("lora_unet_guidance_in_out_layer"),
        )
        <= 1e-6
    )


def test_kohya_split_qkv_block_diagonal(pipe, tmp_path):
    """kohya's split-qkv files: a block-diagonal up over a down of rank 3r; consumers apply alpha / 3r."""
    g = torch.Generator().manual_seed(3)
    tensors: dict[str, torch.Tensor] = {}
    r = 4
    for stream in ("img", "txt"):
        downs = [torch.randn(r, H, generator=g) for _ in range(3)]
        up = torch.zeros(3 * H, 3 * r)
        for i in range(3):
            up[i * H : (i + 1) * H, i * r : (i + 1) * r] = torch.randn(H, r, generator=g)
        stem = f"lora_unet_double_blocks_0_{stream}_attn_qkv"
        tensors |= {f"{stem}.lora_down.weight": torch.cat(downs), f"{stem}.lora_up.weight": up,
                    f"{stem}.alpha": torch.tensor(6.0)}  # fmt: skip
    path = tmp_path / "split.safetensors"
    save_file(tensors, path)
    state = load_lora(path)
    assert state.modules["transformer.transformer_blocks.0.attn.to_q"].rank == r  # the block, not 3r
    assert_state_matches(state, fused_deltas(pipe, path))
    # written back fused, it is block-diagonal again and every delta is kept
    out = tmp_path / "back.safetensors"
    save_lora(state, out, format="kohya")
    again = load_lora(out)
    for name, m in state.modules.items():
        assert rel(again.modules[name].delta(), m.delta()) <= 1e-6


def test_xlabs_read_equals_diffusers_fuse(pipe, tmp_path):
    g = torch.Generator().manual_seed(5)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(2):
        for what, rows in (("qkv_lora1", 3 * H), ("qkv_lora2", 3 * H), ("proj_lora1", H), ("proj_lora2", H)):
            d, u = _pair(g, rows, H)
            tensors[f"double_blocks.{i}.processor.{what}.down.weight"] = d
            tensors[f"double_blocks.{i}.processor.{what}.up.weight"] = u
    path = tmp_path / "xlabs.safetensors"
    save_file(tensors, path)
    assert detect_format(path) == "xlabs"
    state = load_lora(path)
    assert_state_matches(state, fused_deltas(pipe, path))


def kohya_as_bfl(tensors: dict[str, torch.Tensor], names: str = "AB") -> dict[str, torch.Tensor]:
    """The same LoRA in BFL names (ComfyUI reads the two alike): ``diffusion_model.<dotted BFL path>``."""
    out = {}
    for k, v in tensors.items():
        m = re.match(r"lora_unet_(.+?)\.(lora_down\.weight|lora_up\.weight|alpha)$", k)
        if m is None:
            out[k] = v
            continue
        bfl = fluxfmt.bfl_of_flat(m.group(1))
        role = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}
        suffix = role[m.group(2)] if names == "AB" else m.group(2)
        out[f"diffusion_model.{bfl}.{suffix}"] = v
    return out


@pytest.mark.parametrize("names", ["AB", "updown"])
def test_bfl_read_equals_the_same_lora_in_kohya_names(pipe, tmp_path, names):
    """diffusers 0.42 has no loader for plain BFL LoRAs: the oracle is the same file in kohya names, which it has."""
    kohya = kohya_file(bfl_shapes(with_linear1=False, with_top=False), te=False)
    path = tmp_path / "bfl.safetensors"
    save_file(kohya_as_bfl(kohya, names), path)
    assert detect_format(path) == "bfl"
    kpath = tmp_path / "k.safetensors"
    save_file(kohya, kpath)
    assert_state_matches(load_lora(path), fused_deltas(pipe, kpath))


def test_diffusers_names_with_and_without_peft_prefix(tmp_path):
    g = torch.Generator().manual_seed(9)
    d, u = _pair(g, H, H)
    for key in (
        "transformer.single_transformer_blocks.0.attn.to_q",
        "base_model.model.single_transformer_blocks.0.attn.to_q",
    ):
        path = tmp_path / "d.safetensors"
        save_file({f"{key}.lora_A.weight": d, f"{key}.lora_B.weight": u}, path)
        assert detect_format(path) == "diffusers"
        state = load_lora(path)
        assert state.family == "flux"
        assert list(state.modules) == ["transformer.single_transformer_blocks.0.attn.to_q"]


# ---------------------------------------------------------------------------------------------------------------
# Writing: every layout lorax writes loads in diffusers to the deltas lorax computes


@pytest.mark.parametrize("fmt", ["kohya", "diffusers", "bfl"])
def test_written_layouts_load_in_diffusers(pipe, tmp_path, fmt):
    src = tmp_path / "src.safetensors"
    save_file(kohya_file(bfl_shapes(with_linear1=False, with_top=False), te=fmt == "diffusers"), src)
    state = load_lora(src)
    out = tmp_path / f"out-{fmt}.safetensors"
    save_lora(state, out, format=fmt)
    written = load_file(out)
    assert detect_format(out) == fmt
    if fmt == "bfl":  # diffusers reads BFL names only in kohya form: rename, as for the reading test
        oracle = tmp_path / "as-kohya.safetensors"
        save_file({_bfl_to_kohya(k): v for k, v in written.items()}, oracle)
        fused = fused_deltas(pipe, oracle)
    else:
        fused = fused_deltas(pipe, out)
    assert_state_matches(state, fused)
    again = load_lora(out)
    assert set(again.modules) == set(state.modules)
    for name, m in state.modules.items():
        assert rel(again.modules[name].delta(), m.delta()) <= 1e-6, name


def _bfl_to_kohya(key: str) -> str:
    m = re.match(r"diffusion_model\.(.+)\.lora_(A|B)\.weight$", key)
    if m is None:
        return key
    return f"lora_unet_{m.group(1).replace('.', '_')}.lora_{'down' if m.group(2) == 'A' else 'up'}.weight"


def test_split_to_fused_grows_rank_and_keeps_every_delta():
    """Parts with their own downs (a diffusers-trained LoRA) fuse exactly at rank Σ r; a missing part is zero rows."""
    g = torch.Generator().manual_seed(11)
    from lorax.adapters.state import LoraModule, LoraState

    state = LoraState(family="flux")
    for p, r, a in (("attn.to_q", 4, 4.0), ("attn.to_k", 2, 8.0), ("proj_mlp", 3, 1.0)):
        d, u = _pair(g, 4 * H if p == "proj_mlp" else H, H, r)
        state.modules[f"transformer.single_transformer_blocks.0.{p}"] = LoraModule(d, u, a)
    d, u = _pair(g, 2 * H, H)
    state.modules["transformer.norm_out.linear"] = LoraModule(d, u, 4.0)
    for fmt in ("kohya", "bfl"):
        tensors, _ = fluxfmt.write(state, variant=fmt)
        key = "lora_unet_single_blocks_0_linear1.lora_down.weight" if fmt == "kohya" else (
            "diffusion_model.single_blocks.0.linear1.lora_A.weight")  # fmt: skip
        assert tensors[key].shape == (9, H)
        again = fluxfmt.read(tensors, {})
        for name, m in state.modules.items():
            assert rel(again.modules[name].delta(), m.delta()) <= 1e-6, (fmt, name)
        assert not bool(again.modules["transformer.single_transformer_blocks.0.attn.to_v"].delta().any())


# ---------------------------------------------------------------------------------------------------------------
# Commands


def test_inspect_names_the_variant(cli, tmp_path):
    path = tmp_path / "k.safetensors"
    save_file(kohya_file(bfl_shapes()), path, {"ss_network_dim": "4"})
    result = cli("inspect", str(path), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["family"] == "flux"
    assert report["format"] == "kohya"
    assert report["layout"].startswith("kohya") and any(
        b.startswith("single blocks") for b in report["blocks"]
    )
    text = cli("inspect", str(path))
    assert "flux" in text.stdout and "double blocks" in text.stdout and "single blocks" in text.stdout


@pytest.mark.parametrize("to", ["diffusers", "bfl", "kohya"])
def test_convert_between_layouts(cli, tmp_path, to):
    src = tmp_path / "k.safetensors"
    save_file(kohya_file(bfl_shapes()), src)
    out = tmp_path / f"{to}.safetensors"
    result = cli("convert", str(src), "-o", str(out), "--to", to)
    assert result.exit_code == 0, result.output
    assert detect_format(out) == to
    a, b = load_lora(src), load_lora(out)
    assert set(a.modules) == set(b.modules)
    for name, m in a.modules.items():
        assert rel(b.modules[name].delta(), m.delta()) <= 1e-6, name


def test_merge_refuses_flux_loras(cli, tmp_path):
    src = tmp_path / "k.safetensors"
    save_file(kohya_file(bfl_shapes(with_top=False), te=False), src)
    result = cli("merge", "shapes", str(src), "-o", str(tmp_path / "m.safetensors"))
    assert result.exit_code != 0
    assert "merging Flux LoRAs into a model is not supported yet" in result.output
    assert not (tmp_path / "m.safetensors").exists()


def test_t5_modules_keep_kohya_names_and_diffusers_refuses_them(tmp_path):
    g = torch.Generator().manual_seed(13)
    stem = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"
    d, u = _pair(g, 4096, 4096)
    tensors = {f"{stem}.lora_down.weight": d, f"{stem}.lora_up.weight": u, f"{stem}.alpha": torch.tensor(2.0)}
    tensors |= kohya_file({"double_blocks.0.img_attn.proj": (H, H)}, te=False)
    path = tmp_path / "t5.safetensors"
    save_file(tensors, path)
    assert detect_format(path) == "kohya"
    state = load_lora(path)
    assert "text_encoder_2.encoder.block.0.layer.0.SelfAttention.q" in state.modules
    only_t5 = tmp_path / "only-t5.safetensors"
    save_file({k: v for k, v in tensors.items() if k.startswith("lora_te3_")}, only_t5)
    assert detect_format(only_t5) == "kohya" and load_lora(only_t5).family == "flux"
    out = tmp_path / "t5-bfl.safetensors"
    save_lora(state, out, format="bfl")
    assert f"{stem}.lora_down.weight" in load_file(out)
    from lorax.errors import FormatError

    with pytest.raises(FormatError, match="reads no text_encoder_2 LoRA"):
        save_lora(state, tmp_path / "t5-d.safetensors", format="diffusers")
    assert not (tmp_path / "t5-d.safetensors").exists()


def test_generate_reads_flux_loras(tmp_path):
    """generate applies Flux LoRAs now (tests/test_flux_generate.py checks the images against diffusers'); it no
    longer consults ``Family.mergeable``, which only merge does."""
    from lorax.gen.runtime import load_lora_file

    src = tmp_path / "k.safetensors"
    save_file(kohya_file(bfl_shapes(with_top=False), te=False), src)
    state = load_lora_file(src, None)
    assert state.family == "flux"
    assert "transformer.single_transformer_blocks.0.attn.to_q" in state.modules
