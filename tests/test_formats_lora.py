"""kohya and diffusers/PEFT formats: exact round trips, cross-format deltas, and diffusers' own loader as oracle."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lorax.adapters.peft_bridge import lora_state_from_peft, to_peft_state_dict, to_pipeline_state_dict
from lorax.adapters.state import LoraModule, LoraState
from lorax.errors import FormatError, MismatchError
from lorax.formats import detect_format, kohya, load_lora, naming, save_lora
from lorax.io.safetensors_io import SafetensorsFile, save_tensors
from lorax.models import families
from lorax.zoo.random_lora import random_lora
from lorax.zoo.tiny import tiny_pipeline

KINDS = ("attention", "ff", "conv")


@pytest.fixture(scope="session")
def pipe():
    return tiny_pipeline("sd1", seed=0)


@pytest.fixture(scope="session")
def lora(pipe) -> LoraState:
    """Attention, feed-forward and LoCon conv modules on UNet and text encoder, mixed ranks and alphas."""
    state = random_lora(pipe, kinds=KINDS, rank=4, alpha=2.0, seed=1, family="sd1")
    for i, (key, module) in enumerate(sorted(state.modules.items())):
        if i % 3 == 0:
            assert isinstance(module, LoraModule)
            state.modules[key] = LoraModule(module.down[:2].clone(), module.up[:, :2].clone(), 3.0)
    return state


def weights(model) -> dict[str, torch.Tensor]:
    return {
        name: m.weight.detach().clone()
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)
        and "lora_" not in name
        and "base_layer" not in name
    }


def live_weights(pipe, component: str) -> dict[str, torch.Tensor]:
    """Weights keyed by lorax on-disk paths (fused PEFT layers keep their weight in ``base_layer``)."""
    out = {}
    for name, m in getattr(pipe, component).named_modules():
        if isinstance(m, torch.nn.Linear | torch.nn.Conv2d) and "lora_" not in name:
            key = name.removesuffix(".base_layer")
            out[families.live_to_disk(component, key)] = m.weight.detach().clone()
    return out


def assert_same_deltas(a: LoraState, b: LoraState, atol: float = 0.0) -> None:
    assert set(a.modules) == set(b.modules)
    for key in a.modules:
        torch.testing.assert_close(
            a.modules[key].delta(), b.modules[key].delta(), atol=atol, rtol=0 if atol == 0 else 1e-3
        )


def assert_exact(a: LoraState, b: LoraState) -> None:
    assert set(a.modules) == set(b.modules)
    for key, m in a.modules.items():
        n = b.modules[key]
        assert isinstance(m, LoraModule) and isinstance(n, LoraModule)
        assert torch.equal(m.down, n.down) and torch.equal(m.up, n.up), key
        assert m.alpha == n.alpha, key


# --- names ---------------------------------------------------------------------------------------------------


def test_sgm_names_agree_with_diffusers_single_file_converter():
    """Our diffusers→SGM UNet map, fed through diffusers' own LDM converter, gives back every original key."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = families.family_config("sdxl", "unet")
    config.pop("_class_name")
    # The SDXL layout (3 levels, attention from level 1, 1/2/10 transformer layers) at a tiny width.
    config.update(
        block_out_channels=[32, 64, 64], attention_head_dim=[2, 4, 4], cross_attention_dim=16,
        transformer_layers_per_block=[1, 2, 3], addition_time_embed_dim=8, projection_class_embeddings_input_dim=40,
        sample_size=8,
    )  # fmt: skip
    unet = UNet2DConditionModel(**config)
    sd = unet.state_dict()
    sgm = {}
    for key, tensor in sd.items():
        module, _, leaf = key.rpartition(".")
        mapped = families.diffusers_to_sgm(module, unet.config)
        assert mapped is not None, key
        assert families.sgm_to_diffusers(mapped, unet.config) == module
        sgm[f"model.diffusion_model.{mapped}.{leaf}"] = tensor
    back = convert_ldm_unet_checkpoint(sgm, dict(unet.config))
    assert set(back) == set(sd)
    for key in sd:
        assert torch.equal(back[key].reshape(sd[key].shape), sd[key]), key


