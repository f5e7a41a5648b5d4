"""lorax convert: model layouts both ways, .ckpt → .safetensors, LoRA formats with SVD resize, embeddings."""

from __future__ import annotations

import json

import pytest
import torch
from checkpoint_helpers import save, scratch, tiny_folder, tiny_lora, tiny_pipe, tiny_single
from safetensors.torch import load_file

from lorax.errors import ConfigError
from lorax.services.convert import ConvertConfig, convert


def test_model_layouts_both_ways_through_the_cli(cli) -> None:  # type: ignore[no-untyped-def]
    from diffusers import StableDiffusionPipeline

    d = scratch("convert")
    single = d / "model.safetensors"
    result = cli("convert", tiny_folder("sd2"), "-o", single, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["kind"] == "model" and doc["output_format"] == "single-file" and doc["family"] == "sd2"
    back = cli("convert", single, "-o", d / "folder", "--dtype", "fp16")
    assert back.exit_code == 0, back.stderr
    unet_file = load_file(d / "folder" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in unet_file.values()} == {torch.float16}
    pipe = StableDiffusionPipeline.from_pretrained(d / "folder")
    want = tiny_pipe("sd2").text_encoder.state_dict()
    got = pipe.text_encoder.state_dict()
    for k in want:
        assert torch.equal(got[k], want[k].half()), k
    again = cli("convert", single, "-o", d / "folder")
    assert again.exit_code == 1 and "--force" in again.stderr


def test_ckpt_to_safetensors_keeps_every_tensor() -> None:
    d = scratch("ckpt")
    sd = load_file(tiny_single("sd1"))
    sd["model_ema.decay"] = torch.tensor(0.999)
    torch.save({"state_dict": sd}, d / "m.ckpt")
    result = convert(ConvertConfig(str(d / "m.ckpt"), d / "m.safetensors"))
    assert result.kind == "model" and result.tensors == len(sd)
    out = load_file(d / "m.safetensors")
    assert set(out) == set(sd) and all(torch.equal(out[k], sd[k]) for k in sd)


def test_single_file_without_configs_needs_config_from() -> None:
    from lorax.errors import ModelNotFoundError
    from lorax.io.safetensors_io import save_tensors

    d = scratch("foreign")
    foreign = d / "foreign.safetensors"
    save_tensors(load_file(tiny_single("sd1")), foreign)  # no lorax metadata: like a file from elsewhere
    with pytest.raises(ModelNotFoundError, match="--config-from"):
        convert(ConvertConfig(str(foreign), d / "out"))
    convert(ConvertConfig(str(foreign), d / "out", config_from=str(tiny_folder("sd1"))))
    unet = load_file(d / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    want = tiny_pipe("sd1").unet.state_dict()
    assert all(torch.equal(unet[k], want[k]) for k in want)


def test_lora_format_conversion_and_svd_resize() -> None:
    from lorax.formats import detect_format, load_lora

    d = scratch("lora")
    state = tiny_lora("sd1", seed=11, rank=8)
    src = save(state, d / "k.safetensors")
    convert(ConvertConfig(str(src), d / "d.safetensors", to="diffusers"))
    assert detect_format(d / "d.safetensors") == "diffusers"
    back = load_lora(d / "d.safetensors")
    for name, m in state.modules.items():
        torch.testing.assert_close(back.modules[name].delta(), m.delta(), atol=1e-6, rtol=1e-5)
    errors = []
    for rank in (1, 2, 4, 8):
        out = d / f"r{rank}.safetensors"
        result = convert(ConvertConfig(str(src), out, rank=rank))
        resized = load_lora(out)
        assert resized.ranks() == [rank]
        err = sum(
            float((resized.modules[n].delta() - m.delta()).norm() ** 2) for n, m in state.modules.items()
        )
        total = sum(float(m.delta().norm() ** 2) for m in state.modules.values())
        errors.append((err / total) ** 0.5)
        worst = result.worst
        assert worst is not None and 0 < worst.energy <= 1
        # the reported error is the real one: ‖ΔW − ΔW_r‖ / ‖ΔW‖ of the worst module
        w = state.modules[worst.module].delta()
        real = float((resized.modules[worst.module].delta() - w).norm() / w.norm())
        assert abs(real - worst.error) < 1e-4
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-5  # full rank: exact
    with pytest.raises(ConfigError, match="--rank"):
        convert(ConvertConfig(str(src), d / "x.safetensors", rank=0))


def test_embeddings_between_a1111_and_diffusers() -> None:
    from lorax.formats import detect_format, load_embeddings, save_embeddings

    d = scratch("emb")
    vec = torch.randn(1, 32)
    save_embeddings({"<cat>": {"text_encoder": vec}}, d / "cat.pt", format="a1111-embedding")
    result = convert(ConvertConfig(str(d / "cat.pt"), d / "learned_embeds.safetensors", to="diffusers"))
    assert result.kind == "embedding" and result.tokens == ["<cat>"]
    assert detect_format(d / "learned_embeds.safetensors") == "diffusers-embedding"
    (emb,) = load_embeddings(d / "learned_embeds.safetensors").values()
    torch.testing.assert_close(emb["text_encoder"].reshape(1, 32), vec)


# --- LoRAs for a non-standard model (the built-in shapes model), with bundled tokens as lorax pivot writes them ---


@pytest.fixture(scope="module")
def shapes():
    """The shapes pipeline and a pivot-like LoRA for it (attention of UNet and text encoder, rank 4, alpha 2, two
    tokens bundled), saved as kohya with ``bundle_emb`` keys; plus the same LoRA without its tokens."""
    from dataclasses import replace

    from lorax.formats import save_lora
    from lorax.models.pipeline import load_pipeline
    from lorax.zoo.random_lora import random_lora

    pipe = load_pipeline("shapes")
    state = random_lora(pipe, components=("unet", "text_encoder"), rank=4, alpha=2.0, seed=5, family="sd1")
    # lora_diffusion holds Linear layers of Attention / CLIPAttention (proj_in/out are outside its target classes)
    state.modules = {
        k: m for k, m in state.modules.items() if ".attn1." in k or ".attn2." in k or ".self_attn." in k
    }
    dim = pipe.text_encoder.config.hidden_size
    gen = torch.Generator().manual_seed(9)
    state.embeddings = {
        "<s1>": {"text_encoder": torch.randn(2, dim, generator=gen)},
        "<s2>": {"text_encoder": torch.randn(1, dim, generator=gen)},
    }
    d = scratch("shapes-lora")
    kohya = save_lora(state, d / "pivot.safetensors")
    plain = save_lora(replace(state, embeddings={}), d / "plain.safetensors")
    return pipe, state, kohya, plain


def _seed_order(model: torch.nn.Module, targets: set[str], text: bool) -> list[str]:
    """cloneofsimo/lora's ``_find_modules`` order, written out again: every ``nn.Linear`` inside each module whose
    class is a target, in ``model.modules()`` order (text-encoder paths in the on-disk ``text_model.`` form)."""
    names = {id(m): n for n, m in model.named_modules()}
    order = []
    for ancestor in model.modules():
        if type(ancestor).__name__ not in targets:
            continue
        for _, child in ancestor.named_modules():
            if isinstance(child, torch.nn.Linear):
                path = names[id(child)]
                order.append("text_model." + path if text and not path.startswith("text_model.") else path)
    return order


def _fused(pipe, lora_path):  # type: ignore[no-untyped-def]
    """The UNet and text-encoder weights after diffusers' own ``load_lora_weights`` + ``fuse_lora``."""
    import copy

    p = copy.deepcopy(pipe)
    p.load_lora_weights(str(lora_path))
    p.fuse_lora(lora_scale=1.0)
    out = {}
    for component in ("unet", "text_encoder"):
        for name, value in getattr(p, component).state_dict().items():
            if "lora_" not in name:
                out[f"{component}.{name.replace('.base_layer.', '.')}"] = value
    return out


def test_pivot_lora_round_trips_through_lora_diffusion_with_model(cli, shapes) -> None:  # type: ignore[no-untyped-def]
    from lorax.formats import detect_format, load_lora

    pipe, state, kohya, plain = shapes
    assert any(k.startswith("bundle_emb.") for k in load_file(kohya))
    d = scratch("shapes-ld")
    ld = d / "pivot.ld.safetensors"
    result = cli("convert", kohya, "--to", "lora_diffusion", "--model", "shapes", "-o", ld, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["outputs"] == [str(ld)] and doc["model"] == "shapes" and doc["tokens"] == ["<s1>", "<s2>"]
    assert detect_format(ld) == "lora_diffusion"

    # the file's i-th pair is the i-th module in the seed's own traversal of the live shapes model
    raw = load_file(ld)
    for component, targets in (
        ("unet", {"Attention", "CrossAttention", "GEGLU"}),
        ("text_encoder", {"CLIPAttention"}),
    ):
        order = _seed_order(getattr(pipe, component), targets, component == "text_encoder")
        assert len([k for k in raw if k.startswith(f"{component}:") and k.endswith(":up")]) == len(order)
        for i, path in enumerate(order):
            got = raw[f"{component}:{i}:up"] @ raw[f"{component}:{i}:down"]
            m = state.modules.get(f"{component}.{path}")
            want = torch.zeros_like(got) if m is None else 0.5 * (m.up @ m.down)  # alpha / r = 2 / 4
            assert torch.equal(got, want), (component, i, path)
    for token, per in state.embeddings.items():
        assert torch.equal(raw[token].reshape(per["text_encoder"].shape), per["text_encoder"])

    # lorax reads it back against the live pipeline
    from_ld = load_lora(ld, model=pipe)
    for name, m in state.modules.items():
        assert torch.equal(from_ld.modules[name].delta(), m.delta()), name
    assert all(not from_ld.modules[n].delta().any() for n in set(from_ld.modules) - set(state.modules))

    # … and convert back to kohya: the same modules, deltas and tokens
    back = d / "back.safetensors"
    result = cli("convert", ld, "--to", "kohya", "--model", "shapes", "-o", back)
    assert result.exit_code == 0, result.stderr
    assert "zero pairs" in result.stderr
    again = load_lora(back, model=pipe)
    assert set(again.modules) == set(state.modules)
    for name, m in state.modules.items():
        assert torch.equal(again.modules[name].delta(), m.delta()), name
    assert set(again.embeddings) == set(state.embeddings)
    for token, per in state.embeddings.items():
        assert torch.equal(again.embeddings[token]["text_encoder"], per["text_encoder"])

    # oracle: diffusers' own loader fuses the original kohya file and the lora_diffusion → diffusers file alike
    via_ld = d / "via-ld.safetensors"
    assert cli("convert", ld, "--to", "diffusers", "--model", "shapes", "-o", via_ld).exit_code == 0
    want, got = _fused(pipe, plain), _fused(pipe, via_ld)
    base = {f"{c}.{n}": v for c in ("unet", "text_encoder") for n, v in getattr(pipe, c).state_dict().items()}
    changed = [k for k in want if not torch.equal(want[k], base[k])]
    assert len(changed) == len(state.modules)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0)


def test_lora_diffusion_without_model_names_the_option(cli, shapes) -> None:  # type: ignore[no-untyped-def]
    _, _, kohya, _ = shapes
    d = scratch("shapes-nomodel")
    out = d / "x.safetensors"
    result = cli("convert", kohya, "--to", "lora_diffusion", "-o", out)
    assert result.exit_code == 1 and "--model" in result.stderr and "[32, 32]" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
    ld = d / "ld.safetensors"
    assert cli("convert", kohya, "--to", "lora_diffusion", "-m", "shapes", "-o", ld).exit_code == 0
    result = cli("convert", ld, "--to", "kohya", "-o", d / "k.safetensors")
    assert result.exit_code == 1 and "--model" in result.stderr and not (d / "k.safetensors").exists()
    assert len(result.stderr.strip().splitlines()) == 1
    # a model the LoRA does not belong to is refused, naming it
    result = cli(
        "convert", ld, "--to", "kohya", "--model", str(tiny_folder("sd1")), "-o", d / "k.safetensors"
    )
    assert result.exit_code == 1 and "does not fit --model" in result.stderr
    result = cli("convert", tiny_folder("sd1"), "--model", "shapes", "-o", d / "m.safetensors")
    assert result.exit_code == 1 and "--model applies to LoRA" in result.stderr


def test_diffusers_output_writes_bundled_tokens_beside_it(cli, shapes) -> None:  # type: ignore[no-untyped-def]
    import copy

    pipe, state, kohya, _ = shapes
    d = scratch("shapes-diffusers")
    out = d / "pytorch_lora_weights.safetensors"
    files = {
        "<s1>": d / "pytorch_lora_weights.s1.safetensors",
        "<s2>": d / "pytorch_lora_weights.s2.safetensors",
    }
    files["<s2>"].write_bytes(b"in the way")
    result = cli(
        "convert", kohya, "--to", "diffusers", "-o", out
    )  # one of the files exists: nothing is written
    assert result.exit_code == 1 and "--force" in result.stderr and not out.exists()
    assert files["<s2>"].read_bytes() == b"in the way" and not files["<s1>"].exists()
    result = cli("convert", kohya, "--to", "diffusers", "-o", out, "--force", "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["outputs"] == [str(out), *map(str, files.values())]
    assert doc["embedding_files"] == {t: str(p) for t, p in files.items()}
    assert sorted(p.name for p in d.iterdir()) == sorted([out.name, *(p.name for p in files.values())])
    from lorax.io.safetensors_io import read_header

    beside = json.loads(read_header(out).metadata["lorax_embedding_files"])
    assert beside == {t: p.name for t, p in files.items()}
    text = cli("convert", kohya, "--to", "diffusers", "-o", out, "--force")
    assert all(str(p) in text.stdout for p in [out, *files.values()])

    # oracle: diffusers' loaders. The LoRA fuses to W0 + (alpha / r) · up @ down, computed here from the state …
    fused = _fused(pipe, out)
    for name, m in state.modules.items():
        component, path = name.split(".", 1)
        live = path.removeprefix("text_model.") if component == "text_encoder" else path
        w0 = getattr(pipe, component).state_dict()[f"{live}.weight"]
        torch.testing.assert_close(
            fused[f"{component}.{live}.weight"], w0 + 0.5 * m.up @ m.down, atol=1e-6, rtol=0
        )
    # … and load_textual_inversion takes every token file as it is (multi-vector tokens as <s1>, <s1>_1)
    p = copy.deepcopy(pipe)
    p.load_textual_inversion([str(f) for f in files.values()])
    table = p.text_encoder.get_input_embeddings().weight
    for token, per in state.embeddings.items():
        vectors = per["text_encoder"]
        names = [token] + [f"{token}_{i}" for i in range(1, vectors.shape[0])]
        ids = p.tokenizer.convert_tokens_to_ids(names)
        assert torch.equal(table[ids], vectors), token


def test_sdxl_tokens_beside_a_diffusers_lora_use_clip_l_and_clip_g() -> None:
    from lorax.adapters.state import LoraModule, LoraState
    from lorax.formats import load_embeddings

    gen = torch.Generator().manual_seed(2)
    module = LoraModule(torch.randn(2, 640, generator=gen), torch.randn(640, 2, generator=gen), 2.0)
    vectors = {
        "text_encoder": torch.randn(2, 768, generator=gen),
        "text_encoder_2": torch.randn(2, 1280, generator=gen),
    }
    state = LoraState(
        {"unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": module},
        embeddings={"<xl>": vectors},
        family="sdxl",
    )
    d = scratch("sdxl-beside")
    src = save(state, d / "k.safetensors")
    result = convert(ConvertConfig(str(src), d / "lora.safetensors", to="diffusers"))
    assert result.embedding_files == {"<xl>": d / "lora.xl.safetensors"}
    raw = load_file(d / "lora.xl.safetensors")
    assert set(raw) == {"clip_l", "clip_g"}
    assert torch.equal(raw["clip_l"], vectors["text_encoder"]) and torch.equal(
        raw["clip_g"], vectors["text_encoder_2"]
    )
    (got,) = load_embeddings(d / "lora.xl.safetensors").values()
    assert all(torch.equal(got[c], vectors[c]) for c in vectors)


def test_embedding_paths_are_sanitised_and_distinct() -> None:
    from pathlib import Path

    from lorax.services.convert import embedding_paths

    paths = embedding_paths(Path("out/lora.safetensors"), ["<s1>", "s1", "<>", "a b/c"])
    assert [p.name for p in paths.values()] == [
        "lora.s1.safetensors",
        "lora.s1-2.safetensors",
        "lora.token2.safetensors",
        "lora.a_b_c.safetensors",
    ]
    assert all(p.parent == Path("out") for p in paths.values())
