"""lorax train on a tiny random SD1 model: outputs, oracle loads, exact resume, stops, caches, prior preservation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lorax.errors import ConfigError, TrainingError
from lorax.progress import NullProgress
from lorax.training.config import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from lorax.zoo.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny-sd1") / "model"
    tiny_pipeline("sd1", words=["sks", "star", "circle"]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):
        arr = np.full((40, 48, 3), 255, dtype=np.uint8)
        arr[8:32, 10 + i : 34 + i] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(folder / f"star-{i}.png")
    return folder


def config(tiny_model: Path, images: Path, out: Path, **changes) -> TrainConfig:
    values = dict(
        data_dir=images,
        output=out,
        model=str(tiny_model),
        instance_prompt="a sks star",
        resolution=32,
        steps=4,
        learning_rate=1e-3,
        device="cpu",
        save_dtype="fp32",
    )
    values.update(changes)
    return TrainConfig(**values)


def run(cfg: TrainConfig, progress=None):
    from lorax.services.train import train

    return train(cfg, progress or NullProgress())


def header(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def test_train_writes_kohya_lora_with_metadata_curve_and_config(tiny_model, images, tmp_path):
    from lorax.formats import detect_format, load_lora

    out = tmp_path / "star.safetensors"
    result = run(config(tiny_model, images, out, rank=2, alpha=1.0))
    assert result.output == out and out.exists()
    assert detect_format(out) == "kohya"
    tensors = load_file(out)
    assert tensors and all(k.startswith("lora_unet_") for k in tensors)
    ups = [v for k, v in tensors.items() if k.endswith("lora_up.weight")]
    assert len(ups) == result.modules["unet"] == 48  # 2 blocks with attention × (attn1, attn2) × q, k, v, out
    assert all(float(u.abs().max()) > 0 for u in ups), "LoRA up weights never moved from zero"
    meta = header(out)
    assert meta["ss_network_dim"] == "2" and meta["ss_network_alpha"] == "1"
    assert meta["ss_steps"] == "4" and meta["ss_seed"] == "0" and meta["ss_num_train_images"] == "4"
    assert meta["ss_resolution"] == "(32, 32)" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_output_name"] == "star" and meta["lorax_family"] == "sd1"
    assert float(meta["ss_training_finished_at"]) >= float(meta["ss_training_started_at"])
    state = load_lora(out)
    assert state.ranks() == [2] and state.alphas() == [1.0]
    rows = result.loss_csv.read_text().splitlines()
    assert rows[0] == "step,loss,smoothed_loss,lr" and len(rows) == 5
    assert [int(r.split(",")[0]) for r in rows[1:]] == [1, 2, 3, 4]
    with Image.open(result.loss_png) as png:
        assert png.size == (800, 450)  # the loss plot (lorax/training/report.py), axes and all
    reloaded = TrainConfig.from_sources({}, result.config_path)
    assert reloaded.rank == 2 and reloaded.alpha == 1.0 and reloaded.steps == 4
    assert Path(reloaded.data_dir) == images and reloaded.instance_prompt == "a sks star"


def test_diffusers_loader_agrees_with_the_files(tiny_model, images, tmp_path, cli):
    """The diffusers-format output loads in diffusers' load_lora_weights, whose fused deltas equal up @ down
    computed by hand from the file's tensors alone (alpha / r folded in, as diffusers' scripts write); the kohya file of the same (seeded) run reads back to
    the same deltas through lorax's reader."""
    from diffusers import StableDiffusionPipeline

    from lorax.formats import load_lora

    common = dict(train_text=True, rank=4, alpha=2.0, steps=3)
    d_out = run(config(tiny_model, images, tmp_path / "d.safetensors", format="diffusers", **common)).output
    k_out = run(config(tiny_model, images, tmp_path / "k.safetensors", **common)).output

    raw = load_file(d_out)
    hand = {}
    for key, down in raw.items():
        if key.endswith(".lora_A.weight"):
            up = raw[key.replace(".lora_A.", ".lora_B.")]
            # alpha / r (2 / 4) is folded into lora_B, so the tensors alone carry the strength (lora_alpha = r)
            hand[key[: -len(".lora_A.weight")]] = up.double() @ down.double()
    assert any(k.startswith("text_encoder.") for k in hand) and any(k.startswith("unet.") for k in hand)

    pipe = StableDiffusionPipeline.from_pretrained(
        str(tiny_model), safety_checker=None, requires_safety_checker=False
    )
    before = {f"unet.{n}": p.detach().clone() for n, p in pipe.unet.named_parameters()}
    before |= {f"text_encoder.{n}": p.detach().clone() for n, p in pipe.text_encoder.named_parameters()}
    pipe.load_lora_weights(str(d_out))
    pipe.fuse_lora(lora_scale=1.0)
    after = {f"unet.{n}": p for n, p in pipe.unet.named_parameters()}
    after |= {f"text_encoder.{n}": p for n, p in pipe.text_encoder.named_parameters()}
    for module, delta in hand.items():
        live = module.replace("text_encoder.text_model.", "text_encoder.")
        fused = (
            after[f"{live}.base_layer.weight"]
            if f"{live}.base_layer.weight" in after
            else after[f"{live}.weight"]
        )
        diff = fused.double() - before[f"{live}.weight"].double()
        torch.testing.assert_close(diff, delta, atol=1e-6, rtol=1e-4)

    kohya = load_lora(k_out)
    assert set(kohya.modules) == set(hand)
    for module, delta in hand.items():
        torch.testing.assert_close(kohya.modules[module].delta().double(), delta, atol=1e-7, rtol=1e-5)

    # lorax merge folds the kohya file into the model folder with the same deltas.
    merged = tmp_path / "merged"
    result = cli("merge", tiny_model, k_out, "-o", merged)
    assert result.exit_code == 0, (result.stderr, result.stdout, result.exception)
    merged_pipe = StableDiffusionPipeline.from_pretrained(
        str(merged), safety_checker=None, requires_safety_checker=False
    )
    merged_params = {f"unet.{n}": p for n, p in merged_pipe.unet.named_parameters()}
    merged_params |= {f"text_encoder.{n}": p for n, p in merged_pipe.text_encoder.named_parameters()}
    for module, delta in hand.items():
        live = module.replace("text_encoder.text_model.", "text_encoder.")
        diff = merged_params[f"{live}.weight"].double() - before[f"{live}.weight"].double()
        torch.testing.assert_close(diff, delta, atol=1e-6, rtol=1e-4)


