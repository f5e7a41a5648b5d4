"""`lorax train` features users of kohya / diffusers / OneTrainer look for (issue 19): usable snapshots, starting
from a LoRA, learning-rate options, EMA, clip skip. CLI-level, on the tiny SD1 model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def model_dir(star_model: Path) -> Path:
    return star_model


@pytest.fixture()
def image_dir(star_images: Path) -> Path:
    return star_images


def train(cli, model_dir: Path, image_dir: Path, out: Path, *args: object):
    result = cli(
        "train",
        image_dir,
        "--model",
        model_dir,
        "--instance-prompt",
        "a sks star",
        "--resolution",
        "32",
        "--lr",
        "1e-3",
        "--device",
        "cpu",
        "--save-dtype",
        "fp32",
        "-o",
        out,
        *[str(a) for a in args],
    )
    return result


def header(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


# --- item 1: usable snapshots ---------------------------------------------------------------------------------


def test_snapshots_every_n_steps_are_the_output_at_that_step_and_load_in_diffusers(
    cli, tmp_path, model_dir, image_dir
):
    from diffusers import StableDiffusionPipeline

    from lorax.formats import load_lora

    out = tmp_path / "star.safetensors"
    older = tmp_path / "star-step00000099.safetensors"  # not this run's: never deleted by --save-last
    older.write_bytes(b"an earlier run's snapshot")
    result = train(cli, model_dir, image_dir, out, "--steps", 5, "--save-every", 2, "--save-last", 1)
    assert result.exit_code == 0, result.stderr
    step2, step4 = (tmp_path / f"star-step0000000{s}.safetensors" for s in (2, 4))
    assert step4.is_file() and not step2.exists(), "--save-last 1 keeps the newest snapshot only"
    assert older.read_bytes() == b"an earlier run's snapshot"
    assert "snapshot: " in result.stderr and str(step4) in result.stderr
    assert not list(tmp_path.glob(".*.tmp"))

    meta, final_meta = header(step4), header(out)
    assert set(meta) == set(final_meta), set(meta) ^ set(final_meta)
    assert meta["ss_steps"] == "4" and meta["ss_max_train_steps"] == "5" and final_meta["ss_steps"] == "5"
    assert meta["sshs_model_hash"] != final_meta["sshs_model_hash"]
    assert meta["modelspec.architecture"] == final_meta["modelspec.architecture"]

    # the snapshot is exactly what a 4-step run writes (the same seeded run, stopped there)
    four = tmp_path / "four.safetensors"
    assert train(cli, model_dir, image_dir, four, "--steps", 4).exit_code == 0
    snap, ref = load_file(step4), load_file(four)
    assert snap.keys() == ref.keys()
    for key in ref:
        torch.testing.assert_close(snap[key], ref[key], rtol=0, atol=0)

    # diffusers' own loader reads the snapshot; its fused deltas are lorax's reading of the file
    pipe = StableDiffusionPipeline.from_pretrained(
        str(model_dir), safety_checker=None, requires_safety_checker=False
    )
    before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    pipe.load_lora_weights(str(step4))
    pipe.fuse_lora(lora_scale=1.0)
    after = dict(pipe.unet.named_parameters())
    state = load_lora(step4)
    assert state.modules
    for key, module in state.modules.items():
        path = key.removeprefix("unet.")
        fused = after.get(f"{path}.base_layer.weight", after.get(f"{path}.weight"))
        assert fused is not None, key
        torch.testing.assert_close(
            fused.double() - before[f"{path}.weight"].double(), module.delta().double(), atol=1e-6, rtol=1e-4
        )


def test_snapshots_every_n_epochs_and_existing_ones_need_force(cli, tmp_path, model_dir, image_dir):
    out = tmp_path / "ep.safetensors"
    # 2 images, batch 1: 2 steps an epoch; epochs 1 and 2 get snapshots, epoch 3 is the output itself
    result = train(cli, model_dir, image_dir, out, "--epochs", 3, "--save-every-epochs", 1)
    assert result.exit_code == 0, result.stderr
    names = sorted(p.name for p in tmp_path.glob("ep-*.safetensors"))
    assert names == ["ep-000001.safetensors", "ep-000002.safetensors"]
    assert header(tmp_path / "ep-000002.safetensors")["ss_epoch"] == "2"

    again = tmp_path / "again.safetensors"
    (tmp_path / "again-000001.safetensors").write_bytes(b"keep me")
    result = train(cli, model_dir, image_dir, again, "--epochs", 2, "--save-every-epochs", 1)
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and "again-000001.safetensors" in line and "--force" in line
    assert (tmp_path / "again-000001.safetensors").read_bytes() == b"keep me" and not again.exists()


def test_save_last_needs_snapshots(cli, tmp_path, model_dir, image_dir):
    result = train(cli, model_dir, image_dir, tmp_path / "x.safetensors", "--steps", 1, "--save-last", 2)
    assert result.exit_code == 1 and "--save-last needs --save-every" in result.stderr


# --- item 2: --init-lora ------------------------------------------------------------------------------------


@pytest.fixture()
def step0(monkeypatch):
    """The trainable tensors as the loop finds them before step 1 (``{component.peft key: tensor}``)."""
    from lorax.training.loop import TrainingLoop

    seen: dict[str, torch.Tensor] = {}
    original = TrainingLoop.run

    def run(self):
        seen.update({k: v.clone() for k, v in self.job.state_tensors().items()})
        return original(self)

    monkeypatch.setattr(TrainingLoop, "run", run)
    return seen


def test_init_lora_starts_from_the_files_weights(cli, tmp_path, model_dir, image_dir, step0):
    kohya = tmp_path / "k.safetensors"
    assert (
        train(cli, model_dir, image_dir, kohya, "--steps", 2, "--rank", 2, "--network-alpha", 1).exit_code
        == 0
    )
    step0.clear()
    out = tmp_path / "cont.safetensors"
    result = train(
        cli, model_dir, image_dir, out, "--steps", 1, "--rank", 2, "--network-alpha", 1, "--init-lora", kohya
    )
    assert result.exit_code == 0, result.stderr
    raw = load_file(kohya)
    assert len(step0) == len(raw) - len([k for k in raw if k.endswith(".alpha")])
    ups = [k for k in step0 if ".lora_B." in k]
    assert ups and all(float(step0[k].abs().max()) > 0 for k in ups), "the file's up weights are not zero"
    for key, tensor in step0.items():
        component, path = key.split(".", 1)
        assert component == "unet"
        module, kind = path.rsplit(".lora_", 1)
        name = "lora_unet_" + module.replace(".", "_")
        part = "lora_down.weight" if kind.startswith("A") else "lora_up.weight"
        torch.testing.assert_close(tensor, raw[f"{name}.{part}"], rtol=0, atol=0)
    assert header(out)["lorax_init_lora"] == "k.safetensors"


def test_init_lora_from_a_diffusers_file_with_text_encoder_keeps_its_deltas(
    cli, tmp_path, model_dir, image_dir, step0
):
    """A diffusers file folds alpha / r into lora_B (read back with alpha = r); starting from it at another
    --network-alpha rescales the up weights so every module's delta is the file's B @ A."""
    diffusers_file = tmp_path / "d.safetensors"
    args = ("--rank", 2, "--network-alpha", 1, "--train-text")
    assert (
        train(
            cli, model_dir, image_dir, diffusers_file, "--steps", 2, "--format", "diffusers", *args
        ).exit_code
        == 0
    )
    step0.clear()
    result = train(
        cli,
        model_dir,
        image_dir,
        tmp_path / "c.safetensors",
        "--steps",
        1,
        *args,
        "--init-lora",
        diffusers_file,
    )
    assert result.exit_code == 0, result.stderr
    assert "up weights rescaled" in result.stderr
    raw = load_file(diffusers_file)
    hand = {
        k[: -len(".lora_A.weight")].replace(".text_model.", "."): raw[
            k.replace(".lora_A.", ".lora_B.")
        ].double()
        @ raw[k].double()
        for k in raw
        if k.endswith(".lora_A.weight")
    }
    assert any(k.startswith("text_encoder.") for k in hand)
    checked = 0
    for key in step0:
        if ".lora_A." not in key:
            continue
        prefix = key[: -len(".lora_A.weight")]
        live_delta = 0.5 * step0[prefix + ".lora_B.weight"].double() @ step0[key].double()  # alpha 1 / rank 2
        torch.testing.assert_close(live_delta, hand[prefix], atol=1e-7, rtol=1e-5)
        checked += 1
    assert checked == len(hand)


@pytest.mark.parametrize(
    ("init_flags", "flags", "expected"),
    [
        ((), ("--rank", 4), "rank 2, not --rank 4; pass --rank 2"),
        ((), ("--rank", 2, "--targets", "attn-ff"), "trained modules are not in it"),
        (("--train-text",), ("--rank", 2), "of its modules are not trained here"),
    ],
)
def test_init_lora_that_does_not_fit_is_one_line(
    cli, tmp_path, model_dir, image_dir, init_flags, flags, expected
):
    init = tmp_path / "init.safetensors"
    assert train(cli, model_dir, image_dir, init, "--steps", 1, "--rank", 2, *init_flags).exit_code == 0
    out = tmp_path / "o.safetensors"
    result = train(cli, model_dir, image_dir, out, "--steps", 1, *flags, "--init-lora", init)
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("lorax: error: --init-lora ") and expected in line, line
    assert str(init) in line and not out.exists()
    if init_flags:
        assert "pass --train-text" in line


# --- item 4: learning rates -------------------------------------------------------------------------------------


@pytest.fixture()
def optimizer_at_start(monkeypatch):
    """The loop's optimizer param groups (lr, and the PEFT names of their parameters) before step 1."""
    from lorax.training.loop import TrainingLoop

    seen: list[tuple[float, set[str]]] = []
    original = TrainingLoop.run

    def run(self):
        names = {id(p): f"{c}.{n}" for c, m in self.job.components().items() for n, p in m.named_parameters()}
        seen.extend((g["lr"], {names[id(p)] for p in g["params"]}) for g in self.optimizer.param_groups)
        return original(self)

    monkeypatch.setattr(TrainingLoop, "run", run)
    return seen


