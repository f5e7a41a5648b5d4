"""lorax convert: model layouts both ways, .ckpt → .safetensors, LoRA formats with SVD resize, embeddings."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_helpers import save, scratch, tiny_folder, tiny_lora, tiny_pipe, tiny_single
from safetensors.torch import load_file

from lorax.errors import ConfigError
from lorax.services.convert import ConvertConfig, convert


def test_model_layouts_both_ways_through_the_cli(cli) -> None:  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionPipeline

    d = scratch("convert")
    single = d / "model.safetensors"
    result = cli("convert", tiny_folder("sd2"), "-o", single, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["kind"] == "model" and doc["output_format"] == "single-file" and doc["family"] == "sd2"
    back = cli("convert", single, "-o", d / "folder", "--dtype", "fp16")
    assert back.exit_code == 0, back.stderr
    unet_file = load_file(d / "folder" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in unet_file.values()} == {torch.float16}
    pipe = StableDiffusionPipeline.from_pretrained(d / "folder")
    want = tiny_pipe("sd2").text_encoder.state_dict()
    got = pipe.text_encoder.state_dict()
    for k in want:
        assert torch.equal(got[k], want[k].half()), k
    again = cli("convert", single, "-o", d / "folder")
    assert again.exit_code == 1 and "--force" in again.stderr


def test_ckpt_to_safetensors_keeps_every_tensor() -> None:
    d = scratch("ckpt")
    sd = load_file(tiny_single("sd1"))
    sd["model_ema.decay"] = torch.tensor(0.999)
    torch.save({"state_dict": sd}, d / "m.ckpt")
    result = convert(ConvertConfig(str(d / "m.ckpt"), d / "m.safetensors"))
    assert result.kind == "model" and result.tensors == len(sd)
    out = load_file(d / "m.safetensors")
    assert set(out) == set(sd) and all(torch.equal(out[k], sd[k]) for k in sd)


def test_single_file_without_configs_needs_config_from() -> None:
    from lorax.errors import ModelNotFoundError
    from lorax.io.safetensors_io import save_tensors

    d = scratch("foreign")
    foreign = d / "foreign.safetensors"
    save_tensors(load_file(tiny_single("sd1")), foreign)  # no lorax metadata: like a file from elsewhere
    with pytest.raises(ModelNotFoundError, match="--config-from"):
        convert(ConvertConfig(str(foreign), d / "out"))
    convert(ConvertConfig(str(foreign), d / "out", config_from=str(tiny_folder("sd1"))))
    unet = load_file(d / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    want = tiny_pipe("sd1").unet.state_dict()
    assert all(torch.equal(unet[k], want[k]) for k in want)


def test_lora_format_conversion_and_svd_resize() -> None:
    from lorax.formats import detect_format, load_lora

    d = scratch("lora")
    state = tiny_lora("sd1", seed=11, rank=8)
    src = save(state, d / "k.safetensors")
    convert(ConvertConfig(str(src), d / "d.safetensors", to="diffusers"))
    assert detect_format(d / "d.safetensors") == "diffusers"
    back = load_lora(d / "d.safetensors")
    for name, m in state.modules.items():
        torch.testing.assert_close(back.modules[name].delta(), m.delta(), atol=1e-6, rtol=1e-5)
    errors = []
    for rank in (1, 2, 4, 8):
        out = d / f"r{rank}.safetensors"
        result = convert(ConvertConfig(str(src), out, rank=rank))
        resized = load_lora(out)
        assert resized.ranks() == [rank]
        err = sum(
            float((resized.modules[n].delta() - m.delta()).norm() ** 2) for n, m in state.modules.items()
        )
        total = sum(float(m.delta().norm() ** 2) for m in state.modules.values())
        errors.append((err / total) ** 0.5)
        worst = result.worst
        assert worst is not None and 0 < worst.energy <= 1
        # the reported error is the real one: ‖ΔW − ΔW_r‖ / ‖ΔW‖ of the worst module
        w = state.modules[worst.module].delta()
        real = float((resized.modules[worst.module].delta() - w).norm() / w.norm())
        assert abs(real - worst.error) < 1e-4
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-5  # full rank: exact
    with pytest.raises(ConfigError, match="--rank"):
        convert(ConvertConfig(str(src), d / "x.safetensors", rank=0))


def test_embeddings_between_a1111_and_diffusers() -> None:
    from lorax.formats import detect_format, load_embeddings, save_embeddings

    d = scratch("emb")
    vec = torch.randn(1, 32)
    save_embeddings({"<cat>": {"text_encoder": vec}}, d / "cat.pt", format="a1111-embedding")
    result = convert(ConvertConfig(str(d / "cat.pt"), d / "learned_embeds.safetensors", to="diffusers"))
    assert result.kind == "embedding" and result.tokens == ["<cat>"]
    assert detect_format(d / "learned_embeds.safetensors") == "diffusers-embedding"
    (emb,) = load_embeddings(d / "learned_embeds.safetensors").values()
    torch.testing.assert_close(emb["text_encoder"].reshape(1, 32), vec)
