"""The ``lorax`` Typer app: global options, error rendering, and command registration.

Each command lives in ``lorax/cli/<name>.py`` and exposes ``register(app)``. Modules are found by name
(``COMMAND_ORDER``), so a command that is not ready is simply absent. Heavy libraries (torch, diffusers)
are imported inside the services, never at import time here, so ``lorax --help`` stays fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup

from lorax import __version__
from lorax.cli._click import click
from lorax.errors import LoraxError

# The order commands appear in --help. A module missing from lorax/cli is not registered.
COMMAND_ORDER = [
    "prepare",
    "train",
    "invert",
    "pivot",
    "generate",
    "score",
    "merge",
    "mix",
    "convert",
    "extract",
    "inspect",
]


class _State:
    debug: bool = bool(os.environ.get("LORAX_DEBUG"))
    quiet: bool = False


STATE = _State()


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


GLOBAL_FLAGS = ("-q", "--quiet", "--debug")


def hoist_global_flags(args: list[str]) -> list[str]:
    """``lorax train … -q`` as ``lorax -q train …``: the global flags are accepted after the command too."""
    args = list(args)
    end = args.index("--") if "--" in args else len(args)
    moved = [a for a in args[:end] if a in GLOBAL_FLAGS]
    if not moved:
        return args
    return moved + [a for a in args[:end] if a not in GLOBAL_FLAGS] + args[end:]


class LoraxCommand(TyperCommand):
    """Help text renders as typed: rich would take ``[[lora]]`` or ``linear[a]B`` for markup and drop it, and
    ``linear:A:B`` for an emoji."""

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        import rich.text
        from rich.markup import escape

        saved = [(p, getattr(p, "help", None)) for p in self.params]
        saved_help = self.help
        from_markup = rich.text.Text.from_markup
        # rich would also turn emoji codes into pictures: ``linear:A:B`` would show as ``linear🅰B``
        rich.text.Text.from_markup = classmethod(  # type: ignore[method-assign, assignment]
            lambda cls, text, **kw: from_markup(text, **{**kw, "emoji": False})
        )
        try:
            for param, text in saved:
                if text:
                    param.help = escape(text)  # type: ignore[attr-defined]
            if self.help:
                self.help = escape(self.help)
            super().format_help(ctx, formatter)
        finally:
            rich.text.Text.from_markup = from_markup  # type: ignore[method-assign]
            for param, text in saved:
                if text:
                    param.help = text  # type: ignore[attr-defined]
            self.help = saved_help


class LoraxGroup(TyperGroup):
    """Turns lorax's domain errors into one line on stderr and exit code 1 (tracebacks only with --debug)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # registration order, not alphabetical

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_flags(args))

    def invoke(self, ctx: click.Context) -> Any:
        from lorax.io.atomic import SignalsAsInterrupt

        try:
            with SignalsAsInterrupt():  # SIGTERM and SIGHUP clean up like Ctrl-C
                return super().invoke(ctx)
        except (typer.Exit, typer.Abort, click.ClickException):
            raise
        except BrokenPipeError:
            reader_gone()
        except LoraxError as err:
            if STATE.debug:
                raise
            click.echo(f"lorax: error: {_one_line(str(err))}", err=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt as err:
            if STATE.debug:
                raise
            signum = getattr(err, "signum", None)
            if signum is None:
                click.echo("lorax: interrupted", err=True)
                raise typer.Exit(130) from None
            click.echo(f"lorax: interrupted by {err}", err=True)
            raise typer.Exit(128 + signum) from None
        except MemoryError:
            if STATE.debug:
                raise
            click.echo("lorax: error: out of memory", err=True)
            raise typer.Exit(1) from None
        except Exception as err:  # an unexpected failure: still one line unless --debug
            if STATE.debug:
                raise
            name = type(err).__name__
            click.echo(
                f"lorax: error: {name}: {_one_line(str(err))} (run with --debug for a traceback)", err=True
            )
            raise typer.Exit(1) from None


app = typer.Typer(
    name="lorax",
    cls=LoraxGroup,
    help="Low-Rank Adaptation of text-to-image diffusion models: prepare data; train, invert, pivot, merge, "
    "mix, convert, extract, generate and inspect LoRAs and embeddings.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorax {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bars or log lines on stderr.")
    ] = False,
) -> None:
    """lorax: LoRA for Stable Diffusion, from training to merging, in one CLI."""
    STATE.debug = debug or bool(os.environ.get("LORAX_DEBUG"))
    STATE.quiet = quiet


def register_commands() -> None:
    for name in COMMAND_ORDER:
        module_name = f"lorax.cli.{name}"
        if importlib.util.find_spec(module_name) is None:
            continue
        importlib.import_module(module_name).register(app)
    for info in app.registered_commands:
        info.cls = LoraxCommand


register_commands()


def reader_gone() -> NoReturn:
    """The pipe's reader has gone (``lorax … | head``): stop quietly with exit code 1, as click itself does.

    What is still buffered for stdout is dropped (its reader is gone) rather than failing again at exit; files
    already written stay written, and a command interrupted mid-write has cleaned up like any other exception.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout already closed or not a real file
        pass
    sys.exit(1)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # --help or a usage error written before any command ran
        reader_gone()
    except KeyboardInterrupt:
        print("lorax: interrupted", file=sys.stderr)
        sys.exit(130)
