"""`lorax train --sample-prompts FILE --sample-every N` (kohya's per-line options) and `--val-split` (a held-out
validation loss at fixed timesteps and noise, in the loss CSV and plot). Issue 19 item 8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorax.errors import ConfigError, InputError
from lorax.training.sample_prompts import SamplePrompt, parse_line, read_sample_prompts

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from lorax.zoo.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("samples-model") / "model"
    tiny_pipeline("sd1").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("samples-images")
    rng = np.random.default_rng(3)
    for i in range(10):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(folder / f"img{i}.png")
    return folder


def test_kohya_line_options_parse_as_kohya_reads_them():
    # the pieces after " --": kohya's patterns (w, h, d, s, l, n), sizes floored to multiples of 8, steps clamped
    spec = parse_line("a red circle, best --n blurry, lowres --s 5000 --l 6.5 --d 42 --W 100 --h 36")
    assert spec == SamplePrompt(
        "a red circle, best",
        negative="blurry, lowres",
        steps=1000,
        guidance=6.5,
        seed=42,
        width=96,
        height=64,
    )
    assert parse_line("plain prompt") == SamplePrompt("plain prompt")
    with pytest.raises(InputError, match="unknown option --ss"):
        parse_line("x --ss euler_a", where="p.txt:1")
    with pytest.raises(InputError, match=r"p\.txt:3: --d x1 is not a number"):
        parse_line("x --d x1", where="p.txt:3")


def test_prompt_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\n\na square --d 1\n  \n# a star\na circle --s 3\n", encoding="utf-8")
    assert read_sample_prompts(path) == [SamplePrompt("a square", seed=1), SamplePrompt("a circle", steps=3)]
    (tmp_path / "empty.txt").write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(InputError, match="no prompts"):
        read_sample_prompts(tmp_path / "empty.txt")


def test_sample_prompts_options_reach_the_samples(cli, tmp_path, image_dir, model_dir):
    from lorax.gen.params import read_png_parameters

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# kohya prompt file\na sks square --n blurry --s 2 --l 3.5 --d 7 --w 100 --h 64\na sks circle\n",
        encoding="utf-8",
    )
    out = tmp_path / "out.safetensors"
    result = cli(
        "train", image_dir, "--model", model_dir, "--instance-prompt", "a sks square", "-o", out,
        "--steps", "2", "--resolution", "32", "--sample-prompts", prompts, "--sample-every", "1",
        "--sample-steps", "1", "--seed", "5",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    folder = tmp_path / "out.samples"
    first = folder / "step-000002-0.png"
    with Image.open(first) as image:
        assert image.size == (96, 64)  # 100 floored to a multiple of 8
    params = read_png_parameters(first)
    assert params.prompt == "a sks square" and params.negative_prompt == "blurry"
    assert params.fields["Steps"] == "2" and params.fields["CFG scale"] == "3.5"
    assert params.fields["Seed"] == "7" and params.fields["Size"] == "96x64"
    assert params.fields["Training step"] == "2"
    second = read_png_parameters(folder / "step-000001-1.png")
    assert second.prompt == "a sks circle" and second.fields["Steps"] == "1"  # the run's --sample-steps
    with Image.open(folder / "step-000001-1.png") as image:
        assert image.size == (32, 32)  # the training resolution
    assert (tmp_path / "out.samples.png").is_file()  # the sheet: prompts × steps


def test_sample_prompts_needs_sample_every(cli, tmp_path, image_dir, model_dir):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n", encoding="utf-8")
    out = tmp_path / "out.safetensors"
    result = cli(
        "train", image_dir, "--model", model_dir, "--instance-prompt", "x", "-o", out, "--steps", "1",
        "--sample-prompts", prompts,
    )  # fmt: skip
    assert result.exit_code == 1 and "--sample-prompts needs --validation-every" in result.stderr
    bad = tmp_path / "bad.txt"
    bad.write_text("a --q 3\n", encoding="utf-8")
    result = cli(
        "train", image_dir, "--model", model_dir, "--instance-prompt", "x", "-o", out, "--steps", "1",
        "--sample-prompts", bad, "--sample-every", "1",
    )  # fmt: skip
    assert result.exit_code == 1 and "bad.txt:1: unknown option --q" in result.stderr
    assert not out.exists()


def test_held_out_split_is_seeded_and_disjoint(image_dir):
    from lorax.data.images import load_image_folder
    from lorax.training.val_loss import split_held_out

    items = load_image_folder(image_dir, instance_prompt="x")
    train, held = split_held_out(items, 0.2, seed=3)
    assert len(held) == 2 and len(train) == 8
    assert not {it.path for it in held} & {it.path for it in train}
    assert split_held_out(items, 0.2, seed=3)[1] == held  # fixed by the seed
    with pytest.raises(ConfigError, match="leave none to train on"):
        split_held_out(items[:1], 0.5, seed=3)


def test_val_split_loss_never_trains_on_held_out_and_is_deterministic(
    tmp_path, image_dir, model_dir, monkeypatch
):
    import lorax.training.val_loss as val_loss_module
    from lorax.data.dataset import TrainData
    from lorax.services.train import train
    from lorax.training.config import TrainConfig

    seen: set[Path] = set()
    original = TrainData.batch_keys

    def spy(self, epoch, indices):  # every training batch's images (the held-out data has its own TrainData)
        keys, captions, rngs = original(self, epoch, indices)
        if not getattr(self, "_held_out", False):
            seen.update(self.items[k.item].path for k in keys if k.source == "instance")
        return keys, captions, rngs

    made = val_loss_module.held_out_data

    def mark(items, data):
        out = made(items, data)
        out._held_out = True  # type: ignore[attr-defined]
        return out

    monkeypatch.setattr(TrainData, "batch_keys", spy)
    monkeypatch.setattr(val_loss_module, "held_out_data", mark)
    hooks: list = []
    original_init = val_loss_module.ValidationLoss.__init__

    def keep(self, *a, **k):
        original_init(self, *a, **k)
        hooks.append(self)

    monkeypatch.setattr(val_loss_module.ValidationLoss, "__init__", keep)
    out = tmp_path / "out.safetensors"
    cfg = TrainConfig(
        data_dir=image_dir, output=out, model=str(model_dir), instance_prompt="x", steps=4, resolution=32,
        val_split=0.2, validation_every=2, seed=3, learning_rate=1e-2, batch_size=2,
    )  # fmt: skip
    result = train(cfg)
    held = {it.path for it in hooks[0].batches.data.items}
    assert len(held) == 2 and result.num_val_images == 2
    assert seen and not seen & held, "a held-out image was in a training batch"
    assert len(seen) == 8
    # measured at steps 2 and 4; the same weights give the same value, the trained ones another
    assert [s for s, _ in result.val_losses] == [2, 4]
    again = hooks[0].evaluate()
    assert again == hooks[0].evaluate() == pytest.approx(result.val_losses[-1][1], rel=0, abs=0)
    assert result.val_losses[0][1] != result.val_losses[1][1]
    # in the CSV as a column, empty where not measured
    lines = (tmp_path / "out.loss.csv").read_text().splitlines()
    assert lines[0] == "step,loss,smoothed_loss,lr,val_loss"
    assert lines[1].endswith(",") and float(lines[2].rsplit(",", 1)[1]) == pytest.approx(
        result.val_losses[0][1], rel=1e-5
    )
    with Image.open(tmp_path / "out.loss.png") as image:
        assert image.size == (800, 450)


def test_loss_plot_draws_the_validation_series(tmp_path):
    from lorax.training.report import write_loss_png

    losses = [[s, 0.5 + 0.01 * (s % 3), 1e-4, s] for s in range(1, 21)]
    write_loss_png(losses, tmp_path / "a.png")
    write_loss_png(losses, tmp_path / "b.png", val_losses=[[5, 0.9], [10, 0.8], [20, 0.7]])
    a = np.asarray(Image.open(tmp_path / "a.png").convert("RGB")).astype(int)
    b = np.asarray(Image.open(tmp_path / "b.png").convert("RGB")).astype(int)
    green = (46, 160, 67)
    assert not (np.abs(a - green).sum(-1) < 30).any()
    assert (np.abs(b - green).sum(-1) < 30).sum() > 100


def test_config_file_takes_sample_every_and_the_prompt_file_beside_it(tmp_path):
    from lorax.training.config import load_toml

    path = tmp_path / "run.toml"
    path.write_text('sample-prompts = "prompts.txt"\nsample-every = 25\nval-split = 0.1\n', encoding="utf-8")
    values = load_toml(path)
    assert values == {"sample_prompts": tmp_path / "prompts.txt", "validation_every": 25, "val_split": 0.1}
