"""Helpers shared by the command modules: output rendering, progress, JSON."""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from lorax.cli.app import STATE

JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
ForceOption = Annotated[bool, typer.Option("--force", "-f", help="Overwrite an existing output.")]
T = TypeVar("T")


def option(*names: str, help: str) -> Any:
    """A ``typer.Option`` whose default the help text already tells (or that has none worth showing)."""
    return typer.Option(*names, help=help, show_default=False)


def with_flags(*parts: Callable[..., None]) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """A command (``def command(ctx: typer.Context, **flags: Any)``) whose flags are the parameters of ``parts``, in
    their order: flag groups (``lorax.cli.training_options.token_flags``) and functions declaring the command's own
    flags."""

    def apply(command: Callable[..., None]) -> Callable[..., None]:
        params = [inspect.signature(command, eval_str=True).parameters["ctx"]]
        for part in parts:
            params += inspect.signature(part, eval_str=True).parameters.values()
        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]  # what Typer reads
        command.__annotations__ = {p.name: p.annotation for p in params} | {"return": None}
        return command

    return apply


def config_from(cls: type[T], flags: Mapping[str, Any], **given: Any) -> T:
    """A command's config: dataclass ``cls`` with each field the flag of its name holds, ``given`` (the flags a
    command renames or parses) over them. ``flags``: the command's parameters (``dict(locals())`` on entry)."""
    names = {f.name for f in fields(cls) if f.init}  # type: ignore[arg-type]  # cls is a dataclass
    return cls(**({k: v for k, v in flags.items() if k in names} | given))


def model_option(help: str, *, show_default: bool = True) -> Any:
    """``--model`` / ``-m``: the base model a command works with (``help`` says what for)."""
    return typer.Option("--model", "-m", help=help, show_default=show_default)


def to_option(help: str) -> Any:
    """``--to``: the format (or layout) a command writes; ``help`` names the choices and the default."""
    return typer.Option("--to", help=help)


def config_from_option(help: str) -> Any:
    """``--config-from``: where a single file lorax did not write takes its configs and tokenizer from."""
    return typer.Option("--config-from", help=help)


def dtype_option(default: str) -> Any:
    """``--dtype`` of the commands that write weights; ``default`` says where the precision comes from without it."""
    return typer.Option(help=f"Output precision: fp16, bf16 or fp32 (default: {default}).")


def run_and_report(
    run: Callable[[Any], T],
    *,
    json_out: bool,
    render: Callable[[T], None] | None = None,
    summary: Callable[[T], None] | None = None,
    as_json: Callable[[T], Any] | None = None,
) -> T:
    """The end of every command: ``run(progress)`` under the CLI's progress display, then ``summary`` (for people,
    on stderr, while the display is live; left out with --quiet), then the result: one JSON document with --json
    (``as_json`` of it when given), else ``render``."""
    with cli_progress() as progress:
        result = run(progress)
        if summary is not None and not progress.quiet:
            summary(result)
    if json_out:
        print_json(as_json(result) if as_json is not None else result)
    elif render is not None:
        render(result)
    return result


def table_report(
    output: Any,
    title: str,
    columns: Sequence[str],
    left: Sequence[str],
    rows: Iterable[Sequence[str]],
    *lines: str,
) -> None:
    """The output's path on stdout, then (unless --quiet) on stderr a table of ``rows`` for people, its ``columns``
    right-aligned but for those in ``left``, and ``lines`` under it."""
    from rich.table import Table

    console = path_then_console(output)
    if console is None:
        return
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    print_lines(console, *lines)


def print_lines(console: Any, *lines: str) -> None:
    """Each line as written: no rich markup or highlighting (paths and module names hold ``[`` and digits)."""
    for line in lines:
        console.print(line, markup=False, highlight=False)


def path_then_console(*paths: Any):  # type: ignore[no-untyped-def]
    """The output paths alone on stdout, one a line; the console for what people read (stderr), None with --quiet."""
    for path in paths:
        stdout_console().print(str(path), markup=False, highlight=False)
    return None if STATE.quiet else stderr_console()


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


