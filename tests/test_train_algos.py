"""`lorax train --algo` (issue 19 item 3): LoHa / LoKr through PEFT, written in LyCORIS' kohya keys, merge back with
the live PEFT model's deltas; LoCon's convs at --conv-rank; --algo dora is --dora. CLI-level, on the tiny SD1 model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
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
    return cli(
        "train", image_dir, "--model", model_dir, "--instance-prompt", "a sks star", "--resolution", "32",
        "--lr", "1e-2", "--steps", "3", "--device", "cpu", "--save-dtype", "fp32", "-o", out,
        *[str(a) for a in args],
    )  # fmt: skip


def capture_live_deltas(monkeypatch) -> dict[str, torch.Tensor]:
    """PEFT's own ``get_delta_weight`` of every live LoHa/LoKr layer, taken when the output is written."""
    from lorax.training import algos

    seen: dict[str, torch.Tensor] = {}
    real = algos.lycoris_state

    def spy(models, family=None):
        for component, model in models.items():
            seen.update({f"{component}.{k}": v for k, v in algos.live_deltas(model).items()})
        return real(models, family)

    monkeypatch.setattr(algos, "lycoris_state", spy)
    return seen


# LyCORIS' key suffixes (lycoris/modules/loha.py, lokr.py: the state-dict names ComfyUI and A1111 read)
LOHA_KEYS = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}
LOKR_KEYS = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_loha_and_lokr_merge_back_with_the_live_peft_deltas(
    cli, tmp_path, model_dir, image_dir, monkeypatch, algo
):
    live = capture_live_deltas(monkeypatch)
    out = tmp_path / f"{algo}.safetensors"
    result = train(cli, model_dir, image_dir, out, "--algo", algo, "--rank", 4, "--alpha", 2)
    assert result.exit_code == 0, result.stderr
    assert live and all(float(d.abs().max()) > 0 for d in live.values())  # three steps moved every layer

    tensors = load_file(out)
    modules: dict[str, set[str]] = {}
    for key in tensors:
        name, suffix = key.split(".", 1)
        modules.setdefault(name, set()).add(suffix)
    assert all(name.startswith("lora_unet_") for name in modules)
    assert all(s <= (LOHA_KEYS if algo == "loha" else LOKR_KEYS) and "alpha" in s for s in modules.values())
    convs = [n for n in modules if "resnets" in n and ("conv1" in n or "conv2" in n)]
    assert convs and any("conv_shortcut" in n for n in modules)  # the resnets' 3×3 and 1×1 convs train
    assert len(modules) == len(live)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": algo, "conv_dim": "4", "conv_alpha": "2"}

    merged = tmp_path / "merged"
    result = cli("merge", model_dir, out, "-o", f"{merged}/")
    assert result.exit_code == 0, result.stderr
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(model_dir / "unet").state_dict()
    after = UNet2DConditionModel.from_pretrained(merged / "unet").state_dict()
    for key, delta in live.items():
        path = key.removeprefix("unet.") + ".weight"
        got = after[path].float() - base[path].float()
        err = float((got - delta).norm() / delta.norm())
        assert err <= 1e-5, (key, err)
    untouched = [
        k for k in base if k.endswith(".weight") and k[: -len(".weight")] not in {x[5:] for x in live}
    ]
    assert untouched and all(torch.equal(base[k], after[k]) for k in untouched)


