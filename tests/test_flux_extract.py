"""``lorax extract`` on Flux models (issue 16): a LoRA from two Flux checkpoints, in kohya's Flux names.

The tuned model is the base plus known deltas, built by hand in BFL's own layout (a kohya module's delta is
``alpha / r · up @ down`` on the fused tensor itself). The extracted file is read by diffusers' own
``FluxPipeline.load_lora_weights`` + ``fuse_lora``, and checked by hand against the truncated-SVD bound
(Eckart–Young: the best rank-k error is the norm of the discarded singular values).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from test_flux_lora import bfl_shapes, fused_deltas, kohya_file, rel
from test_flux_merge import bfl, bfl_deltas, folder, pipe  # noqa: F401  (the tiny model's fixtures)


def tuned_file(base: Path, out: Path, lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``base`` with each kohya module's delta added to its BFL tensor; returns ``{BFL weight key: delta}``."""
    tensors = load_file(base)
    deltas = {}
    for k in lora:
        if not k.endswith(".lora_down.weight"):
            continue
        stem = k[: -len(".lora_down.weight")]
        d, u = lora[k], lora[f"{stem}.lora_up.weight"]
        delta = float(lora[f"{stem}.alpha"]) / d.shape[0] * u @ d
        key = next(
            t
            for t in tensors
            if t.endswith(".weight") and t[: -len(".weight")].replace(".", "_") == stem[10:]
        )
        tensors[key] = tensors[key] + delta
        deltas[key] = delta
    save_file(tensors, out)
    return deltas


def kohya_deltas(path: Path) -> dict[str, torch.Tensor]:
    """``{kohya module: alpha / r · up @ down}`` of a kohya file, read with safetensors alone."""
    t = load_file(path)
    out = {}
    for k in t:
        if k.endswith(".lora_down.weight"):
            stem = k[: -len(".lora_down.weight")]
            d, u = t[k], t[f"{stem}.lora_up.weight"]
            out[stem] = float(t[f"{stem}.alpha"]) / d.shape[0] * u @ d
    return out


def test_extracted_lora_loads_in_diffusers_to_the_difference(cli, pipe, folder, bfl, tmp_path):  # noqa: F811
    tuned = tmp_path / "tuned.safetensors"
    tuned_file(bfl, tuned, kohya_file(bfl_shapes(with_linear1=False, with_top=False), te=False))
    out = tmp_path / "extracted.safetensors"
    result = cli("extract", str(folder), str(tuned), "-o", str(out), "--rank", "4", "--targets", "all")
    assert result.exit_code == 0, result.output
    written = load_file(out)
    assert (
        written["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 4
    )  # fused: rank r, not 3r
    assert written["lora_unet_double_blocks_1_txt_mod_lin.lora_up.weight"].shape[1] == 4
    ours = fused_deltas(pipe, out, components=("transformer",))
    truth = bfl_deltas(tuned, bfl)
    assert set(ours) == set(truth)
    for name, delta in truth.items():
        assert rel(ours[name], delta) <= 1e-4, name


def test_extracted_delta_meets_the_svd_bound_for_every_fused_module(cli, bfl, tmp_path):  # noqa: F811
    """Below the true rank (4) each module keeps the best rank-2 approximation of its fused delta: linear1's four
    slices together, the final layer in BFL's (shift, scale) order, the embedders."""
    tuned = tmp_path / "tuned.safetensors"
    deltas = tuned_file(bfl, tuned, kohya_file(bfl_shapes(), seed=4, te=False))
    out = tmp_path / "rank2.safetensors"
    result = cli("extract", str(bfl), str(tuned), "-o", str(out), "--rank", "2", "--targets", "all")
    assert result.exit_code == 0, result.output
    ours = kohya_deltas(out)
    assert set(ours) == {"lora_unet_" + k[: -len(".weight")].replace(".", "_") for k in deltas}
    for key, delta in deltas.items():
        got = ours["lora_unet_" + key[: -len(".weight")].replace(".", "_")]
        s = torch.linalg.svdvals(delta.double())
        bound = float(s[2:].square().sum().sqrt())
        error = float((got.double() - delta.double()).norm())
        assert abs(error - bound) <= 1e-4 * float(s.square().sum().sqrt()), key
        assert error < float(delta.norm())


def test_attn_targets_take_linear1_whole_and_leave_the_rest(cli, bfl, tmp_path):  # noqa: F811
    tuned = tmp_path / "tuned.safetensors"
    tuned_file(bfl, tuned, kohya_file(bfl_shapes(), seed=6, te=False))
    out = tmp_path / "attn.safetensors"
    result = cli("extract", str(bfl), str(tuned), "-o", str(out), "--rank", "4")
    assert result.exit_code == 0, result.output
    modules = set(kohya_deltas(out))
    assert "lora_unet_single_blocks_0_linear1" in modules  # q, k, v fused with the MLP: extracted whole
    assert (
        "lora_unet_double_blocks_0_txt_attn_qkv" in modules
        and "lora_unet_double_blocks_0_img_attn_proj" in modules
    )
    assert not any("mlp" in m or "mod_lin" in m or "linear2" in m or "final_layer" in m for m in modules)
