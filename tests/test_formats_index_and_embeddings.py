"""lora_diffusion (index-ordered) files, token embeddings, and LyCORIS / DoRA modules against hand computations."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

from lorax.adapters.state import LoraModule, LoraState
from lorax.errors import MismatchError
from lorax.formats import (
    detect_format,
    load_embeddings,
    load_lora,
    lora_diffusion,
    save_embeddings,
    save_lora,
)
from lorax.io.safetensors_io import SafetensorsFile, save_tensors
from lorax.models import families
from lorax.zoo.tiny import tiny_pipeline


@pytest.fixture(scope="session")
def pipe():
    return tiny_pipeline("sd1", seed=3)


def find_modules(model: nn.Module, ancestor_class: set[str], search_class=(nn.Linear,)) -> list[str]:
    """lora_diffusion's ``_find_modules_v2`` walk, reproduced: the names of the modules it yields, in order."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for ancestor in (m for m in model.modules() if m.__class__.__name__ in ancestor_class):
        for _, module in ancestor.named_modules():
            if any(isinstance(module, c) for c in search_class):
                out.append(names[id(module)])
    return out


def old_block_order(unet: nn.Module) -> nn.Module:
    """A copy whose transformer blocks register ``ff`` before ``attn2``, as diffusers ≤ 0.14 did."""
    unet = copy.deepcopy(unet)
    for module in unet.modules():
        if type(module).__name__ == "BasicTransformerBlock":
            order = ["attn1", "ff", "attn2"]
            reordered = OrderedDict((k, module._modules[k]) for k in order)
            reordered.update((k, v) for k, v in module._modules.items() if k not in order)
            module._modules = reordered
    return unet


