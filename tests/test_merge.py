"""lorax merge: LoRAs into models (single file and diffusers folder), checked against hand computations and
diffusers' own loader; untouched tensors bit-identical; errors; signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import save, scratch, tiny_folder, tiny_lora, tiny_pipe, tiny_single
from safetensors.torch import load_file

from lorax.adapters.state import LoraModule, LoraState
from lorax.errors import ConfigError, MismatchError
from lorax.io.safetensors_io import SafetensorsFile
from lorax.services.merge import MergeConfig, merge


def diffusers_view(single: Path, family: str) -> dict[str, dict[str, torch.Tensor]]:
    """A single file seen through diffusers' own converters (independent of lorax's key tables)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    pipe = tiny_pipe(family)
    sd = load_file(single)
    text = (
        convert_ldm_clip_checkpoint(sd)
        if family == "sd1"
        else convert_open_clip_checkpoint(pipe.text_encoder, sd)
    )
    return {
        "unet": convert_ldm_unet_checkpoint(sd, dict(pipe.unet.config)),
        "vae": convert_ldm_vae_checkpoint(sd, dict(pipe.vae.config)),
        "text_encoder": {k.removeprefix("text_model."): v for k, v in text.items()},
    }


def hand_merged(
    family: str, loras: list[tuple[LoraState, float, float]]
) -> dict[str, dict[str, torch.Tensor]]:
    """W0 + alpha·(lora_alpha/r)·up@down computed here, on the pipeline's own state dicts."""
    pipe = tiny_pipe(family)
    out = {
        c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in ("unet", "text_encoder")
    }
    for state, alpha, alpha_text in loras:
        for name, m in state.modules.items():
            component, _, path = name.partition(".")
            key = path.removeprefix("text_model.") + ".weight"
            w = out[component][key]
            up = m.up.reshape(m.up.shape[0], -1).double()
            down = m.down.reshape(m.down.shape[0], -1).double()
            a = alpha_text if component == "text_encoder" else alpha
            delta = (a * (m.alpha / m.rank) * (up @ down)).reshape(w.shape)
            out[component][key] = (w.double() + delta).to(w.dtype)
    return out


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_merge_matches_hand_computation(family: str) -> None:
    lora_a, lora_b = tiny_lora(family, seed=1), tiny_lora(family, seed=2, rank=2, alpha=1.0, conv=False)
    d = scratch("merge")
    pa, pb = save(lora_a, d / "a.safetensors"), save(lora_b, d / "b.safetensors", fmt="diffusers")
    out = d / "merged.safetensors"
    result = merge(
        MergeConfig(str(tiny_single(family)), [f"{pa}:0.7", str(pb)], out, alpha=1.3, alpha_text=0.4)
    )
    assert result.modules_merged == len(lora_a.modules) + len(lora_b.modules)
    assert not result.unmatched
    got = diffusers_view(out, family)
    want = hand_merged(family, [(lora_a, 0.7, 0.4), (lora_b, 1.3, 0.4)])
    for component in ("unet", "text_encoder"):
        for key, w in want[component].items():
            torch.testing.assert_close(got[component][key], w, atol=1e-5, rtol=1e-5, msg=f"{component}.{key}")
    # every tensor no LoRA touches is byte-identical to the base's (SD2: q;k;v share one fused tensor)
    base, merged = SafetensorsFile(tiny_single(family)), SafetensorsFile(out)
    assert base.keys() == merged.keys()
    changed = {k for k in base.header.tensors if base.raw(k) != merged.raw(k)}
    assert len(changed) == result.tensors_merged
    assert all(k.startswith(("model.diffusion_model.", "cond_stage_model.")) for k in changed)
    assert result.tensors_copied == len(base.header.tensors) - len(changed)


def test_alpha_zero_is_the_base_and_fp16_stays_fp16() -> None:
    base = tiny_single("sd1", "fp16")
    d = scratch("alpha0")
    lora = save(tiny_lora("sd1"), d / "l.safetensors")
    out = d / "m.safetensors"
    merge(MergeConfig(str(base), [str(lora)], out, alpha=0.0, alpha_text=0.0))
    a, b = SafetensorsFile(base), SafetensorsFile(out)
    assert all(a.raw(k) == b.raw(k) for k in a.header.tensors)
    assert {b.info(k).dtype for k in b.header.tensors} == {"F16"}


