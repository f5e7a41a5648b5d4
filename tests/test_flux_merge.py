"""``lorax merge`` into Flux models (issue 16): every checkpoint layout, every LoRA layout lorax reads, streaming.

The oracle is diffusers' own ``FluxPipeline.load_lora_weights`` + ``fuse_lora`` on the tiny pipeline, compared in
diffusers' layout (a BFL output is read back by diffusers' own converter, ``test_flux_checkpoint.diffusers_converter``).
What diffusers cannot check on a tiny model (its kohya converter splits ``linear1`` at the full-size width and drops
the embedders and the final layer) is checked by hand in BFL's own layout, where a kohya module's delta is
``alpha / r · up @ down`` on the fused tensor itself.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_flux_checkpoint import diffusers_converter, transformer_file
from test_flux_lora import (
    H,
    _pair,
    bfl_shapes,
    fused_deltas,
    kohya_as_bfl,
    kohya_file,
    rel,
    tiny_pipeline,
)


@pytest.fixture(scope="module")
def pipe(one_torch_thread):
    return tiny_pipeline()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, pipe) -> Path:
    out = tmp_path_factory.mktemp("flux-merge") / "tiny"
    pipe.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def bfl(folder) -> Path:
    from lorax.io.checkpoint import open_checkpoint
    from lorax.io.model_layout import write_single_file

    out = folder.parent / "flux1-tiny.safetensors"
    write_single_file(open_checkpoint(folder), out)  # type: ignore[arg-type]
    return out


def bfl_deltas(merged: Path, base: Path) -> dict[str, torch.Tensor]:
    """``{transformer.<diffusers module>: W' − W}`` of two BFL files, both read by diffusers' own converter."""
    convert = diffusers_converter()
    after, before = convert(load_file(merged)), convert(load_file(base))
    return {
        "transformer." + k.removesuffix(".weight"): after[k] - before[k]
        for k in before
        if not torch.equal(after[k], before[k])
    }


def assert_deltas(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))[:6]
    for name, delta in theirs.items():
        assert rel(ours[name], delta) <= 1e-5, name


def xlabs_file(seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(2):
        for what, rows in (("qkv_lora1", 3 * H), ("qkv_lora2", 3 * H), ("proj_lora1", H), ("proj_lora2", H)):
            d, u = _pair(g, rows, H)
            tensors[f"double_blocks.{i}.processor.{what}.down.weight"] = d
            tensors[f"double_blocks.{i}.processor.{what}.up.weight"] = u
    return tensors


def split_qkv_file(seed: int = 3) -> dict[str, torch.Tensor]:
    """kohya's split-qkv save: a block-diagonal up over a down of rank 3r."""
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    r = 4
    for block in range(2):
        for stream in ("img", "txt"):
            up = torch.zeros(3 * H, 3 * r)
            for i in range(3):
                up[i * H : (i + 1) * H, i * r : (i + 1) * r] = torch.randn(H, r, generator=g) * 0.1
            stem = f"lora_unet_double_blocks_{block}_{stream}_attn_qkv"
            tensors |= {f"{stem}.lora_down.weight": torch.randn(3 * r, H, generator=g) * 0.1,
                        f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(6.0)}  # fmt: skip
    return tensors


def lora_inputs(kind: str, tmp_path: Path) -> tuple[Path, Path]:
    """(the file lorax merges, the file diffusers' loader reads for the same LoRA)."""
    plain = kohya_file(bfl_shapes(with_linear1=False, with_top=False), te=False)
    ours = tmp_path / f"{kind}.safetensors"
    if kind == "kohya":
        save_file(plain, ours)
        return ours, ours
    if kind == "kohya-split-qkv":
        save_file(split_qkv_file(), ours)
        return ours, ours
    if kind == "xlabs":
        save_file(xlabs_file(), ours)
        return ours, ours
    kohya = tmp_path / "as-kohya.safetensors"
    save_file(plain, kohya)
    if (
        kind == "bfl"
    ):  # diffusers 0.42 has no loader for BFL names: the same LoRA in kohya names is the oracle's
        save_file(kohya_as_bfl(plain), ours)
        return ours, kohya
    from lorax.formats import (
        load_lora,
        save_lora,
    )  # diffusers / PEFT names, as lorax writes and diffusers reads

    save_lora(load_lora(kohya), ours, format="diffusers")
    return ours, ours


@pytest.mark.parametrize("kind", ["kohya", "kohya-split-qkv", "bfl", "xlabs", "diffusers"])
def test_merge_into_bfl_file_equals_diffusers_fuse(cli, pipe, bfl, tmp_path, kind):
    ours, theirs = lora_inputs(kind, tmp_path)
    out = tmp_path / "merged.safetensors"
    result = cli("merge", str(bfl), str(ours), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert_deltas(bfl_deltas(out, bfl), fused_deltas(pipe, theirs, components=("transformer",)))


def kohya_delta(tensors: dict[str, torch.Tensor], stem: str) -> torch.Tensor:
    d, u = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
    return float(tensors[f"{stem}.alpha"]) / d.shape[0] * u @ d


def test_fused_linear1_final_layer_and_embedders_by_hand(cli, bfl, tmp_path):
    """In BFL's own layout a kohya module's delta lands on the fused tensor whole: ``linear1``'s four slices of
    unequal size, the final layer's halves back in BFL's (shift, scale) order, the embedders one to one."""
    tensors = kohya_file(bfl_shapes(), te=False)
    lora = tmp_path / "all.safetensors"
    save_file(tensors, lora)
    out = tmp_path / "merged.safetensors"
    result = cli("merge", str(bfl), f"{lora}:0.75", "-o", str(out))
    assert result.exit_code == 0, result.output
    before, after = load_file(bfl), load_file(out)
    stems = {k.rsplit(".", 2)[0] for k in tensors}
    for stem in stems:
        flat = stem.removeprefix("lora_unet_")
        key = next(
            k for k in before if k.endswith(".weight") and k[: -len(".weight")].replace(".", "_") == flat
        )
        assert rel(after[key] - before[key], 0.75 * kohya_delta(tensors, stem)) <= 1e-5, key
    touched = {k for k in before if not torch.equal(after[k], before[k])}
    assert len(touched) == len(stems)  # nothing else moved


def test_untouched_tensors_are_copied_byte_for_byte_and_dtypes_kept(cli, bfl, tmp_path):
    from safetensors import safe_open

    half = tmp_path / "bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(bfl).items()}, half)
    lora = tmp_path / "k.safetensors"
    save_file(kohya_file({"double_blocks.0.img_attn.qkv": (3 * H, H)}, te=False), lora)
    out = tmp_path / "m.safetensors"
    assert cli("merge", str(half), str(lora), "-o", str(out)).exit_code == 0
    raw_in, raw_out = half.read_bytes(), out.read_bytes()
    with safe_open(half, "pt") as a, safe_open(out, "pt") as b:
        keys = set(a.keys())
        assert keys == set(b.keys())
        for k in keys:
            ta, tb = a.get_tensor(k), b.get_tensor(k)
            assert tb.dtype == torch.bfloat16
            if k != "double_blocks.0.img_attn.qkv.weight":
                assert torch.equal(ta, tb), k
    assert raw_in != raw_out


def test_merge_into_all_in_one_file_keeps_the_rest(cli, bfl, tmp_path):
    tensors = {"model.diffusion_model." + k: v for k, v in load_file(bfl).items()}
    tensors["vae.decoder.conv_out.weight"] = torch.randn(3, 4, 3, 3)
    tensors["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(32)
    aio = tmp_path / "aio.safetensors"
    save_file(tensors, aio)
    src = kohya_file({"single_blocks.1.linear1": (7 * H, H)}, te=False)
    lora = tmp_path / "k.safetensors"
    save_file(src, lora)
    out = tmp_path / "m.safetensors"
    result = cli("merge", str(aio), str(lora), "-o", str(out))
    assert result.exit_code == 0, result.output
    after = load_file(out)
    key = "model.diffusion_model.single_blocks.1.linear1.weight"
    assert rel(after[key] - tensors[key], kohya_delta(src, "lora_unet_single_blocks_1_linear1")) <= 1e-5
    for k, v in tensors.items():
        if k != key:
            assert torch.equal(after[k], v), k


def test_merge_into_diffusers_folder_with_clip_equals_diffusers_fuse(cli, pipe, folder, tmp_path):
    lora = tmp_path / "k.safetensors"
    save_file(kohya_file(bfl_shapes(with_linear1=False, with_top=False), te=True), lora)
    out = tmp_path / "merged"
    result = cli("merge", str(folder), str(lora), "-o", str(out))
    assert result.exit_code == 0, result.output
    ours = {}
    for component in ("transformer", "text_encoder"):
        name = "diffusion_pytorch_model" if component == "transformer" else "model"
        a = load_file(out / component / f"{name}.safetensors")
        b = load_file(folder / component / f"{name}.safetensors")
        ours |= {
            f"{component}.{k.removesuffix('.weight')}": a[k] - b[k] for k in b if not torch.equal(a[k], b[k])
        }
    # diffusers' Flux loader cannot read kohya's lora_te1_ keys (test_flux_lora): it reads the same LoRA in its names
    from lorax.formats import load_lora, save_lora

    as_diffusers = tmp_path / "d.safetensors"
    save_lora(load_lora(lora), as_diffusers, format="diffusers")
    theirs = fused_deltas(pipe, as_diffusers)
    assert any(k.startswith("text_encoder.") for k in theirs)
    assert_deltas(ours, theirs)


def test_merge_bfl_into_diffusers_output_and_folder_into_bfl_output(cli, pipe, folder, bfl, tmp_path):
    ours_file, theirs = lora_inputs("kohya", tmp_path)
    expected = fused_deltas(pipe, theirs, components=("transformer",))
    as_folder = tmp_path / "as-folder"
    result = cli("merge", str(bfl), str(ours_file), "-o", str(as_folder))
    assert result.exit_code == 0, result.output
    a, b = load_file(transformer_file(as_folder)), load_file(transformer_file(folder))
    assert_deltas(
        {"transformer." + k.removesuffix(".weight"): a[k] - b[k] for k in b if not torch.equal(a[k], b[k])},
        expected,
    )
    as_file = tmp_path / "as-file.safetensors"
    result = cli("merge", str(folder), str(ours_file), "-o", str(as_file))
    assert result.exit_code == 0, result.output
    assert_deltas(bfl_deltas(as_file, bfl), expected)


def test_flux_lora_on_an_sd_model_is_refused(cli, tmp_path):
    lora = tmp_path / "k.safetensors"
    save_file(kohya_file(bfl_shapes(with_top=False), te=False), lora)
    out = tmp_path / "m.safetensors"
    result = cli("merge", "shapes", str(lora), "-o", str(out))
    assert result.exit_code != 0
    assert "is a Flux LoRA, not a sd1 one" in result.output
    assert not out.exists()


def test_flux_loras_merge_and_mix_with_each_other(cli, tmp_path):
    from lorax.formats import detect_format, load_lora

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(kohya_file(bfl_shapes(), seed=1, te=False), a)
    save_file(xlabs_file(seed=2), b)
    merged, mixed = tmp_path / "merged.safetensors", tmp_path / "mixed.safetensors"
    result = cli("merge", str(a), f"{b}:0.25", "--alpha", "0.5", "-o", str(merged))
    assert result.exit_code == 0, result.output
    result = cli("mix", f"{a}:0.5", f"{b}:0.25", "-o", str(mixed), "--to", "bfl")
    assert result.exit_code == 0, result.output
    assert detect_format(merged) == "kohya" and detect_format(mixed) == "bfl"
    sa, sb = load_lora(a), load_lora(b)
    for out in (merged, mixed):
        state = load_lora(out)
        assert state.family == "flux"
        assert set(state.modules) == set(sa.modules) | set(sb.modules)
        for name, m in state.modules.items():
            want = 0.5 * sa.modules[name].delta() if name in sa.modules else 0
            want = want + (0.25 * sb.modules[name].delta() if name in sb.modules else 0)
            assert rel(m.delta(), want) <= 1e-5, (out.name, name)
    assert re.search(r"modules", result.output)


def test_modules_that_need_the_base_weight_get_their_own_slice_in_diffusers_order():
    """DoRA (and any module that reads W0) merged into a fused BFL tensor sees its own part, in diffusers' row order
    (the final layer's halves swapped), as it would in a diffusers folder."""
    from lorax.adapters.flux_merge import _Sliced
    from lorax.adapters.lycoris import DoraModule
    from lorax.adapters.merge import Contribution, apply_contributions
    from lorax.io.keymaps.flux import swap_rows, tensor_from_single

    g = torch.Generator().manual_seed(8)
    for key, part, rows in (
        ("single_blocks.0.linear1.weight", 3, (3 * H, 7 * H)),
        ("final_layer.adaLN_modulation.1.weight", 0, (0, 2 * H)),
    ):
        entry = tensor_from_single(key)
        assert entry is not None
        start, end = rows
        w = torch.randn(end, H, generator=g)
        d, u = _pair(g, end - start, H)
        dora = DoraModule(d, u, 4.0, torch.rand(end - start, 1, generator=g) + 0.5)
        sliced = _Sliced(entry, tuple(w.shape), [Contribution("m", dora, 0.7, part, len(entry.parts))])  # type: ignore[arg-type]
        merged = apply_contributions(w, [Contribution("all", sliced, 1.0)])  # type: ignore[arg-type]
        expected = w.clone()
        if entry.reshape == "swap":
            expected = swap_rows(dora.apply(swap_rows(w), 0.7))
        else:
            expected[start:end] = dora.apply(w[start:end], 0.7)
        assert rel(merged, expected) <= 1e-6, key
        assert not torch.allclose(merged, w)
