"""lorax merge with a LoRA as BASE (concat, SVD rank, seed-blend, seed-join) and LyCORIS/DoRA merges into a model,
each against a hand computation from the published definitions."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_helpers import save, scratch, tiny_lora, tiny_pipe, tiny_single

from lorax.errors import ConfigError
from lorax.formats import load_lora
from lorax.io.checkpoint import open_checkpoint
from lorax.io.safetensors_io import save_tensors
from lorax.services.merge import MergeConfig, merge


def _pair(d):  # type: ignore[no-untyped-def]
    a, b = tiny_lora("sd1", seed=41, rank=4, alpha=2.0), tiny_lora("sd1", seed=42, rank=4, alpha=4.0)
    a.embeddings = {"<a>": {"text_encoder": torch.randn(1, 32)}}
    b.embeddings = {"<b>": {"text_encoder": torch.randn(1, 32)}}
    return a, b, save(a, d / "a.safetensors"), save(b, d / "b.safetensors")


def test_lora_plus_lora_is_exact_by_default(cli) -> None:  # type: ignore[no-untyped-def]
    d = scratch("ll")
    a, b, pa, pb = _pair(d)
    result = cli("merge", pa, pb, "--alpha", "0.3", "-o", d / "ab.safetensors", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["kind"] == "lora" and [x["alpha"] for x in doc["loras"]] == [0.3, 0.7]
    ab = load_lora(d / "ab.safetensors")
    for name in a.modules:
        want = 0.3 * a.modules[name].delta() + 0.7 * b.modules[name].delta()
        torch.testing.assert_close(ab.modules[name].delta(), want, atol=1e-6, rtol=1e-5)
    assert ab.ranks() == [8] and set(ab.embeddings) == {"<a>", "<b>"}


def test_lora_plus_lora_svd_rank_reports_energy() -> None:
    d = scratch("llsvd")
    a, b, pa, pb = _pair(d)
    result = merge(MergeConfig(str(pa), [str(pb)], d / "r2.safetensors", alpha=0.5, rank=2))
    assert result.worst_energy is not None and 0 < result.worst_energy < 1
    full = merge(MergeConfig(str(pa), [str(pb)], d / "r8.safetensors", alpha=0.5, rank=8))
    assert full.worst_energy == pytest.approx(1.0, abs=1e-9)
    r8 = load_lora(d / "r8.safetensors")
    name = next(iter(a.modules))
    want = 0.5 * a.modules[name].delta() + 0.5 * b.modules[name].delta()
    torch.testing.assert_close(r8.modules[name].delta(), want, atol=1e-5, rtol=1e-5)


def test_seed_blend_and_seed_join() -> None:
    d = scratch("seed")
    a, b, pa, pb = _pair(d)
    merge(MergeConfig(str(pa), [str(pb)], d / "blend.safetensors", alpha=0.25, mode="seed-blend"))
    blend = load_lora(d / "blend.safetensors")
    name = next(iter(a.modules))
    ma, mb = a.modules[name], b.modules[name]
    up = 0.25 * ma.up * ma.scale + 0.75 * mb.up * mb.scale  # scales folded into up, then the seed's lpl
    down = 0.25 * ma.down + 0.75 * mb.down
    torch.testing.assert_close(blend.modules[name].delta(), up @ down, atol=1e-6, rtol=1e-5)
    assert blend.ranks() == [4]
    merge(MergeConfig(str(pa), [str(pb)], d / "join.safetensors", alpha=0.5, mode="seed-join"))
    join = load_lora(d / "join.safetensors")
    assert set(join.embeddings) == {"<s0-0>", "<s1-0>"} and join.ranks() == [8]
    with pytest.raises(ConfigError, match="--mode"):
        merge(MergeConfig(str(pa), [str(pb)], d / "x.safetensors", mode="lpl"))


def _kohya(module: str) -> str:
    return "lora_unet_" + module.removeprefix("unet.").replace(".", "_")


def test_loha_lokr_dora_merge_by_their_definitions() -> None:
    """LoHa: (w1a@w1b)⊙(w2a@w2b)·α/r; LoKr: kron(w1, w2a@w2b)·α/r; DoRA: m·(W0+ΔW)/‖W0+ΔW‖ per output row."""
    d = scratch("lycoris")
    g = torch.Generator().manual_seed(5)
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    attn = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
    q, k, v = f"{attn}.attn1.to_q", f"{attn}.attn1.to_k", f"{attn}.attn1.to_v"
    loha = {
        "hada_w1_a": rnd(32, 4),
        "hada_w1_b": rnd(4, 32),
        "hada_w2_a": rnd(32, 4),
        "hada_w2_b": rnd(4, 32),
    }
    lokr = {"lokr_w1": rnd(4, 4), "lokr_w2_a": rnd(8, 2), "lokr_w2_b": rnd(2, 8)}
    down, up, magnitude = rnd(4, 32), rnd(32, 4), rnd(32, 1).abs() + 1.0
    tensors = {f"{_kohya(q)}.{n}": t for n, t in loha.items()} | {f"{_kohya(q)}.alpha": torch.tensor(2.0)}
    tensors |= {f"{_kohya(k)}.{n}": t for n, t in lokr.items()} | {f"{_kohya(k)}.alpha": torch.tensor(1.0)}
    tensors |= {
        f"{_kohya(v)}.lora_down.weight": down,
        f"{_kohya(v)}.lora_up.weight": up,
        f"{_kohya(v)}.alpha": torch.tensor(4.0),
        f"{_kohya(v)}.dora_scale": magnitude,
    }
    path = d / "lycoris.safetensors"
    save_tensors(tensors, path)
    out = d / "merged.safetensors"
    alpha = 0.8
    merge(MergeConfig(str(tiny_single("sd1")), [str(path)], out, alpha=alpha))
    merged = open_checkpoint(out)
    base = tiny_pipe("sd1").unet.state_dict()

    def w(m: str) -> torch.Tensor:
        return merged.tensor("unet", m.removeprefix("unet.") + ".weight")

    def w0(m: str) -> torch.Tensor:
        return base[m.removeprefix("unet.") + ".weight"]

    d_loha = (loha["hada_w1_a"] @ loha["hada_w1_b"]) * (loha["hada_w2_a"] @ loha["hada_w2_b"]) * (2.0 / 4)
    torch.testing.assert_close(w(q), w0(q) + alpha * d_loha, atol=1e-6, rtol=1e-5)
    d_lokr = torch.kron(lokr["lokr_w1"], lokr["lokr_w2_a"] @ lokr["lokr_w2_b"]) * (1.0 / 2)
    torch.testing.assert_close(w(k), w0(k) + alpha * d_lokr, atol=1e-6, rtol=1e-5)
    vv = w0(v) + (4.0 / 4) * (up @ down)
    adapted = magnitude * vv / vv.norm(dim=1, keepdim=True)
    torch.testing.assert_close(w(v), w0(v) + alpha * (adapted - w0(v)), atol=1e-6, rtol=1e-5)


def test_full_difference_module_merges_weight_and_bias() -> None:
    d = scratch("diff")
    q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    diff, diff_b = torch.randn(32, 32) * 0.01, torch.randn(32) * 0.01
    path = d / "diff.safetensors"
    save_tensors({f"{_kohya(q)}.diff": diff, f"{_kohya(q)}.diff_b": diff_b}, path)
    out = d / "merged.safetensors"
    merge(MergeConfig(str(tiny_single("sd1")), [str(path)], out, alpha=0.5))
    merged, base = open_checkpoint(out), tiny_pipe("sd1").unet.state_dict()
    key = q.removeprefix("unet.")
    torch.testing.assert_close(merged.tensor("unet", key + ".weight"), base[key + ".weight"] + 0.5 * diff)
    torch.testing.assert_close(merged.tensor("unet", key + ".bias"), base[key + ".bias"] + 0.5 * diff_b)
