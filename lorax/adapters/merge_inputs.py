"""Reading LoRAs for a merge into a model: each resolved against the base's own modules (or, for lora_diffusion's
index files, the base built with its real classes), its family checked against the base's, and the families whose
LoRAs lorax cannot merge yet refused in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.errors import MismatchError

if TYPE_CHECKING:
    from lorax.adapters.state import LoraState


def base_index_model(base: str | Path) -> Callable[[], dict[str, Any]]:
    """A lazy ``{component: meta module}`` of BASE with its real classes, for lora_diffusion's index order (built once,
    only when an index file is merged; ``{}`` when a single file carries no configs and none is cached)."""
    from functools import cache

    from lorax.errors import ModelNotFoundError

    @cache
    def build() -> dict[str, Any]:
        from lorax.models.skeleton import load_skeleton

        try:
            return load_skeleton(base)[0]
        except ModelNotFoundError:
            return {}

    return build


def read_index_file(path: Path, model: dict[str, Any], family: str | None, base: str) -> LoraState:
    from lorax.formats import load_lora

    try:
        return load_lora(path, model=model, family=family)
    except MismatchError as err:
        text = str(err)
        if err.path is not None:
            text = text.removeprefix(f"{err.path}: ")
        raise MismatchError(f"does not fit the base {base}: {text}", path=path) from None


def read_for_base(
    path: Path,
    fmt: str,
    family: str | None,
    base: str,
    skeleton: dict[str, Any] | None = None,
    index_model: Callable[[], dict[str, Any]] | None = None,
) -> LoraState:
    """One LoRA read for a merge into the base ``base`` of ``family``. Names resolve against ``skeleton`` (the base's
    own module paths) when given; a LoRA with modules the base lacks is read again by the family's tables, so that
    the plan can name what does not match. lora_diffusion files (modules by index) resolve against
    ``index_model()``, BASE built with its real classes. A LoRA of another family is refused."""
    from lorax.formats import load_lora

    refuse_unmergeable(path)
    declared = declared_family(path)
    if family and declared and declared != family:
        raise MismatchError(f"is a {declared} LoRA but the base model is {family}", path=path)
    state = None
    if skeleton and fmt != "lora_diffusion":
        try:
            state = load_lora(path, model=skeleton, family=family)
        except MismatchError:
            state = None
    elif fmt == "lora_diffusion" and index_model is not None:
        model = index_model()
        if model:  # indices resolve against BASE's own modules, in BASE's own order
            state = read_index_file(path, model, family, base)
    if state is None:
        state = load_lora(path, family=family)
    state.family = state.family or declared or family
    if family and state.family and state.family != family:
        raise MismatchError(f"is a {state.family} LoRA but the base model is {family}", path=path)
    return state


def refuse_unmergeable(path: Path) -> None:
    """One line for a LoRA of a family whose LoRAs lorax cannot apply to a model yet (``Family.mergeable``: Flux)."""
    from lorax.errors import ConfigError
    from lorax.formats import is_safetensors
    from lorax.io.safetensors_io import read_header
    from lorax.models import families

    if not is_safetensors(path):
        return
    header = read_header(path)
    family = families.detect(metadata=header.metadata) or families.detect(lora_keys=list(header.tensors))
    found = families.find(family)
    if found is not None and not found.mergeable:
        raise ConfigError(f"merging {found.label} LoRAs into a model is not supported yet", path=path)


def declared_family(path: Path) -> str | None:
    """The family a LoRA file's header declares (lorax's ``lorax_family`` or kohya's ``ss_base_model_version``)."""
    from lorax.io.safetensors_io import read_header
    from lorax.models import families

    if path.is_dir() or path.suffix.lower() != ".safetensors":
        return None
    meta = read_header(path).metadata
    if meta.get("lorax_family"):
        return meta["lorax_family"]
    return families.detect(metadata=meta)