def marked_pairs(
    model: nn.Module, names: list[str], rank: int = 2
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pair i has up filled with i + 1 (so every index is recognisable after reading)."""
    pairs = []
    for i, name in enumerate(names):
        w = model.get_submodule(name).weight
        down = torch.randn(rank, *w.shape[1:])
        up = torch.full((w.shape[0], rank, *([1, 1] if w.dim() == 4 else [])), float(i + 1))
        pairs.append((up, down))
    return pairs


def check_indices(state: LoraState, component: str, names: list[str]) -> None:
    got = state.component_modules(component)
    assert len(got) == len(names)
    for i, name in enumerate(names):
        m = got[families.live_to_disk(component, name)]
        assert isinstance(m, LoraModule)
        assert torch.all(m.up == i + 1), (i, name)
        assert m.alpha == m.rank


@pytest.mark.parametrize("era", ["new", "old"])
@pytest.mark.parametrize("extended", [False, True])
def test_lora_diffusion_safetensors_indices(tmp_path, pipe, era, extended):
    unet_targets = (
        {"ResnetBlock2D", "CrossAttention", "Attention", "GEGLU"}
        if extended
        else {"CrossAttention", "Attention", "GEGLU"}
    )
    search = (nn.Linear, nn.Conv2d) if extended else (nn.Linear,)
    layout_unet = pipe.unet if era == "new" else old_block_order(pipe.unet)
    unet_names = find_modules(layout_unet, unet_targets, search)
    te_names = find_modules(pipe.text_encoder, {"CLIPAttention"})
    assert te_names[:4] == [
        f"encoder.layers.0.self_attn.{p}" for p in ("k_proj", "v_proj", "q_proj", "out_proj")
    ]
    tensors, metadata = (
        {},
        {"unet": json.dumps(sorted(unet_targets)), "text_encoder": json.dumps(["CLIPAttention"])},
    )
    for component, model, names in [
        ("unet", layout_unet, unet_names),
        ("text_encoder", pipe.text_encoder, te_names),
    ]:
        for i, (up, down) in enumerate(marked_pairs(model, names)):
            tensors[f"{component}:{i}:up"], tensors[f"{component}:{i}:down"] = up, down
            metadata[f"{component}:{i}:rank"] = "2"
    tensors["<s1>"] = torch.randn(32)
    metadata["<s1>"] = "<embed>"
    path = tmp_path / "ld.safetensors"
    save_tensors(tensors, path, metadata)
    assert detect_format(path) == "lora_diffusion"
    state = load_lora(path, model=pipe)  # the live model uses the new order either way
    check_indices(state, "unet", unet_names)
    check_indices(state, "text_encoder", te_names)
    assert torch.equal(state.embeddings["<s1>"]["text_encoder"][0], tensors["<s1>"])


def test_lora_diffusion_legacy_pt_set(tmp_path, pipe):
    unet_names = find_modules(pipe.unet, {"CrossAttention", "Attention", "GEGLU"})
    te_names = find_modules(pipe.text_encoder, {"CLIPAttention"})
    unet_pairs, te_pairs = marked_pairs(pipe.unet, unet_names), marked_pairs(pipe.text_encoder, te_names)
    torch.save([t for pair in unet_pairs for t in pair], tmp_path / "x.pt")
    torch.save([t for pair in te_pairs for t in pair], tmp_path / "x.text_encoder.pt")
    torch.save({"<krk>": torch.randn(32)}, tmp_path / "x.ti.pt")
    assert detect_format(tmp_path / "x.pt") == "lora_diffusion"
    for member in ("x.pt", "x.text_encoder.pt"):
        state = load_lora(tmp_path / member, model=pipe)
        check_indices(state, "unet", unet_names)
        check_indices(state, "text_encoder", te_names)
        assert set(state.embeddings) == {"<krk>"}


def test_lora_diffusion_full_size_family_without_model(tmp_path):
    """Without a model, indices resolve against the family's full-size meta model (family told by shapes)."""
    meta = {c: families.meta_model("sd2", c) for c in ("unet", "text_encoder")}
    tensors = {}
    names = {}
    for component, model in meta.items():
        targets = {"CrossAttention", "Attention", "GEGLU"} if component == "unet" else {"CLIPAttention"}
        names[component] = find_modules(model, targets)
        for i, name in enumerate(names[component]):
            out, inp = model.get_submodule(name).weight.shape
            tensors[f"{component}:{i}:up"] = torch.full((out, 1), float(i + 1))
            tensors[f"{component}:{i}:down"] = torch.zeros(1, inp)
    path = tmp_path / "sd2.safetensors"
    save_tensors(tensors, path, {})
    state = load_lora(path)
    assert state.family == "sd2"
    for component in meta:
        check_indices(state, component, names[component])


def test_lora_diffusion_ambiguous_orders_refused():
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q, self.to_k, self.to_v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.to_out = nn.ModuleList([nn.Linear(8, 8)])

    class GEGLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn1, self.attn2 = Attention(), Attention()
            self.ff = nn.Module()
            self.ff.net = nn.ModuleList([GEGLU()])

    model = nn.Module()
    model.transformer_blocks = nn.ModuleList([Block()])
    pairs = [(torch.zeros(8, 1), torch.zeros(1, 8))] * 9
    with pytest.raises(MismatchError, match="fit both"):
        lora_diffusion.resolve(pairs, model, "unet", [lora_diffusion.UNET_DEFAULT])


def test_lora_diffusion_count_mismatch(pipe):
    with pytest.raises(MismatchError, match="do not match the model"):
        lora_diffusion.resolve(
            [(torch.zeros(4, 1), torch.zeros(1, 4))], pipe.unet, "unet", [lora_diffusion.UNET_DEFAULT]
        )


def test_lora_diffusion_write_read(tmp_path, pipe):
    """lorax writes lora_diffusion with the scale folded into up; a subset of targets is padded with zero pairs."""
    gen = torch.Generator().manual_seed(0)
    state = LoraState(family="sd1")
    for key in ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                "unet.up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj",
                "text_encoder.text_model.encoder.layers.1.self_attn.q_proj"):  # fmt: skip
        component, _, inner = key.partition(".")
        out, inp = families.weight_table(getattr(pipe, component), component)[inner]
        state.modules[key] = LoraModule(
            torch.randn(2, inp, generator=gen), torch.randn(out, 2, generator=gen), 0.5
        )
    state.embeddings["<s1>"] = {"text_encoder": torch.randn(1, 32, generator=gen)}
    path = tmp_path / "w.safetensors"
    save_lora(state, path, format="lora_diffusion", model=pipe)
    raw = SafetensorsFile(path)
    assert json.loads(raw.metadata["unet"]) == list(lora_diffusion.UNET_DEFAULT)
    assert raw.metadata["<s1>"] == "<embed>"
    back = load_lora(path, model=pipe)
    nonzero = {k for k, m in back.modules.items() if m.delta().abs().sum() > 0}
    assert nonzero == set(state.modules)
    for key, m in state.modules.items():
        torch.testing.assert_close(back.modules[key].delta(), m.delta(), atol=1e-6, rtol=0)
    assert torch.equal(back.embeddings["<s1>"]["text_encoder"], state.embeddings["<s1>"]["text_encoder"])


# --- embeddings ----------------------------------------------------------------------------------------------


