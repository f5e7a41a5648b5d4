"""Helpers shared by the command modules: output rendering, progress, JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from lorax.cli.app import STATE

JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
ForceOption = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")]


def _default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return asdict(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def to_json(obj: Any) -> str:
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = asdict(obj)
    return json.dumps(obj, default=_default, sort_keys=False)


def print_json(obj: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(to_json(obj) + "\n")
    sys.stdout.flush()


def stdout_console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(file=sys.stdout, soft_wrap=True)


def stderr_console():  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(file=sys.stderr, stderr=True, soft_wrap=True)


class RichTask:
    def __init__(self, progress: Any, task_id: Any) -> None:
        self._progress = progress
        self._id = task_id

    def advance(self, n: float = 1) -> None:
        self._progress.advance(self._id, n)

    def update(self, **fields: Any) -> None:
        known: dict[str, Any] = {
            k: fields.pop(k) for k in ("completed", "total", "description") if k in fields
        }
        if fields:
            info = "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()
            )
            known["info"] = info
        self._progress.update(self._id, **known)

    def __enter__(self) -> RichTask:
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.remove_task(self._id)


class _LogOnlyTask:
    def advance(self, n: float = 1) -> None:
        pass

    def update(self, **fields: Any) -> None:
        pass

    def __enter__(self) -> _LogOnlyTask:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class CliProgress:
    """Renders the service progress protocol: rich bars on an interactive stderr, nothing otherwise."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet or STATE.quiet
        self.interactive = sys.stderr.isatty() and not self.quiet
        self._rich: Any = None

    def __enter__(self) -> CliProgress:
        if self.interactive:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._rich = Progress(
                SpinnerColumn(),
                TextColumn("[progress.description]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=stderr_console(),
                transient=True,
            )
            self._rich.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)
            self._rich = None

    def task(self, description: str, total: float | None = None) -> Any:
        if self._rich is None:
            return _LogOnlyTask()
        return RichTask(self._rich, self._rich.add_task(description, total=total, info=""))

    def log(self, message: str) -> None:
        if self.quiet:
            return
        if self._rich is not None:
            self._rich.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=sys.stderr, flush=True)


@contextmanager
def cli_progress() -> Iterator[CliProgress]:
    with CliProgress() as progress:
        yield progress
