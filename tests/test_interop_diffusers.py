"""Files lorax writes, loaded by their consumer's own loader: diffusers' ``load_lora_weights`` + ``fuse_lora`` on tiny
pipelines built from config. The fused weights must equal ``lorax merge`` of the same file (relative error ≤ 1e-5)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import save, scratch, tiny_folder, tiny_lora
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lorax.adapters.lycoris import DoraModule
from lorax.adapters.state import LoraModule, LoraState
from lorax.services.merge import MergeConfig, merge

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMPONENTS = {
    "sd1": ("unet", "text_encoder"),
    "sd2": ("unet", "text_encoder"),
    "sdxl": ("unet", "text_encoder", "text_encoder_2"),
}


def a_lora(family: str, alpha: float = 2.0, content: str = "lora") -> LoraState:
    """rank 4, alpha ≠ rank, so a consumer that drops alpha / r applies the wrong strength. ``content``: ``lora``
    (UNet attention and feed-forward, text-encoder attention and MLP), ``locon`` (the same and a 3×3 UNet conv) or
    ``text`` (the text encoders' modules only)."""
    if family == "sdxl":
        from test_sdxl import sdxl_lora

        state = sdxl_lora(seed=5, rank=4, alpha=alpha, conv=content == "locon")
    else:
        state = tiny_lora(family, seed=5, alpha=alpha, conv=content == "locon")
    if content == "text":
        state.modules = {k: m for k, m in state.modules.items() if not k.startswith("unet.")}
    return state


def weights(pipe, family: str) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    out = {}
    for component in COMPONENTS[family]:
        for name, value in getattr(pipe, component).state_dict().items():
            if "lora_" not in name:
                out[f"{component}.{name.replace('.base_layer.', '.')}"] = value.detach().clone()
    return out


@cache
def base_weights(family: str) -> dict[str, torch.Tensor]:
    from diffusers import DiffusionPipeline

    return weights(DiffusionPipeline.from_pretrained(tiny_folder(family)), family)


def diffusers_fused(family: str, lora: Path, scale: float = 1.0) -> dict[str, torch.Tensor]:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_folder(family))
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(lora_scale=scale, components=list(COMPONENTS[family]))
    pipe.unload_lora_weights()
    return weights(pipe, family)


