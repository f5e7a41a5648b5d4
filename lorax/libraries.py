"""diffusers and transformers log load reports, warnings and progress bars of their own; lorax keeps its output to
one line per event, so it silences them: for good (``silence_libraries``, training runs) or for a block
(``quiet_libraries``, loading adapters), with the one list of what is silenced."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


def silence_libraries() -> None:
    """Errors only, no progress bars, from diffusers and transformers (until they are set otherwise)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for log in (dlog, tlog):
        log.set_verbosity_error()
        log.disable_progress_bar()


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """``silence_libraries`` for the block; their verbosity and progress bars come back as they were."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    saved = [(log, log.get_verbosity(), log.is_progress_bar_enabled()) for log in (dlog, tlog)]
    silence_libraries()
    try:
        yield
    finally:
        for log, level, bars in saved:
            log.set_verbosity(level)
            if bars:
                log.enable_progress_bar()
