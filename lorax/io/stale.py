"""What a killed run left for an output (temp files and folders, reported and removed with ``--force``, never
those a running lorax still holds), and whether a run's output fits on its disk. ``lorax.io.atomic`` checks both
before it writes.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

from lorax.errors import InputError, OutputExistsError

try:
    import fcntl
except ImportError:  # not POSIX: no locks, so no temp file is ever taken for stale
    fcntl = None  # type: ignore[assignment]

_TEMP_SUFFIXES = ("tmp", "old", "work")


def path_exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def nearest_existing(folder: Path) -> Path:
    folder = folder if str(folder) else Path(".")
    while not path_exists(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


# ---- temp files of earlier runs ------------------------------------------------------------------------------


def _temp_names(out: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(out.name)}\.[0-9a-f]{{12}}\.({'|'.join(_TEMP_SUFFIXES)})")


def temp_files(out: str | Path) -> list[tuple[Path, bool]]:
    """The temp files and folders lorax made for ``out``, each with whether a running lorax still holds it."""
    out = Path(out)
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        return []
    pattern = _temp_names(out)
    try:
        names = sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name) and not p.is_symlink())
    except OSError:
        return []
    return [(p, _held(p)) for p in names]


def _held(path: Path) -> bool:
    if fcntl is None:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops the lock we may have taken
    return False


def check_temps(out: Path, force: bool) -> None:
    if os.environ.get("RANK", "0") != "0":  # under torchrun one process looks
        return
    for path, held in temp_files(out):
        if held:
            if not force:
                raise OutputExistsError(
                    f"another lorax run is writing it now ({path.name}); wait for it to finish, or pass --force "
                    "to overwrite its result",
                    path=out,
                )
            continue
        kind = "folder" if path.is_dir() else "file"
        size, age = _size(path), _age(path)
        if force:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            notice(
                f"{out}: removed the stale temp {kind} {path.name} ({size}, {age} old) of an interrupted run"
            )
        else:
            notice(
                f"{out}: a stale temp {kind} {path.name} ({size}, {age} old) is left from an interrupted run; "
                "pass --force to remove it"
            )


def notice(message: str) -> None:
    """A warning line on stderr (stale temp files): the user should hear of gigabytes left on the disk."""
    print(f"lorax: warning: {message}", file=sys.stderr, flush=True)


def _size(path: Path) -> str:
    try:
        if path.is_dir():
            n = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        else:
            n = path.stat().st_size
    except OSError:
        n = 0
    return _human(n)


def _age(path: Path) -> str:
    try:
        s = max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        s = 0.0
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.0f} h"
    return f"{s / 86400:.0f} d"


def check_free_space(out: str | Path, need_bytes: int, what: str) -> None:
    """Refuse to start a run whose ``what`` (about ``need_bytes``) would not fit on the output's disk."""
    out = Path(out)
    folder = nearest_existing(out if out.is_dir() else out.parent)
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if need_bytes > free:
        raise InputError(
            f"{what} need about {_human(need_bytes)} and the disk has {_human(free)} free; free some space "
            "or choose another place",
            path=out,
        )


def _human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"
