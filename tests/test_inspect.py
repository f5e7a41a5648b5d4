"""``lorax inspect``: what it reports for each kind of file, header-only reading, and one-line errors."""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch

from lorax.adapters.state import LoraModule, LoraState
from lorax.formats import save_embeddings, save_lora
from lorax.io.safetensors_io import save_tensors
from lorax.zoo.random_lora import random_lora
from lorax.zoo.tiny import tiny_pipeline


@pytest.fixture(scope="session")
def pipe():
    return tiny_pipeline("sd1", seed=5)


@pytest.fixture(scope="session")
def files(tmp_path_factory, pipe):
    root = tmp_path_factory.mktemp("inspect")
    state = random_lora(pipe, kinds=("attention", "ff", "conv"), rank=4, alpha=2.0, family="sd1")
    state.modules["unet.down_blocks.0.resnets.0.conv1"] = LoraModule(
        torch.randn(2, 32, 3, 3), torch.randn(32, 2, 1, 1), 1.0
    )
    state.metadata = {
        "ss_training_started_at": "1700000000",
        "ss_tag_frequency": json.dumps({"5_cat": {"cat": 3, "tabby": 7}, "1_dog": {"cat": 1}}),
        "ss_network_dim": "4",
    }
    kohya_state = LoraState(
        dict(state.modules), {"<s1>": {"text_encoder": torch.randn(2, 32)}}, state.metadata, "sd1"
    )
    save_lora(kohya_state, root / "k.safetensors", format="kohya")
    save_lora(LoraState(dict(state.modules), family="sd1"), root / "d.safetensors", format="diffusers")
    attn = random_lora(pipe, kinds=("attention",), rank=2, family="sd1")
    attn.modules = {
        k: v for k, v in attn.modules.items() if ".attentions." not in k or "transformer_blocks" in k
    }
    save_lora(attn, root / "ld.safetensors", format="lora_diffusion", model=pipe)
    save_embeddings({"<cat>": {"text_encoder": torch.randn(1, 768)}}, root / "learned_embeds.safetensors")
    return root, state, kohya_state, attn


def run_json(cli, *paths):
    result = cli("inspect", "--json", *paths)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_kohya_report(cli, files):
    root, state, _, _ = files
    (report,) = run_json(cli, root / "k.safetensors")
    assert report["format"] == "kohya" and report["kind"] == "lora" and report["family"] == "sd1"
    assert report["components"] == ["unet", "text_encoder"]
    assert report["modules"] == len(state.modules)
    assert report["ranks"] == sorted({m.rank for m in state.modules.values()})
    assert report["alphas"] == sorted({float(m.alpha) for m in state.modules.values()})
    assert report["targets"] == ["attention", "ff", "conv"]
    assert report["dtypes"] == ["F32"]
    assert report["size_bytes"] == (root / "k.safetensors").stat().st_size
    assert report["tokens"] == {"<s1>": {"vectors": 2, "dims": {"text_encoder": 32}}}
    assert report["training"]["top_tags"] == {"tabby": 7, "cat": 4}
    assert report["training"]["training_started_at"] == "2023-11-14 22:13:20 UTC"
    text = cli("inspect", root / "k.safetensors")
    assert text.exit_code == 0
    for word in ("kohya", "sd1", "attention, ff, conv", "<s1> (2 × 32)", "training.top_tags"):
        assert word in text.stdout


def test_diffusers_lora_diffusion_embedding_reports(cli, files):
    root, state, _, attn = files
    d, ld, emb = run_json(
        cli, root / "d.safetensors", root / "ld.safetensors", root / "learned_embeds.safetensors"
    )
    # a diffusers file carries alpha / r in its lora_B (lora_alpha = r, as diffusers' scripts write): alphas = ranks
    assert d["format"] == "diffusers" and d["modules"] == len(state.modules) and d["alphas"] == [2.0, 4.0]
    assert (
        ld["format"] == "lora_diffusion"
        and ld["ranks"] == [2]
        and ld["components"] == ["unet", "text_encoder"]
    )
    assert ld["modules"] >= len(attn.modules)  # padded with zero pairs for untouched target modules
    assert ld["targets"] == ["attention", "ff"]
    assert emb["kind"] == "embedding" and emb["tokens"] == {
        "<cat>": {"vectors": 1, "dims": {"text_encoder": 768}}
    }
    assert emb["family"] == "sd1"