def test_folder_merge_equals_diffusers_fuse_lora() -> None:
    """diffusers' own load_lora_weights + fuse_lora(lora_scale=alpha) is the oracle for a folder merge."""
    from diffusers import StableDiffusionPipeline

    d = scratch("oracle")
    state = tiny_lora("sd1", seed=3, conv=False)
    lora = save(state, d / "pytorch_lora_weights.safetensors", fmt="diffusers")
    out = d / "merged"
    alpha = 0.6
    merge(MergeConfig(str(tiny_folder("sd1")), [str(lora)], out, alpha=alpha))
    merged = StableDiffusionPipeline.from_pretrained(out)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_folder("sd1"))
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=alpha, components=["unet", "text_encoder"])
    pipe.unload_lora_weights()
    for component in ("unet", "text_encoder", "vae"):
        want = getattr(pipe, component).state_dict()
        got = getattr(merged, component).state_dict()
        assert set(want) == set(got)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-5, msg=f"{component}.{k}")
    base = StableDiffusionPipeline.from_pretrained(tiny_folder("sd1")).unet.state_dict()
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert not torch.equal(base[key], merged.unet.state_dict()[key])  # the merge did something


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_single_file_merge_equals_folder_merge_after_conversion(family: str) -> None:
    d = scratch("same")
    lora = save(tiny_lora(family, seed=4), d / "l.safetensors")
    merge(MergeConfig(str(tiny_single(family)), [str(lora)], d / "s.safetensors", alpha=0.8))
    merge(MergeConfig(str(tiny_folder(family)), [str(lora)], d / "f", alpha=0.8))
    merge(
        MergeConfig(str(tiny_folder(family)), [str(lora)], d / "f2s.safetensors", alpha=0.8, to="single-file")
    )
    a, b = load_file(d / "s.safetensors"), load_file(d / "f2s.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    folder_unet = load_file(d / "f" / "unet" / "diffusion_pytorch_model.safetensors")
    single_unet = diffusers_view(d / "s.safetensors", family)["unet"]
    for k in folder_unet:
        assert torch.equal(folder_unet[k], single_unet[k]), k


def test_merge_single_file_into_diffusers_output_loads() -> None:
    from diffusers import StableDiffusionPipeline

    d = scratch("todiff")
    state = tiny_lora("sd2", seed=5)
    lora = save(state, d / "l.safetensors")
    result = merge(MergeConfig(str(tiny_single("sd2")), [str(lora)], d / "out", to="diffusers"))
    assert result.kind == "diffusers"
    pipe = StableDiffusionPipeline.from_pretrained(d / "out")
    want = hand_merged("sd2", [(state, 1.0, 1.0)])
    for component in ("unet", "text_encoder"):
        got = getattr(pipe, component).state_dict()
        for k, w in want[component].items():
            torch.testing.assert_close(got[k], w, atol=1e-5, rtol=1e-5)


def test_token_embeddings_go_into_the_tokenizer_or_beside_the_file() -> None:
    from transformers import CLIPTextModel, CLIPTokenizer

    d = scratch("tokens")
    state = tiny_lora("sd1", seed=6, conv=False)
    vec = torch.randn(2, 32)
    state.embeddings = {"<krk>": {"text_encoder": vec}}
    lora = save(state, d / "l.safetensors")
    merge(MergeConfig(str(tiny_folder("sd1")), [str(lora)], d / "out"))
    tok = CLIPTokenizer.from_pretrained(d / "out" / "tokenizer")
    te = CLIPTextModel.from_pretrained(d / "out" / "text_encoder")
    ids = tok.convert_tokens_to_ids(["<krk>", "<krk>_1"])
    assert tok.unk_token_id not in ids and len(set(ids)) == 2
    table = te.get_input_embeddings().weight
    torch.testing.assert_close(table[ids], vec)
    base_table = tiny_pipe("sd1").text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(table[: base_table.shape[0]], base_table)
    with pytest.raises(MismatchError, match="<krk> is already in the model's tokenizer"):
        merge(MergeConfig(str(d / "out"), [str(lora)], d / "twice"))
    assert not (d / "twice").exists() and not list(d.glob(".twice*"))

    result = merge(MergeConfig(str(tiny_single("sd1")), [str(lora)], d / "m.safetensors"))
    assert len(result.embedding_files) == 1
    from lorax.formats import load_embeddings

    loaded = load_embeddings(result.embedding_files[0])
    (emb,) = loaded.values()
    torch.testing.assert_close(emb["text_encoder"].reshape(-1, 32), vec)


def test_mismatches_name_the_problem_and_write_nothing() -> None:
    d = scratch("mismatch")
    out = d / "m.safetensors"
    wrong_family = save(tiny_lora("sd2"), d / "sd2.safetensors")
    with pytest.raises(MismatchError, match="sd2 LoRA but the base model is sd1"):
        merge(MergeConfig(str(tiny_single("sd1")), [str(wrong_family)], out))
    bad = LoraState({"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": LoraModule(
        torch.zeros(2, 48), torch.zeros(32, 2))}, family="sd1")  # fmt: skip
    with pytest.raises(MismatchError, match=r"attn1\.to_q \(LoRA \[32, 48\], model \[32, 32\]\)"):
        merge(MergeConfig(str(tiny_single("sd1")), [str(save(bad, d / "bad.safetensors", "diffusers"))], out))
    extra = tiny_lora("sd1", conv=False)
    extra.modules["unet.down_blocks.0.attentions.7.transformer_blocks.0.attn1.to_q"] = LoraModule(
        torch.zeros(2, 32), torch.zeros(32, 2)
    )
    extra_path = save(extra, d / "extra.safetensors", "diffusers")
    with pytest.raises(
        MismatchError, match=r"1 LoRA modules match no weight.*attentions\.7.*--allow-unmatched"
    ):
        merge(MergeConfig(str(tiny_single("sd1")), [str(extra_path)], out))
    assert not out.exists() and not list(d.glob(".m.safetensors*"))
    result = merge(MergeConfig(str(tiny_single("sd1")), [str(extra_path)], out, allow_unmatched=True))
    assert result.unmatched == ["unet.down_blocks.0.attentions.7.transformer_blocks.0.attn1.to_q"]
    assert result.modules_merged == len(extra.modules) - 1
    with pytest.raises(ConfigError, match="--dtype"):
        merge(MergeConfig(str(tiny_single("sd1")), [str(extra_path)], d / "x.safetensors", dtype="fp8"))


def test_ckpt_base_is_read_safely_and_written_as_safetensors() -> None:
    d = scratch("ckpt")
    ckpt = d / "base.ckpt"
    torch.save({"state_dict": load_file(tiny_single("sd1"))}, ckpt)
    lora = save(tiny_lora("sd1", seed=7), d / "l.safetensors")
    with pytest.raises(ConfigError, match=r"\.safetensors"):
        merge(MergeConfig(str(ckpt), [str(lora)], d / "out.ckpt"))
    merge(MergeConfig(str(ckpt), [str(lora)], d / "a.safetensors"))
    merge(MergeConfig(str(tiny_single("sd1")), [str(lora)], d / "b.safetensors"))
    a, b = load_file(d / "a.safetensors"), load_file(d / "b.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_cli_merge_table_and_json(cli) -> None:  # type: ignore[no-untyped-def]
    d = scratch("cli")
    lora = save(tiny_lora("sd1", seed=8), d / "l.safetensors")
    out = d / "m.safetensors"
    result = cli("merge", tiny_single("sd1"), f"{lora}:0.5", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["modules_merged"] == len(tiny_lora("sd1").modules) and doc["loras"][0]["alpha"] == 0.5
    again = cli("merge", tiny_single("sd1"), lora, "-o", out)
    assert again.exit_code == 1 and "already exists" in again.stderr and "--force" in again.stderr
    table = cli("merge", tiny_single("sd1"), lora, "-o", out, "--force")
    assert table.exit_code == 0 and "modules merged" in table.stderr
    assert table.stdout.strip() == str(out)  # the path on stdout, the table on stderr
    for args, message in [
        ((d / "missing.safetensors", lora), "missing.safetensors: no such file"),
        ((tiny_single("sd1"), d / "nope.safetensors"), "nope.safetensors: no such file"),
        ((tiny_single("sd1"), lora, "--to", "kohya"), "--to kohya is a LoRA format"),
        ((tiny_single("sd1"), lora, "--mode", "lpl"), "--mode must be one of"),
    ]:
        bad = cli("merge", *args, "-o", d / "bad.safetensors")
        assert bad.exit_code == 1, args
        assert bad.stderr.startswith("lorax: error: ") and message in bad.stderr, bad.stderr
        assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert not (d / "bad.safetensors").exists()


@lru_cache(maxsize=1)
def big_base() -> Path:
    """The tiny SD1 file plus 160 MB of extra tensors, so that a merge takes long enough to interrupt."""
    from lorax.io.safetensors_io import save_tensors

    base = scratch("big") / "big.safetensors"
    big = {f"model.diffusion_model.extra_{i}": torch.zeros(4 * 1024 * 1024) for i in range(10)}
    save_tensors({**load_file(tiny_single("sd1")), **big}, base)
    return base


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_merge_leaves_nothing(sig: signal.Signals) -> None:
    """A merge stopped mid-write by SIGINT/SIGTERM leaves no output and no temp file."""
    d = scratch("signal")
    base = big_base()
    lora = save(tiny_lora("sd1", seed=9), d / "l.safetensors")
    out = d / "m.safetensors"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorax", "merge", str(base), str(lora), "-o", str(out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # A shell's background job inherits SIGINT ignored; give the child the default, as an interactive user has.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 60
    while time.time() < deadline and not list(d.glob(".m.safetensors.*")) and proc.poll() is None:
        time.sleep(0.002)
    proc.send_signal(signal.SIGSTOP)  # hold it mid-write so the signal lands while the temp file exists
    assert list(d.glob(".m.safetensors.*")), "the merge never started writing"
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig  # 130 for Ctrl-C, 143 for SIGTERM
    assert b"interrupted" in err
    assert not out.exists()
    assert not list(d.glob(".m.safetensors*"))


def test_copy_fallback_without_copy_file_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel cannot copy between the files, plain reads and writes give the same bytes."""

    def refuse(*args: object) -> int:
        raise OSError("not supported here")

    d = scratch("fallback")
    lora = save(tiny_lora("sd2", seed=12), d / "l.safetensors")
    merge(MergeConfig(str(tiny_single("sd2")), [str(lora)], d / "fast.safetensors"))
    monkeypatch.setattr(os, "copy_file_range", refuse)
    merge(MergeConfig(str(tiny_single("sd2")), [str(lora)], d / "slow.safetensors"))
    assert (d / "fast.safetensors").read_bytes() == (d / "slow.safetensors").read_bytes()