def test_loraplus_puts_up_matrices_at_ratio_times_lr_and_their_first_step_moves_that_much(
    cli, tmp_path, model_dir, image_dir, optimizer_at_start, step0
):
    # non-zero up weights, so the down weights get gradients at step 1 too
    init = tmp_path / "init.safetensors"
    assert train(cli, model_dir, image_dir, init, "--steps", 1, "--rank", 2, "--train-text").exit_code == 0
    optimizer_at_start.clear()
    step0.clear()
    out = tmp_path / "plus.safetensors"
    result = train(
        cli, model_dir, image_dir, out, "--steps", 1, "--rank", 2, "--train-text", "--init-lora", init,
        "--loraplus-ratio", 16, "--text-lr", "1e-4", "--weight-decay", 0,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    groups = optimizer_at_start
    assert len(groups) == 4
    for lr, names in groups:
        ups = {n for n in names if ".lora_B." in n}
        assert ups in (set(), names), "a group mixes up and down matrices"
        text = {n.startswith("text_encoder.") for n in names}
        assert len(text) == 1
        base = 1e-4 if text == {True} else 1e-3
        assert lr == pytest.approx(base * (16 if ups else 1))
    assert sum(len(n) for _, n in groups) == len(step0)

    # Adam's first step moves each weight with a gradient by lr (|m̂ / √v̂| = 1): B by 16 × A's step
    after = load_file(out)
    moved: dict[str, float] = {}
    for key, before in step0.items():
        component, path = key.split(".", 1)
        module, kind = path.rsplit(".lora_", 1)
        prefix = "lora_unet_" if component == "unet" else "lora_te_"
        module = module if component == "unet" else "text_model." + module
        name = (
            prefix
            + module.replace(".", "_")
            + (".lora_down.weight" if kind.startswith("A") else ".lora_up.weight")
        )
        step = float((after[name] - before).abs().max())
        moved.setdefault(f"{component}-{kind[0]}", 0.0)
        moved[f"{component}-{kind[0]}"] = max(moved[f"{component}-{kind[0]}"], step)
    assert moved["unet-A"] == pytest.approx(1e-3, rel=1e-3)
    assert moved["unet-B"] == pytest.approx(16e-3, rel=1e-3)
    assert moved["text_encoder-A"] == pytest.approx(1e-4, rel=1e-3)
    assert moved["text_encoder-B"] == pytest.approx(16e-4, rel=1e-3)
    import json

    assert json.loads(header(out)["ss_network_args"])["loraplus_lr_ratio"] == 16


def _lrs(cli, model_dir, image_dir, out, *args):
    import json

    result = train(cli, model_dir, image_dir, out, "--steps", 8, "--json", *args)
    assert result.exit_code == 0, result.stderr
    return [row[2] for row in json.loads(result.stdout)["losses"]], header(out)


def test_cosine_with_restarts_and_polynomial_follow_their_definitions(cli, tmp_path, model_dir, image_dir):
    """The lr of each step against the published formulas (transformers / diffusers optimization docs):
    warm-up lr·s/w, then cosine with hard restarts 0.5·(1 + cos(π·((cycles·p) mod 1))) and polynomial
    (lr - end)·(1 - p)^power + end, p the fraction of the post-warm-up steps done."""
    import math

    lr, total = 1e-3, 8
    got, meta = _lrs(
        cli, model_dir, image_dir, tmp_path / "cos.safetensors",
        "--lr-scheduler", "cosine_with_restarts", "--lr-cycles", 2, "--warmup-ratio", 0.25,
    )  # fmt: skip
    warmup = 2  # int(0.25 × 8)

    def cos(s: int) -> float:
        if s < warmup:
            return lr * s / warmup
        p = (s - warmup) / (total - warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * ((2 * p) % 1.0)))

    assert got == pytest.approx([cos(s) for s in range(total)], abs=1e-12)
    assert max(got[5:]) == pytest.approx(lr), "the second cycle restarts at the full lr"
    assert meta["ss_lr_warmup_steps"] == "2" and meta["ss_lr_scheduler_num_cycles"] == "2"

    got, meta = _lrs(
        cli, model_dir, image_dir, tmp_path / "poly.safetensors",
        "--lr-scheduler", "polynomial", "--lr-power", 2, "--warmup-steps", 1,
    )  # fmt: skip
    end = 1e-7

    def poly(s: int) -> float:
        if s < 1:
            return lr * s / 1
        return (lr - end) * (1 - (s - 1) / (total - 1)) ** 2 + end

    assert got == pytest.approx([poly(s) for s in range(total)], abs=1e-12)
    assert meta["ss_lr_scheduler"] == "polynomial" and meta["ss_lr_scheduler_power"] == "2"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--warmup-steps", 2, "--warmup-ratio", 0.1), "--warmup-steps and --warmup-ratio are exclusive"),
        (("--warmup-ratio", 1.5), "--warmup-ratio must be in [0, 1)"),
        (("--lr-cycles", 3), "--lr-cycles needs --lr-scheduler cosine_with_restarts"),
        (("--lr-power", 2), "--lr-power needs --lr-scheduler polynomial"),
        (("--loraplus-ratio", 0), "--loraplus-ratio must be > 0"),
    ],
)
def test_learning_rate_flags_that_do_not_fit(cli, tmp_path, model_dir, image_dir, args, expected):
    result = train(cli, model_dir, image_dir, tmp_path / "x.safetensors", "--steps", 1, *args)
    assert result.exit_code == 1 and expected in result.stderr, result.stderr


