"""Buffers reused within one streaming rewrite (``lorax.io.rewrite``).

A fresh buffer costs its page faults the first time it is touched: 0.4 ms a MB here, which for a 24 GB Flux merge
(every weight read into memory of its own, every merged weight written from memory of its own) is 19 s, as long as
the copy itself. So the rewrite keeps a few buffers and lends them again: a tensor is read into one, the merge
writes its result into another (``empty``), and both come back once the writer thread has written the result.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

_current: Pool | None = None


class Pool:
    """Byte buffers (numpy ``uint8``) to lend and take back; at most ``keep`` idle ones are kept (the largest)."""

    def __init__(self, keep: int = 3) -> None:
        self._free: list[np.ndarray] = []
        self._lent: list[np.ndarray] = []  # lent by the calling thread since the last ``lent()``
        self._lock = threading.Lock()
        self.keep = keep

    def take(self, nbytes: int, lend: bool = True) -> np.ndarray:
        """A buffer of at least ``nbytes`` (its first ``nbytes`` when ``lend``: counted by ``lent()``; else the whole
        buffer, for the caller to give back itself)."""
        with self._lock:
            fits = [b for b in self._free if b.nbytes >= nbytes]
            found = min(fits, key=lambda b: b.nbytes) if fits else None
            if found is not None:
                self._free = [b for b in self._free if b is not found]
        buf = found if found is not None else np.empty(max(nbytes, 1), np.uint8)
        if not lend:
            return buf
        self._lent.append(buf)
        return buf[:nbytes]

    def lent(self) -> list[np.ndarray]:
        """The buffers lent since the last call (they go back with ``give``)."""
        out, self._lent = self._lent, []
        return out

    def give(self, buffers: list[np.ndarray]) -> None:
        with self._lock:
            self._free.extend(buffers)
            self._free.sort(key=lambda b: b.nbytes, reverse=True)
            del self._free[self.keep :]


@contextmanager
def lending(pool: Pool) -> Iterator[Pool]:
    """Make ``empty`` lend from ``pool`` while a rewrite runs."""
    global _current
    before, _current = _current, pool
    try:
        yield pool
    finally:
        _current = before


def empty(nbytes: int) -> np.ndarray:
    """``nbytes`` uninitialised bytes: lent by the rewrite in progress (given back after its write), else new."""
    pool = _current
    return pool.take(nbytes) if pool is not None else np.empty(nbytes, np.uint8)


def address(data: object) -> int:
    """Where a tensor's, an array's or a buffer's bytes start (to tell whether a result lives in a lent buffer)."""
    ptr = getattr(data, "data_ptr", None)
    if callable(ptr):
        return int(ptr())
    view = memoryview(data)  # type: ignore[arg-type]
    return int(np.frombuffer(view, np.uint8).ctypes.data) if view.nbytes else 0


def inside(data: object, buf: np.ndarray) -> bool:
    start = int(buf.ctypes.data)
    return start <= address(data) < start + max(buf.nbytes, 1)
