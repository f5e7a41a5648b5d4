"""Every LyCORIS algorithm lorax reads, merged into a tiny SD1 single file, against a hand computation written here
from the published definitions (LyCORIS ``lycoris/modules``, ComfyUI ``comfy/weight_adapter``), at strengths 1.0
and 0.6; every tensor the file does not target stays bit-identical.

Definitions used (ΔW at strength 1; merged W = W0 + s·ΔW unless said):
* LoHa: ΔW = (α/r)·(w1a@w1b) ⊙ (w2a@w2b); Tucker: each factor is Σ_ij t[i,j,k,l]·wa[i,p]·wb[j,q] → [p, q, k, l].
* LoKr: ΔW = (α/r)·kron(W1, W2), W1 = w1 or w1a@w1b, W2 = w2, w2a@w2b or the Tucker rebuild; scale 1 if both full.
* LoCon-Tucker: ΔW[o, n, k, l] = (α/r)·Σ_ij up[o,i]·mid[i,j,k,l]·down[j,n].
* DoRA (on a LoRA, LoHa or LoKr delta): W' = m·V/‖V‖, V = W0 + ΔW, norm per output row (m [out, 1]) or per input
  column (m [1, in, …], over output and kernel axes); merged W = W0 + s·(W' − W0) (ComfyUI's rule).
* IA3: ΔW = W0 ⊙ w, w per output row (on_input 0) or per input column (on_input 1).
* full: ΔW = diff, Δb = diff_b.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import scratch, tiny_single
from safetensors.torch import load_file, save_file

from lorax.io.checkpoint import open_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATT = "down_blocks.0.attentions.0.transformer_blocks.0"
ATT1 = "down_blocks.0.attentions.1.transformer_blocks.0"
RES = "down_blocks.0.resnets"
TE_ATT = "text_model.encoder.layers.0.self_attn"


def _stem(component: str, path: str) -> str:
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component]
    return prefix + path.replace(".", "_")


def _single_key(component: str, path: str, param: str = "weight") -> str:
    """The original-layout key of a module in the tiny SD1 single file (read from its keymap, not guessed)."""
    ckpt = open_checkpoint(tiny_single("sd1"))
    found = ckpt.keymap.locate(component, f"{path}.{param}")  # type: ignore[union-attr]
    assert found is not None, path
    return str(found[0].single)


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Σ_ij t[i, j, k, l] · wa[i, p] · wb[j, q], written out as two contractions."""
    tmp = (t[:, :, None] * wa[:, None, :, None, None]).sum(0)  # Σ_i → [j, p, k, l]
    return (tmp[:, :, None] * wb[:, None, :, None, None]).sum(0)  # Σ_j → [p, q, k, l]


