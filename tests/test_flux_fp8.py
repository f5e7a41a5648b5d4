"""``lorax merge`` into fp8 Flux files (issue 16): plain ``F8_E4M3`` and ComfyUI's "scaled fp8" (``scale_weight``).

The reference is the published rule: dequantise (``W = W8 · scale``, scale 1 for plain fp8), add the LoRA's delta in
fp32, requantise with the file's own scale (``W8' = W' / scale`` cast to fp8, as ComfyUI's ``comfy/ops.py`` does for a
patched scaled-fp8 weight, round to nearest here). The merged weights are within fp8 rounding of that, computed by
hand from the file and the LoRA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_flux_lora import H, _pair, kohya_file
from test_flux_merge import bfl, folder, pipe  # noqa: F401  (the tiny model's fixtures)

FP8 = torch.float8_e4m3fn
MODULES = {"double_blocks.0.img_attn.qkv": (3 * H, H), "single_blocks.1.linear1": (7 * H, H),
           "final_layer.adaLN_modulation.1": (2 * H, H)}  # fmt: skip


def lora_delta(tensors: dict[str, torch.Tensor], bfl_module: str) -> torch.Tensor:
    stem = "lora_unet_" + bfl_module.replace(".", "_")
    d, u = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
    return float(tensors[f"{stem}.alpha"]) / d.shape[0] * u @ d


def fp8_file(source: Path, out: Path, scaled: bool) -> dict[str, torch.Tensor]:
    """The tiny BFL model with its matrices in fp8 (biases and norms in bf16), as fp8 Flux files are; ``scaled``:
    per-tensor ``scale_weight = amax / 448`` beside each matrix and the ``scaled_fp8`` marker, as ComfyUI's are."""
    tensors: dict[str, torch.Tensor] = {}
    for k, v in load_file(source).items():
        if v.ndim == 2:
            scale = v.abs().max() / torch.finfo(FP8).max if scaled else torch.tensor(1.0)
            tensors[k] = (v / scale).to(FP8)
            if scaled:
                tensors[k.removesuffix(".weight") + ".scale_weight"] = scale.reshape(()).float()
        else:
            tensors[k] = v.to(torch.bfloat16)
    if scaled:
        tensors["scaled_fp8"] = torch.empty(0, dtype=FP8)
    save_file(tensors, out)
    return tensors


def within_fp8_rounding(ours: torch.Tensor, reference: torch.Tensor) -> None:
    """Each value within one fp8 step of the reference (E4M3: 3 mantissa bits), and nearly all equal to it."""
    step = reference.abs() * 2.0**-3 + 2.0**-9
    assert bool(((ours - reference).abs() <= step).all())
    assert float((ours == reference).float().mean()) >= 0.99


@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_merge_is_the_fp32_merge_requantised(cli, bfl, tmp_path, scaled):  # noqa: F811
    base = tmp_path / "fp8.safetensors"
    tensors = fp8_file(bfl, base, scaled)
    src = kohya_file(MODULES, te=False)
    lora = tmp_path / "k.safetensors"
    save_file(src, lora)
    out = tmp_path / "merged.safetensors"
    result = cli("merge", str(base), f"{lora}:0.5", "-o", str(out))
    assert result.exit_code == 0, result.output
    merged = load_file(out)
    assert set(merged) == set(tensors)
    for bfl_module in MODULES:
        key = bfl_module + ".weight"
        scale = float(tensors[bfl_module + ".scale_weight"]) if scaled else 1.0
        full = tensors[key].float() * scale + 0.5 * lora_delta(src, bfl_module)  # dequantise, merge in fp32
        assert merged[key].dtype == FP8
        within_fp8_rounding(merged[key].float(), (full / scale).to(FP8).float())
        assert not torch.equal(merged[key], tensors[key])
    for k, v in tensors.items():  # scales, marker, other weights: as they were
        if k.removesuffix(".weight") not in MODULES:
            assert merged[k].dtype == v.dtype and torch.equal(
                merged[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)
            ), k


def test_fp8_merge_saturates_instead_of_overflowing(cli, bfl, tmp_path):  # noqa: F811
    base = tmp_path / "fp8.safetensors"
    fp8_file(bfl, base, scaled=False)
    g = torch.Generator().manual_seed(0)
    d, u = _pair(g, 3 * H, H)
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    lora = tmp_path / "big.safetensors"
    save_file(
        {
            f"{stem}.lora_down.weight": d * 1e3,
            f"{stem}.lora_up.weight": u * 1e3,
            f"{stem}.alpha": torch.tensor(4.0),
        },
        lora,
    )
    out = tmp_path / "m.safetensors"
    result = cli("merge", str(base), str(lora), "-o", str(out))
    assert result.exit_code == 0, result.output
    w = load_file(out)["double_blocks.0.img_attn.qkv.weight"].float()
    assert bool(torch.isfinite(w).all()) and float(w.abs().max()) == torch.finfo(FP8).max


def test_layouts_that_cannot_be_requantised_are_refused(cli, bfl, tmp_path):  # noqa: F811
    lora = tmp_path / "k.safetensors"
    save_file(kohya_file(MODULES, te=False), lora)
    gguf = tmp_path / "flux1-dev-Q4_K.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    result = cli("merge", str(gguf), str(lora), "-o", str(tmp_path / "a.safetensors"))
    assert result.exit_code != 0 and "GGUF" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1

    nf4 = dict(load_file(bfl))
    nf4["double_blocks.0.img_attn.qkv.weight.absmax"] = torch.ones(4)
    nf4["double_blocks.0.img_attn.qkv.weight.quant_state.bitsandbytes__nf4"] = torch.zeros(
        8, dtype=torch.uint8
    )
    bnb = tmp_path / "nf4.safetensors"
    save_file(nf4, bnb)
    result = cli("merge", str(bnb), str(lora), "-o", str(tmp_path / "b.safetensors"))
    assert result.exit_code != 0 and "bitsandbytes" in result.output
    assert len(result.output.strip().splitlines()) == 1

    rows = tmp_path / "rowwise.safetensors"
    tensors = fp8_file(bfl, rows, scaled=True)
    tensors["double_blocks.0.img_attn.qkv.scale_weight"] = torch.ones(3 * H, 1)
    save_file(tensors, rows)
    result = cli("merge", str(rows), str(lora), "-o", str(tmp_path / "c.safetensors"))
    assert result.exit_code != 0 and "one scale per tensor" in result.output
    assert not any((tmp_path / n).exists() for n in ("a.safetensors", "b.safetensors", "c.safetensors"))