def test_vocabulary_decoder_rebuilds_every_full_size_path():
    for family, components in families.FAMILIES.items():
        for component in components:
            for path in families.module_paths(family, component):
                assert naming.vocabulary_decode(naming.flatten(path)) == path, (family, path)


def test_detect_family_from_keys():
    unet_key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    assert families.detect_family_from_lora_keys([unet_key], {unet_key: (4, 768)}) == "sd1"
    assert families.detect_family_from_lora_keys([unet_key], {unet_key: (4, 1024)}) == "sd2"
    assert families.detect_family_from_lora_keys(["lora_te2_text_model_x.lora_down.weight"]) == "sdxl"
    assert families.detect_family_from_lora_keys(["lora_unet_input_blocks_4_1_proj_in.alpha"]) == "sdxl"
    assert families.detect_family_from_lora_keys(["lora_unet_conv_in.alpha"]) is None


# --- round trips ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_write_read_exact(tmp_path, pipe, lora, fmt):
    path = tmp_path / f"x.{fmt}.safetensors"
    save_lora(lora, path, format=fmt)
    assert detect_format(path) == fmt
    for model in (pipe, None):
        back = load_lora(path, model=model)
        # diffusers: alpha / r folded into lora_B (diffusers' lora_alpha = r), so the same deltas with alpha = r
        if fmt == "diffusers":
            assert_same_deltas(lora, back, atol=1e-6)
            assert all(m.alpha == m.rank for m in back.modules.values())
        else:
            assert_exact(lora, back)
        assert back.family == "sd1"
    meta = SafetensorsFile(path).metadata
    assert meta["lorax_family"] == "sd1" and meta["lorax_rank"] == "2,4" and meta["lorax_alpha"] == "2,3"
    assert meta["lorax_targets"] == "attention,ff,conv"


def test_kohya_names_and_ss_metadata_kept(tmp_path, lora):
    state = LoraState(
        dict(lora.modules), metadata={"ss_network_dim": "4", "ss_tag_frequency": '{"a": 1}'}, family="sd1"
    )
    path = tmp_path / "k.safetensors"
    save_lora(state, path, format="kohya")
    sf = SafetensorsFile(path)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_down.weight" in sf
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in sf
    assert sf.get("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha").dtype == torch.float32
    assert load_lora(path).metadata["ss_tag_frequency"] == '{"a": 1}'


@pytest.mark.parametrize(("src", "dst"), [("kohya", "diffusers"), ("diffusers", "kohya")])
def test_any_to_any_keeps_deltas(tmp_path, lora, src, dst):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_lora(lora, a, format=src)
    save_lora(load_lora(a), b, format=dst)
    assert_same_deltas(lora, load_lora(b), atol=1e-6)  # alpha / r folded into diffusers factors
    c = tmp_path / "c16.safetensors"
    save_lora(load_lora(a), c, format=dst, dtype=torch.float16)
    assert_same_deltas(lora, load_lora(c), atol=1e-3)


def test_sdxl_kohya_original_naming_round_trip(tmp_path):
    """SDXL: written with kohya's SGM block names, read back through the family table and through the vocabulary."""
    gen = torch.Generator().manual_seed(0)
    state = LoraState(family="sdxl")
    for component, path in [
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q"),
        ("unet", "mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj"),
        ("unet", "up_blocks.1.upsamplers.0.conv"),
        ("unet", "up_blocks.0.resnets.2.conv_shortcut"),
        ("text_encoder", "text_model.encoder.layers.3.self_attn.k_proj"),
        ("text_encoder_2", "text_model.encoder.layers.31.mlp.fc2"),
    ]:
        out, inp, *k = families.module_table("sdxl", component)[path]
        down = torch.randn(2, inp, *k, generator=gen)
        up = torch.randn(out, 2, *([1, 1] if k else []), generator=gen)
        state.modules[f"{component}.{path}"] = LoraModule(down, up, 1.0)
    path = tmp_path / "xl.safetensors"
    save_lora(state, path, format="kohya")
    keys = SafetensorsFile(path).keys()
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj.alpha" in keys
    assert "lora_unet_output_blocks_5_2_conv.lora_down.weight" in keys
    assert "lora_unet_output_blocks_2_0_skip_connection.lora_down.weight" in keys
    assert "lora_te1_text_model_encoder_layers_3_self_attn_k_proj.alpha" in keys
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2.alpha" in keys
    assert_exact(state, load_lora(path))
    assert_exact(state, load_lora(path, family="sdxl"))
    tensors = SafetensorsFile(path).load_all()
    assert_exact(state, kohya.read(tensors, {}))  # no lorax_family: detected from the names