DEFAULT_PROGRESS_INTERVAL = 10.0  # seconds between plain progress lines (LORAX_PROGRESS_INTERVAL)


def progress_interval() -> float:
    """Seconds between two plain progress lines: ``LORAX_PROGRESS_INTERVAL``, else 10."""
    import os

    text = os.environ.get("LORAX_PROGRESS_INTERVAL", "").strip()
    try:
        value = float(text) if text else DEFAULT_PROGRESS_INTERVAL
    except ValueError:
        value = DEFAULT_PROGRESS_INTERVAL
    return max(0.0, value)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def _field(name: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{name} {value:.3g}" if name == "lr" else f"{name} {value:.4g}"
    return f"{name} {value}"


class PlainTask:
    """A task as plain text lines for logs (stderr not a terminal): one line every ``interval`` seconds, like tqdm in
    a file — ``training: 150/600 (25%), loss 0.1234, lr 0.005, 2.51 it/s, 01:00 elapsed, ETA 03:00`` — and a last
    line when it ends if it printed any. A task without a total (a model load) says its name once, when it starts."""

    def __init__(
        self, write: Any, description: str, total: float | None, interval: float, clock: Any = None
    ) -> None:
        import time

        self._write = write
        self._clock = clock or time.monotonic
        self.description = description
        self.total = total
        self.interval = interval
        self.completed = 0.0
        self.fields: dict[str, Any] = {}
        self._started = self._last = self._clock()
        self._first: float | None = None  # ``completed`` when this session's timing began (resumed runs)
        self._printed = 0
        self._printed_at: float | None = None  # ``completed`` of the last line
        if total is None:
            self._write(f"{description} …")

    def advance(self, n: float = 1) -> None:
        if self._first is None:
            self._first = self.completed
        self._set(self.completed + n)

    def update(self, **fields: Any) -> None:
        if "description" in fields:
            self.description = str(fields.pop("description"))
        if "total" in fields:
            self.total = fields.pop("total")
        completed = fields.pop("completed", None)
        fields.pop("it/s", None)  # measured here, over the whole task
        self.fields.update(fields)
        if completed is not None:
            if self._first is None:  # where this session starts (a resumed run starts past 0)
                self._first = float(completed)
            self._set(float(completed))

    def _set(self, completed: float) -> None:
        self.completed = completed
        now = self._clock()
        if self.total is not None and now - self._last >= self.interval:
            self._last = now
            self._printed += 1
            self._printed_at = self.completed
            self._write(self.line(now))

    def line(self, now: float | None = None) -> str:
        now = self._clock() if now is None else now
        elapsed = now - self._started
        done = self.completed - (self._first or 0.0)
        parts = [f"{self.description}: {self.completed:g}"]
        if self.total:
            parts[0] += f"/{self.total:g} ({100 * self.completed / self.total:.0f}%)"
        parts += [_field(k, v) for k, v in self.fields.items()]
        rate = done / elapsed if elapsed > 0 else 0.0
        if rate > 0:
            parts.append(f"{rate:.3g} it/s" if rate >= 1 else f"{1 / rate:.3g} s/it")
        parts.append(f"{_duration(elapsed)} elapsed")
        if self.total and rate > 0 and self.completed < self.total:
            parts.append(f"ETA {_duration((self.total - self.completed) / rate)}")
        return ", ".join(parts)

    def __enter__(self) -> PlainTask:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._printed and exc[0] is None and self._printed_at != self.completed:
            self._write(self.line())


class CliProgress:
    """Renders the service progress protocol: rich bars on an interactive stderr; plain lines (``PlainTask``, no
    escape codes) every ``LORAX_PROGRESS_INTERVAL`` seconds when stderr is a file or pipe; nothing with --quiet."""

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
            if self.quiet:
                from lorax.progress import NullProgress

                return NullProgress().task(description, total)
            return PlainTask(self.log, description, total, progress_interval())
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
