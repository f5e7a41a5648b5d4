"""Several concepts in one run: ``--concept DIR:PROMPT[:REPEATS]`` (repeatable) or ``[[concepts]]`` tables in the
``--config`` TOML. Each concept is one kohya subset (``lorax.data.kohya.Subset``): its images train ``REPEATS`` times
per epoch, an image without a caption file (``.caption``, then ``.txt``) is captioned ``PROMPT`` (kohya's
``class_tokens``), and the metadata's ``ss_dataset_dirs`` / ``ss_tag_frequency`` list each folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorax.errors import ConfigError

_TABLE_KEYS = ("dir", "prompt", "repeats")


def parse_concept(spec: str) -> tuple[Path, str, int]:
    """``DIR:PROMPT[:REPEATS]`` → ``(DIR, PROMPT, REPEATS)``; the folder is everything before the first colon."""
    folder, sep, rest = spec.partition(":")
    if not sep or not folder or not rest.strip():
        raise ConfigError(
            f"--concept {spec!r}: expected DIR:PROMPT[:REPEATS] (e.g. 'photos/dog:a sks dog:10')"
        )
    prompt, repeats = rest, 1
    head, sep, tail = rest.rpartition(":")
    if sep and tail.strip().lstrip("-").isdigit():
        prompt, repeats = head, int(tail)
    if repeats < 1:
        raise ConfigError(f"--concept {spec!r}: REPEATS must be ≥ 1 (got {repeats})")
    if not prompt.strip():
        raise ConfigError(f"--concept {spec!r}: the prompt is empty")
    return Path(folder).expanduser(), prompt.strip(), repeats


def concept_subsets(specs: list[str]) -> list[Any]:
    """The kohya subsets of ``--concept`` values (one per concept; a folder named twice is refused)."""
    from lorax.data.kohya import Subset

    subsets, seen = [], set()
    for spec in specs:
        folder, prompt, repeats = parse_concept(spec)
        key = folder.resolve()
        if key in seen:
            raise ConfigError(f"--concept {spec!r}: folder {folder} is already a concept")
        seen.add(key)
        subsets.append(Subset(folder, repeats, prompt))
    return subsets


def concepts_from_toml(tables: Any, path: Path) -> list[str]:
    """``[[concepts]]`` tables (``dir``, ``prompt``, optional ``repeats``) as ``--concept`` values; a relative
    ``dir`` is relative to the TOML's folder."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("concepts must be [[concepts]] tables (dir, prompt, repeats)", path=path)
    specs = []
    for i, table in enumerate(tables, 1):
        unknown = sorted(set(table) - set(_TABLE_KEYS))
        if unknown:
            raise ConfigError(
                f"[[concepts]] #{i}: unknown key(s) {', '.join(unknown)} (keys: dir, prompt, repeats)",
                path=path,
            )
        if not isinstance(table.get("dir"), str) or not isinstance(table.get("prompt"), str):
            raise ConfigError(f"[[concepts]] #{i} needs dir and prompt (strings)", path=path)
        repeats = table.get("repeats", 1)
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise ConfigError(
                f"[[concepts]] #{i}: repeats must be an integer ≥ 1 (got {repeats!r})", path=path
            )
        folder = Path(table["dir"]).expanduser()
        if not folder.is_absolute():
            folder = path.parent / folder
        specs.append(f"{folder}:{table['prompt']}:{repeats}")
    return specs
