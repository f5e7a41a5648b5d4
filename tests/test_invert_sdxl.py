"""lorax invert / pivot on the tiny SDXL model: the tokens train in both text encoders (clip_l / clip_g) and nothing
else moves; SDXL embedding and kohya bundle outputs load back through lorax generate's loaders with the same vectors;
pooling stays at EOS after tokens are added; exact resume; one-line refusals of formats that have no SDXL layout.

The tiny model's second text encoder says ``eos_token_id: 2`` like the real SDXL config, so transformers pools it at
``argmax(input_ids)`` unless lorax moves the pooling to the tokenizer's EOS."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lorax.progress import NullProgress
from lorax.training.pivot_config import InvertConfig, PivotConfig

WORDS = ["sks", "purple", "square", "shape", "red"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def xl_model(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    from lorax.zoo.tiny import tiny_pipeline

    pipe = tiny_pipeline("sdxl", seed=3, words=WORDS)
    pipe.text_encoder_2.config.eos_token_id = (
        2  # as stabilityai/stable-diffusion-xl-base-1.0's text_encoder_2
    )
    folder = tmp_path_factory.mktemp("tiny-xl-ti") / "model"
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def concept(tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    from lorax.zoo.shapes import write_concept_dir

    folder = tmp_path_factory.mktemp("xl-purple-squares")
    write_concept_dir(folder, "square", "purple", 2, seed=1, caption="a purple square")
    return folder


def load(model: Path):  # type: ignore[no-untyped-def]
    from lorax.training.base import load_base_pipeline

    return load_base_pipeline(str(model))


def common(model: Path, data: Path, out: Path) -> dict:
    return dict(data_dir=data, output=out, model=str(model), token_at_data="purple|<s1>", resolution=32,
                device="cpu", save_dtype="fp32")  # fmt: skip


def pooled_at(pipe, prompt: str, position: int) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """text_encoder_2's projection of its final hidden state at ``position``: what pooling there gives."""
    ids = pipe.tokenizer_2(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = pipe.text_encoder_2(ids)
        return pipe.text_encoder_2.text_projection(out.last_hidden_state[0, position])


def eos_position(pipe, prompt: str) -> int:  # type: ignore[no-untyped-def]
    ids = pipe.tokenizer_2(prompt, padding="max_length", max_length=77).input_ids
    return ids.index(pipe.tokenizer_2.eos_token_id)


def test_pooling_stays_at_eos_after_tokens_are_added(xl_model):  # type: ignore[no-untyped-def]
    from lorax.adapters.apply import register_tokens
    from lorax.training.inversion import learn_tokens

    prompt = "a <s1> square"
    # without the fix: the added id is the highest, so argmax pooling lands on the placeholder
    raw = load(xl_model)
    assert raw.text_encoder_2.text_model.eos_token_id == 2
    raw.tokenizer_2.add_tokens(["<s1>"])
    raw.text_encoder_2.resize_token_embeddings(len(raw.tokenizer_2), mean_resizing=False)
    ids = raw.tokenizer_2(prompt).input_ids
    placeholder = ids.index(raw.tokenizer_2.convert_tokens_to_ids("<s1>"))
    with torch.no_grad():
        _, _, bad, _ = raw.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(bad[0], pooled_at(raw, prompt, placeholder))

    # training path (learn_tokens) and generation path (register_tokens): pooled at the EOS position
    trained = load(xl_model)
    learn_tokens(trained, "sdxl", ["<s1>"], init=["rand"])
    generated = load(xl_model)
    register_tokens(
        generated, {"<s1>": {"text_encoder": torch.randn(1, 32), "text_encoder_2": torch.randn(1, 64)}}
    )
    for pipe in (trained, generated):
        eos = eos_position(pipe, prompt)
        assert eos == placeholder + 2  # <bos> a <s1> square <eos>
        with torch.no_grad():
            _, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        torch.testing.assert_close(pooled[0], pooled_at(pipe, prompt, eos))
        assert not torch.allclose(pooled[0], pooled_at(pipe, prompt, placeholder))
    # prompts without added tokens pool exactly where they did before (EOS was the highest id)
    base = load(xl_model)
    with torch.no_grad():
        want = base.encode_prompt("a red square", device="cpu", do_classifier_free_guidance=False)[2]
        got = trained.encode_prompt("a red square", device="cpu", do_classifier_free_guidance=False)[2]
    torch.testing.assert_close(got, want)


def test_token_set_inits_both_tables_scales_the_norm_target_and_checkpoints(xl_model):  # type: ignore[no-untyped-def]
    from lorax.errors import MismatchError
    from lorax.training.inversion import STATE_PREFIX, STATE_PREFIX_2, LearnedTokenSet, learn_tokens

    pipe = load(xl_model)
    w1 = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    w2 = pipe.text_encoder_2.get_input_embeddings().weight.detach().clone()
    tokens = learn_tokens(pipe, "sdxl", ["<a>", "<b>"], vectors=2, init=["red sks", "shape"], norm_target=0.3)
    assert isinstance(tokens, LearnedTokenSet)
    assert tokens.tokens == ["<a>", "<b>"] and tokens.expand("x <a> y") == "x <a> <a>_1 y"
    emb = tokens.embeddings()
    ids1 = pipe.tokenizer("red sks", add_special_tokens=False).input_ids
    ids2 = pipe.tokenizer_2("red sks", add_special_tokens=False).input_ids
    assert torch.equal(emb["<a>"]["text_encoder"], w1[ids1])  # one word token per vector, in each table
    assert torch.equal(emb["<a>"]["text_encoder_2"], w2[ids2])
    shape2 = pipe.tokenizer_2("shape", add_special_tokens=False).input_ids
    assert torch.allclose(emb["<b>"]["text_encoder_2"], w2[shape2].mean(0).expand(2, -1))
    # norm target of clip_g: 0.3 × (mean row norm of table 2 / of table 1), over the original rows
    ratio = float(w2.norm(dim=-1).mean() / w1.norm(dim=-1).mean())
    assert tokens.parts["text_encoder"].norm_target == 0.3
    assert tokens.parts["text_encoder_2"].norm_target == pytest.approx(0.3 * ratio, rel=1e-5)
    tokens.decay_norms(lr=0.05)  # λ = 1: straight to each table's target
    emb = tokens.embeddings()
    assert torch.allclose(emb["<b>"]["text_encoder"].norm(dim=-1), torch.full((2,), 0.3), atol=1e-5)
    assert torch.allclose(emb["<b>"]["text_encoder_2"].norm(dim=-1), torch.full((2,), 0.3 * ratio), atol=1e-5)
    # checkpoint keys: the first table's as SD1 wrote them, the second's beside them
    state = tokens.state_tensors()
    assert set(state) == {
        STATE_PREFIX + "<a>",
        STATE_PREFIX + "<b>",
        STATE_PREFIX_2 + "<a>",
        STATE_PREFIX_2 + "<b>",
    }
    assert state[STATE_PREFIX_2 + "<a>"].shape == (2, 64)
    tokens.set_embeddings({t: {c: torch.zeros_like(v) for c, v in per.items()} for t, per in emb.items()})
    assert all(float(v.abs().max()) == 0 for per in tokens.embeddings().values() for v in per.values())
    tokens.load_state_tensors(state)
    assert all(torch.equal(tokens.embeddings()[t][c], emb[t][c]) for t in emb for c in emb[t])
    with pytest.raises(MismatchError, match="no text_encoder_2 rows"):
        tokens.load_state_tensors({k: v for k, v in state.items() if k.startswith(STATE_PREFIX)})


def test_invert_trains_only_the_new_rows_of_both_tables_and_the_file_loads_back(xl_model, concept, tmp_path):  # type: ignore[no-untyped-def]
    from lorax.adapters.apply import register_tokens
    from lorax.formats import detect_format, load_embeddings
    from lorax.services.invert import invert

    pipe = load(xl_model)
    tables = {c: getattr(pipe, c).get_input_embeddings().weight.detach().clone()
              for c in ("text_encoder", "text_encoder_2")}  # fmt: skip
    others = {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items() if "token_embedding" not in k}
              for c in ("text_encoder", "text_encoder_2", "unet", "vae")}  # fmt: skip
    out = tmp_path / "s1.safetensors"
    # zero init + decoupled weight decay: the new rows move only by training, every other row only by restore
    cfg = InvertConfig(**common(xl_model, concept, out), steps=2, vectors=2, init_token="zero", weight_decay=0.5,
                       learning_rate=0.05)  # fmt: skip
    result = invert(cfg, NullProgress(), pipeline=pipe)
    assert result.steps == 2 and set(result.norms) == set(result.norms_2) == {"<s1>"}
    assert result.format == "sdxl-embedding"
    for component, before in tables.items():
        table = getattr(pipe, component).get_input_embeddings().weight.detach()
        tokenizer = pipe.tokenizer if component == "text_encoder" else pipe.tokenizer_2
        rows = tokenizer.convert_tokens_to_ids(["<s1>", "<s1>_1"])
        assert rows == [before.shape[0], before.shape[0] + 1]  # appended after the original vocabulary
        assert torch.equal(table[: before.shape[0]], before), component
        assert float(table[rows].abs().min(dim=-1).values.max()) > 0, component  # trained off zero
    for component, state in others.items():
        for k, v in getattr(pipe, component).state_dict().items():
            if "token_embedding" not in k:
                assert torch.equal(v, state[k]), (component, k)
    assert pipe.text_encoder_2.text_model.eos_token_id == pipe.tokenizer_2.eos_token_id

    assert detect_format(out) == "sdxl-embedding"
    with safe_open(str(out), "pt") as f:
        assert set(f.keys()) == {"clip_l", "clip_g"}
        assert f.get_tensor("clip_l").shape == (2, 32) and f.get_tensor("clip_g").shape == (2, 64)
        assert f.metadata()["lorax_family"] == "sdxl"
    loaded = load_embeddings(out)
    # the trained token, kept in lorax's header (A1111/ComfyUI trigger it by the file name, "s1")
    assert set(loaded) == {"<s1>"}
    fresh = load(xl_model)
    assert register_tokens(fresh, loaded) == ["<s1>"]
    for component in ("text_encoder", "text_encoder_2"):
        tokenizer = fresh.tokenizer if component == "text_encoder" else fresh.tokenizer_2
        learned = getattr(pipe, component).get_input_embeddings().weight.detach()
        rows = pipe.tokenizer.convert_tokens_to_ids(["<s1>", "<s1>_1"]) if component == "text_encoder" else \
            pipe.tokenizer_2.convert_tokens_to_ids(["<s1>", "<s1>_1"])  # fmt: skip
        back = getattr(fresh, component).get_input_embeddings().weight.detach()
        assert torch.equal(back[tokenizer.convert_tokens_to_ids(["<s1>", "<s1>_1"])], learned[rows]), (
            component
        )


