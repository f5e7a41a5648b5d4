"""Streaming rewrite of a tensor file: the source's header gives the output plan; every tensor is copied as raw bytes
(inside the kernel, bit for bit) unless its dtype changes, it is replaced, or the caller changes it, one tensor at a
time, so that memory stays bounded by the largest tensor. ``lorax merge`` (changes: merged weights) and ``lorax
convert`` (a new dtype) write through here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from lorax.errors import FormatError
from lorax.io.checkpoint_sources import PickleSource, SafetensorsSource
from lorax.io.model_layout import FLOAT_DTYPES, out_dtype, st_to_torch
from lorax.io.safetensors_io import StreamingWriter, st_dtype
from lorax.progress import Task

if TYPE_CHECKING:
    import torch

# A changed tensor: (the tensor as read, the safetensors dtype it is written in) → the tensor to write, in that dtype.
Change = Callable[["torch.Tensor", str], "torch.Tensor"]


@contextmanager
def single_thread() -> Iterator[None]:
    """Elementwise merges of one tensor gain nothing from threads, and on a busy machine torch's thread pool
    spins: one thread is many times faster there."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fd(path: Path, handles: dict[Path, int]) -> int:
    if path not in handles:
        handles[path] = os.open(path, os.O_RDONLY)
    return handles[path]


def read_owned(source: SafetensorsSource | PickleSource, name: str, handles: dict[Path, int]) -> torch.Tensor:
    """A float tensor read with ``pread`` into memory of its own, not memory-mapped: the mapped pages of a
    multi-GB checkpoint stay resident and count against the merge's peak memory (SDXL: 2.6 GB mapped vs 0.4 GB)."""
    if not isinstance(source, SafetensorsSource) or source.dtype(name) not in FLOAT_DTYPES:
        return source.get(name)
    import torch

    f = source.file_of(name)
    info = f.info(name)
    if info.nbytes == 0:
        return source.get(name)
    fd = _fd(f.path, handles)
    buf = bytearray(info.nbytes)
    view, done = memoryview(buf), 0
    while done < info.nbytes:
        n = os.preadv(fd, [view[done:]], info.start + done)
        if n <= 0:
            raise FormatError(f"tensor {name} ends past the end of the file", path=f.path)
        done += n
    return torch.frombuffer(buf, dtype=st_to_torch(info.dtype)).reshape(info.shape)


def rewrite_tensor_file(
    source: SafetensorsSource | PickleSource,
    out: Path,
    changes: Mapping[str, Change] | None = None,
    *,
    dtype: str | None = None,
    metadata: dict[str, str] | None = None,
    replacements: Mapping[str, torch.Tensor] | None = None,
    task: Task | None = None,
) -> tuple[int, int]:
    """Write ``source`` to ``out``: ``replacements`` instead of their tensors, ``changes[key](tensor, dtype)`` for
    theirs, every other tensor copied byte for byte when its dtype stays (float tensors go to ``dtype`` when given).
    Returns (tensors changed, tensors copied)."""
    changes = changes or {}
    replacements = replacements or {}
    specs = []
    for k in source:
        if k in replacements:
            t = replacements[k]
            specs.append((k, out_dtype(st_dtype(t), dtype), tuple(t.shape)))
        else:
            specs.append((k, out_dtype(source.dtype(k), dtype), source.shape(k)))
    changed = copied = 0
    handles: dict[Path, int] = {}
    try:
        writer = StreamingWriter(out, specs, metadata)
        with writer, single_thread():
            for k, dt, _ in specs:
                if k in replacements:
                    t = replacements[k]
                    writer.write(k, t.to(st_to_torch(dt)) if dt in FLOAT_DTYPES else t)
                elif k in changes:
                    writer.write(k, changes[k](read_owned(source, k, handles), dt))
                    changed += 1
                elif source.dtype(k) == dt:
                    if isinstance(source, SafetensorsSource):
                        f = source.file_of(k)
                        writer.copy_from(k, _fd(f.path, handles), f.info(k).start)
                    else:
                        writer.write(k, source.raw(k))
                    copied += 1
                else:
                    writer.write(k, source.get(k).to(st_to_torch(dt)))
                    copied += 1
                if task is not None:
                    task.advance()
    finally:
        for fd in handles.values():
            os.close(fd)
    return changed, copied
