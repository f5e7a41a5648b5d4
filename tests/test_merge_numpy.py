"""The merge without torch (lorax.adapters.array_merge / array_inputs) against the torch path: the same bytes, for
fp16, bf16 and fp32 weights; bf16 rounding against torch's own cast; no torch imported; and the fall back to the
torch path where the numpy rule does not run (its error words kept)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_helpers import save, scratch, tiny_lora, tiny_single

from lorax.adapters import array_merge
from lorax.adapters.merge import Contribution
from lorax.adapters.merge_rows import merge_rows, plan_rows
from lorax.adapters.state import LoraModule, LoraState
from lorax.errors import MismatchError
from lorax.io.model_layout import st_to_torch
from lorax.progress import NullProgress
from lorax.services.merge import MergeConfig, merge, merge_model


def _np(t: torch.Tensor) -> np.ndarray:
    """A torch tensor as numpy (bf16 as its bits, as array_merge holds it)."""
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _as_arrays(cs: list[Contribution]) -> list[Contribution]:
    out = []
    for c in cs:
        m = c.module
        assert isinstance(m, LoraModule)
        arrays = array_merge.ArrayLora(m.down.float().numpy(), m.up.float().numpy(), float(m.alpha or 0))
        out.append(Contribution(c.module_name, arrays, c.weight, c.part, c.parts))  # type: ignore[arg-type]
    return out


def _pairs(shape: tuple[int, ...], lora_dtype: torch.dtype, gen: torch.Generator) -> list[Contribution]:
    """Three LoRAs on thirds of the rows (q;k;v as OpenCLIP fuses them) and one on all rows, odd scales."""
    rows, cols = shape[0], int(np.prod(shape[1:]))
    rest = shape[1:]
    conv = [1, 1] if len(rest) == 3 else []

    def down(r: int) -> torch.Tensor:
        return (torch.randn(r, *rest, generator=gen) * 0.1).to(lora_dtype)

    def up(n: int, r: int) -> torch.Tensor:
        return (torch.randn(n, r, *conv, generator=gen) * 0.1).to(lora_dtype)

    assert cols > 0
    cs = [Contribution("all", LoraModule(down(16), up(rows, 16), 7.0), 0.83)]
    if rows % 3 == 0:
        cs += [Contribution(f"p{p}", LoraModule(down(4), up(rows // 3, 4), 3.0), 1.3, p, 3) for p in range(3)]
    cs.append(Contribution("unit", LoraModule(down(8), up(rows, 8)), 1.0))  # alpha = rank: addmm's alpha 1
    return cs


@pytest.mark.parametrize("dt", ["F16", "BF16", "F32"])
@pytest.mark.parametrize(
    "shape",
    [(320, 320), (1280, 1280), (768, 3072), (300, 77), (9, 2), (3, 5), (640, 320, 3, 3), (320, 320, 1, 1)],
)
def test_numpy_rows_equal_the_torch_rows_bit_for_bit(dt, shape):
    gen = torch.Generator().manual_seed(shape[0] + len(shape))
    w = (torch.randn(*shape, generator=gen) * 0.05).to(st_to_torch(dt))
    lora_dtype = torch.float16 if dt != "BF16" else torch.bfloat16
    cs = _pairs(shape, lora_dtype, gen)
    plan = plan_rows(cs, shape)
    assert plan is not None
    with torch.inference_mode():
        expected = merge_rows(w, plan, dt)
    assert expected is not None
    got = array_merge.merge_rows(_np(w), array_merge._terms(_as_arrays(cs), shape), dt)
    assert got.shape == shape and got.tobytes() == _np(expected.contiguous()).tobytes()
    assert got.tobytes() != _np(w).tobytes()  # it merged something


def test_a_single_column_needs_torch():
    """torch multiplies a one-column weight by another kernel (its bits differ from sgemm's): not taken here."""
    cs = _as_arrays([Contribution("m", LoraModule(torch.randn(2, 1), torch.randn(6, 2)), 0.5)])
    with pytest.raises(array_merge.NeedsTorch):
        array_merge.merge_rows(np.zeros((6, 1), np.float16), array_merge._terms(cs, (6, 1)), "F16")


def test_bf16_rounding_is_torchs_cast():
    """Ties to even both ways, the largest values, subnormals, ±0, ±inf, NaN, a million random floats and 65536
    random bit patterns."""
    special = [1.0 + 2**-8, 1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20, -(1.0 + 2**-8), 3.3895313892515355e38,
               3.39e38, 1e-40, -1e-42, 2**-133, 0.0, -0.0, float("inf"), -float("inf"), float("nan")]  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    randoms = (torch.randn(1 << 20, generator=gen) * torch.logspace(-30, 30, 1 << 20)).float()
    bits = torch.randint(0, 2**31 - 1, (1 << 16,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = torch.cat([torch.tensor(special, dtype=torch.float32), randoms, bits.view(torch.float32)])
    expected = x.to(torch.bfloat16).view(torch.uint16).numpy()
    got = array_merge.to_bf16_bits(x.numpy())
    nan = np.isnan(x.numpy())
    assert (
        nan.sum() > 100 and np.isnan(array_merge.to_fp32(got[nan])).all()
    )  # torch's NaN bits vary by kernel
    assert np.array_equal(got[~nan], expected[~nan])
    back = array_merge.to_fp32(expected)  # bf16 → fp32 is exact
    assert np.array_equal(
        back.view(np.uint32), x.to(torch.bfloat16).float().view(torch.int32).numpy().view(np.uint32)
    )


def test_fp16_casts_are_torchs():
    """fp16 → fp32 for all 65536 bit patterns, fp32 → fp16 on ties, subnormals, overflow and a million values."""
    to32, to16 = array_merge._half()
    every = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    wide = np.empty(65536, np.float32)
    to32(every, wide)
    expected = torch.from_numpy(every.copy()).float().numpy()
    nan = np.isnan(expected)
    assert (
        np.array_equal(wide[~nan].view(np.uint32), expected[~nan].view(np.uint32))
        and np.isnan(wide[nan]).all()
    )
    gen = torch.Generator().manual_seed(1)
    special = [
        1 + 2**-11,
        1 + 3 * 2**-11,
        2**-24,
        2**-25,
        3 * 2**-26,
        65504.0,
        65519.0,
        65520.0,
        1e-8,
        -6e-5,
        0.0,
        -0.0,
    ]
    x = torch.cat(
        [torch.tensor(special), torch.randn(1 << 20, generator=gen) * torch.logspace(-9, 5, 1 << 20)]
    )
    narrow = np.empty(x.numel(), np.float16)
    to16(x.numpy(), narrow)
    assert np.array_equal(narrow.view(np.uint16), x.half().numpy().view(np.uint16))


def _torch_merge(base: Path, lora: Path, out: Path, **kw) -> None:
    merge_model(MergeConfig(str(base), [str(lora)], out, force=True, **kw), NullProgress())


def _bf16_lora(path: Path) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = {k: (v.bfloat16() if v.dim() else v) for k, v in load_file(path).items()}
    out = path.with_name("bf16-" + path.name)
    save_file(tensors, out)
    return out


@pytest.mark.parametrize(
    ("family", "dtype"),
    [("sd1", None), ("sd1", "fp16"), ("sd1", "bf16"), ("sd1", "fp32"), ("sd2", None), ("sdxl", None)],
)
def test_cli_merge_without_torch_writes_the_torch_paths_bytes(family, dtype):
    """A LoRA + LoCon (kohya) into the tiny SD1 single file in each dtype, and into SD2's (OpenCLIP's fused q;k;v)
    and SDXL's (kohya's original UNet names): a subprocess merges without importing torch, and its file equals the
    torch path's byte for byte."""
    base = tiny_single(family, dtype)
    work = scratch("numpy-merge")
    if family == "sdxl":  # the tiny SDXL's own blocks, both text encoders
        from test_sdxl import sdxl_lora

        lora = save(sdxl_lora(seed=3, conv=True), work / "k.safetensors")
    else:
        lora = save(tiny_lora(family, seed=3, alpha=3.0), work / "k.safetensors")
    if dtype == "bf16":
        lora = _bf16_lora(lora)
    fast, slow = work / "fast.safetensors", work / "slow.safetensors"
    code = (
        "import sys\n"
        "from lorax.cli.app import app\n"
        f"try:\n    app(['-q', 'merge', {str(base)!r}, {str(lora) + ':0.7'!r}, '--text-scale', '1.3', '-o', {str(fast)!r}])\n"
        "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    merge_model(
        MergeConfig(str(base), [f"{lora}:0.7"], slow, alpha_text=1.3, force=True), NullProgress()
    )  # arrays=False: the torch path
    assert fast.read_bytes() == slow.read_bytes()
    assert fast.read_bytes() != base.read_bytes()


def test_overflow_falls_back_to_the_torch_paths_error():
    """A scale that overflows fp16: the numpy rule stops, the torch path runs and names the tensor."""
    base = tiny_single("sd1", "fp16")
    work = scratch("numpy-overflow")
    lora = save(tiny_lora("sd1", seed=4, conv=False), work / "k.safetensors")
    with pytest.raises(MismatchError, match="not finite in F16"):
        merge(MergeConfig(str(base), [f"{lora}:1e7"], work / "out.safetensors"))
    assert not (work / "out.safetensors").exists()


def test_lycoris_and_embeddings_take_the_torch_path():
    """Files the numpy reader does not take (a LoHa module, a bundled embedding) still merge, by the torch path."""
    from lorax.adapters.array_inputs import base_skeleton, read_lora
    from lorax.io.checkpoint import open_checkpoint

    base = tiny_single("sd1")
    work = scratch("numpy-fallback")
    state = tiny_lora("sd1", seed=5, conv=False)
    state.embeddings = {"<tok>": {"text_encoder": torch.randn(1, 32)}}
    lora = save(state, work / "emb.safetensors")
    plain = save(LoraState(dict(state.modules), family="sd1"), work / "plain.safetensors")
    skeleton = base_skeleton(open_checkpoint(base), None)
    assert skeleton is not None
    assert read_lora(lora, "sd1", skeleton) is None
    assert read_lora(plain, "sd1", skeleton) is not None
    assert base_skeleton(open_checkpoint(base), "fp32") is None  # a dtype change: the torch path
    result = merge(MergeConfig(str(base), [str(lora)], work / "out.safetensors"))
    assert result.embeddings == ["<tok>"] and result.tensors_merged > 0


def test_rewrite_copies_runs_page_aligned_as_the_source():
    """The rewrite's output starts its data at the source's offset modulo 4096 (in-kernel copies of runs of
    untouched tensors between equally aligned offsets), every untouched tensor's bytes unchanged, read back by the
    safetensors library itself."""
    from safetensors import safe_open

    from lorax.io.checkpoint_sources import SafetensorsSource
    from lorax.io.rewrite import rewrite_tensor_file
    from lorax.io.safetensors_io import read_header

    base = tiny_single("sd1", "fp16")
    out = scratch("aligned") / "copy.safetensors"
    key = next(k for k in read_header(base).tensors if k.endswith("attn1.to_q.weight"))
    double = lambda buf, dt: memoryview(bytes(b ^ 0x01 for b in bytes(buf)))  # noqa: E731  flips one bit a byte
    changed, copied = rewrite_tensor_file(
        SafetensorsSource([base]), out, {key: double}, metadata={"x": "y" * 77}, raw=True
    )
    src, dst = read_header(base), read_header(out)
    assert changed == 1 and copied == len(src.tensors) - 1
    assert dst.data_offset % 4096 == src.data_offset % 4096 and dst.metadata == {"x": "y" * 77}
    with safe_open(str(base), "np") as a, safe_open(str(out), "np") as b:
        for k in src.tensors:
            same = a.get_tensor(k).tobytes() == b.get_tensor(k).tobytes()
            assert same == (k != key), k