def test_interrupted_and_resumed_equals_uninterrupted(tiny_model, images, tmp_path, monkeypatch):
    from lorax.training.job import DiffusionBatches

    settings = dict(
        steps=6,
        batch_size=2,
        grad_accum=2,
        lr_scheduler="cosine",
        warmup_steps=1,
        flip=True,
        caption_dropout=0.25,
        lora_dropout=0.1,
        train_text=True,
        noise_offset=0.05,
        snr_gamma=5.0,
    )
    straight = run(config(tiny_model, images, tmp_path / "straight.safetensors", **settings))

    out = tmp_path / "resumed.safetensors"
    original = DiffusionBatches.loss

    def interrupted(self, micro_step, generator, unet=None):
        if micro_step == 9:  # inside step 5, after the checkpoint at step 3
            raise KeyboardInterrupt
        return original(self, micro_step, generator, unet)

    monkeypatch.setattr(DiffusionBatches, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(config(tiny_model, images, out, checkpoint_every=3, **settings))
    assert not out.exists()
    monkeypatch.setattr(DiffusionBatches, "loss", original)
    checkpoints = tmp_path / "resumed.checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000003"]
    with pytest.raises(ConfigError, match=r"--seed 0 \(now 1\)"):
        run(config(tiny_model, images, out, resume=checkpoints, **{**settings, "seed": 1}))
    resumed = run(config(tiny_model, images, out, resume=checkpoints, **settings))
    assert resumed.resumed_from == checkpoints / "step-000003"
    assert resumed.steps == straight.steps == 6
    a, b = load_file(straight.output), load_file(resumed.output)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    assert header(out)["ss_steps"] == header(straight.output)["ss_steps"] == "6"
    assert resumed.loss_csv.read_text() == straight.loss_csv.read_text()


