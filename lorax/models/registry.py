"""Built-in models: names that lorax resolves to a diffusers folder shipped inside the package.

``--model shapes`` is the tiny Stable-Diffusion-architecture model trained on the shapes world
(``lorax/zoo/shapes``; see docs/model-card.md). Standard library only, so the CLI can resolve names cheaply.
"""

from __future__ import annotations

from pathlib import Path

from lorax.errors import ModelNotFoundError

_ZOO = Path(__file__).resolve().parent.parent / "zoo"

BUILTIN_MODELS: dict[str, Path] = {
    "shapes": _ZOO / "shapes" / "model",
}


def resolve_builtin(name: str) -> Path | None:
    """The packaged diffusers folder for a built-in model name, or ``None`` if ``name`` is not a built-in name.

    Raises:
        ModelNotFoundError: the name is built in but its folder is missing (an install without package data).
    """
    folder = BUILTIN_MODELS.get(name)
    if folder is None:
        return None
    if not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"the built-in model {name!r} is missing from this install (no model_index.json); "
            "reinstall lorax, or rebuild it with `make shapes-model`",
            path=folder,
        )
    return folder
