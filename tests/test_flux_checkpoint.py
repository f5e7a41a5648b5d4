"""Flux.1 model checkpoints (issue 16): the BFL single file (bare, and under ``model.diffusion_model.`` in all-in-one
files) ⇄ the diffusers folder's ``transformer/``, bit-exact both ways.

The oracle is diffusers' own single-file loader: ``FluxTransformer2DModel.from_single_file`` and its converter
``convert_flux_transformer_checkpoint_to_diffusers``, which hard-codes the full-size width (``inner_dim = 3072``,
used to split ``linear1``); the tests run that very function with the constant set to the tiny model's width.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_flux_lora import TINY, H, tiny_pipeline


def diffusers_converter():
    """diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` with ``inner_dim`` the tiny width."""
    import diffusers.loaders.single_file_utils as sfu

    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in src
    namespace = dict(vars(sfu))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {H}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, one_torch_thread) -> Path:
    out = tmp_path_factory.mktemp("flux") / "tiny"
    tiny_pipeline().save_pretrained(out)
    return out


def transformer_file(root: Path) -> Path:
    return root / "transformer" / "diffusion_pytorch_model.safetensors"


def forward(model, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n, t = 16, 8
    kwargs = dict(
        hidden_states=torch.randn(1, n, TINY["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(1, t, TINY["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(1, TINY["pooled_projection_dim"], generator=g),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=torch.randn(n, 3, generator=g),
        txt_ids=torch.zeros(t, 3),
    )
    with torch.no_grad():
        return model(**kwargs).sample


def test_folder_to_bfl_is_what_diffusers_single_file_loader_reads(cli, folder, tmp_path, monkeypatch):
    """lorax's BFL file holds exactly the keys diffusers' converter consumes, and diffusers' own
    ``from_single_file`` reads it back into the original transformer, tensor for tensor and forward for forward."""
    import diffusers.loaders.single_file_model as sfm
    from diffusers import FluxTransformer2DModel

    bfl = tmp_path / "flux1.safetensors"
    result = cli("convert", str(folder), "-o", str(bfl))
    assert result.exit_code == 0, result.output
    tensors = load_file(bfl)
    assert "double_blocks.0.img_attn.qkv.weight" in tensors and "single_blocks.1.linear1.bias" in tensors
    left = dict(tensors)
    converted = diffusers_converter()(left)
    assert left == {}  # every key of the file is one diffusers' converter reads
    original = load_file(transformer_file(folder))
    assert set(converted) == set(original)
    for k, v in original.items():
        assert torch.equal(converted[k], v), k

    mapping = dict(sfm.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"])
    mapping["checkpoint_mapping_fn"] = diffusers_converter()
    monkeypatch.setitem(sfm.SINGLE_FILE_LOADABLE_CLASSES, "FluxTransformer2DModel", mapping)
    loaded = FluxTransformer2DModel.from_single_file(
        str(bfl), config=str(folder), subfolder="transformer", local_files_only=True
    )
    reference = FluxTransformer2DModel.from_pretrained(folder / "transformer")
    torch.testing.assert_close(forward(loaded), forward(reference), rtol=1e-5, atol=1e-6)


def bfl_by_diffusers_inverse(folder: Path) -> dict[str, torch.Tensor]:
    """A BFL state dict (lorax's mapping, checked by diffusers' converter giving the original back; a file from
    elsewhere: no lorax metadata)."""
    original = load_file(transformer_file(folder))
    convert = diffusers_converter()
    probe = {}
    from lorax.io.keymaps import join_parts
    from lorax.io.keymaps.flux import keymap_to_bfl

    keymap, missed = keymap_to_bfl(list(original), "flux", "transformer")
    assert missed == []
    for e in keymap.entries:
        probe[e.single] = join_parts(e, [original[p] for p in e.parts])
    back = convert(dict(probe))
    assert all(torch.equal(back[k], original[k]) for k in original)  # the inverse is right by diffusers' code
    return probe


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_file_from_elsewhere_to_folder_and_back_bit_exact(cli, folder, tmp_path, prefix):
    """A BFL file without lorax metadata (bare, or all-in-one with a VAE beside) → a diffusers folder equal to the
    original transformer (configs from --config-from), and back to the same bytes."""
    from diffusers import FluxTransformer2DModel

    tensors = {prefix + k: v.to(torch.bfloat16) for k, v in bfl_by_diffusers_inverse(folder).items()}
    if prefix:
        tensors["vae.encoder.conv_in.weight"] = torch.ones(4, 3, 3, 3, dtype=torch.bfloat16)
    src = tmp_path / "from-elsewhere.safetensors"
    save_file(tensors, src)
    out = tmp_path / "folder"
    result = cli("convert", str(src), "-o", str(out), "--config-from", str(folder))
    assert result.exit_code == 0, result.output
    assert "flux" in result.output
    if prefix:
        assert "1 tensors have no place in a diffusers folder" in result.output
    written = load_file(transformer_file(out))
    original = load_file(transformer_file(folder))
    assert set(written) == set(original)
    for k, v in original.items():
        assert written[k].dtype == torch.bfloat16
        assert torch.equal(written[k], v.to(torch.bfloat16)), k
    model = FluxTransformer2DModel.from_pretrained(out / "transformer", torch_dtype=torch.float32)
    reference = FluxTransformer2DModel.from_pretrained(folder / "transformer").to(torch.bfloat16).float()
    torch.testing.assert_close(forward(model), forward(reference), rtol=1e-5, atol=1e-6)

    again = tmp_path / "again.safetensors"
    result = cli("convert", str(out), "-o", str(again))
    assert result.exit_code == 0, result.output
    bare = load_file(again)
    assert set(bare) == {
        k[len(prefix) :] for k in tensors if k.startswith(prefix) and not k.startswith("vae.")
    }
    for k, v in bare.items():
        assert torch.equal(v, tensors[prefix + k]), k
    with safe_open(again, "pt") as f:
        meta = f.metadata()
    assert meta["lorax_family"] == "flux" and "transformer" in json.loads(meta["lorax.configs"])


def test_folder_to_bfl_to_folder_round_trip_without_config_from(cli, folder, tmp_path):
    """diffusers → BFL → diffusers: bit-exact, the configs travelling in the BFL file's header."""
    bfl = tmp_path / "x.safetensors"
    back = tmp_path / "back"
    assert cli("convert", str(folder), "-o", str(bfl)).exit_code == 0
    result = cli("convert", str(bfl), "-o", str(back))
    assert result.exit_code == 0, result.output
    a, b = load_file(transformer_file(folder)), load_file(transformer_file(back))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((back / "transformer" / "config.json").read_text())["num_single_layers"] == 2
    assert json.loads((back / "model_index.json").read_text())["_class_name"] == "FluxPipeline"


def test_flux_single_file_is_detected_as_a_model_and_a_lora_is_not(folder, tmp_path):
    from lorax.io.checkpoint import is_model_checkpoint, open_checkpoint

    bfl = tmp_path / "m.safetensors"
    save_file(bfl_by_diffusers_inverse(folder), bfl)
    assert is_model_checkpoint(bfl)
    assert open_checkpoint(bfl).family == "flux"
    xlabs = tmp_path / "xlabs.safetensors"
    save_file({"double_blocks.0.processor.qkv_lora1.down.weight": torch.zeros(4, H)}, xlabs)
    assert not is_model_checkpoint(xlabs)
