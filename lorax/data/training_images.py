"""The images of a training run, read by kohya's conventions (``lorax.data.kohya``): ``--concept`` folders
(``lorax.data.concepts``), a ``--dataset_config`` TOML, ``N_name`` folders or a plain image folder, with kohya's
description of them (``ss_dataset_dirs``, ``ss_tag_frequency``, … in ``DatasetSummary``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lorax.data.kohya import (
    DatasetSpec,
    Subset,
    is_kohya_folder,
    read_caption,
    read_dataset_config,
    subsets_from_folder,
    tag_frequency,
)
from lorax.errors import ConfigError, InputError

if TYPE_CHECKING:
    from lorax.data.images import ImageItem


@dataclass
class DatasetSummary:
    """What kohya records about a dataset (``ss_dataset_dirs``, ``ss_reg_dataset_dirs``, ``ss_tag_frequency``)."""

    dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    reg_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    tags: dict[str, dict[str, int]] = field(default_factory=dict)
    trigger_words: list[str] = field(default_factory=list)

    def add(self, name: str, repeats: int, captions: list[str], *, is_reg: bool = False) -> None:
        info = self.reg_dirs if is_reg else self.dirs
        while name in info:  # two subsets of the same basename, as kohya's metadata editor keys them
            name += "_"
        info[name] = {"n_repeats": repeats, "img_count": len(captions)}
        if not is_reg:
            self.tags[name] = tag_frequency(captions)

    def metadata(self) -> dict[str, str]:
        return {
            "ss_dataset_dirs": json.dumps(self.dirs, ensure_ascii=False),
            "ss_reg_dataset_dirs": json.dumps(self.reg_dirs, ensure_ascii=False),
            "ss_tag_frequency": json.dumps(self.tags, ensure_ascii=False),
        }


def load_subset(
    subset: Subset, *, strict: bool = False, warn: Callable[[str], None] | None = None
) -> list[ImageItem]:
    """The readable images of one subset, captioned by their caption file, else the subset's class tokens."""
    from lorax.data.images import ImageItem, checked_size, find_images

    what = "class" if subset.is_reg else "training"
    if not subset.image_dir.is_dir():
        raise InputError(f"{what} image folder does not exist", path=subset.image_dir)
    items = []
    for path in find_images(subset.image_dir):
        size = checked_size(path, strict)
        if isinstance(size, str):
            if warn is not None:
                warn(f"skipping unreadable image {path} ({size})")
            continue
        caption = read_caption(path, subset.caption_extension)
        if caption is None:
            caption = subset.class_tokens
        if caption is None:
            raise InputError(
                "has no caption file and its subset has no class_tokens (name the folder '10_sks dog' "
                "or set class_tokens)",
                path=path,
            )
        items.append(ImageItem(path, caption, size, subset.num_repeats, subset.options))
    if not items:
        raise InputError(f"no readable images in this {what} subset", path=subset.image_dir)
    return items


@dataclass
class TrainingImages:
    """Training and class images of a run, and kohya's description of them."""

    items: list[ImageItem]
    class_items: list[ImageItem]
    summary: DatasetSummary
    kohya: bool = False  # read from N_name folders or a dataset config
    spec: DatasetSpec | None = None


def load_training_images(
    data_dir: Path | None,
    *,
    dataset_config: Path | None = None,
    class_dir: Path | None = None,
    instance_prompt: str | None = None,
    repeats: int = 1,
    strict: bool = False,
    recursive: bool = False,
    warn: Callable[[str], None] | None = None,
    concepts: list[str] | None = None,
) -> TrainingImages:
    """The images of a run: ``--concept`` folders, a dataset config, a folder in kohya's ``N_name`` layout, or a
    plain image folder.

    A class folder in kohya's layout gives the class images too (else the caller makes them from the class prompt).
    """
    from lorax.data.images import load_image_folder

    summary = DatasetSummary()
    spec: DatasetSpec | None = None
    if concepts:  # one kohya subset per --concept (lorax.data.concepts)
        from lorax.data.concepts import concept_subsets

        if data_dir is not None or dataset_config is not None:
            raise ConfigError("--concept names every training folder: drop DATA_DIR / --dataset-config")
        subsets = concept_subsets(concepts)
    elif dataset_config is not None:
        spec = read_dataset_config(dataset_config)
        subsets = list(spec.subsets)
        if data_dir is not None:
            raise ConfigError("give DATA_DIR or --dataset-config, not both (the config names its image_dir)")
    elif data_dir is not None and is_kohya_folder(data_dir):
        subsets = subsets_from_folder(Path(data_dir), warn=warn)
        loose = [p for p in Path(data_dir).iterdir() if p.is_file() and _is_image(p)]
        if loose and warn is not None:
            warn(
                f"{data_dir}: {len(loose)} images beside the '<repeats>_<name>' folders are not trained "
                "(kohya's layout trains the folders only)"
            )
    else:
        if data_dir is None:
            raise ConfigError("DATA_DIR is required (a folder of training images) or --dataset-config")
        items = load_image_folder(
            data_dir, instance_prompt=instance_prompt, strict=strict, recursive=recursive, warn=warn
        )
        summary.add(Path(data_dir).name, repeats, [it.caption for it in items])
        if instance_prompt:
            summary.trigger_words.append(instance_prompt)
        class_items = _kohya_class_items(class_dir, strict, warn, summary)
        return TrainingImages(items, class_items, summary, kohya=False)
    if class_dir is not None and is_kohya_folder(class_dir):
        subsets += subsets_from_folder(Path(class_dir), is_reg=True, warn=warn)
    items, class_items = [], []
    for subset in subsets:
        loaded = load_subset(subset, strict=strict, warn=warn)
        (class_items if subset.is_reg else items).extend(loaded)
        summary.add(subset.name, subset.num_repeats, [it.caption for it in loaded], is_reg=subset.is_reg)
        if not subset.is_reg and subset.class_tokens and subset.class_tokens not in summary.trigger_words:
            summary.trigger_words.append(subset.class_tokens)
    if not items:
        raise InputError("no training subsets (every subset is is_reg)", path=dataset_config or data_dir)
    if instance_prompt and instance_prompt not in summary.trigger_words:
        summary.trigger_words.insert(0, instance_prompt)
    return TrainingImages(items, class_items, summary, kohya=True, spec=spec)


def _kohya_class_items(
    class_dir: Path | None,
    strict: bool,
    warn: Callable[[str], None] | None,
    summary: DatasetSummary,
) -> list[ImageItem]:
    if class_dir is None or not is_kohya_folder(class_dir):
        return []
    items = []
    for subset in subsets_from_folder(Path(class_dir), is_reg=True, warn=warn):
        loaded = load_subset(subset, strict=strict, warn=warn)
        summary.add(subset.name, subset.num_repeats, [it.caption for it in loaded], is_reg=True)
        items.extend(loaded)
    return items


def _is_image(path: Path) -> bool:
    from lorax.data.images import IMAGE_EXTENSIONS

    return path.suffix.lower() in IMAGE_EXTENSIONS
