"""Outputs that appear whole or not at all, and never replace what lorax could not have written.

The one place outputs are planned (``check_outputs``) and written (``atomic_path``):

- Before anything is written, every output of a command is checked together. One that exists is refused without
  ``--force``; with ``--force`` only an output of the same kind is replaced: a file by a file, a folder holding its
  kind's marker (``model_index.json`` for a model folder, ``state.json`` for a training checkpoint) by such a folder.
  Anything else is refused with one line and nothing is touched.
- The output's folder must be writable (probed with a real file), so a long run fails at once, not at its end.
- Temp files and folders that a killed run left for OUT (``.OUT.<hex>.tmp``, ``.old``, ``.work``) are reported
  (name, size, age) and removed with ``--force``; those of a run still writing (they are locked) are never touched.
- The result is written beside OUT under a temp name and renamed into place *without replacing* (``renameat2``
  with ``RENAME_NOREPLACE``, else a hard link and unlink): an OUT that appeared during the run is kept and reported.
- On any exception, SIGINT, SIGTERM or SIGHUP the temp is removed, with the folders created for it; a full or
  read-only disk is reported naming OUT, not the temp path.

SIGKILL cannot be caught: it leaves the temp file, which the next run for the same OUT reports.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from lorax.errors import InputError, OutputExistsError
from lorax.io.stale import (  # check_free_space, notice and temp_files stay importable from here
    check_free_space,  # noqa: F401
    check_temps,
    fcntl,
    nearest_existing,
    notice,  # noqa: F401
    path_exists,
    temp_files,  # noqa: F401
)


@dataclass(frozen=True)
class Kind:
    """What lorax writes at an output path; ``--force`` replaces only the same kind."""

    label: str
    folder: bool = False
    marker: str | None = None  # a file every folder of this kind holds


FILE = Kind("file")
MODEL_FOLDER = Kind("model folder", folder=True, marker="model_index.json")
CHECKPOINT = Kind("training checkpoint", folder=True, marker="state.json")
FILES_FOLDER = Kind("folder", folder=True)  # a folder lorax writes files into (validation samples)

Planned = Path | str | tuple[Path | str, Kind]


class SignalInterrupt(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised like Ctrl-C so that every cleanup runs."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"signal {signal.Signals(signum).name}")


# ---- planning ------------------------------------------------------------------------------------------------


def check_output(path: str | Path, force: bool, kind: Kind = FILE) -> Path:
    """``check_outputs`` for one output."""
    return check_outputs([(path, kind)], force)[0]


def check_outputs(outputs: Sequence[Planned], force: bool) -> list[Path]:
    """Check every output of a command before anything is written; returns their paths.

    Raises ``OutputExistsError`` for an existing output (without ``force``, or of another kind), a run still writing
    one (without ``force``); ``InputError`` for a folder that cannot be written. Reports stale temp files on stderr and
    removes them with ``force``.
    """
    planned = [(Path(p), FILE) if not isinstance(p, tuple) else (Path(p[0]), p[1]) for p in outputs]
    for out, kind in planned:
        _check_existing(out, kind, force)
    for out, _ in planned:
        check_temps(out, force)
    probed: set[Path] = set()
    for out, _ in planned:
        folder = nearest_existing(out.parent)
        if folder not in probed:
            probed.add(folder)
            _probe_writable(folder, out)
    return [out for out, _ in planned]


def _what(path: Path) -> str:
    if path.is_symlink():
        return "a link"
    if path.is_dir():
        return "a folder"
    if path.is_file():
        return "a file"
    return "a special file"


def _same_kind(path: Path, kind: Kind) -> bool:
    if not kind.folder:
        return path.is_symlink() or path.is_file()  # a link is replaced itself, never what it points to
    if path.is_symlink() or not path.is_dir():
        return False
    return kind.marker is None or (path / kind.marker).is_file()


def _mismatch(path: Path, kind: Kind) -> str:
    what = _what(path)
    if kind.folder and kind.marker is not None and what == "a folder":
        what = f"a folder without {kind.marker}, not a {kind.label}"
    return (
        f"exists and is {what}; --force replaces only a {kind.label} with a {kind.label}, "
        "so nothing was touched: choose another output name"
    )


def _check_existing(out: Path, kind: Kind, force: bool) -> None:
    folder = nearest_existing(out.parent)
    if not folder.is_dir():
        raise InputError(f"the output's folder {folder} is not a folder", path=out)
    if not path_exists(out):
        return
    if not _same_kind(out, kind):
        raise OutputExistsError(_mismatch(out, kind), path=out)
    if not force:
        raise OutputExistsError("already exists; pass --force to overwrite it", path=out)


def check_writable(folder: str | Path) -> None:
    """Refuse a folder that lorax will write into later (checkpoints) but that cannot be written now."""
    folder = Path(folder)
    _probe_writable(nearest_existing(folder), folder)


def _probe_writable(folder: Path, out: Path) -> None:
    probe = folder / f".lorax-probe.{secrets.token_hex(6)}.tmp"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as err:
        raise InputError(f"cannot be written: {_reason(err)} in {folder}", path=out) from None
    probe.unlink(missing_ok=True)


def _reason(err: BaseException) -> str:
    code = getattr(err, "errno", None)
    text = str(err)
    if code == errno.ENOSPC or "No space left" in text or "os error 28" in text:
        return "no space left on the disk"
    if code == errno.EDQUOT or "quota exceeded" in text.lower():
        return "the disk quota is exceeded"
    if code == errno.EROFS or "Read-only file system" in text or "os error 30" in text:
        return "the file system is read-only"
    if code in (errno.EACCES, errno.EPERM):
        return "no permission to write"
    return (
        os.strerror(code) if isinstance(code, int) else text.splitlines()[0] if text else type(err).__name__
    )


def _disk_error(err: BaseException) -> bool:
    text = str(err)
    return getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or any(
        s in text for s in ("No space left", "os error 28", "Read-only file system", "os error 30")
    )


# ---- signals -------------------------------------------------------------------------------------------------


class SignalsAsInterrupt:
    """While active, SIGTERM and SIGHUP raise ``SignalInterrupt`` so that cleanup code runs (main thread only)."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s)

    def __enter__(self) -> None:
        self._old: dict[int, object] = {}
        for sig in self.SIGNALS:
            try:
                old = signal.getsignal(sig)
                if old == signal.SIG_IGN:  # nohup: the user asked for the run to outlive the terminal
                    continue
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                return

    @staticmethod
    def _handler(signum: int, frame: FrameType | None) -> None:
        raise SignalInterrupt(signum)

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]