def test_kohya_diffusers_names_for_sdxl_read(tmp_path):
    """SDXL files that use diffusers block names (lora_unet_down_blocks_1_…) read the same."""
    out, inp = families.module_table("sdxl", "unet")[
        "down_blocks.2.attentions.1.transformer_blocks.7.attn2.to_k"
    ]
    tensors = {
        "lora_unet_down_blocks_2_attentions_1_transformer_blocks_7_attn2_to_k.lora_down.weight": torch.randn(
            2, inp
        ),
        "lora_unet_down_blocks_2_attentions_1_transformer_blocks_7_attn2_to_k.lora_up.weight": torch.randn(
            out, 2
        ),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(2, 1280),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(1280, 2),
    }
    state = kohya.read(tensors, {})
    assert state.family == "sdxl"
    assert set(state.modules) == {
        "unet.down_blocks.2.attentions.1.transformer_blocks.7.attn2.to_k",
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj",
    }


def test_kohya_unknown_module_for_model_is_refused(tmp_path, pipe):
    tensors = {
        "lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight": torch.zeros(1, 4),
        "lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 1),
    }
    path = tmp_path / "bad.safetensors"
    save_tensors(tensors, path)
    with pytest.raises(MismatchError, match="down_blocks_9"):
        load_lora(path, model=pipe)


def test_diffusers_unknown_module_for_model_is_refused(tmp_path, pipe):
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    tensors = {f"{key}.lora_A.weight": torch.zeros(1, 4), f"{key}.lora_B.weight": torch.zeros(4, 1)}
    tensors |= {k.replace("down_blocks.0", "down_blocks.7"): v for k, v in tensors.items()}
    path = tmp_path / "other.safetensors"
    save_tensors(tensors, path)
    with pytest.raises(MismatchError, match=r"1 LoRA module.*down_blocks\.7"):
        load_lora(path, model=pipe)
    assert len(load_lora(path).modules) == 2


def test_kohya_mismatched_pair_and_leftovers(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_tensors(
        {
            "lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4),
            "lora_unet_conv_in.lora_up.weight": torch.zeros(4, 3),
        },
        path,
    )
    with pytest.raises(FormatError, match="do not form a low-rank pair"):
        load_lora(path)
    with pytest.raises(FormatError, match="not in kohya naming: stray"):
        kohya.read({"lora_unet_conv_in.lora_down.weight": torch.zeros(1), "stray": torch.zeros(1)}, {})


# --- diffusers generations -----------------------------------------------------------------------------------


def test_diffusers_older_generations_read(tmp_path, lora):
    """``.lora.down/.lora.up`` (with ``.alpha``), ``processor.to_q_lora``, old text-encoder patch names."""
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    m = lora.modules[key]
    te = lora.modules["text_encoder.text_model.encoder.layers.1.self_attn.v_proj"]
    assert isinstance(m, LoraModule) and isinstance(te, LoraModule)
    older = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.down.weight": m.down,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.lora.up.weight": m.up,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.alpha": torch.tensor(m.alpha),
        "text_encoder.encoder.layers.1.self_attn.v_proj.lora_linear_layer.down.weight": te.down,
        "text_encoder.encoder.layers.1.self_attn.v_proj.lora_linear_layer.up.weight": te.up,
    }
    oldest = {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": m.down,
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": m.up,
        "text_encoder.text_model.encoder.layers.1.self_attn.to_v_lora.down.weight": te.down,
        "text_encoder.text_model.encoder.layers.1.self_attn.to_v_lora.up.weight": te.up,
    }
    for name, tensors in [("older", older), ("oldest", oldest)]:
        path = tmp_path / f"{name}.safetensors"
        save_tensors(tensors, path)
        assert detect_format(path) == "diffusers"
        state = load_lora(path)
        assert set(state.modules) == {key, "text_encoder.text_model.encoder.layers.1.self_attn.v_proj"}
        expected_alpha = m.alpha if name == "older" else m.rank
        got = state.modules[key]
        assert isinstance(got, LoraModule) and got.alpha == expected_alpha
        assert torch.equal(got.up, m.up) and torch.equal(got.down, m.down)