def test_lycoris_report(cli, tmp_path):
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_tensors({f"{stem}.hada_w1_a": torch.zeros(8, 3), f"{stem}.hada_w1_b": torch.zeros(3, 8),
                  f"{stem}.hada_w2_a": torch.zeros(8, 3), f"{stem}.hada_w2_b": torch.zeros(3, 8),
                  f"{stem}.alpha": torch.tensor(1.5, dtype=torch.float16)}, tmp_path / "loha.safetensors")  # fmt: skip
    (report,) = run_json(cli, tmp_path / "loha.safetensors")
    assert report["format"] == "lycoris" and report["algorithms"] == ["loha"]
    assert report["ranks"] == [3] and report["alphas"] == [1.5] and report["targets"] == ["attention"]


def test_model_reports(cli, tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "model")
    single = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(
            320, 1024
        ),
        "first_stage_model.decoder.conv_in.weight": torch.zeros(1),
        "cond_stage_model.model.token_embedding.weight": torch.zeros(1),
    }
    save_tensors(single, tmp_path / "sd2.safetensors")
    folder, one = run_json(cli, tmp_path / "model", tmp_path / "sd2.safetensors")
    assert folder["kind"] == "model" and folder["format"] == "diffusers-folder" and folder["family"] == "sd1"
    assert folder["components"] == ["unet", "vae", "text_encoder"]
    assert one["format"] == "single-file" and one["family"] == "sd2"
    assert one["components"] == ["unet", "vae", "text_encoder"]


def test_safetensors_path_imports_no_torch(files):
    root = files[0]
    code = (
        "import sys\n"
        "from lorax.cli.app import app\n"
        f"try:\n    app(['inspect', '--json', {str(root / 'k.safetensors')!r}])\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'numpy' not in sys.modules, 'numpy was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)[0]["format"] == "kohya"


def test_every_format_is_described_without_torch(files, tmp_path):
    """Each format's ``describe`` (kohya, LyCORIS, diffusers, lora_diffusion, an embedding) reads headers only."""
    root = files[0]
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    lokr = {f"{stem}.lokr_w1": torch.zeros(2, 2), f"{stem}.lokr_w2_a": torch.zeros(4, 3),
            f"{stem}.lokr_w2_b": torch.zeros(3, 4), f"{stem}.alpha": torch.tensor(3.0)}  # fmt: skip
    save_tensors(lokr, tmp_path / "lokr.safetensors")
    names = [root / "k.safetensors", tmp_path / "lokr.safetensors", root / "d.safetensors"]
    names += [root / "ld.safetensors", root / "learned_embeds.safetensors"]
    code = (
        "import sys\n"
        "from lorax.cli.app import app\n"
        f"try:\n    app(['inspect', '--json', *{[str(n) for n in names]!r}])\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    reports = json.loads(out.stdout)
    assert [r["format"] for r in reports] == [
        "kohya", "lycoris", "diffusers", "lora_diffusion", "diffusers-embedding"
    ]  # fmt: skip
    assert (
        reports[1]["algorithms"] == ["lokr"] and reports[1]["ranks"] == [3] and reports[1]["alphas"] == [3.0]
    )


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _bad_files(tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": _RunsCode(str(marker))}, protocol=2))
    good = tmp_path / "good.safetensors"
    save_tensors({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
                  "lora_unet_conv_in.lora_up.weight": torch.zeros(320, 2, 1, 1)}, good)  # fmt: skip
    data = good.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[:-10])
    (tmp_path / "claims.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    header = json.dumps({"a": {"dtype": "X99", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "dtype.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    save_tensors({"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4),
                  "lora_unet_conv_in.lora_up.weight": torch.zeros(4, 3)}, tmp_path / "pair.safetensors")  # fmt: skip
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    save_tensors({"foo": torch.zeros(2, 2, 2)}, tmp_path / "unknown.safetensors")
    (tmp_path / "notes.txt").write_text("hello, not a model\n")
    return marker, {
        "evil.pt": "refused",
        "truncated.safetensors": "truncated",
        "claims.safetensors": "header claims",
        "dtype.safetensors": "unknown dtype",
        "pair.safetensors": "do not form a low-rank pair",
        "empty.safetensors": "is empty",
        "folder": "is a folder",
        "missing.safetensors": "no such file",
        "unknown.safetensors": "unknown format",
        "notes.txt": "unknown format",
    }


def test_bad_input_gives_one_line_errors(cli, tmp_path):
    marker, cases = _bad_files(tmp_path)
    for name, problem in cases.items():
        result = cli("inspect", tmp_path / name)
        assert result.exit_code == 1, (name, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (name, result.stderr)
        assert lines[0].startswith("lorax: error: ") and name in lines[0] and problem in lines[0], (
            name,
            lines,
        )
        assert "Traceback" not in result.stderr + result.stdout
    assert not marker.exists(), "the pickle's code ran"
    assert not os.path.exists(tmp_path / "marker")
