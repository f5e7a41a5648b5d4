"""A TOML file read with one-line errors naming it (``--config`` files, kohya's dataset configs)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from lorax.errors import InputError


def read_toml(path: Path, missing: str) -> dict[str, Any]:
    """The parsed document of ``path``; ``InputError`` naming the file when it is not there (``missing``, e.g.
    ``"config file not found"``) or not valid TOML."""
    if not path.is_file():
        raise InputError(missing, path=path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"not valid TOML ({err})", path=path) from None


def toml_value(value: Any) -> str:
    """A value as TOML (what a resolved config and ``[[concepts]]`` tables write)."""
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid TOML basic string