def test_embedding_formats_round_trip(tmp_path):
    vec = torch.randn(2, 768)
    g = torch.randn(2, 1280)
    cases = [
        ("a1111.pt", {"tok": {"text_encoder": vec}}, "a1111-embedding", "tok"),
        ("emb.safetensors", {"emb": {"text_encoder": vec}}, "a1111-embedding", "emb"),
        ("xl.safetensors", {"xl": {"text_encoder": vec, "text_encoder_2": g}}, "sdxl-embedding", "xl"),
        (
            "learned_embeds.safetensors",
            {"<cat>": {"text_encoder": vec[:1]}, "<dog>": {"text_encoder": vec}},
            "diffusers-embedding",
            None,
        ),
    ]
    for name, emb, fmt, _ in cases:
        path = tmp_path / name
        save_embeddings(emb, path, format=fmt)
        assert detect_format(path) == fmt
        back = load_embeddings(path)
        assert set(back) == set(emb)
        for token, per in emb.items():
            assert set(back[token]) == set(per)
            for component, t in per.items():
                assert torch.equal(back[token][component], t)
    a1111 = torch.load(tmp_path / "a1111.pt", weights_only=True)
    assert torch.equal(a1111["string_to_param"]["*"], vec) and a1111["name"] == "tok"
    assert SafetensorsFile(tmp_path / "learned_embeds.safetensors").get("<cat>").shape == (768,)


def test_kohya_bundled_embeddings(tmp_path):
    state = LoraState(family="sd1")
    state.modules["unet.conv_in"] = LoraModule(torch.randn(1, 4, 3, 3), torch.randn(320, 1, 1, 1), 1.0)
    state.embeddings["<s1>"] = {"text_encoder": torch.randn(3, 768)}
    path = tmp_path / "b.safetensors"
    save_lora(state, path, format="kohya")
    assert "bundle_emb.<s1>.string_to_param.*" in SafetensorsFile(path)
    assert torch.equal(
        load_embeddings(path)["<s1>"]["text_encoder"], state.embeddings["<s1>"]["text_encoder"]
    )
    xl = LoraState(
        family="sdxl",
        embeddings={"<t>": {"text_encoder": torch.randn(1, 768), "text_encoder_2": torch.randn(1, 1280)}},
    )
    save_lora(xl, tmp_path / "xl.safetensors", format="kohya")
    assert {"bundle_emb.<t>.clip_l", "bundle_emb.<t>.clip_g"} <= set(
        SafetensorsFile(tmp_path / "xl.safetensors").keys()
    )
    back = load_lora(tmp_path / "xl.safetensors")
    assert torch.equal(back.embeddings["<t>"]["text_encoder_2"], xl.embeddings["<t>"]["text_encoder_2"])


# --- LyCORIS and DoRA ----------------------------------------------------------------------------------------


def test_loha_lokr_read_against_hand_math(tmp_path):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    out_, in_ = 320, 320  # down_blocks.0 attn1.to_q of sd1
    loha = {"hada_w1_a": r(out_, 4), "hada_w1_b": r(4, in_), "hada_w2_a": r(out_, 4), "hada_w2_b": r(4, in_)}
    lokr = {"lokr_w1": r(16, 8), "lokr_w2_a": r(20, 2), "lokr_w2_b": r(2, 40)}
    # conv LoHa with Tucker cores: sd1 down_blocks.0.resnets.0.conv1 is [320, 320, 3, 3]
    cp = {"hada_w1_a": r(2, 320), "hada_w1_b": r(2, 320), "hada_t1": r(2, 2, 3, 3),
          "hada_w2_a": r(2, 320), "hada_w2_b": r(2, 320), "hada_t2": r(2, 2, 3, 3)}  # fmt: skip
    stems = {
        "loha": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        "lokr": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k",
        "cp": "lora_unet_down_blocks_0_resnets_0_conv1",
    }
    tensors = {}
    for name, parts in (("loha", loha), ("lokr", lokr), ("cp", cp)):
        tensors |= {f"{stems[name]}.{k}": v for k, v in parts.items()}
    tensors[f"{stems['loha']}.alpha"] = torch.tensor(2.0)
    tensors[f"{stems['lokr']}.alpha"] = torch.tensor(1.0)
    tensors[f"{stems['cp']}.alpha"] = torch.tensor(1.0)
    # make it sd1 (cross-attention width 768) so the family's weight shapes are known
    tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"] = r(
        1, 768
    )
    tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight"] = r(320, 1)
    path = tmp_path / "lyco.safetensors"
    save_tensors(tensors, path)
    assert detect_format(path) == "lycoris"
    state = load_lora(path)
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1."
    # LoHa: elementwise product of two rank-4 products, times alpha / r
    hand = (loha["hada_w1_a"] @ loha["hada_w1_b"]) * (loha["hada_w2_a"] @ loha["hada_w2_b"]) * (2.0 / 4)
    torch.testing.assert_close(state.modules[prefix + "to_q"].delta(), hand)
    # LoKr: block (i, j) of the Kronecker product is w1[i, j] * w2, scale alpha / r with r = 2
    w2 = lokr["lokr_w2_a"] @ lokr["lokr_w2_b"]
    blocks = torch.zeros(16 * 20, 8 * 40)
    for i in range(16):
        for j in range(8):
            blocks[i * 20 : (i + 1) * 20, j * 40 : (j + 1) * 40] = lokr["lokr_w1"][i, j] * w2
    torch.testing.assert_close(state.modules[prefix + "to_k"].delta(), blocks * 0.5)

    # Tucker LoHa: W[p, q, k, l] = sum_ij t[i, j, k, l] * a[i, p] * b[j, q], per factor
    def tucker(t, a, b):
        w = torch.zeros(320, 320, 3, 3)
        for i in range(2):
            for j in range(2):
                w += t[i, j][None, None] * a[i][:, None, None, None] * b[j][None, :, None, None]
        return w

    hand_cp = (
        tucker(cp["hada_t1"], cp["hada_w1_a"], cp["hada_w1_b"])
        * tucker(cp["hada_t2"], cp["hada_w2_a"], cp["hada_w2_b"])
        * 0.5
    )
    got = state.modules["unet.down_blocks.0.resnets.0.conv1"].delta()
    torch.testing.assert_close(got, hand_cp, atol=1e-3, rtol=1e-4)
    # written back in kohya naming, read again: same deltas
    save_lora(state, tmp_path / "again.safetensors", format="kohya")
    again = load_lora(tmp_path / "again.safetensors")
    for key, m in state.modules.items():
        torch.testing.assert_close(again.modules[key].delta(), m.delta())


