"""What ``lorax train``, ``lorax invert`` and ``lorax pivot`` do around their service: the flags the user gave
(``given_flags``, so a ``--config`` file's values are not overridden by defaults), the model line announced when the
command line did not name one, the service run (``run_service``) and the summary printed at the end."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from lorax.cli.common import cli_progress, print_json

C = TypeVar("C", bound="TrainConfig")
R = TypeVar("R")

if TYPE_CHECKING:
    from lorax.progress import Progress, Task
    from lorax.services.invert import InvertResult
    from lorax.services.pivot import PivotResult
    from lorax.training.config import TrainConfig


def config_params(fn: Callable[..., None]) -> list[str]:
    """The parameters of command ``fn`` that are config keys (all but ctx, --config and --json)."""
    names = inspect.signature(fn).parameters
    return [n for n in names if n not in ("ctx", "config", "json_out")]


def given_flags(ctx: typer.Context, values: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The options the user actually gave (so a --config file's values are not overridden by defaults)."""
    given: dict[str, Any] = {}
    for name in names:
        source = ctx.get_parameter_source(name)
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT", "PROMPT"):
            given[name] = values[name]
    if given.get("validation_prompt") is None:
        given.pop("validation_prompt", None)
    return given


def model_origin(given: dict[str, Any], config_file: Path | None, config: TrainConfig) -> str | None:
    """Where the run's model comes from when the command line did not name it (``None`` when it did)."""
    if given.get("model") is not None:
        return None
    from lorax.training.config import load_toml, resumed_config

    file = config_file
    if file is None and given.get("resume") is not None:
        file = resumed_config(given["resume"])
    if file is not None and load_toml(file, type(config)).get("model") is not None:
        return f"from {file}"
    from lorax.models.registry import BUILTIN_MODELS, default_model

    spec, where = default_model()
    if where == "built in":
        size = ""
        from lorax.models.defaults import model_defaults

        found = model_defaults(spec).size if spec in BUILTIN_MODELS else None
        if found is not None:
            size = f" {found[0]}×{found[1]}"
        return f"lorax's built-in{size} toy model; name yours with --model or LORAX_MODEL"
    return f"from {where}"


class AnnouncingProgress:
    """A progress reporter whose first output is a held line (``model: shapes (…)``): it appears before the run's
    first line or bar, or at ``flush()``; a run that fails before saying anything prints only its error."""

    def __init__(self, inner: Progress, line: str | None) -> None:
        self.inner = inner
        self.line = line

    def flush(self) -> None:
        if self.line is not None:
            line, self.line = self.line, None
            self.inner.log(line)

    def task(self, description: str, total: float | None = None) -> Task:
        self.flush()
        return self.inner.task(description, total)

    def log(self, message: str) -> None:
        self.flush()
        self.inner.log(message)


def announce_model(
    progress: Progress, given: dict[str, Any], config_file: Path | None, config: TrainConfig
) -> AnnouncingProgress:
    """``progress`` whose first line names the model when the command line did not (``model: shapes (…)``)."""
    origin = model_origin(given, config_file, config)
    return AnnouncingProgress(progress, f"model: {config.model} ({origin})" if origin is not None else None)


def print_summary(result: InvertResult | PivotResult, what: str, model: str | None = None) -> None:
    """OUTPUT on stdout; on stderr (unless --quiet) ``what``, the model, the final loss, time, size and the loss
    curve."""
    from lorax.cli.app import STATE
    from lorax.cli.common import stderr_console, stdout_console

    stdout_console().print(str(result.output), markup=False, highlight=False)
    if STATE.quiet or not result.output.exists():
        return
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "-"
    on = f"; model {model}" if model is not None else ""
    stderr_console().print(
        f"{what}{on}; final loss {loss}, {result.seconds:.1f}s; {result.file_bytes / 1e3:.1f} kB; "
        f"loss curve {result.loss_png}"
        + (f"; samples sheet {result.samples_png}" if getattr(result, "samples_png", None) else ""),
        markup=False,
        highlight=False,
    )


def run_service(
    ctx: typer.Context,
    flags: dict[str, Any],
    names: list[str],
    config_class: type[C],
    service: Callable[[C, Progress], R],
) -> tuple[C, R] | None:
    """The command's config (``--config`` under the flags given), ``service`` run on it with progress bars; the
    result printed as JSON with ``--json`` (then ``None``), else the config and result for the command's summary."""
    given = given_flags(ctx, flags, names)
    cfg = config_class.from_sources(given, flags["config"])
    assert isinstance(cfg, config_class)
    with cli_progress() as bars:
        progress = announce_model(bars, given, flags["config"], cfg)
        result = service(cfg, progress)
        progress.flush()
    if flags["json_out"]:
        print_json(result)
        return None
    return cfg, result
