"""``lorax train`` on Flux.1 (issue 17): the flow-matching objective through the same loop and recipes as SD.

Oracles: diffusers' own ``FluxPipeline`` (``load_lora_weights`` of the written file in both layouts, its
``encode_prompt``, ``_pack_latents`` and ``_prepare_latent_image_ids``) and a hand computation of one step from the
published definitions (kohya's and diffusers' Flux trainers: ``x_t = (1 − σ)·x0 + σ·ε``, target ``ε − x0``, the
resolution shift ``e^μ / (e^μ + 1/t − 1)``, timestep ``σ``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import test_flux_generate
import torch
from PIL import Image
from safetensors.torch import load_file
from test_flux_generate import PROMPT, SIZE, diffusers_image, only_png, pixels

from lorax.errors import ConfigError
from lorax.progress import NullProgress
from lorax.training.config import TrainConfig
from lorax.training.objective import LossInputs

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the tiny dev and schnell folders of test_flux_generate (module-scoped fixtures)
dev_dir = test_flux_generate.dev_dir
schnell_dir = test_flux_generate.schnell_dir


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two 32 px images: a coloured square on white, shifted by a pixel."""
    folder = tmp_path_factory.mktemp("circles")
    rng = np.random.default_rng(3)
    for i in range(2):
        arr = np.full((SIZE, SIZE, 3), 255, dtype=np.uint8)
        arr[6:26, 6 + i : 26 + i] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(folder / f"circle-{i}.png")
    return folder


def config(model: Path, images: Path, out: Path, **changes) -> TrainConfig:
    values = dict(
        data_dir=images, output=out, model=str(model), instance_prompt=PROMPT, resolution=SIZE, steps=4,
        learning_rate=1e-3, device="cpu", save_dtype="fp32",
    )  # fmt: skip
    values.update(changes)
    return TrainConfig(**values)


def run(cfg: TrainConfig):
    from lorax.services.train import train

    return train(cfg, NullProgress())


def image_latents(pipe, images: Path) -> torch.Tensor:
    """The training images' latents as FluxPipeline's VAE gives them: ``(mean − shift) · scale``."""
    arrays = [
        np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in sorted(images.glob("*.png"))
    ]
    pixels_ = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
    with torch.no_grad():
        mean = pipe.vae.encode(pixels_).latent_dist.mean
    return (mean - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor


def fixed_batch_loss(pipe, objective, latents: torch.Tensor) -> float:
    """The flow loss of ``pipe``'s transformer on a fixed batch: the same 8 draws of noise and σ each time."""
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=512)
        from lorax.training.flow import FluxCond

        cond = FluxCond(embeds.expand(len(latents), -1, -1), pooled.expand(len(latents), -1))
        losses = [
            objective.loss(
                pipe.transformer, LossInputs(latents, cond), torch.Generator().manual_seed(s)
            ).mean()
            for s in range(8)
        ]
    return float(torch.stack(losses).mean())


def test_training_moves_the_lora_and_lowers_the_loss_on_a_fixed_batch(dev_dir, images, tmp_path):
    from diffusers import FluxPipeline

    from lorax.formats import detect_format
    from lorax.training.flux_train import flux_objective

    out = tmp_path / "circle.safetensors"
    cfg = config(dev_dir, images, out, steps=20, learning_rate=1e-2, targets="all", format="diffusers",
                 timestep_sampling="uniform", cache_latents=True)  # fmt: skip
    result = run(cfg)
    assert detect_format(out) == "diffusers"
    tensors = load_file(out)
    assert all(k.startswith("transformer.") for k in tensors)
    ups = [v for k, v in tensors.items() if ".lora_B." in k]
    assert (
        len(ups) == result.modules["unet"] == 40
    )  # 2 double × 14 Linear + 2 single × 6 (all: modulation too)
    assert all(float(u.abs().max()) > 0 for u in ups)

    pipe = FluxPipeline.from_pretrained(dev_dir)
    objective = flux_objective(pipe, cfg)
    latents = image_latents(pipe, images)
    before = fixed_batch_loss(pipe, objective, latents)
    pipe.load_lora_weights(str(out))  # diffusers' own loader
    after = fixed_batch_loss(pipe, objective, latents)
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_saved_lora_loads_in_diffusers_and_gives_lorax_generates_image(cli, dev_dir, images, tmp_path, fmt):
    from lorax.formats import detect_format

    out = tmp_path / f"circle-{fmt}.safetensors"
    # kohya files fuse the single blocks' to_q/k/v/proj_mlp into linear1, which diffusers' kohya converter splits
    # at full-size widths only: the kohya file trains the double blocks (--train-blocks double)
    blocks = "double" if fmt == "kohya" else None
    run(config(dev_dir, images, out, steps=6, learning_rate=2e-2, format=fmt, train_blocks=blocks, rank=2))
    assert detect_format(out) == fmt
    keys = load_file(out).keys()
    if fmt == "kohya":
        assert keys and all(k.startswith("lora_unet_double_blocks_") for k in keys)
    folder = tmp_path / "png"
    result = cli("generate", PROMPT, "--model", str(dev_dir), "--lora", str(out), "--seed", "5", "--steps", "3",
                 "--size", f"{SIZE}x{SIZE}", "-o", str(folder), "--device", "cpu")  # fmt: skip
    assert result.exit_code == 0, result.output
    ours = pixels(only_png(folder))
    oracle = diffusers_image(dev_dir, steps=3, guidance=3.5, length=512, seed=5, lora=out)
    plain = diffusers_image(dev_dir, steps=3, guidance=3.5, length=512, seed=5)
    assert np.abs(ours - oracle).max() <= 1
    assert np.abs(ours - plain).max() > 2  # the trained LoRA changes the picture


def test_one_step_objective_is_the_hand_computation(dev_dir, images):
    """The Flux hook's batches and objective (what the loop calls) against FluxPipeline's own packing, ids and
    prompt encoding and the published formulas, for one micro-batch and generator."""
    from diffusers import FluxPipeline

    from lorax.training import recipe, setup
    from lorax.training.family_hooks import hooks_for

    cfg = config(dev_dir, images, None, timestep_sampling="flux-shift", sigmoid_scale=1.3,
                 weighting_scheme="cosmap", guidance=2.0, batch_size=2)  # fmt: skip
    pipe = FluxPipeline.from_pretrained(dev_dir)
    pipe.transformer.requires_grad_(False)
    accelerator = recipe.make_accelerator(cfg)
    items = __import__("lorax.data.images", fromlist=["x"]).load_image_folder(images, instance_prompt=PROMPT)
    data = recipe.train_data(cfg, items, [], SIZE, accelerator)
    encoders = setup.text_encoders(pipe, "flux")
    batches = setup.diffusion_batches(
        pipe, data, cfg, family="flux", unet=pipe.transformer, vae=pipe.vae, encoders=encoders, device="cpu",
        latent_cache=None, cache_text=True,
    )  # fmt: skip
    objective = batches.objective  # the objective the loop's loss calls
    assert type(objective).__name__ == "FluxObjective" and hooks_for("flux").name == "flux"
    with torch.no_grad():
        loss = batches.loss(0, torch.Generator().manual_seed(11))

        # by hand
        _, indices = batches.position(0)
        x0, captions, n = batches.latents(0, indices)
        assert n == 2
        g = torch.Generator().manual_seed(11)
        noise = torch.randn(x0.shape, generator=g)  # the noise first, then σ (both trainers' order)
        b, c, h, w = x0.shape
        seq = (h // 2) * (w // 2)
        t = torch.sigmoid(1.3 * torch.randn((b,), generator=g))
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (seq - 256)  # FluxPipeline's calculate_shift
        sigma = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
        s = sigma.view(-1, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        embeds, pooled, text_ids = pipe.encode_prompt(captions, prompt_2=None, max_sequence_length=512)
        pred = pipe.transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w),
            timestep=sigma,  # σ·1000 / 1000: the transformer scales it by 1000 itself
            guidance=torch.full((b,), 2.0),
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
            return_dict=False,
        )[0]
        target = FluxPipeline._pack_latents(noise - x0, b, c, h, w)
        weight = 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
        hand = (weight.view(-1, 1, 1) * (pred - target) ** 2).mean(dim=(1, 2)).mean()
    torch.testing.assert_close(loss, hand, atol=1e-6, rtol=1e-5)


def test_interrupted_and_resumed_is_bitwise_the_uninterrupted_run(dev_dir, images, tmp_path, monkeypatch):
    from lorax.training.job import DiffusionBatches

    settings = dict(steps=6, grad_accum=2, lr_scheduler="cosine", warmup_steps=1, flip=True, lora_dropout=0.1,
                    train_text=True, timestep_sampling="logit-normal", logit_mean=0.2, weighting_scheme="sigma_sqrt")  # fmt: skip
    straight = run(config(dev_dir, images, tmp_path / "straight.safetensors", **settings))
    out = tmp_path / "resumed.safetensors"
    original = DiffusionBatches.loss

    def interrupted(self, micro_step, generator, unet=None):
        if micro_step == 9:  # inside step 5, after the checkpoint at step 3
            raise KeyboardInterrupt
        return original(self, micro_step, generator, unet)

    monkeypatch.setattr(DiffusionBatches, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(config(dev_dir, images, out, checkpoint_every=3, **settings))
    monkeypatch.setattr(DiffusionBatches, "loss", original)
    checkpoints = tmp_path / "resumed.checkpoints"
    with pytest.raises(ConfigError, match=r"--timestep-sampling 'logit-normal' \(now 'uniform'\)"):
        run(config(dev_dir, images, out, resume=checkpoints, **{**settings, "timestep_sampling": "uniform",
                                                                "logit_mean": None}))  # fmt: skip
    resumed = run(config(dev_dir, images, out, resume=checkpoints, **settings))
    assert resumed.resumed_from == checkpoints / "step-000003" and resumed.steps == 6
    a, b = load_file(straight.output), load_file(resumed.output)
    assert a.keys() == b.keys() and any(k.startswith("lora_te1_") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.loss_csv.read_text() == straight.loss_csv.read_text()


def test_presets_and_train_blocks_select_exactly_the_expected_modules(dev_dir):
    from diffusers import FluxTransformer2DModel
    from transformers import T5EncoderModel

    from lorax.training.targets import find_targets

    model = FluxTransformer2DModel.from_pretrained(dev_dir / "transformer")
    attn_d = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    ff_d = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
    double = {
        "attn": [f"attn.{m}" for m in attn_d],
        "attn-ff": [f"attn.{m}" for m in attn_d] + ff_d,
        "all": [f"attn.{m}" for m in attn_d] + ff_d + ["norm1.linear", "norm1_context.linear"],
    }
    single = {
        "attn": ["attn.to_q", "attn.to_k", "attn.to_v"],
        "attn-ff": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"],
        "all": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"],
    }
    for preset in ("attn", "attn-ff", "all"):
        d = {f"transformer_blocks.{i}.{m}" for i in range(2) for m in double[preset]}
        s = {f"single_transformer_blocks.{i}.{m}" for i in range(2) for m in single[preset]}
        assert set(find_targets(model, preset, "unet")) == d | s
        assert set(find_targets(model, preset, "unet", "all")) == d | s
        assert set(find_targets(model, preset, "unet", "double")) == d
        assert set(find_targets(model, preset, "unet", "single")) == s
    # globs reach the top-level layers too
    assert set(find_targets(model, "x_embedder,context_embedder", "unet")) == {
        "x_embedder",
        "context_embedder",
    }
    t5 = T5EncoderModel.from_pretrained(dev_dir / "text_encoder_2")
    found = find_targets(t5, "attn", "text_encoder_2")
    assert len(found) == 2 * 4 and all(
        f.endswith(("q", "k", "v", "o")) and "SelfAttention" in f for f in found
    )


def test_t5_trains_with_train_t5_and_schnell_trains_without_guidance(schnell_dir, images, tmp_path):
    out = tmp_path / "t5.safetensors"
    result = run(config(schnell_dir, images, out, train_text=True, train_t5=True, steps=2))
    prefixes = {k.split("_", 2)[1] for k in load_file(out)}
    assert prefixes == {"unet", "te1", "te3"}  # transformer, CLIP-L, T5 (kohya's Flux prefixes)
    assert result.modules["text_encoder_2"] == 2 * 4
    clip_only = run(config(schnell_dir, images, tmp_path / "clip.safetensors", train_text=True, steps=2))
    assert "text_encoder_2" not in clip_only.modules


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"snr_gamma": 5.0}, "--snr-gamma: min-SNR-γ weights a DDPM schedule"),
        ({"prediction_type": "epsilon"}, "--prediction-type: Flux predicts the flow velocity"),
        ({"clip_skip": 2}, "--clip-skip: Flux conditions on T5"),
        ({"algo": "loha"}, "--algo loha: the Flux LoRA formats hold plain LoRA pairs"),
    ],
)
def test_sd_only_flags_on_flux_are_one_line_errors(dev_dir, images, tmp_path, changes, message):
    with pytest.raises(ConfigError) as err:
        run(config(dev_dir, images, tmp_path / "x.safetensors", **changes))
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"discrete_flow_shift": 3.0},
            "--discrete-flow-shift applies to --timestep-sampling shift (not flux-shift)",
        ),
        (
            {"timestep_sampling": "sigmoid", "logit_std": 1.0},
            "--logit-std applies to --timestep-sampling logit-normal",
        ),
        ({"timestep_sampling": "cosine"}, "--timestep-sampling 'cosine': use one of uniform, sigmoid"),
        ({"train_blocks": "middle"}, "--train-blocks 'middle': use one of all, double, single"),
        ({"train_t5": True}, "--train-t5 trains T5 alongside CLIP-L: add --train-text"),
        (
            {"train_t5": True, "train_text": True, "format": "diffusers"},
            "diffusers' Flux loader reads no T5 LoRA",
        ),
    ],
)
def test_bad_flow_flag_combinations_are_one_line_errors(dev_dir, images, tmp_path, changes, message):
    with pytest.raises(ConfigError) as err:
        config(dev_dir, images, tmp_path / "x.safetensors", **changes).validate()
    assert message in str(err.value) and "\n" not in str(err.value)


def test_guidance_on_schnell_and_flux_flags_on_sd_are_refused(schnell_dir, star_model, images, tmp_path):
    with pytest.raises(ConfigError, match=r"--guidance 2: .* has no guidance embedding \(a schnell model\)"):
        run(config(schnell_dir, images, tmp_path / "x.safetensors", guidance=2.0))
    with pytest.raises(ConfigError, match="--timestep-sampling is a Flux option"):
        run(config(star_model, images, tmp_path / "y.safetensors", timestep_sampling="uniform"))


def test_cli_trains_flux_with_the_flow_flags_and_refuses_a_bad_combination(cli, dev_dir, images, tmp_path):
    out = tmp_path / "cli.safetensors"
    common = [
        "train", str(images), "--model", str(dev_dir), "--instance-prompt", PROMPT, "--resolution", str(SIZE),
        "--steps", "2", "--device", "cpu",
    ]  # fmt: skip
    result = cli(*common, "-o", str(out), "--timestep-sampling", "shift", "--discrete-flow-shift", "3.1582",
                 "--weighting-scheme", "cosmap", "--guidance", "1.5", "--max-sequence-length", "64",
                 "--train-blocks", "single", "--targets", "all")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)
    keys = load_file(out).keys()
    assert keys and all(k.startswith("lora_unet_single_blocks_") for k in keys)
    assert (tmp_path / "cli.toml").read_text().count("discrete-flow-shift = 3.1582") == 1
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    # kohya's flux_train_network.py keys
    assert meta["ss_network_module"] == "networks.lora_flux" and meta["ss_base_model_version"] == "flux1"
    assert json.loads(meta["ss_network_args"]) == {"train_blocks": "single"}  # no conv_dim: Flux has no convs
    assert (meta["ss_timestep_sampling"], meta["ss_discrete_flow_shift"]) == ("shift", "3.1582")
    assert (meta["ss_weighting_scheme"], meta["ss_guidance_scale"], meta["ss_model_prediction_type"]) == (
        "cosmap", "1.5", "raw",
    )  # fmt: skip
    bad = cli(*common, "-o", str(tmp_path / "bad.safetensors"), "--timestep-sampling", "uniform",
              "--discrete-flow-shift", "3")  # fmt: skip
    assert bad.exit_code != 0
    message = bad.stderr.strip()
    assert (
        message.count("\n") == 0 and "--discrete-flow-shift applies to --timestep-sampling shift" in message
    )
    assert "Traceback" not in bad.output and not (tmp_path / "bad.safetensors").exists()


def test_block_dims_give_each_flux_block_its_rank(dev_dir, images, tmp_path):
    """--block-dims on Flux: one rank per block, the 2 double blocks then the 2 single blocks; 0 leaves one out."""
    out = tmp_path / "blocks.safetensors"
    run(config(dev_dir, images, out, steps=1, format="diffusers", block_dims="2,0,3,0", block_lr="1,1,0.5,1"))
    ranks = {k.split(".lora_A")[0]: v.shape[0] for k, v in load_file(out).items() if ".lora_A." in k}
    assert {k.split(".attn")[0] for k in ranks} == {
        "transformer.transformer_blocks.0",
        "transformer.single_transformer_blocks.0",
    }
    assert {r for k, r in ranks.items() if ".transformer_blocks.0" in k and "single" not in k} == {2}
    assert {r for k, r in ranks.items() if "single_transformer_blocks.0" in k} == {3}
    with pytest.raises(
        ConfigError, match=r"--block-dims takes 4 values for flux .*double blocks 0-1, then single"
    ):
        run(config(dev_dir, images, tmp_path / "x.safetensors", block_dims="2,2"))


@pytest.mark.parametrize("command", ["invert", "pivot"])
def test_invert_and_pivot_refuse_flux_in_one_line(dev_dir, images, tmp_path, command):
    from lorax.training.pivot_config import InvertConfig, PivotConfig

    cls = InvertConfig if command == "invert" else PivotConfig
    extra = {"ti_steps": 1, "init_token": "circle"} if command == "pivot" else {}
    cfg = cls(data_dir=images, output=tmp_path / "t.safetensors", model=str(dev_dir), token_at_data="circle|<s1>",
              resolution=SIZE, steps=1, device="cpu", **extra)  # fmt: skip
    service = __import__(f"lorax.services.{command}", fromlist=[command])
    with pytest.raises(ConfigError) as err:
        getattr(service, command)(cfg, NullProgress())
    assert f"lorax {command} does not train Flux models yet" in str(err.value) and "\n" not in str(err.value)


def test_validation_images_come_from_flux_pipeline_over_the_live_lora(dev_dir, images, tmp_path):
    out = tmp_path / "val.safetensors"
    result = run(config(dev_dir, images, out, steps=2, validation_prompt=[PROMPT], validation_every=2, format="diffusers",
                        sample_steps=2, guidance_scale=3.5))  # fmt: skip
    (png,) = result.samples
    assert Image.open(png).size == (SIZE, SIZE)
    from lorax.data.dataset import derive_seed

    # the sample is FluxPipeline's image with the LoRA at that step (the last one here), the prompt's own seed
    seed = derive_seed(0, "validation", 0)
    oracle = diffusers_image(dev_dir, steps=2, guidance=3.5, length=512, seed=seed, lora=out)
    assert np.abs(pixels(png) - oracle).max() <= 1


def test_dreambooth_options_run_on_flux(dev_dir, images, tmp_path):
    """Prior preservation (class images drawn by FluxPipeline), gradient checkpointing, bf16, a held-out loss."""
    out = tmp_path / "db.safetensors"
    result = run(config(dev_dir, images, out, steps=2, class_prompt="a square", num_class_images=2, sample_steps=2,
                        class_dir=tmp_path / "class", gradient_checkpointing=True, mixed_precision="bf16",
                        val_split=0.5, validation_every=1, train_text=True))  # fmt: skip
    assert result.num_class_images == 2 and len(list((tmp_path / "class").glob("*.png"))) == 2
    assert len(result.val_losses) == 2 and all(math.isfinite(v) for _, v in result.val_losses)
    assert load_file(out)


def test_the_models_own_defaults_apply(dev_dir, images, tmp_path):
    """A Flux folder's lorax.json train section sets the flow options; the resolution defaults to the VAE's size."""
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(dev_dir, model)
    defaults = {"timestep_sampling": "shift", "discrete_flow_shift": 2.5, "guidance": 1.5, "steps": 2}
    (model / "lorax.json").write_text(json.dumps({"train": defaults}))
    cfg = TrainConfig.from_sources(
        {"data_dir": images, "output": tmp_path / "d.safetensors", "model": str(model), "instance_prompt": PROMPT,
         "device": "cpu"}
    )  # fmt: skip
    assert (cfg.timestep_sampling, cfg.discrete_flow_shift, cfg.guidance, cfg.steps) == ("shift", 2.5, 1.5, 2)
    result = run(cfg)
    assert result.steps == 2
    toml = (tmp_path / "d.toml").read_text()
    assert 'timestep-sampling = "shift"' in toml and "discrete-flow-shift = 2.5" in toml
    from safetensors import safe_open

    with safe_open(str(result.output), "pt") as f:
        assert f.metadata()["ss_resolution"] == f"({SIZE}, {SIZE})"  # the tiny VAE's sample_size


def test_class_and_validation_images_sample_with_flux_defaults(dev_dir, schnell_dir):
    from diffusers import FluxPipeline

    dev, schnell = FluxPipeline.from_pretrained(dev_dir), FluxPipeline.from_pretrained(schnell_dir)
    assert TrainConfig(model=str(dev_dir)).sampling_for(dev) == (28, 3.5)  # lorax generate's dev defaults
    assert TrainConfig(model=str(schnell_dir)).sampling_for(schnell)[0] == 4
    assert TrainConfig(model=str(dev_dir), sample_steps=3, guidance_scale=2.0).sampling_for(dev) == (3, 2.0)