def test_raw_peft_adapter_folder(tmp_path, lora):
    module = lora.modules["unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"]
    assert isinstance(module, LoraModule)
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_tensors(
        {
            "base_model.model.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.lora_A.weight": module.down,
            "base_model.model.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v.lora_B.weight": module.up,
        },
        folder / "adapter_model.safetensors",
    )
    (folder / "adapter_config.json").write_text(
        json.dumps({"r": module.rank, "lora_alpha": 7, "peft_type": "LORA"})
    )
    state = load_lora(folder)
    got = state.modules["unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v"]
    assert isinstance(got, LoraModule) and got.alpha == 7.0


# --- the oracle: diffusers' own loader -----------------------------------------------------------------------


def fused(pipe, source, scale: float):
    p = copy.deepcopy(pipe)
    p.load_lora_weights(source)
    p.fuse_lora(lora_scale=scale)
    return {c: live_weights(p, c) for c in ("unet", "text_encoder")}


def expected(pipe, state: LoraState, scale: float, component: str) -> dict[str, torch.Tensor]:
    """``W0 + s · (alpha / r) · up @ down``, computed here by hand from the raw tensors."""
    base = {families.live_to_disk(component, k): v for k, v in weights(getattr(pipe, component)).items()}
    for path, m in state.component_modules(component).items():
        assert isinstance(m, LoraModule)
        prod = m.up.reshape(m.up.shape[0], -1) @ m.down.reshape(m.rank, -1)
        base[path] = base[path] + scale * (m.alpha / m.rank) * prod.reshape(base[path].shape)
    return base


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_diffusers_loader_applies_lorax_files(tmp_path, pipe, lora, fmt):
    if fmt == "kohya":
        # diffusers' kohya converter mis-keys per-module alphas (its alpha_pattern entries match nothing), so the
        # oracle gets one alpha for all modules; ranks stay mixed. Per-module alphas are checked via diffusers format.
        lora = LoraState({k: LoraModule(m.down, m.up, 2.5) for k, m in lora.modules.items()}, family="sd1")  # type: ignore[union-attr]
    path = tmp_path / f"o.{fmt}.safetensors"
    save_lora(lora, path, format=fmt)
    scale = 0.7
    got = fused(pipe, str(path), scale)
    components = ("unet", "text_encoder") if fmt == "diffusers" else ("unet",)
    for component in components:
        want = expected(pipe, lora, scale, component)
        for key, w in want.items():
            torch.testing.assert_close(got[component][key], w, atol=1e-5, rtol=0, msg=f"{component}.{key}")
    if fmt == "kohya":  # diffusers drops kohya text-encoder attention LoRA: check lorax's reading by hand
        raw = SafetensorsFile(path)
        back = load_lora(path, model=pipe)
        for key, _m in lora.component_modules("text_encoder").items():
            stem = "lora_te_" + key.replace(".", "_")
            up, down = raw.get(f"{stem}.lora_up.weight"), raw.get(f"{stem}.lora_down.weight")
            hand = raw.get(f"{stem}.alpha").item() / down.shape[0] * (up @ down)
            torch.testing.assert_close(back.modules[f"text_encoder.{key}"].delta(), hand, atol=1e-6, rtol=0)


