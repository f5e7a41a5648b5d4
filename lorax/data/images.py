"""Image folders and their captions.

A training folder holds images (``.png .jpg .jpeg .webp .bmp .gif .tif .tiff``), optionally captioned by
``<image stem>.txt`` beside each image or by a ``metadata.jsonl`` (one ``{"file_name": ..., "text": ...}`` per line,
the Hugging Face image-folder convention; ``caption`` / ``prompt`` are accepted for ``text``). An image without a
caption takes the instance prompt. Unreadable images are named and skipped, or refused with ``strict``.
``NAME.mask.png`` files (loss masks beside their images, as ``lorax prepare`` writes them) are not images.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorax.errors import InputError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
_CAPTION_FIELDS = ("text", "caption", "prompt")


@dataclass(frozen=True)
class ImageItem:
    """One readable training image, its caption and its size ``(width, height)``."""

    path: Path
    caption: str
    size: tuple[int, int]
    repeats: int = 1  # kohya's per-folder repeats (times the run's --repeats)
    options: Any = None  # a kohya subset's caption/augmentation settings (lorax.data.kohya.SubsetOptions)


MASK_SUFFIX = ".mask"  # NAME.mask.png: the loss mask of NAME.png


def is_mask_file(path: Path) -> bool:
    """``NAME.mask.png`` (any image extension): a loss mask, not a training image."""
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.stem.lower().endswith(MASK_SUFFIX)


def has_mask_files(folder: Path) -> bool:
    """Whether ``folder`` or a sub-folder of it holds a ``NAME.mask.png`` (``lorax prepare``'s loss masks)."""
    if not folder.is_dir():
        return False
    for path in folder.iterdir():
        if is_mask_file(path) or (path.is_dir() and any(is_mask_file(p) for p in path.iterdir())):
            return True
    return False


def find_images(folder: Path, *, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` sorted by relative path (so captions never misalign with images); masks
    (``NAME.mask.png``) left out."""
    pattern = "**/*" if recursive else "*"
    return sorted(
        (
            p
            for p in folder.glob(pattern)
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not is_mask_file(p)
        ),
        key=lambda p: p.relative_to(folder).as_posix(),
    )


def read_text_file(path: Path) -> str:
    """A caption (or captions) file's text: UTF-8, else one line naming the file and the first bad byte."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise InputError(
            f"is not UTF-8 text (byte 0x{err.object[err.start]:02x} at position {err.start}); save it as UTF-8",
            path=path,
        ) from None
    except OSError as err:
        raise InputError(f"cannot be read ({err.strerror or err})", path=path) from None


def read_metadata_jsonl(folder: Path) -> dict[str, str]:
    """Captions from ``folder/metadata.jsonl`` keyed by the image's path relative to ``folder``."""
    path = folder / "metadata.jsonl"
    if not path.exists():
        return {}
    captions: dict[str, str] = {}
    for number, line in enumerate(read_text_file(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"line {number} is not JSON ({err.msg})", path=path) from None
        if not isinstance(row, dict) or "file_name" not in row:
            raise InputError(f"line {number} has no file_name", path=path)
        text = next((row[k] for k in _CAPTION_FIELDS if k in row), None)
        if not isinstance(text, str):
            raise InputError(f"line {number} has no text (or caption) string", path=path)
        captions[Path(str(row["file_name"])).as_posix()] = text.strip()
    return captions


def read_image_file(path: Path, option: str, mode: str = "RGB") -> Any:
    """The image an option names (``--init-image``, ``--mask-image``), loaded and converted to ``mode``; a missing or
    unreadable file is one line naming it."""
    from PIL import Image, UnidentifiedImageError

    what = option.lstrip("-").replace("-", " ")
    if not path.is_file():
        raise InputError(f"no such image file ({option})", path=path)
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert(mode)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise InputError(f"cannot read the {what}: {' '.join(str(err).split())}", path=path) from None


def image_size(path: Path) -> tuple[int, int]:
    """Open and decode ``path`` fully (so truncated files are caught now), returning ``(width, height)``."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.size


def checked_size(path: Path, strict: bool) -> tuple[int, int] | str:
    """``(width, height)`` of an image file, or why it cannot be read (the error's name); with ``strict`` an
    unreadable image is an ``InputError`` instead."""
    try:
        return image_size(path)
    except Exception as err:
        if strict:
            raise InputError(
                f"unreadable image ({type(err).__name__}: {err}); remove it or drop --strict", path=path
            ) from None
        return type(err).__name__


def load_image_folder(
    folder: str | Path,
    *,
    instance_prompt: str | None = None,
    strict: bool = False,
    recursive: bool = False,
    warn: Callable[[str], None] | None = None,
    what: str = "training",
) -> list[ImageItem]:
    """Read a folder of training images with their captions.

    Args:
        folder: the image folder.
        instance_prompt: caption for images without their own (``.txt`` or ``metadata.jsonl``).
        strict: raise on the first unreadable image instead of naming it through ``warn`` and skipping it.
        recursive: include images in sub-folders.
        warn: called with one line per skipped image.
        what: the folder's role in messages (``training``, ``class``).

    Raises:
        InputError: a missing or empty folder, no readable image, or an image with no caption and no instance prompt.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{what} image folder does not exist", path=folder)
    if not folder.is_dir():
        raise InputError(f"{what} images must be a folder of images, not a file", path=folder)
    paths = find_images(folder, recursive=recursive)
    if not paths:
        exts = " ".join(sorted(IMAGE_EXTENSIONS))
        raise InputError(f"no images in the {what} folder (looked for {exts})", path=folder)
    metadata = read_metadata_jsonl(folder)
    items: list[ImageItem] = []
    skipped: list[tuple[Path, str]] = []
    for path in paths:
        size = checked_size(path, strict)
        if isinstance(size, str):
            skipped.append((path, size))
            continue
        rel = path.relative_to(folder).as_posix()
        caption = metadata.get(rel)
        if caption is None:
            txt = path.with_suffix(".txt")
            caption = read_text_file(txt).strip() if txt.exists() else None
        if caption is None:
            caption = instance_prompt
        if caption is None:
            raise InputError(
                "has no caption (no .txt beside it, no metadata.jsonl entry); pass --instance-prompt",
                path=path,
            )
        items.append(ImageItem(path, caption, size))
    if not items:
        first, why = skipped[0]
        raise InputError(
            f"none of the {len(skipped)} images in the {what} folder can be read (e.g. {first.name}: {why})",
            path=folder,
        )
    for path, why in skipped:
        if warn is not None:
            warn(f"skipping unreadable image {path} ({why})")
    return items
