"""The benchmarks' reference loop (``bench.train.run_reference``, diffusers' LoRA recipe written out), which both
``bench.train`` and ``bench.train_speed`` time lorax against: it really trains the PEFT adapter it adds, on any
SD1-layout pipeline it is given."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_reference_loop_trains_its_adapter_on_the_given_pipeline(tmp_path):
    from bench.train import TARGETS, run_reference, steady_seconds_per_step, write_images
    from lorax.zoo.tiny import tiny_pipeline

    pipe = tiny_pipeline("sd1")
    frozen = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    case = {
        "rank": 2, "resolution": 32, "batch_size": 2, "steps": 3, "prompt": "a sks star",
        "images": str(write_images(tmp_path / "images", 3, 32)),
    }  # fmt: skip
    times = run_reference(pipe, case)
    assert len(times) == 3 and all(b > a >= 0 for a, b in zip([0.0, *times], times, strict=False))
    assert steady_seconds_per_step(times) == pytest.approx((times[-1] - times[0]) / 2)
    state = pipe.unet.state_dict()
    lora_b = [k for k in state if "lora_B" in k]
    assert lora_b and all(any(t in k for t in TARGETS) for k in lora_b)
    assert all(state[k].abs().max() > 0 for k in lora_b)  # PEFT starts B at zero: the optimizer moved it
    base = {k.replace(".base_layer", ""): v for k, v in state.items() if "lora_" not in k}
    assert base.keys() == frozen.keys() and all(torch.equal(base[k], frozen[k]) for k in frozen)
