"""The progress protocol services report through. The CLI renders it with rich; tests use ``NullProgress``.

Services never draw on the terminal: they call ``progress.task(...)`` and ``progress.log(...)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Task(Protocol):
    def advance(self, n: float = 1) -> None: ...

    def update(self, **fields: Any) -> None:
        """Set ``completed``, ``total``, ``description`` or free-form fields (``loss=…``) shown beside the bar."""

    def __enter__(self) -> Task: ...

    def __exit__(self, *exc: object) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: float | None = None) -> Task: ...

    def log(self, message: str) -> None:
        """A line for the user (stderr in the CLI; silent with --quiet)."""


class _NullTask(AbstractContextManager):
    def advance(self, n: float = 1) -> None:
        pass

    def update(self, **fields: Any) -> None:
        pass

    def __enter__(self) -> _NullTask:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class NullProgress:
    """Reports nothing. The default for library calls."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def task(self, description: str, total: float | None = None) -> Task:
        return _NullTask()

    def log(self, message: str) -> None:
        self.messages.append(message)


def track(progress: Progress, items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items`` while advancing a task of ``progress``."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress.task(description, total=total) as task:
        for item in items:
            yield item
            task.advance()