# ---- writing -------------------------------------------------------------------------------------------------


@contextmanager
def atomic_path(
    path: str | Path, force: bool = False, *, directory: bool = False, kind: Kind | None = None
) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it into place, on failure remove it.

    With ``directory=True`` the temporary path is a fresh folder, by default a model folder (``kind``).
    """
    kind = kind or (MODEL_FOLDER if directory else FILE)
    out = Path(path)
    _check_existing(out, kind, force)
    # The name is chosen before anything exists, so a signal at any point finds it for cleanup; SIGTERM and SIGHUP
    # become KeyboardInterrupt before anything is created, so no default handler kills us with it in place.
    tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
    with SignalsAsInterrupt():
        created: list[Path] = []
        fd: int | None = None
        try:
            created = _make_folders(out.parent)
            if directory:
                tmp.mkdir()
                fd = os.open(tmp, os.O_RDONLY)
            else:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)  # marks the temp as live for other runs' stale check
            yield tmp
            if not directory:
                os.chmod(tmp, 0o666 & ~_umask())
            _commit(tmp, out, force, kind)
        except BaseException as err:
            _remove(tmp)
            _remove_folders(created)
            if isinstance(err, Exception) and not isinstance(err, InputError) and _disk_error(err):
                raise InputError(
                    f"cannot be written: {_reason(err)}; nothing was written", path=out
                ) from None
            raise
        finally:
            if fd is not None:
                os.close(fd)


@contextmanager
def scratch_dir(out: str | Path) -> Iterator[Path]:
    """A locked scratch folder beside ``out`` (same disk), removed on success, error and signal alike."""
    out = Path(out)
    work = out.parent / f".{out.name}.{secrets.token_hex(6)}.work"
    with SignalsAsInterrupt():
        fd: int | None = None
        try:
            work.mkdir()
            fd = os.open(work, os.O_RDONLY)
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield work
        finally:
            if fd is not None:
                os.close(fd)
            shutil.rmtree(work, ignore_errors=True)


def _commit(tmp: Path, out: Path, force: bool, kind: Kind) -> None:
    try:
        if not path_exists(out):
            _rename_noreplace(tmp, out)
            return
    except FileExistsError:
        pass
    # OUT exists now although it did not when the run started (or it did and --force was given)
    if not force:
        raise OutputExistsError(
            "appeared while lorax was writing it and was left as it is; pass --force to overwrite it",
            path=out,
        )
    if not _same_kind(out, kind):
        raise OutputExistsError(_mismatch(out, kind), path=out)
    if not kind.folder:
        os.replace(tmp, out)
        return
    backup = out.parent / f".{out.name}.{secrets.token_hex(6)}.old"
    os.rename(out, backup)
    try:
        _rename_noreplace(tmp, out)
    except BaseException:
        os.rename(backup, out)
        raise
    shutil.rmtree(backup, ignore_errors=True)


def _load_renameat2() -> object:
    try:
        func = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func


_renameat2 = _load_renameat2() if sys.platform.startswith("linux") else None
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; ``FileExistsError`` if ``dst`` exists, which is never replaced."""
    if _renameat2 is not None:
        rc = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)  # type: ignore[operator]
        if rc == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(code, os.strerror(code), str(dst))
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(dst))
    if src.is_dir():
        # No atomic test-and-rename for folders here: only an empty folder created in between could be replaced.
        if path_exists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
        try:
            os.rename(src, dst)
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
            raise
        return
    try:
        os.link(src, dst)  # fails if dst exists
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links
        if path_exists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones this call created, outermost first."""
    missing: list[Path] = []
    f = folder if str(folder) else Path(".")
    while not path_exists(f) and f != f.parent:
        missing.append(f)
        f = f.parent
    created: list[Path] = []
    for f in reversed(missing):
        try:
            f.mkdir()
        except FileExistsError:
            continue
        created.append(f)
    return created


def _remove_folders(created: list[Path]) -> None:
    for f in reversed(created):
        try:
            f.rmdir()  # only if empty: another run may have put something there meanwhile
        except OSError:
            return


def _remove(tmp: Path) -> None:
    try:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    except OSError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
