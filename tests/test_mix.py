"""lorax mix: the weighted sum of LoRAs' deltas, exact by concatenation or SVD-compressed, and recipes."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_helpers import save, scratch, tiny_lora

from lorax.errors import ConfigError
from lorax.formats import load_lora
from lorax.services.mix import MixConfig, mix


def test_exact_mix_is_the_weighted_sum_of_deltas() -> None:
    d = scratch("mix")
    a, b = (
        tiny_lora("sd1", seed=21, rank=4, alpha=2.0),
        tiny_lora("sd1", seed=22, rank=2, alpha=8.0, conv=False),
    )
    pa, pb = save(a, d / "a.safetensors"), save(b, d / "b.safetensors", "diffusers")
    result = mix(MixConfig([f"{pa}:0.7", f"{pb}:-0.3"], d / "m.safetensors"))
    assert result.exact and result.modules == len(a.modules)
    mixed = load_lora(d / "m.safetensors")
    for name, m in mixed.modules.items():
        want = 0.7 * a.modules[name].delta() + (-0.3 * b.modules[name].delta() if name in b.modules else 0)
        torch.testing.assert_close(m.delta(), want, atol=1e-6, rtol=1e-5)
    assert 6 in mixed.ranks() and 4 in mixed.ranks()  # ranks add where both have the module; conv only in A


def test_svd_mix_error_falls_with_rank_and_is_reported() -> None:
    d = scratch("mixsvd")
    a, b = tiny_lora("sd1", seed=23, rank=4), tiny_lora("sd1", seed=24, rank=4)
    pa, pb = save(a, d / "a.safetensors"), save(b, d / "b.safetensors")
    worst = []
    for rank in (1, 3, 8):
        result = mix(MixConfig([str(pa), f"{pb}:0.5"], d / f"m{rank}.safetensors", rank=rank))
        assert not result.exact and result.worst is not None
        mixed = load_lora(d / f"m{rank}.safetensors")
        for e in result.errors:
            want = a.modules[e.module].delta() + 0.5 * b.modules[e.module].delta()
            real = float((mixed.modules[e.module].delta() - want).norm() / want.norm())
            assert abs(real - e.error) < 1e-4, e.module
        worst.append(result.worst.error)
    assert worst[0] > worst[1] > worst[2] and worst[2] < 1e-5


def test_recipe_and_cli(cli) -> None:  # type: ignore[no-untyped-def]
    d = scratch("recipe")
    a, b = tiny_lora("sd1", seed=25), tiny_lora("sd1", seed=26)
    save(a, d / "a.safetensors")
    save(b, d / "b.safetensors")
    (d / "mix.toml").write_text(
        'output = "out.safetensors"\nformat = "diffusers"\n'
        '[[lora]]\npath = "a.safetensors"\nweight = 0.25\n[[lora]]\npath = "b.safetensors"\nweight = 0.75\n'
    )
    result = cli("mix", "--recipe", d / "mix.toml", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["format"] == "diffusers" and [i["weight"] for i in doc["inputs"]] == [0.25, 0.75]
    mixed = load_lora(d / "out.safetensors")
    name = next(iter(a.modules))
    torch.testing.assert_close(
        mixed.modules[name].delta(),
        0.25 * a.modules[name].delta() + 0.75 * b.modules[name].delta(),
        atol=1e-6,
        rtol=1e-5,
    )
    (d / "bad.toml").write_text('[[lora]]\npath = "a.safetensors"\nwieght = 2\n')
    bad = cli("mix", "--recipe", d / "bad.toml", "-o", d / "x.safetensors")
    assert bad.exit_code == 1 and "wieght" in bad.stderr
    with pytest.raises(ConfigError, match="-o"):
        mix(MixConfig([str(d / "a.safetensors")]))


def test_different_families_do_not_mix() -> None:
    from lorax.errors import MismatchError

    d = scratch("fam")
    pa, pb = save(tiny_lora("sd1"), d / "a.safetensors"), save(tiny_lora("sd2"), d / "b.safetensors")
    with pytest.raises(MismatchError, match="different model families"):
        mix(MixConfig([str(pa), str(pb)], d / "m.safetensors"))
