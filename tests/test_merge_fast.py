"""The block-of-rows merge (lorax.adapters.merge_rows) against the whole-tensor rule (apply_contributions, Flux's
_Sliced), and the writer thread of the streaming rewrite (lorax.io.rewrite._Behind)."""

from __future__ import annotations

import pytest
import torch

from lorax.adapters.flux_merge import _Sliced
from lorax.adapters.merge import Contribution, _merged, apply_contributions
from lorax.adapters.merge_rows import merge_rows, plan_rows
from lorax.adapters.state import LoraModule
from lorax.errors import MismatchError
from lorax.io.keymaps import Entry
from lorax.io.model_layout import st_to_torch
from lorax.io.rewrite import _Behind


def _contributions(rows: int, cols: int, gen: torch.Generator) -> list[Contribution]:
    third = [
        Contribution("qkv", LoraModule(torch.randn(4, cols, generator=gen).bfloat16(), torch.randn(rows // 3, 4, generator=gen), 3.0), 0.7, p, 3)
        for p in range(3)
    ]  # fmt: skip
    whole = LoraModule(torch.randn(8, cols, generator=gen), torch.randn(rows, 8, generator=gen) * 0.1)
    return [*third, Contribution("all", whole, -0.4)]


@pytest.mark.parametrize("dt", ["F16", "BF16", "F32"])
@pytest.mark.parametrize("shape", [(300, 77), (1023, 640), (9, 1), (3000, 3072)])
def test_rows_equal_the_whole_tensor_rule_within_one_rounding(dt, shape):
    """Same operations in the same order on each element; only MKL's sgemm may group a block's products otherwise
    than the whole matrix's (an fp32 ulp), which the cast back hides in all but a few elements."""
    gen = torch.Generator().manual_seed(shape[0])
    w = (torch.randn(*shape, generator=gen) * 0.05).to(st_to_torch(dt))
    cs = _contributions(shape[0], shape[1], gen)
    plan = plan_rows(cs, shape)
    assert plan is not None
    fast = merge_rows(w, plan, dt)
    whole = apply_contributions(w, cs, check=False).to(st_to_torch(dt))
    assert fast is not None and fast.dtype == whole.dtype and fast.shape == whole.shape
    eps = torch.finfo(
        fast.dtype
    ).eps  # one rounding of the output dtype, relative to the merged weights' scale
    assert float((fast.double() - whole.double()).abs().max()) <= eps * float(whole.double().abs().max())
    assert (fast != whole).float().mean() < (0.01 if dt != "F32" else 0.5)
    exact = w.double().clone()  # the merge by its definition in fp64: fast is within one rounding of it
    for c in cs:
        m, rows = c.module, shape[0] // c.parts
        exact[c.part * rows : (c.part + 1) * rows] += c.weight * m.scale * (m.up.double() @ m.down.double())
    assert float((fast.double() - exact).abs().max()) <= 2 * eps * float(exact.abs().max())


@pytest.mark.parametrize("fp8", ["F8_E4M3", "F8_E5M2"])
@pytest.mark.parametrize("scale", [None, 0.0123])
@pytest.mark.parametrize("swap", [False, True])
def test_fp8_rows_equal_the_sliced_rule(fp8, scale, swap):
    """Dequantised by table, merged, divided by the scale, saturated and requantised: the _Sliced rule's bytes."""
    gen = torch.Generator().manual_seed(7)
    rows, cols = 96, 40
    w = (torch.randn(rows, cols, generator=gen) * 100).to(st_to_torch(fp8))
    sizes = (1, 2) if not swap else ()
    entry = Entry("x.weight", "transformer", ("a.weight", "b.weight") if not swap else ("a.weight",),
                  reshape="swap" if swap else "", sizes=sizes)  # fmt: skip
    parts = [rows // 3, 2 * rows // 3] if not swap else [rows]
    inner = [
        Contribution(f"m{p}", LoraModule(torch.randn(4, cols, generator=gen), torch.randn(n, 4, generator=gen) * 400, 2.0), 0.9, p, len(parts))
        for p, n in enumerate(parts)
    ]  # fmt: skip
    sliced = _Sliced(entry, (rows, cols), inner, scale, fp8)
    cs = [Contribution("x", sliced, 1.0)]  # type: ignore[arg-type]
    plan = plan_rows(cs, (rows, cols))
    assert plan is not None and plan.clamp is not None
    fast = merge_rows(w, plan, fp8)
    whole = apply_contributions(w, cs, check=False).to(st_to_torch(fp8))
    assert fast is not None
    assert torch.equal(fast.view(torch.uint8), whole.view(torch.uint8))
    if fp8 == "F8_E4M3":  # saturation reached (E5M2's range is wider than these deltas)
        assert float(whole.float().abs().max()) == float(torch.finfo(st_to_torch(fp8)).max)


def test_rows_leave_overflow_and_nan_to_the_whole_tensor_rule():
    """A value fp16 cannot hold, or a NaN, gives None; _merged then words the error as before."""
    w = torch.zeros(6, 4, dtype=torch.float16)
    big = [
        Contribution(
            "big", LoraModule(torch.ones(1, 4), torch.full((6, 1), 70000.0)), 1.0, lora="big.safetensors"
        )
    ]
    plan = plan_rows(big, (6, 4))
    assert plan is not None and merge_rows(w, plan, "F16") is None
    assert merge_rows(w, plan, "F32") is not None
    with pytest.raises(MismatchError, match=r"big\.safetensors.*not finite in F16"):
        _merged("k.weight", big, w, "F16")
    nan = [Contribution("nan", LoraModule(torch.ones(1, 4), torch.full((6, 1), float("nan"))), 1.0)]
    assert merge_rows(w, plan_rows(nan, (6, 4)), "F32") is None  # type: ignore[arg-type]
    with pytest.raises(MismatchError, match="not finite"):
        _merged("k.weight", nan, w, "F32")


def test_rows_do_not_plan_modules_that_need_the_weight():
    class Scaled(LoraModule):  # a subclass may change the rule: the generic path
        pass

    cs = [Contribution("s", Scaled(torch.ones(1, 4), torch.ones(6, 1)), 1.0)]
    assert plan_rows(cs, (6, 4)) is None
    assert (
        plan_rows([Contribution("odd", LoraModule(torch.ones(1, 4), torch.ones(6, 1)), 1.0, 0, 4)], (6, 4))
        is None
    )


def test_writer_thread_keeps_order_and_hands_back_errors():
    done: list[int] = []
    with _Behind() as behind:
        for i in range(20):
            behind.put(done.append, i)
    assert done == list(range(20))

    def fail(_: int) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"), _Behind() as behind:
        behind.put(fail, 0)
        for i in range(50):
            behind.put(done.append, i)