def _kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Kronecker product by blocks: block (i, j) is a[i, j] · b (a 2-D, b 2-D or 4-D)."""
    rows = [torch.cat([a[i, j] * b for j in range(a.shape[1])], dim=1) for i in range(a.shape[0])]
    return torch.cat(rows, dim=0)


def _dora(w0: torch.Tensor, delta: torch.Tensor, m: torch.Tensor, on_out: bool) -> torch.Tensor:
    v = w0 + delta
    if on_out:
        norm = torch.sqrt((v**2).reshape(v.shape[0], -1).sum(1)).reshape(-1, *[1] * (v.dim() - 1))
    else:
        norm = torch.sqrt((v**2).sum(dim=[d for d in range(v.dim()) if d != 1], keepdim=True))
    return m.reshape(norm.shape) * v / norm


@cache
def _case() -> tuple[Path, dict[str, dict]]:
    """One LyCORIS file with every algorithm, and per targeted single-file key its hand-made expectation."""
    g = torch.Generator().manual_seed(12)

    def rnd(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    base = load_file(tiny_single("sd1"))
    tensors: dict[str, torch.Tensor] = {}
    expect: dict[str, dict] = {}  # single key -> {"delta": ΔW} | {"dora": W'} | {"ia3": (w, on_input)}

    def add(component: str, path: str, parts: dict[str, torch.Tensor], alpha: float | None = None) -> None:
        stem = _stem(component, path)
        tensors.update({f"{stem}.{k}": v for k, v in parts.items()})
        if alpha is not None:
            tensors[f"{stem}.alpha"] = torch.tensor(alpha)

    def w0(component: str, path: str) -> torch.Tensor:
        return base[_single_key(component, path)].float()

    # LoHa (linear), α=2, r=4
    p = f"{ATT}.attn1.to_q"
    w1a, w1b, w2a, w2b = rnd(32, 4), rnd(4, 32), rnd(32, 4), rnd(4, 32)
    add("unet", p, {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}, 2.0)
    expect[_single_key("unet", p)] = {"delta": (2.0 / 4) * (w1a @ w1b) * (w2a @ w2b)}

    # LoHa-Tucker on a 3×3 conv, α=1, r=2 (wa [r, out], wb [r, in], t [r, r, 3, 3])
    p = f"{RES}.0.conv1"
    t1, a1, b1, t2, a2, b2 = rnd(2, 2, 3, 3), rnd(2, 32), rnd(2, 32), rnd(2, 2, 3, 3), rnd(2, 32), rnd(2, 32)
    parts = {"hada_t1": t1, "hada_w1_a": a1, "hada_w1_b": b1, "hada_t2": t2, "hada_w2_a": a2, "hada_w2_b": b2}
    add("unet", p, parts, 1.0)
    expect[_single_key("unet", p)] = {"delta": (1.0 / 2) * _tucker(t1, a1, b1) * _tucker(t2, a2, b2)}

    # LoKr with factored w1 and Tucker w2 on a 3×3 conv (decompose_both + use_tucker): out 32 = 4·8, in 32 = 4·8
    p = f"{RES}.0.conv2"
    k1a, k1b, kt, k2a, k2b = rnd(4, 2), rnd(2, 4), rnd(2, 2, 3, 3), rnd(2, 8), rnd(2, 8)
    add(
        "unet",
        p,
        {"lokr_w1_a": k1a, "lokr_w1_b": k1b, "lokr_t2": kt, "lokr_w2_a": k2a, "lokr_w2_b": k2b},
        1.0,
    )
    expect[_single_key("unet", p)] = {"delta": (1.0 / 2) * _kron(k1a @ k1b, _tucker(kt, k2a, k2b))}

    # LoKr: full w1, factored w2 (linear), α=1, r=2
    p = f"{ATT}.attn1.to_k"
    w1, la, lb = rnd(4, 4), rnd(8, 2), rnd(2, 8)
    add("unet", p, {"lokr_w1": w1, "lokr_w2_a": la, "lokr_w2_b": lb}, 1.0)
    expect[_single_key("unet", p)] = {"delta": (1.0 / 2) * _kron(w1, la @ lb)}

    # LoKr: factored w1, full w2 (linear), α=3, r=2
    p = f"{ATT}.attn1.to_v"
    fa, fb, w2 = rnd(4, 2), rnd(2, 4), rnd(8, 8)
    add("unet", p, {"lokr_w1_a": fa, "lokr_w1_b": fb, "lokr_w2": w2}, 3.0)
    expect[_single_key("unet", p)] = {"delta": (3.0 / 2) * _kron(fa @ fb, w2)}

    # LoKr on the text encoder: both full (scale 1, alpha ignored)
    p = f"{TE_ATT}.q_proj"
    e1, e2 = rnd(2, 4), rnd(16, 8)
    add("text_encoder", p, {"lokr_w1": e1, "lokr_w2": e2}, 7.0)
    expect[_single_key("text_encoder", p)] = {"delta": _kron(e1, e2)}

    # LoCon-Tucker on a 3×3 conv: down [r, in, 1, 1], mid [r, r, 3, 3], up [out, r, 1, 1], α=2, r=4
    p = f"{RES}.1.conv1"
    dn, mid, up = rnd(4, 32, 1, 1), rnd(4, 4, 3, 3), rnd(32, 4, 1, 1)
    add("unet", p, {"lora_down.weight": dn, "lora_mid.weight": mid, "lora_up.weight": up}, 2.0)
    locon = torch.zeros(32, 32, 3, 3)
    for i in range(4):
        for j in range(4):
            locon += (
                up[:, i, 0, 0][:, None, None, None]
                * mid[i, j][None, None]
                * dn[j, :, 0, 0][None, :, None, None]
            )
    expect[_single_key("unet", p)] = {"delta": (2.0 / 4) * locon}

    # DoRA on output rows (wd_on_out): LoRA + dora_scale [out, 1], α=4, r=4
    p = f"{ATT}.attn1.to_out.0"
    d, u, m = rnd(4, 32), rnd(32, 4), rnd(32, 1).abs() + 0.5
    add("unet", p, {"lora_down.weight": d, "lora_up.weight": u, "dora_scale": m}, 4.0)
    expect[_single_key("unet", p)] = {"dora": _dora(w0("unet", p), u @ d, m, True)}

    # DoRA on input columns (kohya): dora_scale [1, in], α=2, r=4
    p = f"{ATT}.attn2.to_q"
    d, u, m = rnd(4, 32), rnd(32, 4), rnd(1, 32).abs() + 0.5
    add("unet", p, {"lora_down.weight": d, "lora_up.weight": u, "dora_scale": m}, 2.0)
    expect[_single_key("unet", p)] = {"dora": _dora(w0("unet", p), 0.5 * (u @ d), m, False)}

    # DoRA on input columns of a 3×3 conv LoCon: dora_scale [1, in, 1, 1]
    p = f"{RES}.1.conv2"
    d, u, m = rnd(4, 32, 3, 3), rnd(32, 4, 1, 1), rnd(1, 32, 1, 1).abs() + 0.5
    add("unet", p, {"lora_down.weight": d, "lora_up.weight": u, "dora_scale": m}, 4.0)
    conv = (u.reshape(32, 4) @ d.reshape(4, -1)).reshape(32, 32, 3, 3)
    expect[_single_key("unet", p)] = {"dora": _dora(w0("unet", p), conv, m, False)}

    # LoHa + DoRA (LyCORIS weight_decompose, wd_on_out): dora_scale [out, 1]
    p = f"{ATT}.attn2.to_k"
    w1a, w1b, w2a, w2b, m = rnd(32, 2), rnd(2, 32), rnd(32, 2), rnd(2, 32), rnd(32, 1).abs() + 0.5
    add(
        "unet",
        p,
        {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b, "dora_scale": m},
        1.0,
    )
    expect[_single_key("unet", p)] = {"dora": _dora(w0("unet", p), 0.5 * (w1a @ w1b) * (w2a @ w2b), m, True)}

    # LoKr + DoRA on input columns: dora_scale [1, in]
    p = f"{ATT}.attn2.to_v"
    w1, la, lb, m = rnd(4, 4), rnd(8, 2), rnd(2, 8), rnd(1, 32).abs() + 0.5
    add("unet", p, {"lokr_w1": w1, "lokr_w2_a": la, "lokr_w2_b": lb, "dora_scale": m}, 2.0)
    expect[_single_key("unet", p)] = {"dora": _dora(w0("unet", p), _kron(w1, la @ lb), m, False)}

    # IA3 on output rows (linear), on input columns (linear), on output channels of a conv ([1, out, 1, 1])
    for p, w, on_input in (
        (f"{ATT}.ff.net.2", rnd(32), 0),
        (f"{ATT}.ff.net.0.proj", rnd(32), 1),
        ("down_blocks.0.downsamplers.0.conv", rnd(1, 32, 1, 1), 0),
    ):
        add("unet", p, {"weight": w, "on_input": torch.tensor(on_input)})
        base_w = w0("unet", p)
        shape = (1, -1, *[1] * (base_w.dim() - 2)) if on_input else (-1, 1, *[1] * (base_w.dim() - 2))
        expect[_single_key("unet", p)] = {"delta": base_w * w.reshape(shape)}

    # full difference with a bias difference
    p = f"{ATT1}.attn1.to_out.0"
    diff, diff_b = rnd(32, 32, scale=0.05), rnd(32, scale=0.05)
    add("unet", p, {"diff": diff, "diff_b": diff_b})
    expect[_single_key("unet", p)] = {"delta": diff}
    expect[_single_key("unet", p, "bias")] = {"delta": diff_b}

    path = scratch("lyco-algos") / "every_algorithm.safetensors"
    save_file(tensors, str(path))
    return path, expect


def _want(w0: torch.Tensor, how: dict, s: float) -> torch.Tensor:
    if "dora" in how:
        return w0 + s * (how["dora"] - w0)
    return w0 + s * how["delta"].reshape(w0.shape)


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_every_algorithm_merges_as_its_definition(cli, strength: float) -> None:  # type: ignore[no-untyped-def]
    path, expect = _case()
    out = path.parent / f"merged-{strength}.safetensors"
    result = cli("merge", tiny_single("sd1"), path, "--alpha", str(strength), "-o", out, "--json")
    assert result.exit_code == 0, result.stderr + result.stdout
    doc = json.loads(result.stdout)
    assert doc["loras"][0]["matched"] == doc["loras"][0]["modules"] == 16
    base, merged = load_file(tiny_single("sd1")), load_file(out)
    assert set(merged) == set(base)
    for key in base:
        w0, w = base[key], merged[key]
        if key in expect:
            want = _want(w0.float(), expect[key], strength)
            torch.testing.assert_close(w.float(), want, rtol=1e-5, atol=1e-6, msg=key)
            assert not torch.equal(w, w0), key
        else:
            assert w.dtype == w0.dtype and torch.equal(w, w0), f"{key} changed although no module targets it"


def test_inspect_names_every_algorithm(cli) -> None:  # type: ignore[no-untyped-def]
    path, _ = _case()
    result = cli("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    (doc,) = json.loads(result.stdout)
    assert doc["format"] == "lycoris" and doc["modules"] == 16
    assert set(doc["algorithms"]) == {"loha", "lokr", "lora", "dora", "loha+dora", "lokr+dora", "ia3", "full"}


def test_convert_keeps_every_algorithm(cli) -> None:  # type: ignore[no-untyped-def]
    """lycoris → kohya naming again: the same tensors under the same names (nothing folded, nothing dropped)."""
    path, _ = _case()
    out = path.parent / "converted.safetensors"
    result = cli("convert", path, "--to", "kohya", "-o", out)
    assert result.exit_code == 0, result.stderr + result.stdout
    src, dst = load_file(path), load_file(out)
    lora_mid = {k for k in src if k.endswith(".lora_mid.weight")}
    assert set(dst) == set(src) - lora_mid  # the Tucker mid is folded into down, exactly
    for key in dst:
        if ".lora_down." in key and key.replace("lora_down", "lora_mid") in lora_mid:
            continue
        assert torch.equal(dst[key].reshape(src[key].shape), src[key]), key


def test_ia3_with_the_wrong_length_is_refused(cli) -> None:  # type: ignore[no-untyped-def]
    d = scratch("ia3-bad")
    bad = d / "bad.safetensors"
    save_file({f"{_stem('unet', ATT + '.ff.net.2')}.weight": torch.ones(7), f"{_stem('unet', ATT + '.ff.net.2')}.on_input": torch.tensor(0)}, str(bad))  # fmt: skip
    result = cli("merge", tiny_single("sd1"), bad, "-o", d / "out.safetensors")
    assert result.exit_code == 1
    assert "do not fit" in result.stderr and "IA3 over 7 output rows" in result.stderr
    assert "Traceback" not in result.stderr and not (d / "out.safetensors").exists()


def test_lycoris_library_agrees_at_full_strength(cli) -> None:  # type: ignore[no-untyped-def]
    """The LyCORIS library's own modules (when installed) compute the same layer outputs as the merged weights.

    Their ``forward`` is the oracle: in lycoris-lora 4.1.3 ``get_diff_weight`` / ``get_merged_weight`` apply
    ``alpha / r`` twice (``get_weight`` already holds it), unlike ``forward`` and every consumer.
    """
    loha_mod = pytest.importorskip("lycoris.modules.loha")
    lokr_mod = pytest.importorskip("lycoris.modules.lokr")
    path, _ = _case()
    out = path.parent / "merged-lycoris.safetensors"
    assert cli("merge", tiny_single("sd1"), path, "-o", out).exit_code == 0
    base, merged, file = load_file(tiny_single("sd1")), load_file(out), load_file(path)
    linear = lambda: torch.nn.Linear(32, 32, bias=False)  # noqa: E731
    conv = lambda: torch.nn.Conv2d(32, 32, 3, padding=1, bias=False)  # noqa: E731
    cases = [
        (loha_mod.LohaModule, f"{ATT}.attn1.to_q", linear()),
        (loha_mod.LohaModule, f"{RES}.0.conv1", conv()),
        (loha_mod.LohaModule, f"{ATT}.attn2.to_k", linear()),
        (lokr_mod.LokrModule, f"{ATT}.attn1.to_k", linear()),
    ]  # LyCORIS' state-dict loader rebuilds LoKr layouts of its own factorisation only (not rank-2 Tucker on 32 = 4·8)
    g = torch.Generator().manual_seed(3)
    for cls, p, layer in cases:
        key, stem = _single_key("unet", p), _stem("unet", p)
        with torch.no_grad():
            layer.weight.copy_(base[key].float())

        def get(name: str, stem: str = stem) -> torch.Tensor | None:
            return file.get(f"{stem}.{name}")

        alpha, dora = get("alpha"), get("dora_scale")
        with torch.no_grad():
            if cls is loha_mod.LohaModule:
                names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
                module = cls.make_module_from_state_dict(stem, layer, *(get(n) for n in names), alpha, dora)
            else:
                names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
                module = cls.make_module_from_state_dict(
                    stem, layer, *(get(n) for n in names), None, get("lokr_t2"), alpha, dora
                )
            module.eval()
            if isinstance(layer, torch.nn.Conv2d):
                x = torch.randn(2, 32, 6, 6, generator=g)
                want = torch.nn.functional.conv2d(x, merged[key].float(), padding=1)
            else:
                x = torch.randn(3, 32, generator=g)
                want = torch.nn.functional.linear(x, merged[key].float())
            got = module(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=p)


def test_generate_applies_every_algorithm_as_merge_does(cli) -> None:  # type: ignore[no-untyped-def]
    """generate's live patching (``apply_loras``) gives the weights the checked merge wrote, at strength 0.6, and
    taking the LoRA off restores the base exactly."""
    from checkpoint_helpers import tiny_pipe

    from lorax.adapters.apply import LoraRequest, apply_loras
    from lorax.formats import load_lora

    path, _ = _case()
    out = path.parent / "merged-live.safetensors"
    assert cli("merge", tiny_single("sd1"), path, "--alpha", "0.6", "-o", out).exit_code == 0
    merged = load_file(out)
    pipe = tiny_pipe("sd1")
    state = load_lora(path, model=pipe)
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    applied = apply_loras(
        pipe, [LoraRequest(state, unet_scale=0.6)], fuse=True
    )  # PEFT layers into the weights
    try:
        for name in state.modules:
            component, _, p = name.partition(".")
            model = getattr(pipe, component)
            live = p.removeprefix("text_model.") if not hasattr(model, "text_model") else p
            got = model.get_submodule(live).weight.detach()
            want = merged[_single_key(component, p)].float()
            torch.testing.assert_close(got, want.reshape(got.shape), rtol=1e-5, atol=1e-6, msg=name)
    finally:
        applied.remove()
    for n, p in pipe.unet.named_parameters():
        assert torch.equal(p, before[n]), n