def test_resume_of_an_sdxl_inversion_is_exact(xl_model, concept, tmp_path):  # type: ignore[no-untyped-def]
    from lorax.formats import load_embeddings
    from lorax.services.invert import invert

    full = invert(InvertConfig(**common(xl_model, concept, tmp_path / "full.safetensors"), steps=3,
                               learning_rate=0.02, checkpoint_every=2), NullProgress())  # fmt: skip
    assert [p.name for p in full.checkpoints] == ["step-000002"]
    with safe_open(str(full.checkpoints[0] / "weights.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"embeddings.<s1>", "embeddings_2.<s1>"} <= keys
    resumed = invert(InvertConfig(**common(xl_model, concept, tmp_path / "resumed.safetensors"), steps=3,
                                  learning_rate=0.02, resume=full.checkpoints[0]), NullProgress())  # fmt: skip
    assert resumed.resumed_from == full.checkpoints[0]
    assert [r[:3] for r in resumed.losses] == [r[:3] for r in full.losses]
    a = load_embeddings(tmp_path / "full.safetensors")["<s1>"]
    b = load_embeddings(tmp_path / "resumed.safetensors")["<s1>"]
    assert set(a) == {"text_encoder", "text_encoder_2"}
    assert all(torch.equal(a[c], b[c]) for c in a)


def test_pivot_on_sdxl_writes_kohya_with_clip_l_clip_g_bundles(cli, xl_model, concept, tmp_path):  # type: ignore[no-untyped-def]
    from lorax.formats import load_lora
    from lorax.services.pivot import pivot

    pipe = load(xl_model)
    tables = {c: getattr(pipe, c).get_input_embeddings().weight.detach().clone()
              for c in ("text_encoder", "text_encoder_2")}  # fmt: skip
    out = tmp_path / "p.safetensors"
    cfg = PivotConfig(**common(xl_model, concept, out), ti_steps=2, steps=2, init_token="shape", rank=2,
                      continue_inversion=True, weight_decay=0.5, ti_weight_decay=0.5)  # fmt: skip
    result = pivot(cfg, NullProgress(), pipeline=pipe)
    assert result.ti_steps == 2 and result.steps == 2
    assert set(result.modules) == {"unet", "text_encoder", "text_encoder_2"}
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        bundles = {k: f.get_tensor(k) for k in keys if k.startswith("bundle_emb.")}
    assert set(bundles) == {"bundle_emb.<s1>.clip_l", "bundle_emb.<s1>.clip_g"}
    assert bundles["bundle_emb.<s1>.clip_l"].shape == (1, 32) and bundles["bundle_emb.<s1>.clip_g"].shape == (
        1,
        64,
    )
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_") for k in keys)
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_") for k in keys)
    for component, before in tables.items():  # continued inversion: still only the new rows moved
        table = getattr(pipe, component).get_input_embeddings().weight.detach()
        assert torch.equal(table[: before.shape[0]], before), component
        tokenizer = pipe.tokenizer if component == "text_encoder" else pipe.tokenizer_2
        name = "clip_l" if component == "text_encoder" else "clip_g"
        row = tokenizer.convert_tokens_to_ids("<s1>")
        assert torch.equal(bundles[f"bundle_emb.<s1>.{name}"][0], table[row].float())
    state = load_lora(out)
    assert state.family == "sdxl"
    assert set(state.embeddings) == {"<s1>"}
    assert torch.equal(state.embeddings["<s1>"]["text_encoder"], bundles["bundle_emb.<s1>.clip_l"])
    assert torch.equal(state.embeddings["<s1>"]["text_encoder_2"], bundles["bundle_emb.<s1>.clip_g"])
    gen = cli("generate", "a <s1> square", "-m", xl_model, "-o", tmp_path / "img", "--steps", "1", "--size", "32x32",
              "--seed", "1", "--device", "cpu", "--lora", out)  # fmt: skip
    assert gen.exit_code == 0, gen.stderr
    assert len(list((tmp_path / "img").glob("*.png"))) == 1


@pytest.mark.parametrize(
    ("command", "name", "extra", "message"),
    [
        ("invert", "x.pt", [], "write x.safetensors"),
        ("invert", "x.safetensors", ["--format", "diffusers"], "needs clip_l and clip_g"),
        ("pivot", "x.safetensors", ["--format", "lora_diffusion"], "use --format kohya"),
    ],
)
def test_formats_without_an_sdxl_layout_are_one_line_errors(cli, xl_model, concept, tmp_path, command, name, extra,
                                                            message):  # type: ignore[no-untyped-def]  # fmt: skip
    out = tmp_path / name
    result = cli(command, concept, "-o", out, "--model", xl_model, "--token-at-data", "purple|<s1>",
                 "--resolution", "32", "--steps", "1", "--device", "cpu", *extra)  # fmt: skip
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorax: error:"), result.stderr
    assert message in lines[0] and "SDXL" in lines[0]
    assert not out.exists() and not list(
        tmp_path.glob("x.*")
    )  # refused before training: no loss curve either


def test_loss_masks_on_sdxl_keep_the_size_and_crop_ids(xl_model, concept, tmp_path):  # type: ignore[no-untyped-def]
    import dataclasses

    from PIL import Image

    from lorax.training.inversion_recipe import build_inversion, prepare
    from lorax.training.masks import MaskedSdxlBatches
    from lorax.training.sdxl import SdxlBatches

    def batches_for(masks: dict[str, Image.Image]):  # type: ignore[no-untyped-def]
        folder = tmp_path / f"masks-{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        for name, mask in masks.items():
            mask.save(folder / name)
        cfg = InvertConfig(**common(xl_model, concept, tmp_path / "m.safetensors"), steps=1, mask_dir=folder)
        session = prepare(cfg, NullProgress(), load(xl_model))
        loop, _ = build_inversion(session, max_steps=1, info={}, progress=NullProgress())
        masked = loop.job.batches
        assert isinstance(masked, MaskedSdxlBatches)
        plain = SdxlBatches(
            **{f.name: getattr(masked, f.name) for f in dataclasses.fields(SdxlBatches) if f.init}
        )
        with torch.no_grad():
            return [(b.loss(m, torch.Generator().manual_seed(7)), b) for m in (0, 1) for b in (masked, plain)]

    white = Image.new("L", (64, 64), 255)
    half = Image.new("L", (64, 64), 0)
    half.paste(255, (0, 0, 32, 64))
    # white masks weigh every latent pixel 1: the masked loss is the plain SDXL loss (time ids included)
    losses = batches_for({"0000.png": white, "0001.png": white})
    for (masked_loss, _), (plain_loss, _) in zip(losses[::2], losses[1::2], strict=True):
        torch.testing.assert_close(masked_loss, plain_loss)
    # a half mask changes the loss of its image only
    losses = batches_for({"0000.png": half, "0001.png": white})
    values = [float(v) for v, _ in losses]
    assert {values[0], values[2]} != {values[1], values[3]}
    assert sum(abs(a - b) > 1e-6 for a, b in zip(values[::2], values[1::2], strict=True)) == 1


def test_pivot_resume_inside_tuning_matches_the_uninterrupted_run(xl_model, concept, tmp_path):  # type: ignore[no-untyped-def]
    from lorax.formats import load_lora
    from lorax.services.pivot import pivot

    def cfg(name: str, **changes) -> PivotConfig:  # type: ignore[no-untyped-def]
        return PivotConfig(**common(xl_model, concept, tmp_path / name), ti_steps=2, steps=2, rank=2,
                           continue_inversion=True, auto_mask=True, train_text=False, **changes)  # fmt: skip

    full = pivot(cfg("full.safetensors", checkpoint_every=3), NullProgress())
    assert [p.name for p in full.checkpoints] == ["step-000003"]  # inside tuning: LoRA + both tables' rows
    resumed = pivot(cfg("resumed.safetensors", resume=full.checkpoints[0]), NullProgress())
    assert [r[:3] for r in resumed.losses] == [r[:3] for r in full.losses]
    a, b = load_lora(tmp_path / "full.safetensors"), load_lora(tmp_path / "resumed.safetensors")
    assert set(a.embeddings["<s1>"]) == {"text_encoder", "text_encoder_2"}
    assert all(torch.equal(a.embeddings["<s1>"][c], b.embeddings["<s1>"][c]) for c in a.embeddings["<s1>"])
    assert set(a.modules) == set(b.modules) and all(k.startswith("unet.") for k in a.modules)
    assert all(torch.equal(a.modules[k].up, b.modules[k].up) for k in a.modules)
