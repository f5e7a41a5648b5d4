"""The click that Typer runs on: recent Typer vendors its own copy (``typer._click``), older Typer uses click."""

from __future__ import annotations

try:  # typer >= 0.24 vendors click
    from typer import _click as click  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - older typer
    import click  # type: ignore[no-redef]

__all__ = ["click"]