def test_dora_against_hand_math(tmp_path):
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(6, 5, generator=g)
    down, up = torch.randn(2, 5, generator=g), torch.randn(6, 2, generator=g)
    mag = torch.rand(6, 1, generator=g) + 0.5
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(1.0),
               f"{stem}.dora_scale": mag}  # fmt: skip
    save_tensors(tensors, tmp_path / "dora.safetensors")
    state = load_lora(tmp_path / "dora.safetensors")
    module = state.modules["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    v = w0 + 0.5 * up @ down
    hand = torch.stack([mag[i, 0] * v[i] / torch.sqrt((v[i] ** 2).sum()) for i in range(6)])
    torch.testing.assert_close(module.apply(w0), hand)
    torch.testing.assert_close(module.delta(base_weight=w0), hand - w0)
    with pytest.raises(MismatchError, match="base weight"):
        module.delta()


def test_lora_diffusion_any_to_any(tmp_path, pipe):
    """kohya ⇄ lora_diffusion ⇄ diffusers keep every delta (and kohya ⇄ lora_diffusion every token)."""
    from lorax.zoo.random_lora import random_lora

    state = random_lora(pipe, kinds=("attention", "ff"), rank=3, alpha=1.5, seed=4, family="sd1")
    allowed = {p for p, _ in lora_diffusion.traversal(pipe.unet, "unet", lora_diffusion.UNET_DEFAULT)}
    allowed |= {
        families.live_to_disk("text_encoder", p)
        for p, _ in lora_diffusion.traversal(pipe.text_encoder, "text_encoder", lora_diffusion.TEXT_DEFAULT)
    }
    state.modules = {k: m for k, m in state.modules.items() if k.split(".", 1)[1] in allowed}
    assert len(state.modules) > 20
    state.embeddings = {
        "<s1>": {"text_encoder": torch.randn(1, 32)},
        "<s2>": {"text_encoder": torch.randn(1, 32)},
    }
    save_lora(state, tmp_path / "k.safetensors", format="kohya")
    save_lora(
        load_lora(tmp_path / "k.safetensors"),
        tmp_path / "ld.safetensors",
        format="lora_diffusion",
        model=pipe,
    )
    ld = load_lora(tmp_path / "ld.safetensors", model=pipe)
    tokenless = LoraState(dict(ld.modules), family="sd1")
    save_lora(tokenless, tmp_path / "d.safetensors", format="diffusers")
    save_lora(load_lora(tmp_path / "d.safetensors"), tmp_path / "k2.safetensors", format="kohya")
    for back in (ld, load_lora(tmp_path / "k2.safetensors")):
        assert set(back.modules) == set(state.modules)
        for key, m in state.modules.items():
            torch.testing.assert_close(back.modules[key].delta(), m.delta(), atol=1e-6, rtol=1e-5)
    for token, per in state.embeddings.items():
        assert torch.equal(ld.embeddings[token]["text_encoder"], per["text_encoder"])