# --- item 6: EMA ------------------------------------------------------------------------------------------------


def test_ema_output_equals_a_hand_computed_ema_of_a_3_step_run(cli, tmp_path, model_dir, image_dir):
    """Run A (no EMA) gives the weights w1, w2 (snapshots) and w3 (output); run B, the same run with --ema-decay 0.5,
    writes diffusers' EMAModel average: e1 = w1, e_n = d_n·e_(n-1) + (1 - d_n)·w_n, d_n = min(0.5, n / (n + 9))."""
    plain = tmp_path / "plain.safetensors"
    assert train(cli, model_dir, image_dir, plain, "--steps", 3, "--save-every", 1).exit_code == 0
    w = [load_file(tmp_path / f"plain-step0000000{n}.safetensors") for n in (1, 2)] + [load_file(plain)]
    averaged = tmp_path / "ema.safetensors"
    result = train(cli, model_dir, image_dir, averaged, "--steps", 3, "--ema-decay", 0.5)
    assert result.exit_code == 0, result.stderr
    got = load_file(averaged)
    assert got.keys() == w[2].keys()
    checked = 0
    for key in got:
        if key.endswith(".alpha"):
            continue
        e = w[0][key].double()
        for n in (2, 3):
            d = min(0.5, n / (n + 9))
            e = d * e + (1 - d) * w[n - 1][key].double()
        torch.testing.assert_close(got[key].double(), e, atol=1e-7, rtol=1e-6)
        checked += 1
    assert checked and any(not torch.equal(got[k], w[2][k]) for k in got), "the EMA equals the last weights"
    assert header(averaged)["lorax_ema_decay"] == "0.5"