def test_pipeline_dict_from_peft_bridge(pipe, lora):
    got = fused(pipe, to_pipeline_state_dict(lora, pipe), 1.0)
    for component in ("unet", "text_encoder"):
        for key, w in expected(pipe, lora, 1.0, component).items():
            torch.testing.assert_close(got[component][key], w, atol=1e-5, rtol=0, msg=key)


def test_diffusers_saved_peft_adapter_reads_with_same_deltas(tmp_path, pipe):
    """A LoRA trained-in-place with PEFT and saved by diffusers' own save_lora_weights reads with PEFT's deltas."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    p = copy.deepcopy(pipe)
    unet_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_v", "proj_in"],
                          rank_pattern={"proj_in": 2}, alpha_pattern={"proj_in": 5})  # fmt: skip
    te_cfg = LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=["q_proj", "out_proj"])
    p.unet.add_adapter(unet_cfg)
    inject_adapter_in_model(te_cfg, p.text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(p.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(p.text_encoder),
        unet_lora_adapter_metadata=unet_cfg.to_dict(), text_encoder_lora_adapter_metadata=te_cfg.to_dict(),
    )  # fmt: skip
    state = load_lora(tmp_path / "pytorch_lora_weights.safetensors")
    peft_deltas = {}
    for component in ("unet", "text_encoder"):
        for name, module in getattr(p, component).named_modules():
            if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                peft_deltas[f"{component}.{families.live_to_disk(component, name)}"] = (
                    module.get_delta_weight("default")
                )
    assert set(state.modules) == set(peft_deltas) and peft_deltas
    for key, delta in peft_deltas.items():
        torch.testing.assert_close(state.modules[key].delta(), delta.float(), atol=1e-6, rtol=0, msg=key)
    # and back through the bridge: lora_state_from_peft on the live adapters gives the same deltas
    bridged = lora_state_from_peft(
        {
            "unet": get_peft_model_state_dict(p.unet),
            "text_encoder": get_peft_model_state_dict(p.text_encoder),
        },
        {"unet": unet_cfg, "text_encoder": te_cfg},
    )
    assert_same_deltas(state, bridged, atol=1e-7)
    peft_names = to_peft_state_dict(bridged, "text_encoder", model=p.text_encoder, fold_alpha=False)
    assert set(peft_names) == {k.replace(".default", "") for k in get_peft_model_state_dict(p.text_encoder)}


def test_dora_from_diffusers_and_back_through_diffusers(tmp_path, pipe):
    """A PEFT DoRA adapter saved by diffusers reads as DoRA modules whose apply(W0) is PEFT's merged weight; lorax's
    diffusers-format DoRA file loads in diffusers and fuses to the same weights."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    p = copy.deepcopy(pipe)
    base = live_weights(pipe, "unet")
    cfg = LoraConfig(
        r=2, lora_alpha=3, init_lora_weights=False, target_modules=["to_q", "to_v"], use_dora=True
    )
    p.unet.add_adapter(cfg)
    with torch.no_grad():
        for name, param in p.unet.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1.5)  # a magnitude that is not just the base norm
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(p.unet), unet_lora_adapter_metadata=cfg.to_dict()
    )
    state = load_lora(tmp_path / "pytorch_lora_weights.safetensors")
    for module in p.unet.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge(adapter_names=["default"])
    merged = live_weights(p, "unet")
    assert state.modules and all(type(m).__name__ == "DoraModule" for m in state.modules.values())
    for key, module in state.component_modules("unet").items():
        torch.testing.assert_close(module.apply(base[key]), merged[key], atol=1e-5, rtol=0, msg=key)
    out = tmp_path / "dora.diffusers.safetensors"
    save_lora(state, out, format="diffusers")
    fused_weights = fused(pipe, str(out), 1.0)["unet"]
    for key, module in state.component_modules("unet").items():
        torch.testing.assert_close(fused_weights[key], module.apply(base[key]), atol=1e-5, rtol=0, msg=key)
