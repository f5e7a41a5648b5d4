"""lorax extract: a known rank-r LoRA merged into a model comes back out of the difference."""

from __future__ import annotations

import json

from checkpoint_helpers import save, scratch, tiny_lora, tiny_single

from lorax.formats import load_lora
from lorax.services.extract import ExtractConfig, extract
from lorax.services.merge import MergeConfig, merge


def test_extract_recovers_a_merged_lora(cli) -> None:  # type: ignore[no-untyped-def]
    d = scratch("extract")
    state = tiny_lora("sd2", seed=31, rank=4, alpha=4.0)
    lora = save(state, d / "l.safetensors")
    tuned = d / "tuned.safetensors"
    merge(MergeConfig(str(tiny_single("sd2")), [str(lora)], tuned))
    result = cli(
        "extract",
        tiny_single("sd2"),
        tuned,
        "-o",
        d / "x.safetensors",
        "--rank",
        "4",
        "--targets",
        "all",
        "--json",
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["modules"] == len(state.modules) and doc["family"] == "sd2"
    got = load_lora(d / "x.safetensors")
    assert set(got.modules) == set(state.modules)
    for name, m in state.modules.items():
        want = m.delta()
        err = float((got.modules[name].delta() - want).norm() / want.norm())
        assert err <= 1e-4, (name, err)
    attn_only = extract(ExtractConfig(str(tiny_single("sd2")), str(tuned), d / "a.safetensors", rank=4))
    assert attn_only.modules == sum(1 for n in state.modules if "attn" in n)


def test_extract_error_falls_with_rank() -> None:
    d = scratch("extract-rank")
    state = tiny_lora("sd1", seed=32, rank=8, conv=False)
    tuned = d / "tuned.safetensors"
    merge(MergeConfig(str(tiny_single("sd1")), [str(save(state, d / "l.safetensors"))], tuned))
    worst = []
    for rank in (2, 4, 8):
        result = extract(
            ExtractConfig(str(tiny_single("sd1")), str(tuned), d / f"x{rank}.safetensors", rank=rank)
        )
        worst.append(result.worst.error)
        assert 0 < result.mean_energy <= 1
    assert worst[0] > worst[1] > worst[2] and worst[2] < 1e-4
    clamped = extract(
        ExtractConfig(str(tiny_single("sd1")), str(tuned), d / "c.safetensors", rank=8, clamp_quantile=0.5)
    )
    got = load_lora(d / "c.safetensors")
    name = clamped.extracted[0].module
    raw = load_lora(d / "x8.safetensors").modules[name]
    assert got.modules[name].up.abs().max() < raw.up.abs().max()  # clamping bites