def test_caching_latents_and_text_changes_nothing(tiny_model, images, tmp_path):
    plain = run(config(tiny_model, images, tmp_path / "plain.safetensors", cache_text=False, flip=True))
    cached = run(config(tiny_model, images, tmp_path / "cached.safetensors", cache_latents=True, flip=True))
    a, b = load_file(plain.output), load_file(cached.output)
    for key in a:
        # batched vs single VAE encodes differ in the last bits; Adam carries that into ~1e-5
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_model, images, tmp_path, monkeypatch):
    from lorax.training.objective import DiffusionObjective

    original = DiffusionObjective.loss
    calls = {"n": 0}

    def poisoned(self, unet, step, generator):
        calls["n"] += 1
        loss = original(self, unet, step, generator)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(DiffusionObjective, "loss", poisoned)
    out = tmp_path / "nan.safetensors"
    # step 3's loss comes from step 2's weights: the last state that trained on cleanly is step 1's
    with pytest.raises(TrainingError, match=r"loss became nan at step 3.*from step 1.*step-000001") as err:
        run(config(tiny_model, images, out))
    assert "\n" not in str(err.value)
    assert not out.exists()
    kept = load_file(tmp_path / "nan.checkpoints" / "step-000001" / "weights.safetensors")
    assert kept and all(torch.isfinite(t).all() for t in kept.values())


