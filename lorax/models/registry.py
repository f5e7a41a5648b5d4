"""Built-in models: names that lorax resolves to a diffusers folder shipped inside the package.

``--model shapes`` is the tiny Stable-Diffusion-architecture model trained on the shapes world
(``lorax/zoo/shapes``; see docs/model-card.md); ``--model shapes-flux`` is the tiny FLUX.1-architecture model
trained on the same world (``lorax/zoo/shapes_flux``; docs/model-card-flux.md). Standard library only, so the CLI
can resolve names cheaply.
"""

from __future__ import annotations

import os
from pathlib import Path

from lorax.errors import ConfigError
from lorax.io.model_paths import BUILTIN_MODELS, resolve_builtin

__all__ = ["BUILTIN_MODELS", "DEFAULT_MODEL", "default_model", "resolve_builtin", "user_config_path"]

# The model commands use when neither --model, a --config file, LORAX_MODEL nor the user config file names one.
DEFAULT_MODEL = "shapes"
USER_CONFIG_KEYS = ("model",)


def user_config_path() -> Path:
    """``$XDG_CONFIG_HOME/lorax/config.toml`` (``~/.config/lorax/config.toml`` when XDG_CONFIG_HOME is unset)."""
    base = os.environ.get("XDG_CONFIG_HOME", "").strip() or "~/.config"
    return Path(base).expanduser() / "lorax" / "config.toml"


def default_model() -> tuple[str, str]:
    """The model a command uses when none is named, and where that choice comes from: ``LORAX_MODEL``, else
    ``model = "..."`` in the user config file (a relative path there is relative to the file's folder), else the
    built-in ``shapes`` model.

    Raises:
        ConfigError: the user config file is not valid TOML or has keys other than ``model``.
    """
    env = os.environ.get("LORAX_MODEL", "").strip()
    if env:
        return env, "LORAX_MODEL"
    path = user_config_path()
    if path.is_file():
        import tomllib

        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"not valid TOML ({err})", path=path) from None
        unknown = sorted(set(data) - set(USER_CONFIG_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {', '.join(unknown)}; the user config file holds {', '.join(USER_CONFIG_KEYS)}",
                path=path,
            )
        model = data.get("model")
        if model is not None:
            if not isinstance(model, str) or not model.strip():
                raise ConfigError("model must be a model name, folder, file or Hub id (a string)", path=path)
            local = (path.parent / Path(model).expanduser()).absolute()
            return (str(local) if local.exists() else model), str(path)
    return DEFAULT_MODEL, "built in"
