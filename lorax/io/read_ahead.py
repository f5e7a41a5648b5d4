"""The changed tensors of a streaming rewrite read one ahead of the merge, in a thread of their own.

``pread`` releases the GIL: while the merge computes one weight (and the writer thread writes the one before), the
next one comes off the disk into a buffer of the rewrite's pool (``lorax.io.buffers``), so that a merge costs about
the larger of its I/O and its arithmetic rather than their sum.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from lorax.errors import FormatError
from lorax.io.checkpoint_sources import PickleSource, SafetensorsSource
from lorax.io.model_layout import FLOAT_DTYPES, FP8_DTYPES

if TYPE_CHECKING:
    import numpy as np

    from lorax.io.buffers import Pool


def fill(fd: int, buf: np.ndarray, start: int, name: str, path: Path) -> np.ndarray:
    """``buf`` filled with the file's bytes from ``start`` (``pread`` until it is full)."""
    view, done, n = memoryview(buf), 0, buf.nbytes  # type: ignore[arg-type]
    while done < n:
        step = os.preadv(fd, [view[done:]], start + done)
        if step <= 0:
            raise FormatError(f"tensor {name} ends past the end of the file", path=path)
        done += step
    return buf


class ReadAhead:
    """``get(key)``: the bytes of the changed tensor ``key`` (``keys`` in the order they are asked for), with the
    pool buffer they lie in (the caller gives it back), the next one's read started; ``None`` for a tensor read
    otherwise (not a float tensor of a safetensors file)."""

    def __init__(
        self,
        source: SafetensorsSource | PickleSource,
        keys: list[str],
        pool: Pool,
        open_fd: Callable[[Path], int],
    ) -> None:
        self._source, self._keys, self._pool, self._open = source, keys, pool, open_fd
        self._next = 0
        self._pending: tuple[str, np.ndarray, Future[np.ndarray]] | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="lorax-reader")

    def _readable(self, key: str) -> bool:
        src = self._source
        return (
            isinstance(src, SafetensorsSource)
            and src.dtype(key) in (*FLOAT_DTYPES, *FP8_DTYPES)
            and src.file_of(key).info(key).nbytes > 0
        )

    def _start(self) -> None:
        while self._next < len(self._keys) and not self._readable(self._keys[self._next]):
            self._next += 1
        if self._next >= len(self._keys):
            return
        key = self._keys[self._next]
        self._next += 1
        assert isinstance(self._source, SafetensorsSource)
        f = self._source.file_of(key)
        info = f.info(key)
        base = self._pool.take(info.nbytes, lend=False)
        job = self._thread.submit(fill, self._open(f.path), base[: info.nbytes], info.start, key, f.path)
        self._pending = (key, base, job)

    def get(self, key: str) -> tuple[np.ndarray, np.ndarray] | None:
        if self._pending is None and self._next == 0:
            self._start()
        if self._pending is None or self._pending[0] != key:
            return None
        _, base, job = self._pending
        self._pending = None
        data = job.result()
        self._start()
        return data, base

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.shutdown(wait=True)  # a read in flight fills a pool buffer: let it finish
