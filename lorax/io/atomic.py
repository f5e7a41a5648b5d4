"""Outputs that appear whole or not at all: a temp file in the output's folder, renamed into place.

On any exception, SIGINT or SIGTERM the temp file is removed and nothing is left at the output path.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from lorax.errors import InputError, OutputExistsError


def check_output(path: str | Path, force: bool) -> Path:
    """Refuse an existing output unless ``force``; make sure its folder can be written."""
    out = Path(path)
    if out.exists() and not force:
        raise OutputExistsError("already exists; pass --force to overwrite it", path=out)
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise InputError("the output's parent is not a folder", path=out)
    return out


class _TermAsInterrupt:
    """While active, SIGTERM raises KeyboardInterrupt so that cleanup code runs (main thread only)."""

    def __enter__(self) -> None:
        self._old = None
        try:
            self._old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            self._old = None

    @staticmethod
    def _handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


@contextmanager
def atomic_path(path: str | Path, force: bool = False, *, directory: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it into place, on failure remove it.

    With ``directory=True`` the temporary path is a fresh folder (for diffusers model folders).
    """
    out = check_output(path, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The name is chosen before anything exists, so a signal at any point finds it for cleanup; SIGTERM is turned
    # into KeyboardInterrupt before the file is created, so the default handler never kills us with it in place.
    tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
    with _TermAsInterrupt():
        try:
            if directory:
                tmp.mkdir()
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            yield tmp
            if out.is_dir() and not out.is_symlink():
                backup = out.with_name(f".{out.name}.old")
                shutil.rmtree(backup, ignore_errors=True)
                os.replace(out, backup)
                os.replace(tmp, out)
                shutil.rmtree(backup, ignore_errors=True)
            else:
                if directory and out.exists():
                    out.unlink()
                os.replace(tmp, out)
            if not directory:
                os.chmod(out, 0o666 & ~_umask())
        except BaseException:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
