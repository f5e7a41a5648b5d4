"""SDXL model checkpoints on the tiny SDXL pipeline: single file (``conditioner.embedders.0.transformer.*``,
``conditioner.embedders.1.model.*`` with fused ``in_proj``) ⇄ diffusers, checked by diffusers' own single-file
converters and bit-identical round trips; merge / convert / extract / mix on SDXL; inspect tells the families apart."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_helpers import save, scratch, tiny_folder, tiny_pipe, tiny_single
from safetensors.torch import load_file, save_file
from test_sdxl import hand_merged, sdxl_lora

from lorax.formats import load_lora, save_embeddings
from lorax.io.checkpoint import open_checkpoint
from lorax.io.model_layout import write_diffusers_folder, write_single_file
from lorax.io.safetensors_io import SafetensorsFile
from lorax.services.extract import ExtractConfig, extract
from lorax.services.inspect import inspect_path
from lorax.services.merge import MergeConfig, merge
from lorax.services.mix import MixConfig, mix

TE1 = "conditioner.embedders.0.transformer."
TE2 = "conditioner.embedders.1.model."


def diffusers_view(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """An SDXL single file seen through diffusers' own converters (independent of lorax's key tables)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    pipe = tiny_pipe("sdxl")
    te1 = convert_ldm_clip_checkpoint(sd, remove_prefix=TE1)
    te2 = convert_open_clip_checkpoint(pipe.text_encoder_2, sd, prefix=TE2)
    return {
        "unet": convert_ldm_unet_checkpoint(sd, dict(pipe.unet.config)),
        "vae": convert_ldm_vae_checkpoint(sd, dict(pipe.vae.config)),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in te1.items()},
        "text_encoder_2": te2,
    }


