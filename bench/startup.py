"""Benchmark: CLI start-up. Median wall time of `lorax --help` and `lorax inspect x.safetensors` (in subprocesses)
against `python -c pass` measured in the same run. Target (DESIGN.md): each ≤ 0.3 s.

    python -m bench.startup [--repeat 7]

The inspected file is a rank-16 kohya LoRA for the full-size SD1.5 layout written with safetensors + numpy only (no
torch in this process), plus a 1 GB sparse file whose header claims full-size tensors, to show that inspect reads
headers alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

TARGET_S = 0.3


def _lorax() -> list[str]:
    exe = shutil.which("lorax", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "lorax"]


def _time(cmd: list[str], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def _write_lora(path: Path) -> None:
    """A kohya header for 64 attention modules (rank 16, fp16), zero-filled: a realistic LoRA file shape."""
    header: dict[str, object] = {"__metadata__": {"ss_network_dim": "16", "ss_network_alpha": "8"}}
    offset = 0
    for block in range(16):
        for proj in ("to_q", "to_k", "to_v", "to_out_0"):
            stem = f"lora_unet_down_blocks_{block % 3}_attentions_{block % 2}_transformer_blocks_{block}_attn1_{proj}"
            for suffix, shape in (
                ("lora_down.weight", [16, 320]),
                ("lora_up.weight", [320, 16]),
                ("alpha", []),
            ):
                n = 2 * (shape[0] * shape[1] if shape else 1)
                header[f"{stem}.{suffix}"] = {
                    "dtype": "F16",
                    "shape": shape,
                    "data_offsets": [offset, offset + n],
                }
                offset += n
    _write(path, header, offset)


def _write_big_checkpoint(path: Path) -> None:
    """A sparse 1 GB single-file checkpoint: the header is real, the data section is holes."""
    n = 1 << 30
    header = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": {
            "dtype": "F16", "shape": [320, 768], "data_offsets": [0, 320 * 768 * 2]},
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": {
            "dtype": "F16", "shape": [n // 2 - 320 * 768], "data_offsets": [320 * 768 * 2, n]},
    }  # fmt: skip
    _write(path, header, n)


def _write(path: Path, header: Mapping[str, object], data_bytes: int) -> None:
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + data_bytes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    lorax = _lorax()
    with tempfile.TemporaryDirectory() as tmp:
        lora, big = Path(tmp) / "x.safetensors", Path(tmp) / "big.safetensors"
        _write_lora(lora)
        _write_big_checkpoint(big)
        base = _time([sys.executable, "-c", "pass"], args.repeat)
        rows = [
            ("python -c pass", base),
            ("lorax --help", _time([*lorax, "--help"], args.repeat)),
            ("lorax inspect x.safetensors (LoRA)", _time([*lorax, "inspect", str(lora)], args.repeat)),
            ("lorax inspect big.safetensors (1 GB)", _time([*lorax, "inspect", str(big)], args.repeat)),
        ]
    print(f"startup (median of {args.repeat}); target ≤ {TARGET_S} s")
    for name, seconds in rows:
        verdict = "" if name.startswith("python") else ("  ok" if seconds <= TARGET_S else "  OVER TARGET")
        print(f"  {name:40s} {seconds:6.3f} s   {seconds / base:5.1f}× python -c pass{verdict}")


if __name__ == "__main__":
    main()
