"""Several concepts in one run: ``--concept DIR:PROMPT[:REPEATS]`` (repeatable) or ``[[concepts]]`` tables in the
``--config`` TOML. Each concept is one kohya subset (``lorax.data.kohya.Subset``): its images train ``REPEATS`` times
per epoch, an image without a caption file (``.caption``, then ``.txt``) is captioned ``PROMPT`` (kohya's
``class_tokens``), and the metadata's ``ss_dataset_dirs`` / ``ss_tag_frequency`` list each folder.

Per-concept prior preservation (``[[concepts]]`` only): ``class_prompt`` (what encodes the concept's class images),
``class_dir`` (a folder of them; else they are generated from the prompt) and ``num_class_images``. The config keeps
them as ``concept_class`` strings ``CLASS_DIR:CLASS_PROMPT:COUNT`` (dir and count may be empty), one per concept;
a batch draws each instance example's class example from its own concept's images."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.errors import ConfigError

if TYPE_CHECKING:
    from lorax.data.kohya import Subset

_TABLE_KEYS = ("dir", "prompt", "repeats", "class_prompt", "class_dir", "num_class_images")
_CLASS_KEYS = _TABLE_KEYS[3:]


@dataclass(frozen=True)
class ConceptClass:
    """One concept's class images: ``folder`` (``None``: generated from ``prompt``), at most ``count`` of them
    (``None``: the run's ``num_class_images``)."""

    folder: Path | None
    prompt: str
    count: int | None = None

    @classmethod
    def parse(cls, spec: str) -> ConceptClass:
        """A ``concept_class`` string ``CLASS_DIR:CLASS_PROMPT:COUNT`` (as ``spec`` writes it)."""
        folder, _, rest = spec.partition(":")
        prompt, _, count = rest.rpartition(":")
        return cls(Path(folder) if folder else None, prompt, int(count) if count else None)

    def spec(self) -> str:
        count = "" if self.count is None else str(self.count)
        return f"{self.folder if self.folder is not None else ''}:{self.prompt}:{count}"


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


def concept_subsets(specs: list[str]) -> list[Subset]:
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


def concepts_from_toml(tables: Any, path: Path) -> tuple[list[str], list[str]]:
    """``[[concepts]]`` tables (``dir``, ``prompt``, optional ``repeats`` and class settings) as ``--concept``
    values and ``concept_class`` values (empty when no table has class settings; ``""`` for a table without); a
    relative ``dir`` or ``class_dir`` is relative to the TOML's folder."""
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError("concepts must be [[concepts]] tables (dir, prompt, repeats)", path=path)
    specs, classes = [], []
    for i, table in enumerate(tables, 1):
        unknown = sorted(set(table) - set(_TABLE_KEYS))
        if unknown:
            raise ConfigError(
                f"[[concepts]] #{i}: unknown key(s) {', '.join(unknown)} (keys: {', '.join(_TABLE_KEYS)})",
                path=path,
            )
        if not isinstance(table.get("dir"), str) or not isinstance(table.get("prompt"), str):
            raise ConfigError(f"[[concepts]] #{i} needs dir and prompt (strings)", path=path)
        repeats = table.get("repeats", 1)
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise ConfigError(
                f"[[concepts]] #{i}: repeats must be an integer ≥ 1 (got {repeats!r})", path=path
            )
        specs.append(f"{_beside(table['dir'], path)}:{table['prompt']}:{repeats}")
        classes.append(_class_from_table(table, i, path))
    return specs, (classes if any(classes) else [])


def _beside(folder: str, path: Path) -> Path:
    found = Path(folder).expanduser()
    return found if found.is_absolute() else path.parent / found


def _class_from_table(table: dict[str, Any], i: int, path: Path) -> str:
    """A table's class settings as a ``concept_class`` string (``""`` without any)."""
    given = [k for k in _CLASS_KEYS if k in table]
    if not given:
        return ""
    prompt, folder, count = table.get("class_prompt"), table.get("class_dir"), table.get("num_class_images")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(
            f"[[concepts]] #{i}: {', '.join(given)} needs class_prompt (the caption its class images train with)",
            path=path,
        )
    if folder is not None and (not isinstance(folder, str) or ":" in str(_beside(folder, path))):
        raise ConfigError(
            f"[[concepts]] #{i}: class_dir must be a path without ':' (got {folder!r})", path=path
        )
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
        raise ConfigError(
            f"[[concepts]] #{i}: num_class_images must be an integer ≥ 1 (got {count!r})", path=path
        )
    return ConceptClass(None if folder is None else _beside(folder, path), prompt.strip(), count).spec()


def concept_tables(concepts: list[str], classes: list[str]) -> str:
    """``--concept`` values and their ``concept_class`` values as ``[[concepts]]`` TOML tables (absolute paths,
    so the file means the same wherever it is read from): what ``concepts_from_toml`` reads back."""
    from lorax.data.tomlfile import toml_value

    blocks = []
    for i, spec in enumerate(concepts):
        folder, prompt, repeats = parse_concept(spec)
        lines = [
            "[[concepts]]",
            f"dir = {toml_value(os.path.abspath(folder))}",
            f"prompt = {toml_value(prompt)}",
            f"repeats = {repeats}",
        ]
        own = ConceptClass.parse(classes[i]) if i < len(classes) and classes[i] else None
        if own is not None:
            lines.append(f"class_prompt = {toml_value(own.prompt)}")
            if own.folder is not None:
                lines.append(f"class_dir = {toml_value(os.path.abspath(own.folder))}")
            if own.count is not None:
                lines.append(f"num_class_images = {own.count}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def class_dir_problems(classes: list[str], concepts: list[str]) -> list[str]:
    """Per-concept class settings that cannot be used: not one per concept, or a class_dir without images."""
    from lorax.data.images import find_images

    if not classes:
        return []
    if len(classes) != len(concepts) or not all(classes):
        return [
            "[[concepts]] class settings: give class_prompt (and class_dir or num_class_images) in every "
            "[[concepts]] table, or in none (a batch pairs each concept's images with its own class images)"
        ]
    p = []
    for spec in classes:
        folder = ConceptClass.parse(spec).folder
        if folder is None:
            continue
        if not folder.is_dir():
            p.append(f"[[concepts]] class_dir {folder} does not exist")
        elif not find_images(folder):
            p.append(f"[[concepts]] class_dir {folder} has no images")
    return p