def lorax_merged(family: str, lora: Path, out: Path, scale: float = 1.0) -> dict[str, torch.Tensor]:
    from diffusers import DiffusionPipeline

    merge(MergeConfig(str(tiny_folder(family)), [str(lora)], out, alpha=scale, alpha_text=scale))
    return weights(DiffusionPipeline.from_pretrained(out), family)


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], family: str) -> None:
    assert set(got) == set(want)
    changed = 0
    base = base_weights(family)
    for key, w in want.items():
        err = float((got[key].float() - w.float()).norm() / w.float().norm().clamp_min(1e-12))
        assert err <= 1e-5, (key, err)
        changed += not torch.equal(w, base[key])
    assert changed > 0  # the LoRA did something


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize(
    ("route", "content"),
    [
        ("kohya", "lora"),
        ("diffusers", "lora"),
        ("diffusers-to-kohya", "lora"),
        ("kohya", "locon"),
        ("diffusers", "locon"),
        ("kohya", "text"),
        ("diffusers", "text"),
    ],
)
def test_diffusers_loads_every_lora_layout_lorax_writes(cli, family: str, route: str, content: str) -> None:
    """LoRA, LoCon (a 3×3 conv) and text-encoder-only LoRAs, kohya and diffusers/PEFT, and a kohya file converted from
    a diffusers one."""
    d = scratch(f"interop-{family}-{route}-{content}")
    state = a_lora(family, content=content)
    if content == "locon":
        assert any(m.down.dim() == 4 for m in state.modules.values())
    if content == "text":
        assert state.modules and all(k.startswith("text_encoder") for k in state.modules)
    if route == "diffusers-to-kohya":  # issue 12.1: the diffusers header must not follow the LoRA into kohya
        source = save(state, d / "source.safetensors", fmt="diffusers")
        lora = d / "converted.safetensors"
        result = cli("convert", source, "--to", "kohya", "-o", lora)
        assert result.exit_code == 0, result.stderr
        with safe_open(str(lora), "pt") as f:
            assert "lora_adapter_metadata" not in (f.metadata() or {})
    else:
        lora = save(state, d / "lora.safetensors", fmt=route)
    assert_same_weights(diffusers_fused(family, lora), lorax_merged(family, lora, d / "merged"), family)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_diffusers_file_carries_its_strength_in_its_tensors(family: str) -> None:
    """A consumer that reads no header (ComfyUI) applies ``lora_B @ lora_A``: that must be (alpha / r) · B · A."""
    d = scratch(f"interop-strength-{family}")
    state = a_lora(family, alpha=1.0)
    path = save(state, d / "lora.safetensors", fmt="diffusers")
    tensors = load_file(path)
    for name, m in state.modules.items():
        assert isinstance(m, LoraModule)
        want = (1.0 / 4) * (m.up.reshape(m.up.shape[0], -1) @ m.down.reshape(4, -1))
        got = tensors[f"{name}.lora_B.weight"].reshape(want.shape[0], -1) @ tensors[
            f"{name}.lora_A.weight"
        ].reshape(4, -1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_header_less_consumer_applies_the_delta_lorax_merge_does(family: str) -> None:
    """issue 12.7, against merge: ``lora_B @ lora_A`` of the file's tensors alone (no header read, as ComfyUI) equals
    ``lorax merge``'s change of each targeted weight, for a LoRA written with alpha ≠ rank."""
    d = scratch(f"interop-headerless-{family}")
    path = save(a_lora(family, alpha=1.0), d / "lora.safetensors", fmt="diffusers")
    tensors = load_file(path)
    merged, base = lorax_merged(family, path, d / "merged"), base_weights(family)
    checked = 0
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removesuffix(".lora_A.weight")
        a, b = tensors[key].float(), tensors[f"{name}.lora_B.weight"].float()
        weight = f"{name}.weight".replace(".text_model.", ".")  # this transformers drops text_model. here
        weight = weight if weight in merged else f"{name}.weight"
        delta = merged[weight].float() - base[weight].float()
        got = (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(delta.shape)
        err = float((got - delta).norm() / delta.norm())
        assert err <= 1e-5, (name, err)
        checked += 1
    assert checked >= 2


DORA_MODULES = {
    "sd1": (
        "unet.down_blocks.0.resnets.1.conv2",
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    ),
    "sdxl": (
        "unet.down_blocks.0.resnets.1.conv2",
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    ),
}


DORA_TEXT_MODULES = {  # every text encoder's DoRA is its own component (one use_dora each)
    "sd1": ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj",),
    "sdxl": (
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        "text_encoder_2.text_model.encoder.layers.1.self_attn.k_proj",  # diffusers 0.42 infers a text encoder's
        "text_encoder_2.text_model.encoder.layers.1.mlp.fc1",  # PEFT keys from its attention ones: not MLP alone
    ),
}


def live_weight(family: str, name: str) -> str:
    """The key in ``weights()`` of module ``name``'s weight (transformers 5's CLIPTextModel has no ``text_model.``)."""
    key = f"{name}.weight"
    return key if key in base_weights(family) else key.replace("text_encoder.text_model.", "text_encoder.", 1)


def a_dora(family: str, names: tuple[str, ...]) -> LoraState:
    """Rank-4 DoRA modules (alpha 2, magnitudes per output row, 0–20% above the base weight's row norms)."""
    gen = torch.Generator().manual_seed(11)
    base = base_weights(family)
    modules: dict[str, DoraModule] = {}
    for name in names:
        w0 = base[live_weight(family, name)]
        out = w0.shape[0]
        down = torch.randn((4, *w0.shape[1:]), generator=gen) * 0.1
        up = torch.randn((out, 4, *([1, 1] if w0.dim() == 4 else [])), generator=gen) * 0.1
        magnitude = w0.reshape(out, -1).norm(dim=1) * (1 + 0.2 * torch.rand(out, generator=gen))
        modules[name] = DoraModule(down, up, 2.0, magnitude, wd_on_out=True)
    return LoraState(dict(modules), family=family)  # type: ignore[arg-type]


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("route", ["write", "convert"])
def test_dora_with_conv_modules_loads_in_diffusers(cli, family: str, route: str) -> None:
    """issue 12.2: PEFT's Conv2d DoRA magnitude is ``[1, out, 1, 1]``; Linear's is ``[out]``. Written directly, and
    converted from a kohya (LyCORIS ``dora_scale``) file with ``convert --to diffusers``. Text encoders' DoRA too:
    their magnitudes are named ``….lora_magnitude_vector.weight``, the name diffusers' text-encoder loader (through
    transformers 5) matches; under the bare PEFT name it dropped them and fused a plain LoRA there (10% off)."""
    state = a_dora(family, (*DORA_MODULES[family], *DORA_TEXT_MODULES[family]))
    d = scratch(f"interop-dora-{family}-{route}")
    path = d / "dora.safetensors"
    if route == "write":
        save(state, path, fmt="diffusers")
    else:
        source = save(state, d / "kohya.safetensors")
        result = cli("convert", source, "--to", "diffusers", "-o", path)
        assert result.exit_code == 0, result.stderr
    tensors = load_file(path)
    conv, linear = DORA_MODULES[family]
    assert tensors[f"{conv}.lora_magnitude_vector"].shape == (1, 32, 1, 1)
    assert tensors[f"{linear}.lora_magnitude_vector"].dim() == 1
    for name in DORA_TEXT_MODULES[family]:
        assert tensors[f"{name}.lora_magnitude_vector.weight"].dim() == 1
    assert_same_weights(diffusers_fused(family, path), lorax_merged(family, path, d / "merged"), family)


def test_a_diffusers_refusal_names_the_option_that_exists(cli) -> None:
    """issue 12.8: a LoHa has no diffusers form; the hint names ``--to kohya`` (convert's option), not ``--format``."""
    from lorax.adapters.lycoris import LohaModule

    gen = torch.Generator().manual_seed(2)
    name = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    w1a, w1b, w2a, w2b = (torch.randn(s, generator=gen) for s in [(32, 2), (2, 32), (32, 2), (2, 32)])
    loha = LohaModule(w1a, w1b, w2a, w2b, alpha=2.0)
    d = scratch("interop-refusal")
    src = save(LoraState({name: loha}, family="sd1"), d / "loha.safetensors")  # type: ignore[dict-item]
    result = cli("convert", src, "--to", "diffusers", "-o", d / "out.safetensors")
    assert result.exit_code != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "--to kohya" in result.stderr, result.stderr
    assert not (d / "out.safetensors").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Token embeddings: every form lorax writes, loaded with diffusers' ``load_textual_inversion`` as diffusers documents it


ENCODERS = {  # text encoder → its tokenizer, and the key of its vectors in an SDXL embedding file
    "sd1": {"text_encoder": ("tokenizer", None)},
    "sd2": {"text_encoder": ("tokenizer", None)},
    "sdxl": {"text_encoder": ("tokenizer", "clip_l"), "text_encoder_2": ("tokenizer_2", "clip_g")},
}


def token_names(token: str, n: int) -> list[str]:
    """diffusers' (and lorax's) names of a multi-vector token's rows: ``<s1>``, ``<s1>_1``, …"""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def token_rows(pipe, family: str, token: str, n: int) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The rows ``pipe``'s text encoders hold for ``token``'s ``n`` vectors, each a new entry of the tokenizer."""
    out = {}
    for component, (tokenizer_name, _) in ENCODERS[family].items():
        tokenizer = getattr(pipe, tokenizer_name)
        ids = tokenizer.convert_tokens_to_ids(token_names(token, n))
        base_vocab = getattr(base_pipe(family), tokenizer_name)
        assert all(i >= len(base_vocab) for i in ids), (component, ids)  # new rows, not unk or a known word
        out[component] = getattr(pipe, component).get_input_embeddings().weight[ids].detach().clone()
    return out


@cache
def base_pipe(family: str):  # type: ignore[no-untyped-def]
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(tiny_folder(family))


def file_vectors(path: Path, family: str, token: str) -> dict[str, torch.Tensor]:
    """A file's vectors per text encoder, read with safetensors / torch alone (not lorax's reader)."""
    if path.suffix == ".pt":
        doc = torch.load(path, weights_only=True)
        return {"text_encoder": doc["string_to_param"]["*"]}
    tensors = load_file(path)
    if family == "sdxl":
        return {c: tensors[key] for c, (_, key) in ENCODERS[family].items()}
    (value,) = tensors.values()  # emb_params, or diffusers' {token: vectors}
    assert set(tensors) in ({"emb_params"}, {token}), set(tensors)
    return {"text_encoder": value.reshape(-1, value.shape[-1])}


def load_tokens_in_diffusers(pipe, path: Path, family: str, token: str) -> None:  # type: ignore[no-untyped-def]
    """As diffusers documents each form: an A1111 ``.pt`` or a ``learned_embeds`` file by its path (the file names its
    token), an A1111 ``.safetensors`` (``emb_params``) by its path with ``token=``, an SDXL ``clip_l``/``clip_g`` file
    once per text encoder with ``text_encoder=`` / ``tokenizer=``."""
    if family == "sdxl":
        tensors = load_file(path)
        for component, (tokenizer_name, key) in ENCODERS[family].items():
            pipe.load_textual_inversion(
                tensors[key],
                token=token,
                text_encoder=getattr(pipe, component),
                tokenizer=getattr(pipe, tokenizer_name),
            )
    elif path.suffix == ".pt" or set(load_file(path)) == {token}:
        pipe.load_textual_inversion(str(path))
    else:
        pipe.load_textual_inversion(str(path), token=token)


def diffusers_tokens(family: str, path: Path, token: str, n: int) -> dict[str, torch.Tensor]:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_folder(family))
    load_tokens_in_diffusers(pipe, path, family, token)
    return token_rows(pipe, family, token, n)


def lorax_merged_tokens(family: str, path: Path, out: Path, token: str, n: int) -> dict[str, torch.Tensor]:
    """``lorax merge`` of the file into the tiny model's folder: the tokens go into its tokenizer(s) and table(s)."""
    from diffusers import DiffusionPipeline

    merge(MergeConfig(str(tiny_folder(family)), [str(path)], out))
    return token_rows(DiffusionPipeline.from_pretrained(out), family, token, n)


def assert_same_tokens(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for component, w in want.items():
        assert got[component].shape == w.shape, component
        err = float((got[component].float() - w.float()).norm() / w.float().norm())
        assert err <= 1e-5, (component, err)


EMBEDDING_FORMS = {  # name → (family, file name, lorax format)
    "a1111-pt": ("sd1", "s1.pt", "a1111-embedding"),
    "a1111-safetensors": ("sd1", "s1.safetensors", "a1111-embedding"),
    "diffusers": ("sd1", "learned_embeds.safetensors", "diffusers-embedding"),
    "sd2-a1111-pt": ("sd2", "s1.pt", "a1111-embedding"),
    "sd2-diffusers": ("sd2", "learned_embeds.safetensors", "diffusers-embedding"),
    "sdxl": ("sdxl", "s1.safetensors", "sdxl-embedding"),
}


@pytest.mark.parametrize("vectors", [1, 3])
@pytest.mark.parametrize("form", list(EMBEDDING_FORMS))
def test_diffusers_loads_every_embedding_form_lorax_writes(form: str, vectors: int) -> None:
    """Single- and multi-vector tokens written by lorax's embedding writer: diffusers' rows equal the file's vectors
    and ``lorax merge``'s rows."""
    from lorax.formats import save_embeddings

    family, name, fmt = EMBEDDING_FORMS[form]
    gen = torch.Generator().manual_seed(vectors)
    widths = {
        c: getattr(base_pipe(family), c).get_input_embeddings().weight.shape[1] for c in ENCODERS[family]
    }
    embeddings = {"<s1>": {c: torch.randn(vectors, w, generator=gen) for c, w in widths.items()}}
    d = scratch(f"interop-emb-{form}-{vectors}")
    path = save_embeddings(embeddings, d / name, format=fmt, metadata={"lorax_tokens": '["<s1>"]'})
    want = file_vectors(path, family, "<s1>")
    assert all(torch.equal(want[c], embeddings["<s1>"][c]) for c in want)
    got = diffusers_tokens(family, path, "<s1>", vectors)
    assert_same_tokens(got, want)
    assert_same_tokens(lorax_merged_tokens(family, path, d / "merged", "<s1>", vectors), got)


@pytest.fixture(scope="module")
def purple_squares() -> Path:
    from lorax.zoo.shapes import write_concept_dir

    folder = scratch("interop-purple") / "data"
    write_concept_dir(folder, "square", "purple", 2, seed=1, caption="a purple square")
    return folder


def run_invert(cli, family: str, data: Path, out: Path, *args: str) -> Path:  # type: ignore[no-untyped-def]
    """``lorax invert`` for two steps at a learning rate that moves the vectors well away from their start."""
    result = cli(
        "invert", data, "--model", tiny_folder(family), "-o", out, "--steps", "2", "--learning-rate", "0.05",
        "--resolution", "32", "--save-dtype", "fp32", "--device", "cpu", *args,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return out


@pytest.mark.parametrize(
    ("family", "name", "args"),
    [
        ("sd1", "s1.pt", ()),
        ("sd1", "s1.safetensors", ()),
        ("sd2", "learned_embeds.safetensors", ("--format", "diffusers")),
        ("sdxl", "s1.safetensors", ()),
    ],
    ids=["a1111-pt", "a1111-safetensors", "diffusers", "sdxl"],
)
def test_diffusers_loads_what_lorax_invert_writes(
    cli, purple_squares: Path, family: str, name: str, args
) -> None:  # type: ignore[no-untyped-def]
    """The files ``lorax invert`` writes (two vectors per token), loaded by ``load_textual_inversion``: the rows equal
    the file's vectors and ``lorax merge``'s rows."""
    d = scratch(f"interop-invert-{family}-{name}")
    path = run_invert(
        cli, family, purple_squares, d / name, "--vectors", "2", "--token-at-data", "purple|<s1>", *args
    )
    want = file_vectors(path, family, "<s1>")
    assert all(not torch.allclose(v[0], v[1]) for v in want.values())  # two vectors, so row order shows
    got = diffusers_tokens(family, path, "<s1>", 2)
    assert_same_tokens(got, want)
    assert_same_tokens(lorax_merged_tokens(family, path, d / "merged", "<s1>", 2), got)


def run_pivot(cli, family: str, data: Path, out: Path, *args: str) -> Path:  # type: ignore[no-untyped-def]
    """``lorax pivot`` (the text encoders' LoRA on, as by default) for one inversion step and two LoRA steps, rank 4
    and alpha 2, at a learning rate that moves the LoRA well away from zero."""
    result = cli(
        "pivot", data, "--model", tiny_folder(family), "-o", out, "--ti-steps", "1", "--steps", "2",
        "--learning-rate", "0.01", "--text-learning-rate", "0.01", "--rank", "4", "--alpha", "2",
        "--vectors", "2", "--token-at-data", "purple|<s1>", "--resolution", "32", "--save-dtype", "fp32",
        "--device", "cpu", *args,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    return out


def bundled_vectors(path: Path, family: str) -> dict[str, torch.Tensor]:
    """The token's vectors in a pivot file, read with safetensors alone: kohya's ``bundle_emb.<s1>.…`` keys, or
    lora_diffusion's tensor named by the token."""
    tensors = load_file(path)
    if "<s1>" in tensors:
        return {"text_encoder": tensors["<s1>"].reshape(-1, tensors["<s1>"].shape[-1])}
    if family == "sdxl":
        return {c: tensors[f"bundle_emb.<s1>.{key}"] for c, (_, key) in ENCODERS[family].items()}
    return {"text_encoder": tensors["bundle_emb.<s1>.string_to_param.*"]}


@pytest.mark.parametrize(
    ("family", "fmt"), [("sd1", "kohya"), ("sd2", "kohya"), ("sdxl", "kohya"), ("sd1", "lora_diffusion")]
)
def test_a_pivot_file_loads_in_diffusers_through_convert(
    cli, purple_squares: Path, family: str, fmt: str
) -> None:  # type: ignore[no-untyped-def]
    """A pivot file holds the LoRA (UNet and text encoders) and the learned token in one file: kohya's
    ``bundle_emb`` form, or lora_diffusion's. diffusers reads neither as it is (its ``load_lora_weights`` refuses keys
    without ``lora`` in them, and has no index-file reader); ``lorax convert FILE --to diffusers`` (``--model`` for
    lora_diffusion, whose modules are indices into the model) writes the LoRA and the token beside it, which diffusers
    loads with ``load_lora_weights`` + ``load_textual_inversion`` (SDXL: once per text encoder) as its docs say. The
    fused pipeline equals ``lorax merge`` of the pivot file itself: every weight, the grown token tables included."""
    from diffusers import DiffusionPipeline

    d = scratch(f"interop-pivot-{family}-{fmt}")
    pivot_file = run_pivot(cli, family, purple_squares, d / "pivot.safetensors", "--format", fmt)
    with pytest.raises(ValueError, match="lora"):
        DiffusionPipeline.from_pretrained(tiny_folder(family)).load_lora_weights(str(pivot_file))

    lora = d / "diffusers" / "pytorch_lora_weights.safetensors"
    lora.parent.mkdir()
    model = ("--model", tiny_folder(family)) if fmt == "lora_diffusion" else ()
    if fmt == "lora_diffusion":  # without the model the indices cannot be placed: one line that names --model
        refused = cli("convert", pivot_file, "--to", "diffusers", "-o", lora)
        assert refused.exit_code != 0 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert "--model" in refused.stderr and not lora.exists()
    result = cli("convert", pivot_file, "--to", "diffusers", "-o", lora, *model, "--json")
    assert result.exit_code == 0, result.stderr
    (token_file,) = json.loads(result.stdout)["embedding_files"].values()

    pipe = DiffusionPipeline.from_pretrained(tiny_folder(family))
    pipe.load_lora_weights(str(lora))
    load_tokens_in_diffusers(pipe, Path(token_file), family, "<s1>")
    pipe.fuse_lora(components=list(COMPONENTS[family]))
    pipe.unload_lora_weights()
    fused = weights(pipe, family)
    assert any(k.startswith("text_encoder.") and not torch.equal(v, base_weights(family)[k])
               for k, v in fused.items() if "token_embedding" not in k)  # fmt: skip  # the text LoRA applied

    merged_folder = d / "merged"
    merge(MergeConfig(str(tiny_folder(family)), [str(pivot_file)], merged_folder))
    merged_pipe = DiffusionPipeline.from_pretrained(merged_folder)
    assert_same_weights(fused, weights(merged_pipe, family), family)
    want = bundled_vectors(pivot_file, family)
    assert_same_tokens(token_rows(pipe, family, "<s1>", 2), want)
    assert_same_tokens(token_rows(merged_pipe, family, "<s1>", 2), want)


def test_a_several_token_invert_file_loads_in_diffusers_token_by_token(cli, purple_squares: Path) -> None:  # type: ignore[no-untyped-def]
    """``lorax invert --token '<s1>|<s2>' --format diffusers`` writes ``{token: vectors}`` for both tokens in one file.
    diffusers' format holds one token per file, so its loader refuses the path of a two-token file; it takes the
    file's tensors with their tokens (``load_textual_inversion([tensors…], token=[tokens…])``), as docs/formats.md
    says and ``lorax invert`` tells the user."""
    from diffusers import DiffusionPipeline

    d = scratch("interop-invert-two")
    result = cli(
        "invert", purple_squares, "--model", tiny_folder("sd1"), "-o", d / "learned_embeds.safetensors",
        "--format", "diffusers", "--token", "<s1>|<s2>", "--token-at-data", "purple|<s1> <s2>", "--steps", "2",
        "--learning-rate", "0.05", "--resolution", "32", "--save-dtype", "fp32", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert "load_textual_inversion" in result.stderr  # the note
    path = d / "learned_embeds.safetensors"
    tensors = load_file(path)
    assert sorted(tensors) == ["<s1>", "<s2>"]
    pipe = DiffusionPipeline.from_pretrained(tiny_folder("sd1"))
    with pytest.raises(ValueError, match="incorrect"):
        pipe.load_textual_inversion(str(path))
    pipe.load_textual_inversion(list(tensors.values()), token=list(tensors))
    merged = d / "merged"
    merge(MergeConfig(str(tiny_folder("sd1")), [str(path)], merged))
    merged_pipe = DiffusionPipeline.from_pretrained(merged)
    for token, vectors in tensors.items():
        want = {"text_encoder": vectors.reshape(-1, vectors.shape[-1])}
        assert_same_tokens(token_rows(pipe, "sd1", token, 1), want)
        assert_same_tokens(token_rows(merged_pipe, "sd1", token, 1), want)


# ---------------------------------------------------------------------------------------------------------------------
# What the diffusers/PEFT format cannot hold: refused by convert --to diffusers in one line that says why


def _why(parts: set[str], tensors: dict[str, torch.Tensor], stem: str) -> str | None:
    """What the one-line refusal must say for a module with these LyCORIS tensors (``None``: it has a PEFT form)."""
    dora = "dora_scale" in parts
    if {"hada_w1_a", "hada_w1_b"} <= parts:
        return "a LoHa (a Hadamard product of two low-rank pairs)" + (" with DoRA magnitudes" if dora else "")
    if any(p.startswith("lokr_") for p in parts):
        return "a LoKr (a Kronecker product)" + (" with DoRA magnitudes" if dora else "")
    if "on_input" in parts:
        return "an IA3 (a per-channel scale of the base weight)"
    if "diff" in parts:
        return "a full weight difference (diff)"
    if dora and tensors[f"{stem}.dora_scale"].shape[0] == 1:  # [1, in, …]: norms per input column
        return "DoRA magnitudes per input column have no PEFT form"
    return None  # a LoRA pair, LoCon-Tucker (folded), DoRA per output row


def test_every_algorithm_without_a_peft_form_is_refused_in_one_line(cli) -> None:  # type: ignore[no-untyped-def]
    """Each module of the LyCORIS file with every algorithm (tests/test_lycoris_algorithms.py) on its own: LoHa (and
    Tucker), LoKr (factored, Tucker, full), IA3 (rows, columns, conv), full diff, DoRA per input column, LoHa + DoRA and
    LoKr + DoRA are refused by ``convert --to diffusers`` in one line naming the module, what it is and ``--to kohya``,
    with nothing written; those with a PEFT form (LoCon-Tucker, DoRA per output row) convert, and diffusers fuses them
    as ``lorax merge`` merges the LyCORIS file."""
    from safetensors.torch import save_file
    from test_lycoris_algorithms import _case

    from lorax.formats import keys

    source, _ = _case()
    tensors = load_file(source)
    groups, rest = keys.kohya_groups(list(tensors))
    assert not rest
    d = scratch("interop-refusals")
    refused, converted = set(), []
    for (_component, flat), parts in groups.items():
        suffix, key = next(iter(parts.items()))
        stem = key[: -len(suffix) - 1]
        one = d / f"{flat}.safetensors"
        save_file({k: tensors[k] for k in parts.values()}, str(one))
        out = d / f"{flat}.diffusers.safetensors"
        result = cli("convert", one, "--to", "diffusers", "-o", out)
        why = _why(set(parts), tensors, stem)
        if why is None:
            assert result.exit_code == 0, (flat, result.stderr)
            converted.append((one, out))
            continue
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, (flat, result.stderr)
        assert why in lines[0] and "--to kohya" in lines[0] and str(one) in lines[0], lines[0]
        assert "Traceback" not in result.output and not out.exists()
        refused.add(why.split(" (")[0])
    assert refused == {
        "a LoHa", "a LoKr", "an IA3", "a full weight difference", "DoRA magnitudes per input column have no PEFT form",
    }  # fmt: skip
    assert len(converted) == 2  # LoCon-Tucker and DoRA per output row
    # DoRA beside plain LoRA modules in one component: PEFT has one use_dora per component
    mixed = a_dora("sd1", DORA_MODULES["sd1"])
    mixed.modules.update({k: m for k, m in a_lora("sd1").modules.items() if k.startswith("unet.")})
    mixed_file = save(mixed, d / "mixed.safetensors")
    result = cli("convert", mixed_file, "--to", "diffusers", "-o", d / "mixed.diffusers.safetensors")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    assert (
        "mixes DoRA and plain LoRA" in lines[0] and "--to kohya" in lines[0] and str(mixed_file) in lines[0]
    )
    assert not (d / "mixed.diffusers.safetensors").exists()
    for one, out in converted:
        assert_same_weights(diffusers_fused("sd1", out), lorax_merged("sd1", one, scratch("m") / "m"), "sd1")


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_a_lora_diffusion_file_loads_in_diffusers_through_convert(cli, family: str) -> None:  # type: ignore[no-untyped-def]
    """``convert --to lora_diffusion`` (UNet and text-encoder attention, the format's targets): diffusers has no
    reader for index files; ``convert --to diffusers --model`` gives one it loads, fused as ``lorax merge`` merges the
    lora_diffusion file itself."""
    from diffusers import DiffusionPipeline

    d = scratch(f"interop-ld-{family}")
    state = a_lora(family)
    state.modules = {k: m for k, m in state.modules.items() if ".attn" in k or ".self_attn." in k}
    kohya = save(state, d / "kohya.safetensors")
    model = ("--model", str(tiny_folder(family)))
    ld = d / "ld.safetensors"
    result = cli("convert", kohya, "--to", "lora_diffusion", "-o", ld, *model)
    assert result.exit_code == 0, result.stderr
    assert any(k.startswith("unet:") for k in load_file(ld)) and any(
        k.startswith("text_encoder:") for k in load_file(ld)
    )
    with pytest.raises(ValueError, match="lora"):
        DiffusionPipeline.from_pretrained(tiny_folder(family)).load_lora_weights(str(ld))
    lora = d / "pytorch_lora_weights.safetensors"
    result = cli("convert", ld, "--to", "diffusers", "-o", lora, *model)
    assert result.exit_code == 0, result.stderr
    assert_same_weights(diffusers_fused(family, lora), lorax_merged(family, ld, d / "merged"), family)


def test_a_text_mlp_only_lora_loads_in_diffusers_as_kohya(cli) -> None:  # type: ignore[no-untyped-def]
    """docs/formats.md's known gap, pinned: diffusers 0.42 refuses a diffusers-format LoRA whose text-encoder modules
    are MLP layers only (it recognises PEFT text-encoder keys by their attention names); the kohya file loads and fuses
    as ``lorax merge`` merges it."""
    state = a_lora("sd1", content="text")
    state.modules = {k: m for k, m in state.modules.items() if ".mlp." in k}
    d = scratch("interop-text-mlp")
    peft_file = save(state, d / "peft.safetensors", fmt="diffusers")
    with pytest.raises(ValueError, match="infer state dict type"):
        diffusers_fused("sd1", peft_file)
    kohya = save(state, d / "kohya.safetensors")
    assert_same_weights(diffusers_fused("sd1", kohya), lorax_merged("sd1", kohya, d / "merged"), "sd1")


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a_kohya_dora_file_goes_to_diffusers_through_convert(cli, family: str) -> None:  # type: ignore[no-untyped-def]
    """A kohya (LyCORIS ``dora_scale``) DoRA file, as ``lorax train --dora`` writes (a conv's magnitude
    ``[out, 1, 1, 1]``, LyCORIS' shape, which ComfyUI's ``weight_decompose`` needs). diffusers 0.42 does not read it
    right, as docs/formats.md says, pinned here: on the UNet it fuses the plain LoRA (the magnitudes dropped without a
    word), and with text-encoder modules its loader refuses the file. ``convert --to diffusers`` gives the file it
    fuses as ``lorax merge`` merges the kohya one."""
    d = scratch(f"interop-kohya-dora-{family}")
    unet = save(a_dora(family, DORA_MODULES[family]), d / "unet.safetensors")
    tensors = load_file(unet)
    scales = {k: v.shape for k, v in tensors.items() if k.endswith(".dora_scale")}
    downs = {k: v.dim() for k, v in tensors.items() if k.endswith(".lora_down.weight")}
    assert {tuple(v) for v in scales.values()} == {(32, 1, 1, 1), (64 if family == "sdxl" else 32, 1)}, scales
    assert all(
        len(shape) == downs[k.replace(".dora_scale", ".lora_down.weight")] for k, shape in scales.items()
    )
    plain = d / "plain.safetensors"
    save_file({k: v for k, v in tensors.items() if not k.endswith(".dora_scale")}, str(plain))
    assert_same_weights(
        diffusers_fused(family, unet), lorax_merged(family, plain, d / "plain-merged"), family
    )
    with_text = save(
        a_dora(family, (*DORA_MODULES[family], *DORA_TEXT_MODULES[family])), d / "text.safetensors"
    )
    with pytest.raises(ValueError, match="infer state dict type"):
        diffusers_fused(family, with_text)
    converted = d / "pytorch_lora_weights.safetensors"
    result = cli("convert", with_text, "--to", "diffusers", "-o", converted)
    assert result.exit_code == 0, result.stderr
    assert_same_weights(
        diffusers_fused(family, converted), lorax_merged(family, with_text, d / "merged"), family
    )
