"""diffusers ⇄ single-file key tables: bit-identical round trips on tiny SD1/SD2 models, diffusers' own single-file
converters as the oracle for the forward direction, and the full-size layouts mapped key for key."""

from __future__ import annotations

import pytest
import torch
from checkpoint_helpers import scratch, tiny_folder, tiny_pipe, tiny_single
from safetensors.torch import load_file

from lorax.io.checkpoint import open_checkpoint
from lorax.io.keymaps import (
    Layouts,
    TextLayout,
    UnetLayout,
    VaeLayout,
    keymap_from_diffusers,
    keymap_from_single,
)
from lorax.io.model_layout import write_diffusers_folder, write_single_file


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_matches_diffusers_converters(family: str) -> None:
    """The single file lorax writes converts back, by diffusers' own converters, to the pipeline's exact weights."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    pipe = tiny_pipe(family)
    sd = load_file(tiny_single(family))
    prefix = "cond_stage_model.model." if family == "sd2" else "cond_stage_model.transformer.text_model."
    assert any(k.startswith(prefix) for k in sd)
    if family == "sd2":
        assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in sd
        text = convert_open_clip_checkpoint(pipe.text_encoder, sd)
    else:
        text = convert_ldm_clip_checkpoint(sd)
    converted = {
        "unet": convert_ldm_unet_checkpoint(sd, dict(pipe.unet.config)),
        "vae": convert_ldm_vae_checkpoint(sd, dict(pipe.vae.config)),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in text.items()},
    }
    for component, tensors in converted.items():
        want = getattr(pipe, component).state_dict()
        assert set(tensors) == set(want), component
        for k, v in want.items():
            assert torch.equal(tensors[k], v), f"{component}.{k}"


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize("dtype", [None, "fp16"])
def test_single_to_diffusers_to_single_is_bit_identical(family: str, dtype: str | None) -> None:
    from diffusers import StableDiffusionPipeline

    single = tiny_single(family, dtype)
    d = scratch("roundtrip")
    ckpt = open_checkpoint(single)
    assert ckpt.kind == "single-file" and ckpt.family == family
    (d / "folder").mkdir()
    write_diffusers_folder(ckpt, d / "folder")  # type: ignore[arg-type]
    back = d / "back.safetensors"
    write_single_file(open_checkpoint(d / "folder"), back)  # type: ignore[arg-type]
    a, b = load_file(single), load_file(back)
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    pipe = StableDiffusionPipeline.from_pretrained(d / "folder")
    for component in ("unet", "vae", "text_encoder"):
        want = getattr(tiny_pipe(family), component).state_dict()
        got = getattr(pipe, component).state_dict()
        for k, v in want.items():
            stored = v.to(torch.float16) if dtype == "fp16" else v
            assert torch.equal(got[k], stored.to(got[k].dtype)), f"{component}.{k}"


def test_single_file_views_agree_with_the_folder() -> None:
    folder, single = open_checkpoint(tiny_folder("sd2")), open_checkpoint(tiny_single("sd2"))
    assert sorted(folder.components()) == sorted(single.components())
    for component in ("unet", "vae", "text_encoder"):
        keys = folder.component_keys(component)
        assert sorted(keys) == sorted(single.component_keys(component))
        for key in keys[:: max(1, len(keys) // 25)] + [
            "text_model.encoder.layers.1.self_attn.v_proj.weight"
        ] * (component == "text_encoder"):
            assert torch.equal(folder.tensor(component, key), single.tensor(component, key)), key


def _meta_state(component: str, config: dict) -> dict[str, torch.Tensor]:
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    config = {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}
    with torch.device("meta"):
        if component == "unet":
            model = UNet2DConditionModel(**config)
        elif component == "vae":
            model = AutoencoderKL(**config)
        else:
            model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config))
    return model.state_dict()


SD_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "latent_channels": 4,
    "layers_per_block": 2,
}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_size_layouts_map_like_diffusers(family: str) -> None:
    """Full-size UNet (and SD VAE) keys: lorax's tables and diffusers' converter agree on every key."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from lorax.models.families import family_config

    unet_config = family_config(family, "unet")
    unet = _meta_state("unet", unet_config)
    vae = _meta_state("vae", SD_VAE)
    layouts = Layouts(UnetLayout.from_config(unet_config), VaeLayout.from_config(SD_VAE))
    keymap = keymap_from_diffusers({"unet": list(unet), "vae": list(vae)}, family, layouts)
    single = {e.single: (unet if e.component == "unet" else vae)[e.parts[0]] for e in keymap.entries}
    single = {k: (v.reshape(*v.shape, 1, 1) if k.startswith("first_stage_model.") and v.dim() == 2 else v)
              for k, v in single.items()}  # fmt: skip
    back = convert_ldm_unet_checkpoint(single, unet_config)
    assert set(back) == set(unet)
    assert all(back[k].shape == unet[k].shape for k in unet)
    back_vae = convert_ldm_vae_checkpoint(single, SD_VAE)
    assert set(back_vae) == set(vae)
    # and lorax reads the original names back, inferring the layout from the keys alone
    again = keymap_from_single(list(single), family)
    assert {(e.component, e.parts) for e in again.entries} == {(e.component, e.parts) for e in keymap.entries}
    assert UnetLayout.from_single_keys(
        [k.removeprefix("model.diffusion_model.") for k in single if k.startswith("model.")]
    ) == UnetLayout.from_config(unet_config)