def test_lokr_with_both_factors_full_folds_peft_scale_into_w1(
    cli, tmp_path, model_dir, image_dir, monkeypatch
):
    # rank 8 ≥ the factors' size on the tiny model: PEFT keeps lokr_w1 and lokr_w2 full and still scales by
    # alpha / r, LyCORIS (and ComfyUI) by 1 — the file must carry the scale inside w1.
    live = capture_live_deltas(monkeypatch)
    out = tmp_path / "lokr.safetensors"
    result = train(cli, model_dir, image_dir, out, "--algo", "lokr", "--rank", 8, "--alpha", 1)
    assert result.exit_code == 0, result.stderr
    tensors = load_file(out)
    full = [
        k[: -len(".lokr_w1")] for k in tensors if k.endswith(".lokr_w1") and f"{k[:-8]}.lokr_w2" in tensors
    ]
    assert full
    for name in full[:5]:
        w1, w2 = tensors[f"{name}.lokr_w1"], tensors[f"{name}.lokr_w2"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        ours = torch.kron(w1, w2)  # LyCORIS' rule for two full factors: scale 1
        match = [
            d
            for d in live.values()
            if d.numel() == ours.numel() and torch.allclose(d.reshape(ours.shape), ours, rtol=1e-5, atol=1e-8)
        ]
        assert match, name


def test_locon_trains_the_convs_at_conv_rank(cli, tmp_path, model_dir, image_dir):
    out = tmp_path / "locon.safetensors"
    result = train(
        cli, model_dir, image_dir, out, "--algo", "locon", "--rank", 4, "--conv-rank", 2, "--conv-alpha", 1
    )
    assert result.exit_code == 0, result.stderr
    tensors = load_file(out)
    conv = [k for k in tensors if "resnets" in k and k.endswith("conv1.lora_down.weight")]
    attn = [k for k in tensors if k.endswith("attn1_to_q.lora_down.weight")]
    assert conv and attn
    assert all(tensors[k].shape[0] == 2 and tensors[k].dim() == 4 for k in conv)
    assert all(float(tensors[k.replace("lora_down.weight", "alpha")]) == 1.0 for k in conv)
    assert all(tensors[k].shape[0] == 4 for k in attn)
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert json.loads(meta["ss_network_args"])["conv_dim"] == 2


def test_algo_dora_is_dora(cli, tmp_path, model_dir, image_dir):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert train(cli, model_dir, image_dir, a, "--algo", "dora").exit_code == 0
    assert train(cli, model_dir, image_dir, b, "--dora").exit_code == 0
    ta, tb = load_file(a), load_file(b)
    assert any(k.endswith(".dora_scale") for k in ta) and ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--algo", "ia3"), "--algo must be one of"),
        (("--algo", "loha", "--format", "diffusers"), "--algo loha files are LyCORIS'"),
        (("--algo", "lokr", "--loraplus-ratio", "16"), "--loraplus-ratio works on LoRA pairs"),
        (("--conv-rank", "4"), "need --algo locon, loha or lokr"),
        (("--algo", "loha", "--dora"), "--dora is --algo dora"),
    ],
)
def test_algo_flags_that_do_not_fit(cli, tmp_path, model_dir, image_dir, args, expected):
    result = train(cli, model_dir, image_dir, tmp_path / "x.safetensors", *args)
    assert result.exit_code != 0
    assert expected in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("algo", ["loha", "lokr"])
def test_the_written_modules_load_in_lycoris_own_modules(
    cli, tmp_path, model_dir, image_dir, monkeypatch, algo
):
    # The independent oracle: LyCORIS' LohaModule / LokrModule built from the file's tensors (its
    # make_module_from_state_dict, as its kohya loader does) give PEFT's live deltas. Skipped without lycoris-lora.
    lycoris = pytest.importorskip(f"lycoris.modules.{algo}")
    live = capture_live_deltas(monkeypatch)
    out = tmp_path / f"{algo}.safetensors"
    rank = 4 if algo == "loha" else 8  # rank 8: LoKr's layers of both kinds (full w2 and factored)
    result = train(cli, model_dir, image_dir, out, "--algo", algo, "--rank", rank, "--alpha", 2)
    assert result.exit_code == 0, result.stderr
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    tensors = load_file(out)
    names = (
        ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
        if algo == "loha"
        else ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", None, "lokr_t2")
    )
    kind = lycoris.LohaModule if algo == "loha" else lycoris.LokrModule
    for key, delta in live.items():
        path = key.removeprefix("unet.")
        lora_name = "lora_unet_" + path.replace(".", "_")
        org = unet.get_submodule(path)
        parts = [tensors.get(f"{lora_name}.{n}") if n else None for n in names]
        with torch.no_grad():
            module = kind.make_module_from_state_dict(
                lora_name, org, *parts, tensors[f"{lora_name}.alpha"], None
            )
            theirs = module.get_weight(org.weight.shape).reshape(delta.shape).float()
        err = float((theirs - delta).norm() / delta.norm())
        assert err <= 1e-5, (key, err)


def test_lokr_resumes_exactly_and_text_encoder_gets_the_same_algorithm(
    cli, tmp_path, model_dir, image_dir, monkeypatch
):
    """Interrupted at step 2 and resumed, a LoKr run (with --train-text) writes what the uninterrupted one writes."""
    from lorax.training.loop import TrainingLoop

    args = ("--algo", "lokr", "--train-text")
    straight = tmp_path / "straight.safetensors"
    result = train(cli, model_dir, image_dir, straight, *args)
    assert result.exit_code == 0, result.stderr
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
    assert train(cli, model_dir, image_dir, out, *args).exit_code == 130
    monkeypatch.setattr(TrainingLoop, "_run", original)
    result = cli("train", "--resume", tmp_path / "resumed.checkpoints")
    assert result.exit_code == 0, result.stderr
    a, b = load_file(straight), load_file(out)
    assert any(k.startswith("lora_te_") and ".lokr_w" in k for k in a)
    assert not any(".lora_down" in k for k in a)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
