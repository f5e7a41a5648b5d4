"""Several processes: the frozen base sharded across them (FSDP, ``lorax.training.distributed``) while the LoRA trains
replicated, on the CPU over gloo through ``torchrun``, as under ``accelerate launch`` on GPUs.

Oracles: the same LoRA trained in one process on the whole global batch (plain PyTorch, ``tests/fsdp_oracle.py``),
and the established DDP path of the same ``lorax train`` command (same seeds, same shares of the data)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import test_flux_generate
import test_flux_train
import torch
from safetensors.torch import load_file

from lorax.errors import ConfigError
from lorax.training import distributed
from tests import test_train_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parent.parent
model_dir, image_dir = test_train_cli.model_dir, test_train_cli.image_dir  # the tiny SD folder, two images
flux_dir, flux_images = (
    test_flux_generate.dev_dir,
    test_flux_train.images,
)  # a tiny Flux.1-dev folder, two images


def _torchrun(port: int, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
    ]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=full, timeout=300, cwd=ROOT)


# --- choosing it: accelerate's FSDP settings ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "reshard"),
    [
        ({}, None),
        ({"ACCELERATE_USE_FSDP": "false"}, None),
        ({"ACCELERATE_USE_FSDP": "true"}, True),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_RESHARD_AFTER_FORWARD": "false"}, False),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, False),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "1"}, True),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_RESHARD_AFTER_FORWARD": "FULL_SHARD"}, True),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "NO_SHARD"}, None),
    ],
)
def test_requested_reads_accelerates_fsdp_settings(env, reshard):
    plan = distributed.requested(env)
    assert (plan.reshard_after_forward if plan is not None else None) == reshard


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"FSDP_SHARDING_STRATEGY": "HYBRID_SHARD"}, "HYBRID_SHARD"),
        ({"FSDP_OFFLOAD_PARAMS": "true"}, "FSDP_OFFLOAD_PARAMS"),
        ({"FSDP_SHARDING_STRATEGY": "WHOLE"}, "'WHOLE'"),
        ({"FSDP_RESHARD_AFTER_FORWARD": "maybe"}, "'MAYBE'"),
    ],
)
def test_what_cannot_be_honoured_is_refused_in_one_line(env, expected):
    with pytest.raises(ConfigError) as err:
        distributed.requested({"ACCELERATE_USE_FSDP": "true", **env})
    assert expected in str(err.value) and "\n" not in str(err.value)


class _Accelerator:
    def __init__(self, processes: int, zero_stage: int | None = None) -> None:
        self.num_processes = processes
        plugin = type("Plugin", (), {"zero_stage": zero_stage})() if zero_stage is not None else None
        self.state = type("State", (), {"deepspeed_plugin": plugin})()


def test_plan_refuses_main_process_only_forwards_and_zero3(monkeypatch):
    from lorax.training.config import TrainConfig

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    logged: list[str] = []
    assert distributed.plan_for(TrainConfig(), _Accelerator(2), logged.append) == distributed.ShardPlan()
    assert distributed.plan_for(TrainConfig(), _Accelerator(1), logged.append) is None
    assert logged == ["FSDP asked for with one process: nothing to shard, the base model stays whole"]
    with pytest.raises(ConfigError, match=r"^--validation-prompt under FSDP: the main process alone"):
        distributed.plan_for(TrainConfig(validation_prompt=["a"]), _Accelerator(2), logged.append)
    with pytest.raises(ConfigError, match=r"^--val-split under FSDP"):
        distributed.plan_for(TrainConfig(val_split=0.25), _Accelerator(2), logged.append)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    with pytest.raises(ConfigError, match="DeepSpeed ZeRO-3 partitions the LoRA weights"):
        distributed.plan_for(TrainConfig(), _Accelerator(2, zero_stage=3), logged.append)
    assert distributed.plan_for(TrainConfig(), _Accelerator(2, zero_stage=2), logged.append) is None


def test_accelerate_never_sees_the_fsdp_switch(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with distributed.accelerate_without_fsdp():
        assert os.environ["ACCELERATE_USE_FSDP"] == "false"
    assert os.environ["ACCELERATE_USE_FSDP"] == "true"


# --- the sharded model against one process --------------------------------------------------------------------
def _oracle(tmp_path: Path, port: int, family: str, per_rank: int, accum: int) -> list[dict]:
    proc = _torchrun(port, "tests/fsdp_oracle.py", str(tmp_path), family, str(per_rank), str(accum))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in range(2)]


def _check_oracle(results: list[dict], steps: int = 3) -> None:
    for r in results:
        assert r["world"] == 2
        assert r["max_abs_moved"] > 1e-3  # training moved the weights…
        assert (
            r["max_abs_diff"] <= 1e-5 * r["max_abs_moved"]
        )  # …the same way as one process on the whole batch
        # each process holds half of every frozen weight (dim-0 shards, padded to equal size)
        assert 0.49 <= r["frozen_local"] / r["frozen_total"] <= 0.51, r
        assert (
            r["reductions"] == steps
        )  # one gradient average per optimizer step, none for no_sync micro-batches
    assert results[0]["checksum"] == results[1]["checksum"]  # every process holds the same LoRA


def test_sharded_sd_unet_lora_equals_one_process_on_the_whole_batch(tmp_path):
    """2 processes × 2 examples (two micro-batches of 1, the first under no_sync) vs 1 process × 4 examples."""
    _check_oracle(_oracle(tmp_path, 29661, "sd1", per_rank=2, accum=2))


def test_sharded_flux_transformer_lora_equals_one_process_on_the_whole_batch(tmp_path):
    """The same on a tiny Flux transformer (its double and single blocks are the FSDP units)."""
    _check_oracle(_oracle(tmp_path, 29666, "flux", per_rank=2, accum=2))


# --- the CLI: same command, FSDP vs DDP, checkpoints ---------------------------------------------------------
SD_SHARDED = "UNet2DConditionModel is sharded across 2 processes (2.1 of 4.2 MiB on the main one)"


def _train(
    port: int,
    image_dir: Path,
    model_dir: Path,
    out: Path,
    *extra: str,
    fsdp: bool,
    sharded_line: str = SD_SHARDED,
) -> dict:
    args = ["-m", "lorax", "train", str(image_dir), "--model", str(model_dir), "--instance-prompt", "x"]
    args += ["--resolution", "32", "--steps", "3", "--device", "cpu", "--save-dtype", "fp32"]
    proc = _torchrun(
        port,
        *args,
        "-o",
        str(out),
        "--json",
        *extra,
        env={"ACCELERATE_USE_FSDP": "true" if fsdp else "false"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout  # only the main process reports
    sharded = [ln for ln in proc.stderr.splitlines() if ln.startswith("FSDP:")]
    assert len(sharded) == (1 if fsdp else 0), proc.stderr[-2000:]
    if fsdp:
        assert sharded_line in sharded[0], sharded[0]
        local, total = map(float, re.search(r"\(([\d.]+) of ([\d.]+) MiB", sharded[0]).groups())
        # about half of the frozen base on each process (the figures are rounded to 0.1 MiB), not all of it
        assert 0 < local <= total / 2 + 0.1, sharded[0]
    return json.loads(lines[0])


def test_cli_fsdp_is_the_same_command(tmp_path, image_dir, model_dir):
    """`torchrun … lorax train` with accelerate's FSDP switch: the main process alone reports and writes, the frozen
    UNet is sharded (half of it on each process), the LoRA trains."""
    body = _train(29667, image_dir, model_dir, tmp_path / "fsdp.safetensors", fsdp=True)
    assert body["processes"] == 2 and body["steps"] == 3
    lora = load_file(tmp_path / "fsdp.safetensors")
    assert max(float(t.abs().max()) for k, t in lora.items() if k.endswith("lora_up.weight")) > 1e-5


def test_cli_fsdp_trains_flux_with_the_same_command(tmp_path, flux_dir, flux_images):
    """Flux through the same `torchrun … lorax train`: the frozen transformer is sharded (its double and single
    blocks are the FSDP units), the main process alone writes a kohya-named Flux LoRA that trained."""
    line = "FluxTransformer2DModel is sharded across 2 processes"
    body = _train(29668, flux_images, flux_dir, tmp_path / "flux.safetensors", fsdp=True, sharded_line=line)
    assert body["processes"] == 2 and body["steps"] == 3
    lora = load_file(tmp_path / "flux.safetensors")
    assert any(k.startswith("lora_unet_double_blocks_0_") for k in lora)
    assert any(k.startswith("lora_unet_single_blocks_0_") for k in lora)
    assert max(float(t.abs().max()) for k, t in lora.items() if k.endswith("lora_up.weight")) > 1e-5


@pytest.mark.slow
def test_cli_fsdp_trains_the_same_lora_as_ddp(tmp_path, image_dir, model_dir):
    ddp = _train(29662, image_dir, model_dir, tmp_path / "ddp.safetensors", fsdp=False)
    fsdp = _train(29663, image_dir, model_dir, tmp_path / "fsdp.safetensors", fsdp=True)
    assert fsdp["processes"] == ddp["processes"] == 2
    a, b = load_file(tmp_path / "ddp.safetensors"), load_file(tmp_path / "fsdp.safetensors")
    assert a.keys() == b.keys()
    ups = [k for k in a if k.endswith("lora_up.weight")]
    scale = max(float(a[k].abs().max()) for k in ups)
    assert scale > 1e-5  # the LoRA trained (B starts at zero)
    # float rounding only (Adam's normalised steps magnify it), far below what the LoRA learned
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-3 * scale


@pytest.mark.slow
def test_cli_fsdp_resume_is_bitwise_exact(tmp_path, image_dir, model_dir):
    """Checkpoints hold the whole LoRA and optimizer state (they are replicated): resuming under FSDP gives the
    same file as the uninterrupted run."""
    whole = tmp_path / "whole.safetensors"
    _train(29664, image_dir, model_dir, whole, "--checkpoint-every", "2", fsdp=True)
    checkpoint = tmp_path / "whole.checkpoints" / "step-000002"
    assert checkpoint.is_dir()
    resumed = tmp_path / "resumed.safetensors"
    body = _train(29665, image_dir, model_dir, resumed, "--resume", str(checkpoint), fsdp=True)
    assert body["resumed_from"] == str(checkpoint)
    a, b = load_file(whole), load_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