def test_full_size_openclip_text_encoder_fuses_qkv() -> None:
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    from lorax.models.families import family_config

    config = family_config("sd2", "text_encoder")
    state = {"text_model." + k if not k.startswith("text_model.") else k: v
             for k, v in _meta_state("text_encoder", config).items()}  # fmt: skip
    keymap = keymap_from_diffusers(
        {"text_encoder": list(state)}, "sd2", Layouts(text={"text_encoder": TextLayout.from_config(config)})
    )
    fused = [e for e in keymap.entries if len(e.parts) == 3]
    assert len(fused) == 2 * config["num_hidden_layers"]
    single = {}
    for e in keymap.entries:
        parts = [torch.empty(state[p].shape, device="meta") for p in e.parts]
        single[e.single] = torch.cat(parts) if len(parts) > 1 else parts[0]

    class _Cfg:
        hidden_size = config["hidden_size"]

    class _Model:
        config = _Cfg()

    back = convert_open_clip_checkpoint(_Model(), single)
    assert set(back) == {k for k in state if not k.endswith("position_ids")}


def test_family_detection_and_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lorax.errors import FormatError, InputError, ModelNotFoundError
    from lorax.io.checkpoint import family_from_single_keys, open_checkpoint
    from lorax.io.safetensors_io import save_tensors

    assert open_checkpoint(tiny_folder("sd1")).family == "sd1"
    assert open_checkpoint(tiny_folder("sd2")).family == "sd2"
    assert family_from_single_keys(["conditioner.embedders.1.model.ln_final.weight"]) == "sdxl"
    probe = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    assert family_from_single_keys([probe], lambda k: (320, 1024)) == "sd2"
    odd = tmp_path / "odd.safetensors"
    save_tensors({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, odd)
    with pytest.raises(FormatError, match=r"odd\.safetensors: not a Stable Diffusion checkpoint"):
        open_checkpoint(odd)
    with pytest.raises(InputError, match=r"no model_index\.json"):
        open_checkpoint(tmp_path)
    with pytest.raises(ModelNotFoundError, match=r"offline.*pass a local path"):
        open_checkpoint("someone/some-model")
    with pytest.raises(InputError, match=r"no such file"):
        open_checkpoint(tmp_path / "missing.safetensors")


def test_builtin_names_resolve_through_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    from lorax.io import checkpoint
    from lorax.io import model_paths as registry  # the built-in names (lorax.models.registry re-exports them)

    monkeypatch.setattr(
        registry, "resolve_builtin", lambda name: tiny_folder("sd1") if name == "tiny" else None
    )
    assert checkpoint.resolve_model("tiny") == tiny_folder("sd1")
    assert open_checkpoint("tiny").family == "sd1"


def test_pickle_checkpoint_reads_safely(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lorax.errors import UnsafeFileError

    ckpt = tmp_path / "model.ckpt"
    sd = load_file(tiny_single("sd1"))
    torch.save({"state_dict": sd, "global_step": 3}, ckpt)
    opened = open_checkpoint(ckpt)
    assert opened.family == "sd1" and set(opened.keys()) == set(sd)

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("ran",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Evil()}}, evil)
    with pytest.raises(UnsafeFileError, match="refused"):
        open_checkpoint(evil)


def test_unmappable_diffusers_keys_are_listed() -> None:
    from lorax.errors import FormatError

    layouts = Layouts(UnetLayout((True, False), (False, True), 2))
    with pytest.raises(FormatError, match=r"1 diffusers tensors have no place.*unet\.mystery\.weight"):
        keymap_from_diffusers({"unet": ["conv_in.weight", "mystery.weight"]}, "sd1", layouts)