def test_weights_that_go_non_finite_are_never_kept(tiny_model, images, tmp_path, monkeypatch):
    """issue 13.1: a finite loss, then NaN weights (an inf gradient through clipping): the run stops at that step
    and the state it points to (and every checkpoint) is all finite, not the poisoned one."""
    import itertools

    from lorax.training.objective import DiffusionObjective

    original = DiffusionObjective.loss
    calls = itertools.count(1)

    class InfGradient(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # type: ignore[no-untyped-def]
            return x.clone()

        @staticmethod
        def backward(ctx, grad):  # type: ignore[no-untyped-def]
            return grad * float("inf")

    def poisoned(self, unet, step, generator):
        loss = original(self, unet, step, generator)
        # step 3's loss is finite but its gradient is inf: clipping (0 · inf) and Adam turn the weights NaN
        return InfGradient.apply(loss) if next(calls) == 3 else loss

    monkeypatch.setattr(DiffusionObjective, "loss", poisoned)
    out = tmp_path / "w.safetensors"
    with pytest.raises(TrainingError) as err:
        run(config(tiny_model, images, out, checkpoint_every=1, steps=5))
    assert "\n" not in str(err.value) and not out.exists()
    folders = sorted((tmp_path / "w.checkpoints").iterdir())
    assert folders, "the good steps before the poisoned one are checkpointed"
    for folder in folders:
        kept = load_file(folder / "weights.safetensors")
        assert kept and all(torch.isfinite(t).all() for t in kept.values()), folder.name
    # step 3's gradients come from step 2's weights: the state named is step 1's, the last that trained on cleanly
    assert "from step 1" in str(err.value) and "step-000001" in str(err.value)


def test_prior_preservation_generates_and_caches_class_images(tiny_model, images, tmp_path):
    progress = NullProgress()
    cfg = config(
        tiny_model,
        images,
        tmp_path / "db.safetensors",
        class_prompt="a star",
        num_class_images=2,
        sample_steps=2,
    )
    result = run(cfg, progress)
    assert result.num_class_images == 2
    assert any("generated 2 class images" in m for m in progress.messages)
    assert header(result.output)["ss_num_reg_images"] == "2"
    again = NullProgress()
    run(cfg.replace(output=tmp_path / "db2.safetensors"), again)
    assert not any("generated" in m for m in again.messages)


def test_targets_all_trains_conv_layers_and_validation_samples(tiny_model, images, tmp_path):
    from lorax.formats import load_lora

    result = run(
        config(
            tiny_model,
            images,
            tmp_path / "locon.safetensors",
            targets="all",
            steps=2,
            validation_prompt=["a sks star"],
            validation_every=1,
            sample_steps=2,
        )
    )
    state = load_lora(result.output)
    convs = [k for k, m in state.modules.items() if m.is_conv]
    assert any("resnets.0.conv1" in k for k in convs) and any("downsamplers.0.conv" in k for k in convs)
    assert len(result.samples) == 2 and all(p.exists() for p in result.samples)


def test_dora_with_buckets_epochs_and_templates(tiny_model, images, tmp_path):
    """DoRA writes LyCORIS' dora_scale; 48×40 images in buckets, 2 epochs of batches of 2 (4 images): 4 steps."""
    from lorax.formats import load_lora

    result = run(
        config(
            tiny_model,
            images,
            tmp_path / "dora.safetensors",
            dora=True,
            steps=None,
            epochs=2,
            batch_size=2,
            buckets=True,
            template="object",
            caption_shuffle=True,
        )
    )
    assert result.steps == 4 and result.epochs == 2
    tensors = load_file(result.output)
    scales = {k: v for k, v in tensors.items() if k.endswith(".dora_scale")}
    assert len(scales) == result.modules["unet"]
    state = load_lora(result.output)
    assert {type(m).__name__ for m in state.modules.values()} == {"DoraModule"}
    assert header(result.output)["ss_enable_bucket"] == "True"


def test_config_problems_are_collected_naming_flags(tmp_path):
    cfg = TrainConfig(
        data_dir=tmp_path,
        output=tmp_path / "x.safetensors",
        resolution=30,
        text_learning_rate=1e-5,
        steps=10,
        epochs=2,
        cache_latents=True,
        random_crop=True,
        optimizer="sgd",
    )
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    message = str(err.value)
    for flag in (
        "--resolution",
        "--text-learning-rate",
        "--steps and --epochs",
        "--cache-latents",
        "--optimizer",
    ):
        assert flag in message


def test_toml_keys_match_flags_and_unknown_keys_are_refused(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text('rank = 8\nlearning-rate = 5e-4\nvalidation_prompts = ["a"]\ndata-dir = "imgs"\n')
    cfg = TrainConfig.from_sources({"rank": 2}, path, validate=False)
    assert cfg.rank == 2 and cfg.learning_rate == 5e-4 and cfg.validation_prompt == ["a"]
    assert cfg.data_dir == tmp_path / "imgs"
    path.write_text("rnak = 8\n")
    with pytest.raises(ConfigError, match="rnak"):
        TrainConfig.from_sources({}, path)


def test_rank4_lora_is_under_two_percent_of_sd15():
    """Full-size SD1.5 UNet (meta device, no memory): rank-4 attn LoRA bytes ÷ UNet + text-encoder bytes."""
    from lorax.models.families import meta_model
    from lorax.training.targets import find_targets

    unet = meta_model("sd1", "unet")
    text = meta_model("sd1", "text_encoder")
    modules = dict(unet.named_modules())
    lora = sum(
        4 * (modules[n].in_features + modules[n].out_features) for n in find_targets(unet, "attn", "unet")
    )
    base = sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in text.parameters())
    assert lora / base < 0.02
    all_modules = find_targets(unet, "all", "unet")
    assert (
        len(all_modules)
        > len(find_targets(unet, "attn-ff", "unet"))
        > len(find_targets(unet, "attn", "unet"))
    )