def test_ema_resumes_exactly(cli, tmp_path, model_dir, image_dir, monkeypatch):
    """Interrupted at step 2 and resumed, an EMA run writes what the uninterrupted one writes."""
    from lorax.training.loop import TrainingLoop

    straight = tmp_path / "straight.safetensors"
    assert train(cli, model_dir, image_dir, straight, "--steps", 3, "--ema-decay", 0.9).exit_code == 0
    out = tmp_path / "resumed.safetensors"
    original = TrainingLoop._run

    def stop_after_2(self):
        self.settings.max_steps, full = 2, self.settings.max_steps
        try:
            original(self)
        finally:
            self.settings.max_steps = full
        self._interrupted = True
        self._stop_interrupted()

    monkeypatch.setattr(TrainingLoop, "_run", stop_after_2)
    result = train(cli, model_dir, image_dir, out, "--steps", 3, "--ema-decay", 0.9)
    assert result.exit_code == 130, result.stderr
    monkeypatch.setattr(TrainingLoop, "_run", original)
    result = cli("train", "--resume", tmp_path / "resumed.checkpoints")
    assert result.exit_code == 0, result.stderr
    a, b = load_file(straight), load_file(out)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


# --- item 7: clip skip ------------------------------------------------------------------------------------------


def _penultimate(model_dir: Path, prompts: list[str]) -> torch.Tensor:
    """kohya's clip skip 2 by hand: CLIP's hidden states after all but the last layer, through the final norm."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model_dir / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder")
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        out = encoder(ids, output_hidden_states=True)
        norm = getattr(encoder, "text_model", encoder).final_layer_norm
        hand = norm(out.hidden_states[-2])
    assert not torch.allclose(hand, out.last_hidden_state, atol=1e-3), (
        "clip skip 2 must differ from the last layer"
    )
    return hand


def test_clip_skip_trains_on_the_penultimate_layer_and_records_it(
    cli, tmp_path, model_dir, image_dir, monkeypatch
):
    from lorax.training.objective import DiffusionObjective

    seen: list[torch.Tensor] = []
    original = DiffusionObjective.loss

    def loss(self, unet, step, generator):
        seen.append(step.cond.detach().clone())
        return original(self, unet, step, generator)

    monkeypatch.setattr(DiffusionObjective, "loss", loss)
    out = tmp_path / "skip.safetensors"
    result = train(
        cli, model_dir, image_dir, out, "--steps", 2, "--clip-skip", 2, "--train-text",
        "--validation-prompt", "a sks star", "--validation-every", 2, "--sample-steps", 2,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert len(list((tmp_path / "skip.samples").glob("*.png"))) == 1
    hand = _penultimate(model_dir, ["a sks star"])
    # step 1: the text-encoder LoRA starts at a zero delta, so its context is the base model's
    torch.testing.assert_close(seen[0], hand.expand_as(seen[0]), atol=1e-5, rtol=1e-5)
    assert header(out)["ss_clip_skip"] == "2"


def test_generate_honours_clip_skip_from_the_flag_and_from_the_loras_metadata(
    cli, tmp_path, model_dir, image_dir
):
    """``lorax generate --clip-skip 2`` equals generating with the text encoder's last layer removed (A1111's
    meaning of clip skip 2); a LoRA trained with --clip-skip 2 brings it along (ss_clip_skip), and --clip-skip 1 wins."""
    from lorax.gen.params import read_png_parameters
    from lorax.services.generate import GenerateConfig, generate, load_model

    def gen(out, *args):
        result = cli(
            "generate", "a sks star", "--model", model_dir, "-o", out, "--steps", 3, "--seed", 5, *args
        )
        assert result.exit_code == 0, result.stderr
        return Path(result.stdout.strip()), result.stderr

    def pixels(path):
        return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)

    skipped, _ = gen(tmp_path / "flag", "--clip-skip", 2)
    plain, _ = gen(tmp_path / "plain")
    shorter = load_model(str(model_dir))
    encoder = shorter.text_encoder
    layers = getattr(encoder, "text_model", encoder).encoder.layers
    del layers[-1]
    reference = generate(
        GenerateConfig(
            prompts=["a sks star"], model=str(model_dir), seed=5, steps=3, out_dir=tmp_path / "ref"
        ),
        pipe=shorter,
    ).images[0]
    assert np.abs(pixels(skipped) - pixels(reference.path)).max() <= 1
    assert np.abs(pixels(skipped) - pixels(plain)).max() > 10
    assert read_png_parameters(skipped).fields["Clip skip"] == "2"

    lora = tmp_path / "skip.safetensors"
    assert train(cli, model_dir, image_dir, lora, "--steps", 1, "--clip-skip", 2).exit_code == 0
    from_meta, log = gen(tmp_path / "meta", "--lora", lora)
    assert "clip skip 2 (ss_clip_skip of skip.safetensors" in log
    assert read_png_parameters(from_meta).fields["Clip skip"] == "2"
    off, _ = gen(tmp_path / "off", "--lora", lora, "--clip-skip", 1)
    assert "Clip skip" not in read_png_parameters(off).fields
    assert np.abs(pixels(from_meta) - pixels(off)).max() > 10


def test_clip_skip_is_refused_for_sdxl_and_below_1(cli, tmp_path, image_dir):
    from lorax.zoo.tiny import tiny_pipeline

    sdxl = tmp_path / "sdxl"
    tiny_pipeline("sdxl").save_pretrained(sdxl)
    result = train(cli, sdxl, image_dir, tmp_path / "x.safetensors", "--steps", 1, "--clip-skip", 2)
    assert result.exit_code == 1 and "SDXL already conditions" in result.stderr, result.stderr
    result = train(cli, sdxl, image_dir, tmp_path / "y.safetensors", "--steps", 1, "--clip-skip", 0)
    assert result.exit_code == 1 and "--clip-skip must be ≥ 1" in result.stderr


# --- the options in a --config file -----------------------------------------------------------------------------


def test_config_file_takes_the_new_keys_and_invert_refuses_them(tmp_path, image_dir):
    from lorax.errors import ConfigError
    from lorax.training.config import TrainConfig
    from lorax.training.pivot_config import InvertConfig

    keys = (
        'save-every = 100\nsave-every-epochs = 2\nsave-last = 3\ninit-lora = "old.safetensors"\n'
        'warmup-ratio = 0.1\nlr-scheduler = "cosine_with_restarts"\nlr-cycles = 3\nloraplus-ratio = 16\n'
        "ema-decay = 0.999\nclip-skip = 2\ntext-learning-rate = 1e-5\ntrain-text = true\n"
    )
    cfg = tmp_path / "train.toml"
    cfg.write_text(f'data-dir = "{image_dir}"\noutput = "o.safetensors"\n' + keys, encoding="utf-8")
    config = TrainConfig.from_sources({}, cfg)
    assert (config.save_every, config.save_every_epochs, config.save_last) == (100, 2, 3)
    assert config.init_lora == tmp_path / "old.safetensors" and config.warmup_ratio == 0.1
    assert (config.lr_cycles, config.loraplus_ratio, config.ema_decay, config.clip_skip) == (
        3,
        16.0,
        0.999,
        2,
    )
    again = tmp_path / "again.toml"
    again.write_text(config.to_toml(), encoding="utf-8")
    assert TrainConfig.from_sources({}, again) == config

    invert = tmp_path / "invert.toml"
    invert.write_text(f'data-dir = "{image_dir}"\noutput = "t.safetensors"\nema-decay = 0.9\nclip-skip = 2\n')
    with pytest.raises(ConfigError) as refused:
        InvertConfig.from_sources({}, invert)
    assert "config key ema_decay is lorax train's; lorax invert does not use it" in str(refused.value)


# --- item 4: per-block ranks and learning rates over kohya's blocks ------------------------------------------


def kohya_block_index(lora_name: str, is_sdxl: bool) -> int:
    """kohya sd-scripts' ``networks/lora.py`` ``get_block_index``, restated on the file's key names."""
    import re

    name = lora_name[len("lora_unet_") :]
    if is_sdxl:
        if name.startswith(("time_embed_", "label_emb_")):
            return 0
        for head, offset in (("input_blocks_", 1), ("middle_block_", 10), ("output_blocks_", 13)):
            if name.startswith(head):
                return offset + int(name.split("_")[2])
        return 22 if name.startswith("out_") else -1
    m = re.search(r"(up|down)_blocks_(\d+)_(resnets|upsamplers|downsamplers|attentions)_(\d+)_", lora_name)
    if m:
        i, kind, j = int(m.group(2)), m.group(3), int(m.group(4))
        idx = 3 * i + 2 if kind in ("upsamplers", "downsamplers") else 3 * i + j
        return 1 + idx if m.group(1) == "down" else 12 + 1 + idx
    return 12 if "mid_block_" in lora_name else -1


def _ranks_by_block(path: Path, is_sdxl: bool) -> dict[int, set[tuple[int, float]]]:
    raw = load_file(path)
    out: dict[int, set[tuple[int, float]]] = {}
    for key, down in raw.items():
        if key.startswith("lora_unet_") and key.endswith(".lora_down.weight"):
            module = key[: -len(".lora_down.weight")]
            alpha = float(raw[module + ".alpha"])
            out.setdefault(kohya_block_index(module, is_sdxl), set()).add((down.shape[0], alpha))
    return out


def test_block_dims_give_each_kohya_block_its_rank(cli, tmp_path, model_dir, image_dir):
    dims = [i % 4 + 1 for i in range(25)]
    dims[17] = 0  # up_blocks.1.attentions.1: left out
    out = tmp_path / "blocks.safetensors"
    result = train(cli, model_dir, image_dir, out, "--steps", 1, "--block-dims", ",".join(map(str, dims)))
    assert result.exit_code == 0, result.stderr
    by_block = _ranks_by_block(out, is_sdxl=False)
    # the tiny UNet's attention: IN01, IN02 (down_blocks.0), MID, OUT03-OUT05 (up_blocks.1)
    assert set(by_block) == {1, 2, 12, 16, 18}
    for block, ranks in by_block.items():
        assert ranks == {(dims[block], float(dims[block]))}, (block, ranks)
    import json

    assert json.loads(header(out)["ss_network_args"])["block_dims"] == ",".join(map(str, dims))


def test_block_lr_scales_each_blocks_learning_rate(cli, tmp_path, model_dir, image_dir, optimizer_at_start):
    weights = [1.0] * 25
    weights[1], weights[16], weights[12] = 0.5, 2.0, 0.0  # the mid block does not train
    out = tmp_path / "blr.safetensors"
    result = train(cli, model_dir, image_dir, out, "--steps", 1, "--block-lr", ",".join(map(str, weights)))
    assert result.exit_code == 0, result.stderr
    checked = 0
    for lr, names in optimizer_at_start:
        for name in names:
            assert name.startswith("unet.")
            module = "lora_unet_" + name[len("unet.") :].split(".lora_", 1)[0].replace(".", "_")
            assert lr == pytest.approx(1e-3 * weights[kohya_block_index(module, False)]), name
            checked += 1
    assert checked
    assert set(_ranks_by_block(out, is_sdxl=False)) == {1, 2, 16, 17, 18}
    import json

    args = json.loads(header(out)["ss_network_args"])
    assert args["mid_lr_weight"] == "0.0" and args["down_lr_weight"].split(",")[1] == "0.5"


def test_block_dims_on_sdxl_use_kohyas_23_blocks(cli, tmp_path, image_dir):
    from lorax.zoo.tiny import tiny_pipeline

    sdxl = tmp_path / "sdxl"
    tiny_pipeline("sdxl").save_pretrained(sdxl)
    dims = [(i % 3) + 1 for i in range(23)]
    out = tmp_path / "xl.safetensors"
    result = train(cli, sdxl, image_dir, out, "--steps", 1, "--block-dims", ",".join(map(str, dims)))
    assert result.exit_code == 0, result.stderr
    by_block = _ranks_by_block(out, is_sdxl=True)
    assert by_block and all(1 <= b <= 21 for b in by_block)
    for block, ranks in by_block.items():
        assert ranks == {(dims[block], float(dims[block]))}, (block, ranks)

    result = train(
        cli, sdxl, image_dir, tmp_path / "y.safetensors", "--steps", 1, "--block-dims", "4," * 24 + "4"
    )
    assert result.exit_code == 1
    assert "--block-dims takes 23 values for sdxl" in result.stderr and "\n" not in result.stderr.strip()


def test_snapshot_plan_and_a_snapshot_with_non_finite_weights_is_skipped(tmp_path):
    from types import SimpleNamespace

    from lorax.training.snapshots import Snapshots, plan_snapshots

    out = tmp_path / "o.safetensors"
    # 3 batches an epoch, grad-accum 2: epochs 1, 2, 3 end within steps 2 (micro 4), 3 (6), 5 (10); step 6 is the
    # last (its epoch 4 is the output itself)
    plan = plan_snapshots(out, max_steps=6, every_steps=4, every_epochs=1, epoch_after=lambda s: 2 * s // 3)
    assert {s: [p.name for p in ps] for s, ps in plan.items()} == {
        2: ["o-000001.safetensors"],
        3: ["o-000002.safetensors"],
        4: ["o-step00000004.safetensors"],
        5: ["o-000003.safetensors"],
    }
    logged: list[str] = []
    hook = Snapshots(
        {1: [out.with_name("o-step00000001.safetensors")]}, lambda path: False, log=logged.append
    )
    hook(SimpleNamespace(global_step=1))
    assert hook.written == [] and logged == ["snapshot skipped at step 1: the weights are not finite"]
