"""Streaming rewrite of a tensor file: the source's header gives the output plan; every tensor is copied as raw bytes
(inside the kernel, bit for bit) unless its dtype changes, it is replaced, or the caller changes it, one tensor at a
time, so that memory stays bounded by the largest tensor. ``lorax merge`` (changes: merged weights) and ``lorax
convert`` (a new dtype) write through here.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.io.checkpoint_sources import PickleSource, SafetensorsSource
from lorax.io.model_layout import FLOAT_DTYPES, FP8_DTYPES, out_dtype, st_to_torch
from lorax.io.read_ahead import ReadAhead, fill
from lorax.io.safetensors_io import StreamingWriter, st_dtype
from lorax.progress import Task

if TYPE_CHECKING:
    import numpy as np
    import torch

    from lorax.io.buffers import Pool

# A changed tensor: (the tensor as read, the safetensors dtype it is written in) → the tensor to write, in that dtype.
Change = Callable[["torch.Tensor", str], "torch.Tensor"]
# ``raw=True``: (the tensor's bytes, the dtype it is written in) → the bytes to write.
RawChange = Callable[["np.ndarray", str], "bytes | memoryview"]


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
    if not isinstance(source, SafetensorsSource) or source.dtype(name) not in (*FLOAT_DTYPES, *FP8_DTYPES):
        return source.get(name)
    import torch

    info = source.file_of(name).info(name)
    if info.nbytes == 0:
        return source.get(name)
    return torch.frombuffer(read_bytes(source, name, handles), dtype=st_to_torch(info.dtype)).reshape(
        info.shape
    )


def read_bytes(source: SafetensorsSource, name: str, handles: dict[Path, int]) -> np.ndarray:
    """A tensor's bytes, read with ``pread`` into a buffer of their own (``buffers.empty``: lent, when a rewrite
    runs, and not zero-filled first)."""
    from lorax.io.buffers import empty

    f = source.file_of(name)
    info = f.info(name)
    return fill(_fd(f.path, handles), empty(info.nbytes), info.start, name, f.path)


def rewrite_tensor_file(
    source: SafetensorsSource | PickleSource,
    out: Path,
    changes: Mapping[str, Change] | Mapping[str, RawChange] | None = None,
    *,
    dtype: str | None = None,
    metadata: dict[str, str] | None = None,
    replacements: Mapping[str, torch.Tensor] | None = None,
    task: Task | None = None,
    raw: bool = False,
) -> tuple[int, int]:
    """Write ``source`` to ``out``: ``replacements`` instead of their tensors, ``changes[key](tensor, dtype)`` for
    theirs, every other tensor copied byte for byte when its dtype stays (float tensors go to ``dtype`` when given).
    Returns (tensors changed, tensors copied). ``raw``: the changes take the tensor's bytes (a ``bytearray``) and
    return bytes, and nothing here imports torch (``lorax.adapters.array_merge``).

    Reading, computing and writing overlap: the next changed tensor's bytes are asked of the disk ahead
    (``posix_fadvise WILLNEED``) while this one is computed, and writes and in-kernel copies run in a thread of their
    own (``_Behind``, at most two tensors behind), so a merge costs about its I/O or its arithmetic, not their sum."""
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
    ahead = [k for k, _, _ in specs if k in changes]
    from lorax.io.buffers import Pool, inside, lending  # numpy: not for a command that only reads headers

    pool = Pool()
    try:
        single = isinstance(source, SafetensorsSource) and len(source.files) == 1
        align = source.files[0].header.data_offset if single else None  # type: ignore[union-attr]
        writer = StreamingWriter(out, specs, metadata, align)  # copies page-aligned as in the source
        reads = ReadAhead(source, ahead, pool, lambda p: _fd(p, handles))
        with writer, nullcontext() if raw else single_thread(), _Behind() as behind, lending(pool), reads:
            run: list[Any] = []  # tensors copied as they are, one after the other: [fd, start, end, names]

            def flush() -> None:
                if run:
                    behind.put(writer.copy_many, run[3], run[0], run[1])
                    run.clear()

            for k, dt, _ in specs:
                if not (k not in replacements and k not in changes and source.dtype(k) == dt):
                    flush()
                if k in replacements:
                    t = replacements[k]
                    behind.put(writer.write, k, t.to(st_to_torch(dt)) if dt in FLOAT_DTYPES else t)
                elif k in changes:
                    _advise(source, ahead, changed + 2, handles)  # the next one is being read
                    read = reads.get(k)
                    data = _changed(source, k, changes[k], dt, handles, raw, read)
                    # the tensor as read and the result's buffer: back to the pool (once written, if it is there)
                    lent = pool.lent() + ([read[1]] if read is not None else [])
                    kept = [b for b in lent if inside(data, b)]
                    pool.give([b for b in lent if not inside(data, b)])
                    behind.put(_write_and_give, writer.write, k, data, pool, kept)
                    changed += 1
                elif source.dtype(k) == dt:
                    if isinstance(source, SafetensorsSource):
                        f = source.file_of(k)
                        info, fd = f.info(k), _fd(f.path, handles)
                        if run and run[0] == fd and run[2] == info.start:
                            run[2] = info.end
                            run[3].append(k)
                        else:
                            flush()
                            run[:] = [fd, info.start, info.end, [k]]
                    else:
                        behind.put(writer.write, k, source.raw(k))
                    copied += 1
                else:
                    behind.put(writer.write, k, source.get(k).to(st_to_torch(dt)))
                    copied += 1
                if task is not None:
                    task.advance()
            flush()
    finally:
        for fd in handles.values():
            os.close(fd)
    return changed, copied


def _write_and_give(
    write: Callable[[str, object], None], key: str, data: object, pool: Pool, buffers: list[np.ndarray]
) -> None:
    write(key, data)
    pool.give(buffers)


def _changed(
    source: SafetensorsSource | PickleSource,
    key: str,
    change: Change | RawChange,
    dt: str,
    handles: dict[Path, int],
    raw: bool,
    read: tuple[np.ndarray, np.ndarray] | None,
) -> torch.Tensor | bytes | memoryview:
    if read is not None:  # read ahead (lorax.io.read_ahead)
        if raw:
            return change(read[0], dt)  # type: ignore[arg-type]
        import torch

        weight = torch.frombuffer(read[0], dtype=st_to_torch(source.dtype(key))).reshape(source.shape(key))
        return change(weight, dt)  # type: ignore[arg-type]
    if raw and isinstance(source, SafetensorsSource):
        return change(read_bytes(source, key, handles), dt)  # type: ignore[arg-type]
    return change(read_owned(source, key, handles), dt)  # type: ignore[arg-type]


def _advise(
    source: SafetensorsSource | PickleSource, ahead: list[str], i: int, handles: dict[Path, int]
) -> None:
    """Ask the kernel to start reading the changed tensor at ``ahead[i]``."""
    if i >= len(ahead) or not isinstance(source, SafetensorsSource) or not hasattr(os, "posix_fadvise"):
        return
    f = source.file_of(ahead[i])
    info = f.info(ahead[i])
    if info.nbytes:
        os.posix_fadvise(_fd(f.path, handles), info.start, info.nbytes, os.POSIX_FADV_WILLNEED)


class _Behind:
    """Runs calls in order in a thread of its own, at most ``depth`` behind the caller (writes and in-kernel copies
    release the GIL): the caller computes the next tensor while this one is written. An error in the thread is
    raised in the caller at its next ``put`` or at the end; an error in the caller drops what is still queued."""

    def __init__(self, depth: int = 2) -> None:
        self._queue: queue.Queue[tuple[Callable[..., object], tuple[object, ...]] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="lorax-writer", daemon=True)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None and not self._stop:
                try:
                    item[0](*item[1])
                except BaseException as err:  # handed to the caller
                    self._error = err

    def put(self, call: Callable[..., object], *args: object) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((call, args))

    def __enter__(self) -> _Behind:
        self._thread.start()
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self._stop = True
            while True:  # make room for the end mark
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
        self._queue.put(None)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error
