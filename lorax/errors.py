"""Domain errors. The library raises these; only the CLI turns them into one line and an exit code."""

from __future__ import annotations

from pathlib import Path

# What an error names: the file (or folder) it is about, if any (``LoraxError(..., path=...)``).
ErrorPath = str | Path | None


class LoraxError(Exception):
    """Base of every error lorax reports to a user. The message is one line: what is wrong and what to do."""

    exit_code = 1

    def __init__(self, message: str, *, path: ErrorPath = None) -> None:
        self.path = str(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)


class InputError(LoraxError):
    """A file or folder given by the user cannot be used (missing, unreadable, malformed)."""


class FormatError(InputError):
    """A file's content does not follow the format it claims or that was detected."""


class UnsafeFileError(InputError):
    """A pickle that needs more than plain tensors to load; its code was never run."""


class ConfigError(LoraxError):
    """Flags or config-file values that do not work together."""


class MismatchError(LoraxError):
    """A LoRA or embedding that does not fit the model it is applied to."""


class OutputExistsError(LoraxError):
    """The output exists and --force was not given."""


class ModelNotFoundError(LoraxError):
    """A model id or path that cannot be resolved (offline, missing, not a model)."""


class TrainingError(LoraxError):
    """Training cannot continue (NaN loss, out of memory …)."""


class Interrupted(LoraxError):
    """The user stopped a run (Ctrl-C); the message says how to continue it."""

    exit_code = 130
