"""kohya sd-scripts' dataset conventions: ``N_name`` folders and the ``--dataset_config`` TOML.

* **Folders** (kohya's DreamBooth layout): a training folder holding sub-folders named ``<repeats>_<class tokens>``,
  e.g. ``10_sks dog/``, trains each sub-folder's images ``repeats`` times per epoch; an image without a caption file
  takes the class tokens (``sks dog``) as its caption. Several sub-folders are allowed; sub-folders without a
  number prefix are skipped with a warning, as kohya does. A class (regularisation) folder in the same layout gives
  the prior-preservation images, each captioned by its folder's class tokens.
* **TOML** (``[general]``, ``[[datasets]]``, ``[[datasets.subsets]]``): the keys kohya's ``library/config_util.py``
  defines that lorax can honour (below). Values ascend as in kohya: a subset's key, else its dataset's, else
  ``[general]``'s, else kohya's default. Any other key is refused in one line, naming it and its table.

Relative ``image_dir`` paths resolve against the TOML file's folder, else (as kohya resolves them) the current one.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.data.tomlfile import read_toml
from lorax.errors import ConfigError, InputError

if TYPE_CHECKING:
    pass

# kohya's default caption extension is ".caption"; most kohya_ss users write ".txt", lorax's own convention.
DEFAULT_CAPTION_EXTENSIONS = (".caption", ".txt")
_REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")

# key → (type, where it may appear). Subset keys ascend: subset ⊂ dataset ⊂ general (kohya's *_ASCENDABLE_SCHEMA).
_SUBSET_KEYS: dict[str, type | tuple[type, ...]] = {
    "num_repeats": int,
    "caption_extension": str,
    "class_tokens": str,
    "keep_tokens": int,
    "shuffle_caption": bool,
    "flip_aug": bool,
    "random_crop": bool,
    "caption_dropout_rate": (float, int),
}
_SUBSET_ONLY_KEYS: dict[str, type | tuple[type, ...]] = {"image_dir": str, "is_reg": bool}
_DATASET_KEYS: dict[str, type | tuple[type, ...]] = {
    "resolution": (int, list),
    "enable_bucket": bool,
    "min_bucket_reso": int,
    "max_bucket_reso": int,
    "bucket_reso_steps": int,
    "batch_size": int,
}


@dataclass(frozen=True)
class SubsetOptions:
    """Caption and augmentation settings of one kohya subset (``None``: the run's own setting)."""

    shuffle_caption: bool | None = None
    keep_tokens: int | None = None
    caption_dropout: float | None = None
    flip: bool | None = None
    random_crop: bool | None = None


@dataclass(frozen=True)
class Subset:
    """One folder of a kohya dataset."""

    image_dir: Path
    num_repeats: int = 1
    class_tokens: str | None = None
    caption_extension: str | None = None  # None: .caption, then .txt
    is_reg: bool = False
    options: SubsetOptions = field(default_factory=SubsetOptions)

    @property
    def name(self) -> str:
        """The key kohya's metadata uses for this subset (``os.path.basename(image_dir)``)."""
        return self.image_dir.name


@dataclass(frozen=True)
class DatasetSpec:
    """Subsets and the dataset-level settings of a kohya dataset config (``None``: not set by the file)."""

    subsets: list[Subset]
    resolution: int | None = None
    enable_bucket: bool | None = None
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_reso_steps: int | None = None
    batch_size: int | None = None
    path: Path | None = None

    def config_values(self) -> dict[str, Any]:
        """The dataset-level settings as ``lorax train`` config fields."""
        values = {"resolution": self.resolution, "buckets": self.enable_bucket, "batch_size": self.batch_size}
        return {k: v for k, v in values.items() if v is not None}


def parse_repeat_folder(name: str) -> tuple[int, str] | None:
    """``"10_sks dog"`` → ``(10, "sks dog")`` as kohya splits it; ``None`` for a name without a number prefix."""
    match = _REPEAT_FOLDER.match(name)
    if match is None:
        return None
    return int(match.group(1)), match.group(2)


def repeat_folders(folder: Path) -> list[Path]:
    """The ``N_name`` sub-folders of ``folder`` (sorted), empty when it is not in kohya's layout."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and parse_repeat_folder(p.name) is not None)


def is_kohya_folder(folder: str | Path) -> bool:
    return bool(repeat_folders(Path(folder)))


def subsets_from_folder(
    folder: Path, *, is_reg: bool = False, warn: Callable[[str], None] | None = None
) -> list[Subset]:
    """kohya's ``generate_dreambooth_subsets_config_by_subdirs`` for one training or class folder."""
    subsets = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        parsed = parse_repeat_folder(sub.name)
        if parsed is None or parsed[0] < 1:
            if warn is not None:
                warn(f"skipping {sub} (no '<repeats>_' prefix, as in '10_sks dog')")
            continue
        repeats, tokens = parsed
        subsets.append(Subset(sub, repeats, tokens or None, is_reg=is_reg))
    return subsets


# ---------------------------------------------------------------------------------------------------------------
def read_dataset_config(path: str | Path) -> DatasetSpec:
    """Read a kohya dataset TOML. Every problem is one ``ConfigError``/``InputError`` naming the file."""
    path = Path(path)
    doc = read_toml(path, "dataset config not found")
    _refuse_unknown(doc, {"general": dict, "datasets": list}, "the top level", path)
    general = doc.get("general", {})
    _refuse_unknown(general, {**_SUBSET_KEYS, **_DATASET_KEYS}, "[general]", path)
    datasets = doc.get("datasets", [])
    if not datasets:
        raise ConfigError("has no [[datasets]] table", path=path)
    specs: list[DatasetSpec] = []
    for d, dataset in enumerate(datasets, start=1):
        where = f"[[datasets]] #{d}"
        if not isinstance(dataset, dict):
            raise ConfigError(f"{where} is not a table", path=path)
        _refuse_unknown(dataset, {**_SUBSET_KEYS, **_DATASET_KEYS, "subsets": list}, where, path)
        subsets_doc = dataset.get("subsets", [])
        if not subsets_doc:
            raise ConfigError(f"{where} has no [[datasets.subsets]]", path=path)
        level = {**general, **{k: v for k, v in dataset.items() if k != "subsets"}}
        subsets = []
        for s, sub in enumerate(subsets_doc, start=1):
            swhere = f"{where} subset #{s}"
            if not isinstance(sub, dict):
                raise ConfigError(f"{swhere} is not a table", path=path)
            _refuse_unknown(sub, {**_SUBSET_KEYS, **_SUBSET_ONLY_KEYS}, swhere, path)
            if "image_dir" not in sub:
                raise ConfigError(f"{swhere} has no image_dir", path=path)
            subsets.append(_subset({**level, **sub}, swhere, path))
        specs.append(_dataset(level, subsets, where, path))
    first = specs[0]
    for other in specs[1:]:
        if first.config_values() != other.config_values() or _buckets(first) != _buckets(other):
            raise ConfigError(
                "datasets with different resolution, bucket or batch settings cannot train together in lorax; "
                "give them the same settings or merge them into one [[datasets]]",
                path=path,
            )
    return DatasetSpec(
        [s for spec in specs for s in spec.subsets],
        first.resolution,
        first.enable_bucket,
        first.min_bucket_reso,
        first.max_bucket_reso,
        first.bucket_reso_steps,
        first.batch_size,
        path,
    )


def _buckets(spec: DatasetSpec) -> tuple[int | None, ...]:
    return spec.min_bucket_reso, spec.max_bucket_reso, spec.bucket_reso_steps


def _refuse_unknown(table: Any, allowed: dict[str, Any], where: str, path: Path) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} is not a table", path=path)
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)} in {where}; lorax reads {', '.join(sorted(allowed))}",
            path=path,
        )
    for key, value in table.items():
        kind = allowed[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        ok = False if isinstance(value, bool) and bool not in kinds else isinstance(value, kinds)
        if not ok:
            names = " or ".join("list" if k is list else "table" if k is dict else k.__name__ for k in kinds)
            raise ConfigError(f"{key} in {where} must be {names} (got {value!r})", path=path)


def _resolve_dir(value: str, path: Path) -> Path:
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    beside = path.parent / p
    return beside if beside.exists() or not p.exists() else p


def _subset(values: dict[str, Any], where: str, path: Path) -> Subset:
    repeats = values.get("num_repeats", 1)
    if repeats < 1:
        raise ConfigError(f"num_repeats in {where} must be ≥ 1 (got {repeats})", path=path)
    keep = values.get("keep_tokens")
    if keep is not None and keep < 0:
        raise ConfigError(f"keep_tokens in {where} must be ≥ 0 (got {keep})", path=path)
    dropout = values.get("caption_dropout_rate")
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ConfigError(f"caption_dropout_rate in {where} must be in [0, 1) (got {dropout})", path=path)
    ext = values.get("caption_extension")
    if ext is not None and not ext.startswith("."):
        ext = "." + ext
    options = SubsetOptions(
        shuffle_caption=values.get("shuffle_caption"),
        keep_tokens=keep,
        caption_dropout=None if dropout is None else float(dropout),
        flip=values.get("flip_aug"),
        random_crop=values.get("random_crop"),
    )
    return Subset(
        _resolve_dir(values["image_dir"], path),
        repeats,
        values.get("class_tokens"),
        ext,
        bool(values.get("is_reg", False)),
        options,
    )


def _dataset(values: dict[str, Any], subsets: list[Subset], where: str, path: Path) -> DatasetSpec:
    resolution = values.get("resolution")
    if isinstance(resolution, list):
        if len(resolution) != 2 or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in resolution
        ):
            raise ConfigError(f"resolution in {where} must be an integer or [width, height]", path=path)
        if resolution[0] != resolution[1]:
            raise ConfigError(
                f"resolution {resolution} in {where}: lorax trains at a square base resolution; "
                "give one number and set enable_bucket = true for other shapes",
                path=path,
            )
        resolution = resolution[0]
    if resolution is not None and (resolution <= 0 or resolution % 8):
        raise ConfigError(
            f"resolution in {where} must be a positive multiple of 8 (got {resolution})", path=path
        )
    for key in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "batch_size"):
        if key in values and values[key] <= 0:
            raise ConfigError(f"{key} in {where} must be > 0 (got {values[key]})", path=path)
    lo, hi = values.get("min_bucket_reso"), values.get("max_bucket_reso")
    if lo is not None and hi is not None and lo > hi:
        raise ConfigError(f"min_bucket_reso {lo} in {where} is above max_bucket_reso {hi}", path=path)
    return DatasetSpec(
        subsets,
        resolution,
        values.get("enable_bucket"),
        lo,
        hi,
        values.get("bucket_reso_steps"),
        values.get("batch_size"),
        path,
    )


# ---------------------------------------------------------------------------------------------------------------
def read_caption(image: Path, extension: str | None) -> str | None:
    """The first line of ``<image stem><extension>`` (kohya reads the first line), or ``None``."""
    for ext in (extension,) if extension is not None else DEFAULT_CAPTION_EXTENSIONS:
        path = image.with_suffix(ext)
        if path.is_file():
            from lorax.data.images import read_text_file

            lines = read_text_file(path).splitlines()
            if not lines or not lines[0].strip():
                raise InputError("caption file is empty", path=path)
            return lines[0].strip()
    return None


def tag_frequency(captions: Iterable[str]) -> dict[str, int]:
    """kohya's ``set_tag_frequency``: comma-separated tags, stripped and lower-cased, counted once per image."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts
