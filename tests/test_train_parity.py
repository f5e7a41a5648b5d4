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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from lorax.zoo.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("parity-model") / "model"
    tiny_pipeline("sd1", words=["sks", "star"]).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("parity-images")
    rng = np.random.default_rng(3)
    for i in range(2):
        arr = np.full((32, 32, 3), 255, dtype=np.uint8)
        arr[6:26, 6 + i : 26 + i] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(folder / f"star-{i}.png")
    return folder


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
