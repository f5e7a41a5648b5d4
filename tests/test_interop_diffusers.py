"""Files lorax writes, loaded by their consumer's own loader: diffusers' ``load_lora_weights`` + ``fuse_lora`` on tiny
pipelines built from config. The fused weights must equal ``lorax merge`` of the same file (relative error ≤ 1e-5)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import save, scratch, tiny_folder, tiny_lora
from safetensors import safe_open
from safetensors.torch import load_file

from lorax.adapters.lycoris import DoraModule
from lorax.adapters.state import LoraModule, LoraState
from lorax.services.merge import MergeConfig, merge

COMPONENTS = {
    "sd1": ("unet", "text_encoder"),
    "sd2": ("unet", "text_encoder"),
    "sdxl": ("unet", "text_encoder", "text_encoder_2"),
}


def a_lora(family: str, alpha: float = 2.0, content: str = "lora") -> LoraState:
    """rank 4, alpha ≠ rank, so a consumer that drops alpha / r applies the wrong strength. ``content``: ``lora``
    (UNet attention and feed-forward, text-encoder attention and MLP), ``locon`` (the same and a 3×3 UNet conv) or
    ``text`` (the text encoders' modules only)."""
    if family == "sdxl":
        from test_sdxl import sdxl_lora

        state = sdxl_lora(seed=5, rank=4, alpha=alpha, conv=content == "locon")
    else:
        state = tiny_lora(family, seed=5, alpha=alpha, conv=content == "locon")
    if content == "text":
        state.modules = {k: m for k, m in state.modules.items() if not k.startswith("unet.")}
    return state


def weights(pipe, family: str) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    out = {}
    for component in COMPONENTS[family]:
        for name, value in getattr(pipe, component).state_dict().items():
            if "lora_" not in name:
                out[f"{component}.{name.replace('.base_layer.', '.')}"] = value.detach().clone()
    return out


@cache
def base_weights(family: str) -> dict[str, torch.Tensor]:
    from diffusers import DiffusionPipeline

    return weights(DiffusionPipeline.from_pretrained(tiny_folder(family)), family)


def diffusers_fused(family: str, lora: Path, scale: float = 1.0) -> dict[str, torch.Tensor]:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_folder(family))
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=scale, components=list(COMPONENTS[family]))
    pipe.unload_lora_weights()
    return weights(pipe, family)


