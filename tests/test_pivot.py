"""lorax pivot on a tiny random SD1 model: one file with LoRA + tokens, format round trips, resume across phases,
frozen vs continued inversion, masks, generate/convert load the output, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lorax.progress import NullProgress
from lorax.training.pivot_config import PivotConfig

WORDS = ["sks", "purple", "square", "shape"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def pivot_model(tmp_path_factory) -> Path:
    from lorax.zoo.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-pivot") / "model"
    tiny_pipeline("sd1", words=WORDS).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def squares(tmp_path_factory) -> Path:
    from lorax.zoo.shapes import write_concept_dir

    folder = tmp_path_factory.mktemp("pivot-squares")
    write_concept_dir(folder, "square", "purple", 3, seed=2)
    return folder


def load(model: Path):
    from lorax.training.base import load_base_pipeline

    return load_base_pipeline(str(model))


def config(model: Path, data: Path, out: Path, **changes) -> PivotConfig:
    values = dict(
        data_dir=data,
        output=out,
        model=str(model),
        token_at_data="purple|<s1>",
        init_token="shape",
        resolution=32,
        ti_steps=2,
        steps=2,
        learning_rate=1e-2,
        device="cpu",
        save_dtype="fp32",
    )
    values.update(changes)
    return PivotConfig(**values)


def run(cfg: PivotConfig, pipeline=None):
    from lorax.services.pivot import pivot

    return pivot(cfg, NullProgress(), pipeline=pipeline)


@pytest.fixture(
    scope="module"
)  # after the module's one-thread setting: resumed runs must match it bit for bit
def pivot_file(pivot_model, squares, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("pivot-out") / "s1.safetensors"
    result = run(config(pivot_model, squares, out, vectors=2, checkpoint_every=3, auto_mask=True))
    return out, result


def test_one_kohya_file_holds_lora_and_bundled_tokens(pivot_file, pivot_model):
    from lorax.formats import detect_format, load_embeddings, load_lora

    out, result = pivot_file
    assert result.ti_steps == 2 and result.steps == 2 and [r[0] for r in result.losses] == [1, 2, 3, 4]
    assert detect_format(out) == "kohya"
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert "bundle_emb.<s1>.string_to_param.*" in keys
    assert any(k.startswith("lora_unet_") for k in keys) and any(k.startswith("lora_te_") for k in keys)
    assert meta["ss_steps"] == "4" and meta["lorax_ti_steps"] == "2" and meta["lorax_command"] == "pivot"
    assert json.loads(meta["lorax_tokens"]) == ["<s1>"] and meta["lorax_masks"] == "auto"
    state = load_lora(out, model=load(pivot_model))
    assert state.embeddings["<s1>"]["text_encoder"].shape == (2, 32)
    assert torch.equal(load_embeddings(out)["<s1>"]["text_encoder"], state.embeddings["<s1>"]["text_encoder"])
    assert {k.split(".")[0] for k in state.modules} == {"unet", "text_encoder"}
    assert all(m.up.abs().sum() > 0 for m in state.modules.values())  # every LoRA trained
    assert [p.name for p in result.checkpoints] == ["step-000003"]


def test_round_trips_kohya_and_lora_diffusion_keep_deltas_and_tokens(pivot_file, pivot_model, tmp_path):
    from lorax.formats import load_lora, save_lora
    from lorax.models.skeleton import skeleton

    out, _ = pivot_file
    pipe = load(pivot_model)
    order = skeleton(pipe)
    kohya = load_lora(out, model=pipe)
    ld = save_lora(kohya, tmp_path / "ld.safetensors", format="lora_diffusion", model=order)
    from_ld = load_lora(ld, model=order)
    back = load_lora(save_lora(from_ld, tmp_path / "back.safetensors", format="kohya"), model=pipe)
    for other in (from_ld, back):
        assert set(other.modules) >= set(kohya.modules)
        for key in set(other.modules) - set(
            kohya.modules
        ):  # lora_diffusion fills untrained targets with zeros
            assert not other.modules[key].delta().any(), key
        for key, module in kohya.modules.items():
            assert torch.allclose(other.modules[key].delta(), module.delta(), atol=1e-6, rtol=0), key
        assert torch.equal(other.embeddings["<s1>"]["text_encoder"], kohya.embeddings["<s1>"]["text_encoder"])


def test_lora_diffusion_output_and_generate_loads_both(cli, pivot_model, squares, tmp_path, pivot_file):
    from lorax.formats import detect_format

    out = tmp_path / "ld.safetensors"
    result = cli(
        "pivot", squares, "-o", out, "--format", "lora_diffusion", "--model", pivot_model, "--token-at-data",
        "purple|<s1>", "--ti-steps", "1", "--steps", "1", "--resolution", "32", "--device", "cpu", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["format"] == "lora_diffusion"
    assert detect_format(out) == "lora_diffusion"
    for lora in (out, pivot_file[0]):
        img = tmp_path / f"img-{lora.stem}"
        gen = cli(
            "generate", "a <s1> square", "--model", pivot_model, "--lora", lora, "--steps", "2",
            "--size", "32x32", "--seed", "1", "-o", img, "--device", "cpu",
        )  # fmt: skip
        assert gen.exit_code == 0, gen.stderr
        assert len(list(img.glob("*.png"))) == 1


def test_resume_in_either_phase_matches_the_uninterrupted_run(pivot_model, squares, tmp_path, pivot_file):
    from lorax.formats import load_lora

    full_out, full = pivot_file
    base = dict(vectors=2, auto_mask=True)
    part = run(config(pivot_model, squares, tmp_path / "part.safetensors", checkpoint_every=1, **base))
    names = [p.name for p in part.checkpoints]
    assert names == ["step-000001", "step-000002", "step-000003"]
    pipe = load(pivot_model)
    reference = load_lora(full_out, model=pipe)
    for ckpt in (part.checkpoints[0], part.checkpoints[2]):  # inside inversion, inside tuning
        out = tmp_path / f"resumed-{ckpt.name}.safetensors"
        resumed = run(config(pivot_model, squares, out, resume=ckpt, **base))
        assert [r[:3] for r in resumed.losses] == [r[:3] for r in full.losses]
        got = load_lora(out, model=pipe)
        assert torch.equal(
            got.embeddings["<s1>"]["text_encoder"], reference.embeddings["<s1>"]["text_encoder"]
        )
        for key, module in reference.modules.items():
            assert torch.equal(got.modules[key].up, module.up), key


def test_tokens_frozen_in_phase_two_unless_continue_inversion(pivot_model, squares, tmp_path):
    from safetensors.torch import load_file

    def bundled(path: Path) -> torch.Tensor:
        with safe_open(str(path), "pt") as f:
            return f.get_tensor("bundle_emb.<s1>.string_to_param.*")

    common = dict(ti_steps=1, steps=2, train_text=False, checkpoint_every=1, ti_weight_decay=0.3)
    frozen = run(config(pivot_model, squares, tmp_path / "a.safetensors", **common))
    after_ti = load_file(str(frozen.checkpoints[0] / "weights.safetensors"))["embeddings.<s1>"]
    assert frozen.checkpoints[0].name == "step-000001"
    assert torch.equal(bundled(tmp_path / "a.safetensors"), after_ti)  # unchanged through two LoRA steps

    pipe = load(pivot_model)
    original = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    extra = dict(continue_inversion=True, continue_ti_learning_rate=0.05)
    cont = run(config(pivot_model, squares, tmp_path / "b.safetensors", **common, **extra), pipeline=pipe)
    assert torch.equal(
        load_file(str(cont.checkpoints[0] / "weights.safetensors"))["embeddings.<s1>"], after_ti
    )
    assert not torch.equal(bundled(tmp_path / "b.safetensors"), after_ti)  # it kept training in phase 2
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    row = pipe.tokenizer.convert_tokens_to_ids("<s1>")
    assert row == original.shape[0]  # a new row after the original table
    assert torch.equal(table[:row], original)  # weight decay 0.3 moved none of the other rows


def test_bad_input_and_config_problems(cli, pivot_model, squares, tmp_path):
    common = ["pivot", squares, "--model", pivot_model, "--device", "cpu", "--steps", "1", "--ti-steps", "1"]
    cases = [
        (["-o", tmp_path / "x.safetensors", "--token", "purple"], "purple is already in the model's vocabulary"),
        (["-o", tmp_path / "x.safetensors", "--token-at-data", "purple|<s1>", "--mask-dir", tmp_path],
         "has no mask for 3 of 3 images"),
        (["-o", tmp_path / "x.pt", "--token-at-data", "purple|<s1>"], "must end in .safetensors"),
        (["-o", tmp_path / "x.safetensors", "--token-at-data", "purple|<s1>", "--format", "diffusers"],
         "--format must be one of kohya, lora_diffusion"),
    ]  # fmt: skip
    for extra, message in cases:
        result = cli(*common, *extra)
        assert result.exit_code == 1, (extra, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
    ok = cli(*common, "-o", tmp_path / "ok.safetensors", "--token", "purple", "--overwrite-token", "--json")
    assert ok.exit_code == 0, ok.stderr
    assert json.loads(ok.stdout)["tokens"] == ["purple"]
