"""lorax invert on a tiny random SD1 model: only new rows train, initialisers, norm decay, masks, resume, outputs
that `lorax generate` loads, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorax.progress import NullProgress
from lorax.training.pivot_config import InvertConfig

WORDS = ["sks", "purple", "square", "shape", "red"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def tiny_ti_model(tmp_path_factory) -> Path:
    from lorax.zoo.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-ti") / "model"
    tiny_pipeline("sd1", words=WORDS).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def concept(tmp_path_factory) -> Path:
    from lorax.zoo.shapes import write_concept_dir

    folder = tmp_path_factory.mktemp("purple-squares")
    write_concept_dir(folder, "square", "purple", 3, seed=1, caption="a purple square")
    return folder


def load(model: Path):
    from lorax.training.base import load_base_pipeline

    return load_base_pipeline(str(model))


def config(model: Path, data: Path, out: Path, **changes) -> InvertConfig:
    values = dict(
        data_dir=data,
        output=out,
        model=str(model),
        token_at_data="purple|<s1>",
        resolution=32,
        steps=3,
        device="cpu",
        save_dtype="fp32",
    )
    values.update(changes)
    return InvertConfig(**values)


def run(cfg: InvertConfig, pipeline=None):
    from lorax.services.invert import invert

    return invert(cfg, NullProgress(), pipeline=pipeline)


def test_only_new_rows_train_and_every_other_row_is_restored_exactly(tiny_ti_model, concept, tmp_path):
    pipe = load(tiny_ti_model)
    before_table = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    before_te = {
        k: v.clone() for k, v in pipe.text_encoder.state_dict().items() if "token_embedding" not in k
    }
    before_unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    # Decoupled weight decay moves every row of the table: only the restore step can keep them exact.
    cfg = config(tiny_ti_model, concept, tmp_path / "s1.pt", weight_decay=0.5, learning_rate=0.05, vectors=2)
    result = run(cfg, pipeline=pipe)
    assert result.steps == 3
    assert result.format == "a1111-embedding"
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    rows = pipe.tokenizer.convert_tokens_to_ids(["<s1>", "<s1>_1"])
    assert rows == [len(pipe.tokenizer) - 2, len(pipe.tokenizer) - 1]
    others = torch.ones(table.shape[0], dtype=torch.bool)
    others[rows] = False
    n = before_table.shape[0]
    assert torch.equal(table[:n][others[:n]], before_table[others[:n]])
    from lorax.formats import load_embeddings

    learned = load_embeddings(tmp_path / "s1.pt")["<s1>"]["text_encoder"]
    assert torch.equal(learned, table[rows].float())
    for k, v in pipe.text_encoder.state_dict().items():
        if "token_embedding" not in k:
            assert torch.equal(v, before_te[k]), k
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, before_unet[k]), k


def test_initialisers_word_mean_rand_zero_and_clashes(tiny_ti_model):
    from lorax.errors import InputError
    from lorax.training.inversion import LearnedTokens
    from lorax.training.token_specs import DEFAULT_SIGMA

    pipe = load(tiny_ti_model)
    weight = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    ids = pipe.tokenizer("blue square", add_special_tokens=False).input_ids
    assert len(ids) > 2  # "blue" spells out in letters here: a word of several tokens
    tokens = LearnedTokens.add(
        pipe.tokenizer,
        pipe.text_encoder,
        ["<a>", "<b>", "<c>", "<d>"],
        vectors=3,
        init=["blue square", "zero", "<rand-0.5>", "rand"],
    )
    emb = tokens.embeddings()
    expected = weight[ids].mean(dim=0)
    assert torch.allclose(emb["<a>"]["text_encoder"], expected.expand(3, -1), atol=1e-7)
    assert torch.equal(emb["<b>"]["text_encoder"], torch.zeros(3, weight.shape[1]))
    assert 0.35 < float(emb["<c>"]["text_encoder"].std()) < 0.65
    assert 0.5 * DEFAULT_SIGMA < float(emb["<d>"]["text_encoder"].std()) < 2 * DEFAULT_SIGMA
    assert "<c>_2" in pipe.tokenizer.get_vocab()
    with pytest.raises(InputError, match=r"already in the model's vocabulary.*--overwrite-token"):
        LearnedTokens.add(pipe.tokenizer, pipe.text_encoder, ["sks"])
    with pytest.raises(InputError, match="cannot encode"):
        LearnedTokens.add(pipe.tokenizer, pipe.text_encoder, ["<e>"], init=["   "])
    over = LearnedTokens.add(pipe.tokenizer, pipe.text_encoder, ["sks"], init=["zero"], overwrite=True)
    assert over.rows["sks"] == pipe.tokenizer("sks", add_special_tokens=False).input_ids  # the word's own row
    assert torch.equal(over.embeddings()["sks"]["text_encoder"], torch.zeros(1, weight.shape[1]))


def test_a_word_of_one_token_per_vector_starts_each_vector_from_its_own_token(tiny_ti_model):
    from lorax.training.inversion import LearnedTokens

    pipe = load(tiny_ti_model)
    weight = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    ids = pipe.tokenizer("red sks", add_special_tokens=False).input_ids
    assert len(ids) == 2
    tokens = LearnedTokens.add(
        pipe.tokenizer, pipe.text_encoder, ["<p>", "<q>"], vectors=2, init=["red sks"] * 2
    )
    emb = tokens.embeddings()
    assert torch.equal(emb["<p>"]["text_encoder"], weight[ids].float())
    assert torch.equal(emb["<q>"]["text_encoder"], weight[ids].float())
    single = LearnedTokens.add(pipe.tokenizer, pipe.text_encoder, ["<r>"], vectors=1, init=["red sks"])
    assert torch.allclose(single.embeddings()["<r>"]["text_encoder"][0], weight[ids].mean(dim=0))


def test_norm_decay_is_the_seeds_formula(tiny_ti_model):
    from lorax.training.inversion import LearnedTokens

    pipe = load(tiny_ti_model)
    tokens = LearnedTokens.add(pipe.tokenizer, pipe.text_encoder, ["<n>"], vectors=2, init=["<rand-1.0>"])
    before = tokens.embeddings()["<n>"]["text_encoder"]
    tokens.decay_norms(lr=0.002)  # λ = min(1, 100 · 0.002) = 0.2
    after = tokens.embeddings()["<n>"]["text_encoder"]
    n = before.norm(dim=-1)
    assert torch.allclose(after.norm(dim=-1), n + 0.2 * (0.4 - n), atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(after, before, dim=-1)
    assert torch.allclose(cos, torch.ones(2), atol=1e-6)
    tokens.decay_norms(lr=0.05)  # λ = 1: straight to the target
    assert torch.allclose(
        tokens.embeddings()["<n>"]["text_encoder"].norm(dim=-1), torch.full((2,), 0.4), atol=1e-5
    )


def test_mask_weights_follow_the_seed_and_the_images_crop(tmp_path):
    import random

    from lorax.training.masks import foreground_mask, load_mask, mask_weight

    masks = torch.tensor([[[0.0, 1.0], [1.0, 0.5]]])
    w = mask_weight(masks, (2, 2), temperature=2.0)
    expected = (masks[:, None] + 0.5 + 0.01) ** 2
    assert torch.allclose(w, expected / expected.max(), atol=1e-6)

    arr = np.full((16, 24, 3), 255, dtype=np.uint8)
    arr[4:12, 2:8] = (200, 30, 30)  # a red block on the left
    Image.fromarray(arr).save(tmp_path / "a.png")
    fg = foreground_mask(arr.astype(np.float32) / 255)
    assert fg.sum() == 8 * 6 and fg[4:12, 2:8].all()
    plain = load_mask(
        None, tmp_path / "a.png", (24, 16), (16, 16), random_crop=False, flip=False, rng=random.Random(0)
    )
    flipped = load_mask(
        None, tmp_path / "a.png", (24, 16), (16, 16), random_crop=False, flip=True, rng=random.Random(0)
    )
    assert plain.shape == (16, 16)
    assert torch.equal(flipped, torch.flip(plain, dims=[1]))
    # centre crop of 24 → 16 drops 4 columns each side: the block (columns 2..7) keeps columns 4..7 → 0..3
    assert plain[6, 0:4].min() > 0.9 and plain[6, 5:].max() < 0.1


def test_resume_continues_exactly(tiny_ti_model, concept, tmp_path):
    from lorax.formats import load_embeddings

    full = run(config(tiny_ti_model, concept, tmp_path / "full.pt", steps=4, learning_rate=0.02))
    part = run(
        config(tiny_ti_model, concept, tmp_path / "part.pt", steps=4, learning_rate=0.02, checkpoint_every=2)
    )
    assert [p.name for p in part.checkpoints] == ["step-000002"]
    resumed = run(
        config(
            tiny_ti_model,
            concept,
            tmp_path / "resumed.pt",
            steps=4,
            learning_rate=0.02,
            resume=part.checkpoints[0],
        )
    )
    assert resumed.resumed_from == part.checkpoints[0]
    assert [r[:3] for r in resumed.losses] == [r[:3] for r in full.losses]
    a = load_embeddings(tmp_path / "full.pt")["<s1>"]["text_encoder"]
    b = load_embeddings(tmp_path / "resumed.pt")["<s1>"]["text_encoder"]
    assert torch.equal(a, b)


def test_cli_writes_every_format_with_metadata_samples_and_config(cli, tiny_ti_model, concept, tmp_path):
    from safetensors import safe_open

    from lorax.adapters.apply import register_tokens
    from lorax.formats import detect_format, load_embeddings

    toml = tmp_path / "run.toml"
    toml.write_text(
        f'[invert]\nmodel = "{tiny_ti_model}"\ntoken-at-data = "purple|<s1>"\nresolution = 32\nsteps = 2\n'
        'device = "cpu"\nvalidation-prompt = ["a <s1> square"]\nvalidation-every = 2\n'
    )
    outputs = {
        "s1.pt": ("a1111-embedding", []),
        "s1-a1111.safetensors": ("a1111-embedding", []),
        "learned_embeds.safetensors": ("diffusers-embedding", ["--format", "diffusers", "--vectors", "2"]),
    }
    for name, (fmt, extra) in outputs.items():
        out = tmp_path / name
        result = cli("invert", concept, "-o", out, "--config", toml, "--json", *extra)
        assert result.exit_code == 0, result.stderr
        doc = json.loads(result.stdout)
        assert doc["steps"] == 2 and doc["tokens"] == ["<s1>"]
        assert detect_format(out) == fmt
        embeddings = load_embeddings(out)
        ((token, per),) = embeddings.items()
        assert token == "<s1>"  # a1111 .safetensors: the trained token from the header, not the file name
        assert per["text_encoder"].shape == (2 if extra else 1, 32)
        pipe = load(tiny_ti_model)
        assert register_tokens(pipe, embeddings) == [token]
    with safe_open(str(tmp_path / "learned_embeds.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["lorax_command"] == "invert" and json.loads(meta["lorax_tokens"]) == ["<s1>"]
    assert meta["lorax_ti_steps"] == "2" and meta["lorax_base_model"] == str(tiny_ti_model)
    assert (tmp_path / "s1.samples" / "step-000002-0.png").is_file()
    assert (tmp_path / "s1.loss.png").is_file() and (tmp_path / "s1.loss.csv").read_text().count("\n") == 3
    saved = (tmp_path / "s1.toml").read_text()
    assert saved.startswith("# lorax invert") and 'token-at-data = "purple|<s1>"' in saved


def test_generate_uses_the_learned_token(cli, tiny_ti_model, concept, tmp_path):
    out = tmp_path / "s1.pt"
    assert (
        cli(
            "invert",
            concept,
            "-o",
            out,
            "--model",
            tiny_ti_model,
            "--token-at-data",
            "purple|<s1>",
            "--resolution",
            "32",
            "--steps",
            "1",
            "--device",
            "cpu",
        ).exit_code
        == 0
    )
    result = cli(
        "generate",
        "a <s1> square",
        "--model",
        tiny_ti_model,
        "--embedding",
        out,
        "--steps",
        "2",
        "--size",
        "32x32",
        "--seed",
        "1",
        "-o",
        tmp_path / "img",
        "--device",
        "cpu",
    )
    assert result.exit_code == 0, result.stderr
    assert len(list((tmp_path / "img").glob("*.png"))) == 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--token", "sks"], "sks is already in the model's vocabulary"),
        (["--init-token", "  "], "cannot encode"),
        (["--mask-dir", "MASKS"], "has no mask for 2 of 3 images"),
        (["--token-at-data", "blue|<s1>"], "no training caption contains <s1>"),
        (["--vectors", "0"], "--vectors must be between 1 and 75"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(cli, tiny_ti_model, concept, tmp_path, extra, message):
    masks = tmp_path / "masks"
    masks.mkdir()
    Image.new("L", (32, 32), 255).save(masks / "0000.png")
    args = [
        "invert",
        concept,
        "-o",
        tmp_path / "x.pt",
        "--model",
        tiny_ti_model,
        "--token-at-data",
        "purple|<s1>",
        "--steps",
        "1",
        "--device",
        "cpu",
    ]
    args += [str(masks) if a == "MASKS" else a for a in extra]
    if "--token-at-data" in extra:
        del args[6:8]
    if extra[:2] == ["--token", "sks"]:
        args[args.index("purple|<s1>")] = "purple|sks"
    result = cli(*args)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorax: error:"), result.stderr
    assert message in lines[0]
    assert not (tmp_path / "x.pt").exists()
