"""Files whose meaning depends on the model or on a name outside the tensors:

* lora_diffusion (cloneofsimo/lora) files name modules by index into the model's traversal; merged into a model that
  is not a full-size family (the shipped shapes model), the indices resolve against BASE itself. The oracle is the
  original traversal rule, written here: the i-th ``nn.Linear`` inside modules of the target classes, walking the
  real model's ``named_modules()``.
* learned-token files: the token a file was trained for travels in its header, and ``generate`` honours it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorax.zoo import shapes

SHAPES = Path(shapes.__file__).parent / "model"
UNET_TARGETS = ("CrossAttention", "Attention", "GEGLU")
TEXT_TARGETS = ("CLIPAttention",)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _original_order(model: torch.nn.Module, targets: tuple[str, ...]) -> list[str]:
    """lora_diffusion's ``_find_modules``: Linear children of target-class ancestors, in ``named_modules`` order."""
    out: list[str] = []
    for name, ancestor in model.named_modules():
        if type(ancestor).__name__ not in targets:
            continue
        for child_name, child in ancestor.named_modules():
            full = f"{name}.{child_name}"
            if isinstance(child, torch.nn.Linear) and child_name and full not in out:
                out.append(full)
    return out


def test_lora_diffusion_file_merges_into_the_shapes_model(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(SHAPES / "unet")
    text = CLIPTextModel.from_pretrained(SHAPES / "text_encoder")
    g = torch.Generator().manual_seed(5)
    tensors: dict[str, torch.Tensor] = {}
    want: dict[
        str, torch.Tensor
    ] = {}  # "<component>/<weight key>" -> ΔW (scale folded into up, as the format does)
    for component, model, targets in (("unet", unet, UNET_TARGETS), ("text_encoder", text, TEXT_TARGETS)):
        for i, path in enumerate(_original_order(model, targets)):
            w = model.get_submodule(path).weight
            up, down = (
                torch.randn(w.shape[0], 2, generator=g) * 0.05,
                torch.randn(2, w.shape[1], generator=g) * 0.05,
            )
            tensors[f"{component}:{i}:up"], tensors[f"{component}:{i}:down"] = up, down
            want[f"{component}/{path}.weight"] = up @ down
    assert sum(k.startswith("text_encoder/") for k in want) > 0 and len(want) > 50
    seed = tmp_path / "seed_format.safetensors"
    save_file(
        tensors,
        str(seed),
        {"unet": json.dumps(list(UNET_TARGETS)), "text_encoder": json.dumps(["CLIPAttention"])},
    )
    out = tmp_path / "merged"
    result = cli("merge", SHAPES, seed, "-o", out)
    assert result.exit_code == 0, result.stderr
    checked = 0
    for component, file in (
        ("unet", "diffusion_pytorch_model.safetensors"),
        ("text_encoder", "model.safetensors"),
    ):
        base, merged = load_file(SHAPES / component / file), load_file(out / component / file)
        assert set(base) == set(merged)
        for key, w0 in base.items():
            delta = want.get(f"{component}/{key}")
            if delta is None and component == "text_encoder":
                delta = want.get(f"{component}/{key.removeprefix('text_model.')}")
            if delta is None:
                assert torch.equal(merged[key], w0), key
            else:
                torch.testing.assert_close(merged[key], w0 + delta.to(w0.dtype), rtol=1e-5, atol=1e-6)
                checked += 1
    assert checked == len(want)


def test_lora_diffusion_file_for_another_model_names_the_base(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    seed = tmp_path / "seed_format.safetensors"
    save_file(
        {"unet:0:up": torch.zeros(7, 2), "unet:0:down": torch.zeros(2, 7)},
        str(seed),
        {"unet": '["Attention"]'},
    )
    result = cli("merge", SHAPES, seed, "-o", tmp_path / "merged")
    assert result.exit_code == 1
    assert "does not fit the base" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "merged").exists()


def test_an_inverted_token_keeps_its_name_in_generate_and_diffusers(cli, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionPipeline

    from lorax.zoo.shapes import write_concept_dir

    data = tmp_path / "squares"
    write_concept_dir(data, "square", "purple", 2, seed=1, caption="a purple square")
    out = tmp_path / "s1.safetensors"
    args = [
        "--model",
        SHAPES,
        "--token-at-data",
        "purple|<s1>",
        "--resolution",
        "32",
        "--steps",
        "1",
        "--device",
        "cpu",
    ]
    result = cli("invert", data, *args, "-o", out)
    assert result.exit_code == 0, result.stderr
    assert "trigger" in result.stderr and "'s1'" in result.stderr and "<s1>" in result.stderr
    gen = [
        "--model",
        SHAPES,
        "--embedding",
        out,
        "--steps",
        "1",
        "--size",
        "32x32",
        "--seed",
        "1",
        "--device",
        "cpu",
    ]
    result = cli("generate", "a <s1> square", *gen, "-o", tmp_path / "img")
    assert result.exit_code == 0, result.stderr
    assert "trained token '<s1>'" in result.stderr and "file name, 's1'" in result.stderr
    assert len(list((tmp_path / "img").glob("*.png"))) == 1
    # diffusers' own loader takes the same file when told the token (A1111 files carry no name it reads)
    vectors = load_file(out)["emb_params"]
    pipe = StableDiffusionPipeline.from_pretrained(SHAPES, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(out), token="<s1>")
    row = pipe.tokenizer.convert_tokens_to_ids("<s1>")
    torch.testing.assert_close(
        pipe.text_encoder.get_input_embeddings().weight[row], vectors[0].to(torch.float32)
    )
