"""The one grammar of ``PATH[:NUMBER[:NUMBER]]`` arguments (``merge``/``mix`` inputs, ``generate --lora``).

A path that exists as written is taken whole (Windows drives, files with colons in their names); otherwise up to
``most`` trailing ``:NUMBER`` parts are split off, right to left, stopping at the first part that is not a number or
that would leave no path.
"""

from __future__ import annotations

from pathlib import Path


def split_numbers(text: str, most: int) -> tuple[Path, list[float]]:
    """``text`` → ``(path, numbers)`` with at most ``most`` numbers, in the order written."""
    if Path(text).exists():
        return Path(text), []
    head, numbers = text, list[float]()
    for _ in range(most):
        rest, sep, tail = head.rpartition(":")
        if not sep or not rest:
            break
        try:
            numbers.insert(0, float(tail))
        except ValueError:
            break
        head = rest
    return Path(head), numbers