def lorax_merged(family: str, lora: Path, out: Path, scale: float = 1.0) -> dict[str, torch.Tensor]:
    from diffusers import DiffusionPipeline

    merge(MergeConfig(str(tiny_folder(family)), [str(lora)], out, alpha=scale, alpha_text=scale))
    return weights(DiffusionPipeline.from_pretrained(out), family)


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], family: str) -> None:
    assert set(got) == set(want)
    changed = 0
    base = base_weights(family)
    for key, w in want.items():
        err = float((got[key].float() - w.float()).norm() / w.float().norm().clamp_min(1e-12))
        assert err <= 1e-5, (key, err)
        changed += not torch.equal(w, base[key])
    assert changed > 0  # the LoRA did something


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize(
    ("route", "content"),
    [
        ("kohya", "lora"),
        ("diffusers", "lora"),
        ("diffusers-to-kohya", "lora"),
        ("kohya", "locon"),
        ("diffusers", "locon"),
        ("kohya", "text"),
        ("diffusers", "text"),
    ],
)
def test_diffusers_loads_every_lora_layout_lorax_writes(cli, family: str, route: str, content: str) -> None:
    """LoRA, LoCon (a 3×3 conv) and text-encoder-only LoRAs, kohya and diffusers/PEFT, and a kohya file converted from
    a diffusers one."""
    d = scratch(f"interop-{family}-{route}-{content}")
    state = a_lora(family, content=content)
    if content == "locon":
        assert any(m.down.dim() == 4 for m in state.modules.values())
    if content == "text":
        assert state.modules and all(k.startswith("text_encoder") for k in state.modules)
    if route == "diffusers-to-kohya":  # issue 12.1: the diffusers header must not follow the LoRA into kohya
        source = save(state, d / "source.safetensors", fmt="diffusers")
        lora = d / "converted.safetensors"
        result = cli("convert", source, "--to", "kohya", "-o", lora)
        assert result.exit_code == 0, result.stderr
        with safe_open(str(lora), "pt") as f:
            assert "lora_adapter_metadata" not in (f.metadata() or {})
    else:
        lora = save(state, d / "lora.safetensors", fmt=route)
    assert_same_weights(diffusers_fused(family, lora), lorax_merged(family, lora, d / "merged"), family)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_diffusers_file_carries_its_strength_in_its_tensors(family: str) -> None:
    """A consumer that reads no header (ComfyUI) applies ``lora_B @ lora_A``: that must be (alpha / r) · B · A."""
    d = scratch(f"interop-strength-{family}")
    state = a_lora(family, alpha=1.0)
    path = save(state, d / "lora.safetensors", fmt="diffusers")
    tensors = load_file(path)
    for name, m in state.modules.items():
        assert isinstance(m, LoraModule)
        want = (1.0 / 4) * (m.up.reshape(m.up.shape[0], -1) @ m.down.reshape(4, -1))
        got = tensors[f"{name}.lora_B.weight"].reshape(want.shape[0], -1) @ tensors[
            f"{name}.lora_A.weight"
        ].reshape(4, -1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_header_less_consumer_applies_the_delta_lorax_merge_does(family: str) -> None:
    """issue 12.7, against merge: ``lora_B @ lora_A`` of the file's tensors alone (no header read, as ComfyUI) equals
    ``lorax merge``'s change of each targeted weight, for a LoRA written with alpha ≠ rank."""
    d = scratch(f"interop-headerless-{family}")
    path = save(a_lora(family, alpha=1.0), d / "lora.safetensors", fmt="diffusers")
    tensors = load_file(path)
    merged, base = lorax_merged(family, path, d / "merged"), base_weights(family)
    checked = 0
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight")
        a, b = tensors[key].float(), tensors[f"{name}.lora_B.weight"].float()
        weight = f"{name}.weight".replace(".text_model.", ".")  # this transformers drops text_model. here
        weight = weight if weight in merged else f"{name}.weight"
        delta = merged[weight].float() - base[weight].float()
        got = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(delta.shape)
        err = float((got - delta).norm() / delta.norm())
        assert err <= 1e-5, (name, err)
        checked += 1
    assert checked >= 2


DORA_MODULES = {
    "sd1": (
        "unet.down_blocks.0.resnets.1.conv2",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    ),
    "sdxl": (
        "unet.down_blocks.0.resnets.1.conv2",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    ),
}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("route", ["write", "convert"])
def test_dora_with_conv_modules_loads_in_diffusers(cli, family: str, route: str) -> None:
    """issue 12.2: PEFT's Conv2d DoRA magnitude is ``[1, out, 1, 1]``; Linear's is ``[out]``. Written directly, and
    converted from a kohya (LyCORIS ``dora_scale``) file with ``convert --to diffusers``."""
    gen = torch.Generator().manual_seed(11)
    base = base_weights(family)
    modules: dict[str, DoraModule] = {}
    for name in DORA_MODULES[family]:
        # UNet only: diffusers 0.3x's text-encoder loader does not take DoRA magnitudes in
        w0 = base[f"{name}.weight"]
        out = w0.shape[0]
        down = torch.randn((4, *w0.shape[1:]), generator=gen) * 0.1
        up = torch.randn((out, 4, *([1, 1] if w0.dim() == 4 else [])), generator=gen) * 0.1
        magnitude = w0.reshape(out, -1).norm(dim=1) * (1 + 0.2 * torch.rand(out, generator=gen))
        modules[name] = DoraModule(down, up, 2.0, magnitude, wd_on_out=True)
    state = LoraState(dict(modules), family=family)  # type: ignore[arg-type]
    d = scratch(f"interop-dora-{family}-{route}")
    path = d / "dora.safetensors"
    if route == "write":
        save(state, path, fmt="diffusers")
    else:
        source = save(state, d / "kohya.safetensors")
        result = cli("convert", source, "--to", "diffusers", "-o", path)
        assert result.exit_code == 0, result.stderr
    tensors = load_file(path)
    conv, linear = DORA_MODULES[family]
    assert tensors[f"{conv}.lora_magnitude_vector"].shape == (1, 32, 1, 1)
    assert tensors[f"{linear}.lora_magnitude_vector"].dim() == 1
    assert_same_weights(diffusers_fused(family, path), lorax_merged(family, path, d / "merged"), family)


def test_a_diffusers_refusal_names_the_option_that_exists(cli) -> None:
    """issue 12.8: a LoHa has no diffusers form; the hint names ``--to kohya`` (convert's option), not ``--format``."""
    from lorax.adapters.lycoris import LohaModule

    gen = torch.Generator().manual_seed(2)
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=gen) for s in [(32, 2), (2, 32), (32, 2), (2, 32)])
    loha = LohaModule(w1a, w1b, w2a, w2b, alpha=2.0)
    d = scratch("interop-refusal")
    src = save(LoraState({name: loha}, family="sd1"), d / "loha.safetensors")  # type: ignore[dict-item]
    result = cli("convert", src, "--to", "diffusers", "-o", d / "out.safetensors")
    assert result.exit_code != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "--to kohya" in result.stderr, result.stderr
    assert not (d / "out.safetensors").exists()