def test_single_file_matches_diffusers_converters() -> None:
    pipe = tiny_pipe("sdxl")
    sd = load_file(tiny_single("sdxl"))
    assert f"{TE2}transformer.resblocks.0.attn.in_proj_weight" in sd
    assert sd[f"{TE2}transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 64, 64)
    assert f"{TE2}text_projection" in sd and "model.diffusion_model.label_emb.0.0.weight" in sd
    assert any(k.startswith(TE1 + "text_model.encoder.layers.1.") for k in sd)
    for component, tensors in diffusers_view(sd).items():
        want = getattr(pipe, component).state_dict()
        want = {k: v for k, v in want.items() if not k.endswith("position_ids")}
        got = {k: v for k, v in tensors.items() if not k.endswith("position_ids")}
        assert set(got) == set(want), component
        for k, v in want.items():
            assert torch.equal(got[k], v), f"{component}.{k}"


@pytest.mark.parametrize("dtype", [None, "fp16"])
def test_single_to_diffusers_to_single_is_bit_identical(dtype: str | None) -> None:
    from diffusers import StableDiffusionXLPipeline

    single = tiny_single("sdxl", dtype)
    d = scratch("sdxl-roundtrip")
    ckpt = open_checkpoint(single)
    assert ckpt.kind == "single-file" and ckpt.family == "sdxl"
    (d / "folder").mkdir()
    write_diffusers_folder(ckpt, d / "folder")  # type: ignore[arg-type]
    back = d / "back.safetensors"
    write_single_file(open_checkpoint(d / "folder"), back)  # type: ignore[arg-type]
    a, b = load_file(single), load_file(back)
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    pipe = StableDiffusionXLPipeline.from_pretrained(d / "folder")
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want = getattr(tiny_pipe("sdxl"), component).state_dict()
        got = getattr(pipe, component).state_dict()
        for k, v in want.items():
            stored = v.to(torch.float16) if dtype == "fp16" else v
            assert torch.equal(got[k], stored.to(got[k].dtype)), f"{component}.{k}"


def test_folder_views_agree_with_the_single_file() -> None:
    folder, single = open_checkpoint(tiny_folder("sdxl")), open_checkpoint(tiny_single("sdxl"))
    assert sorted(folder.components()) == sorted(single.components())
    for component in ("unet", "text_encoder", "text_encoder_2"):
        keys = folder.component_keys(component)
        assert sorted(keys) == sorted(single.component_keys(component))
        for key in keys:
            assert torch.equal(folder.tensor(component, key), single.tensor(component, key)), key


def test_single_file_merge_matches_hand_and_folder_merge() -> None:
    d = scratch("sdxl-merge")
    state = sdxl_lora(seed=11, conv=True)
    lora = save(state, d / "l.safetensors")
    out = d / "merged.safetensors"
    result = merge(MergeConfig(str(tiny_single("sdxl")), [str(lora)], out, alpha=0.9, alpha_text=0.5))
    assert result.modules_merged == len(state.modules) and not result.unmatched
    got = diffusers_view(load_file(out))
    want = hand_merged(state, 0.9, 0.5)
    for component in ("unet", "text_encoder", "text_encoder_2"):
        for key, w in want[component].items():
            torch.testing.assert_close(got[component][key], w, atol=1e-5, rtol=1e-5, msg=f"{component}.{key}")
    base, merged = SafetensorsFile(tiny_single("sdxl")), SafetensorsFile(out)
    changed = {k for k in base.header.tensors if base.raw(k) != merged.raw(k)}
    assert len(changed) == result.tensors_merged
    assert any(k.startswith(TE2) and "in_proj_weight" in k for k in changed)  # fused q;k;v rebuilt
    # the same merge on the folder, converted to a single file, is byte-identical
    merge(MergeConfig(str(tiny_folder("sdxl")), [str(lora)], d / "f2s.safetensors", alpha=0.9, alpha_text=0.5,
                      to="single-file"))  # fmt: skip
    a, b = load_file(out), load_file(d / "f2s.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_convert_both_layouts_through_the_cli(cli) -> None:  # type: ignore[no-untyped-def]
    d = scratch("sdxl-convert")
    r = cli("convert", tiny_folder("sdxl"), "-o", d / "one.safetensors", "--json")
    assert r.exit_code == 0, r.stderr
    r = cli("convert", d / "one.safetensors", "-o", d / "folder", "--json")
    assert r.exit_code == 0, r.stderr
    for component, stem in (("unet", "diffusion_pytorch_model"), ("text_encoder_2", "model")):
        a = load_file(tiny_folder("sdxl") / component / f"{stem}.safetensors")
        b = load_file(d / "folder" / component / f"{stem}.safetensors")
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), component
    assert (
        json.loads((d / "folder" / "model_index.json").read_text())["_class_name"]
        == "StableDiffusionXLPipeline"
    )


def test_extract_recovers_an_sdxl_lora_and_mix_adds_deltas() -> None:
    d = scratch("sdxl-extract")
    state = sdxl_lora(seed=12, rank=4, alpha=4.0)
    lora = save(state, d / "l.safetensors")
    tuned = d / "tuned.safetensors"
    merge(MergeConfig(str(tiny_single("sdxl")), [str(lora)], tuned))
    result = extract(ExtractConfig(str(tiny_single("sdxl")), str(tuned), d / "x.safetensors", rank=4,
                                   targets="all"))  # fmt: skip
    assert result.family == "sdxl"
    got = load_lora(d / "x.safetensors")
    assert got.family == "sdxl" and set(got.modules) == set(state.modules)
    assert {n.split(".")[0] for n in got.modules} == {"unet", "text_encoder", "text_encoder_2"}
    for name, m in state.modules.items():
        want = m.delta()
        assert float((got.modules[name].delta() - want).norm() / want.norm()) <= 1e-4, name
    other = sdxl_lora(seed=13, rank=2)
    pb = save(other, d / "b.safetensors", "diffusers")
    mixed = mix(MixConfig([f"{lora}:0.5", f"{pb}:2"], d / "m.safetensors"))
    assert mixed.exact
    m = load_lora(d / "m.safetensors")
    assert m.family == "sdxl"
    for name, module in m.modules.items():
        want = 0.5 * state.modules[name].delta() + 2 * other.modules[name].delta()
        torch.testing.assert_close(module.delta(), want, atol=1e-6, rtol=1e-5)


def _bare(path, tensors):  # type: ignore[no-untyped-def]
    save_file(tensors, path)  # no metadata: the family must come from the keys and shapes
    return path


def test_inspect_tells_sd1_sd2_sdxl_apart() -> None:
    d = scratch("sdxl-inspect")
    # LoRAs, without any header metadata: cross-attention input width (768 / 1024 / 2048) or SDXL naming
    loras = {}
    for family, width in (("sd1", 768), ("sd2", 1024), ("sdxl", 2048)):
        stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
        loras[family] = _bare(d / f"{family}.safetensors", {f"{stem}.lora_down.weight": torch.zeros(1, width),
                                                            f"{stem}.lora_up.weight": torch.zeros(640, 1)})  # fmt: skip
    sgm = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    loras["sdxl-kohya"] = _bare(d / "k.safetensors", {f"{sgm}.lora_down.weight": torch.zeros(1, 640),
                                                      f"{sgm}.lora_up.weight": torch.zeros(640, 1),
                                                      f"{sgm}.alpha": torch.tensor(1.0)})  # fmt: skip
    loras["sdxl-te"] = _bare(d / "te.safetensors", {
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(1, 1280),
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1280, 1)})  # fmt: skip
    for name, path in loras.items():
        report = inspect_path(path)
        assert report.kind == "lora" and report.family == name.split("-")[0], name
    # embeddings: A1111 768 (sd1) / 1024 (sd2); SDXL clip_l + clip_g
    for family, width in (("sd1", 768), ("sd2", 1024)):
        p = save_embeddings({"<t>": {"text_encoder": torch.zeros(2, width)}}, d / f"e-{family}.pt")
        report = inspect_path(p)
        assert report.kind == "embedding" and report.family == family
    p = _bare(d / "e-sdxl.safetensors", {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)})
    report = inspect_path(p)
    assert report.kind == "embedding" and report.family == "sdxl" and report.format == "sdxl-embedding"
    # checkpoints: the tiny SDXL folder, its single file with the lorax metadata stripped, a UNet-only SDXL file
    assert inspect_path(tiny_folder("sdxl")).family == "sdxl"
    stripped = _bare(d / "xl.safetensors", load_file(tiny_single("sdxl")))
    report = inspect_path(stripped)
    assert report.kind == "model" and report.family == "sdxl"
    assert report.components == ["unet", "vae", "text_encoder", "text_encoder_2"]
    assert (
        inspect_path(tiny_single("sd2")).family == "sd2" and inspect_path(tiny_single("sd1")).family == "sd1"
    )
    probe = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    unet_only = _bare(d / "u.safetensors", {probe: torch.zeros(320, 2048),
                                            "model.diffusion_model.out.2.weight": torch.zeros(1)})  # fmt: skip
    assert inspect_path(unet_only).family == "sdxl"
