"""``lorax prepare``: a folder of raw pictures → a training folder that ``train``, ``invert`` and ``pivot`` read as it
is: ``NAME.png`` at the model's resolution (or a bucket's size), ``NAME.txt`` captions, ``NAME.mask.png`` masks.

Per image, in the raw folder's sorted order: decode (unreadable files are dropped and named), drop exact duplicates
(same decoded pixels) and perceptual ones (64-bit pHash within ``dedupe_distance`` bits of a kept image), mask the
original, plan the resize and crop (centre, around the mask's bounding box, or none), resize with Lanczos (small
images are upscaled first by the ``upscaler`` model when one is given, with Lanczos otherwise, and counted), caption
the crop. A raw ``NAME.txt`` / ``metadata.jsonl`` caption and a raw
``NAME.mask.png`` are kept unless ``force``. The output folder is written whole, atomically.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.errors import ConfigError, InputError
from lorax.progress import NullProgress, Progress
from lorax.services.common import refuse

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_SIZE = 512
BATCH = 8


@dataclass
class PrepareConfig:
    """Everything ``lorax prepare`` needs; :meth:`validate` names every bad flag at once."""

    raw_dir: Path
    output: Path
    size: tuple[int, int] | None = None  # (width, height); None: the model's training resolution, else 512
    model: str | None = None
    buckets: bool = False
    crop: str = "center"
    dedupe_distance: int = 4  # pHash bits; -1 keeps perceptual duplicates (exact ones still go)
    upscaler: str | None = None  # a Swin2SR model; None: Lanczos
    captioner: str | None = None
    caption_prompt: str | None = None
    prefix: str = ""
    masker: str = "border"
    mask_model: str | None = None
    mask_prompt: str | None = None
    force: bool = False
    dry_run: bool = False

    def validate(self) -> None:
        from lorax.data.maskers import MASKERS
        from lorax.data.prepare import CROPS

        problems: list[str] = []
        if self.crop not in CROPS:
            problems.append(f"--crop {self.crop!r} is unknown; choose one of {', '.join(CROPS)}")
        if self.masker not in MASKERS:
            problems.append(f"--masker {self.masker!r} is unknown; choose one of {', '.join(MASKERS)}")
        if self.crop == "subject" and self.masker == "none":
            problems.append("--crop subject needs a mask: choose a --masker other than none")
        if self.buckets and self.crop == "none":
            problems.append("--buckets crops to bucket sizes: it cannot be combined with --crop none")
        if self.size is not None and (min(self.size) < 8 or self.size[0] % 8 or self.size[1] % 8):
            problems.append(f"--size {self.size[0]}x{self.size[1]}: both sides must be multiples of 8")
        if self.masker == "clipseg" and not self.mask_prompt:
            problems.append('--masker clipseg needs --mask-prompt, e.g. --mask-prompt "a dog"')
        if self.mask_prompt and self.masker != "clipseg":
            problems.append("--mask-prompt only applies with --masker clipseg")
        if self.mask_model and self.masker != "clipseg":
            problems.append("--mask-model only applies with --masker clipseg")
        if self.caption_prompt and not self.captioner:
            problems.append("--caption-prompt only applies with --captioner")
        if self.dedupe_distance < -1 or self.dedupe_distance > 64:
            problems.append(f"--dedupe-distance must be in -1…64 (got {self.dedupe_distance})")
        refuse(problems)


@dataclass
class PreparedImage:
    source: Path
    name: str  # the output image's file name
    source_size: tuple[int, int]
    size: tuple[int, int]
    upscaled: bool
    upscaled_by: str | None  # lanczos, or the model's name (swin2sr x4); None: not upscaled
    caption: str | None
    caption_from: str  # kept (the raw folder's), captioner, prefix, none
    mask_from: str | None  # kept, border, clipseg, face; None: no mask
    mask_coverage: float | None  # share of the output's pixels the mask marks (≥ 0.5)


@dataclass
class DroppedImage:
    source: Path
    reason: str  # unreadable, duplicate
    detail: str


@dataclass
class PrepareResult:
    output: Path
    target: tuple[int, int]
    buckets: bool
    dry_run: bool
    upscaler: str  # what upscales small images: lanczos, or the model's name (swin2sr x4)
    images: list[PreparedImage] = field(default_factory=list)
    dropped: list[DroppedImage] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return {
            "found": len(self.images) + len(self.dropped),
            "kept": len(self.images),
            "unreadable": sum(d.reason == "unreadable" for d in self.dropped),
            "duplicates": sum(d.reason == "duplicate" for d in self.dropped),
            "upscaled": sum(i.upscaled for i in self.images),
            "captions kept": sum(i.caption_from == "kept" for i in self.images),
            "captioned": sum(i.caption_from == "captioner" for i in self.images),
            "uncaptioned": sum(i.caption_from == "none" for i in self.images),
            "masks": sum(i.mask_from is not None for i in self.images),
        }

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return {
            "output": str(self.output),
            "size": list(self.target),
            "buckets": self.buckets,
            "dry_run": self.dry_run,
            "upscaler": self.upscaler,
            "counts": self.counts,
            "images": [asdict(i) | {"source": str(i.source)} for i in self.images],
            "dropped": [asdict(d) | {"source": str(d.source)} for d in self.dropped],
        }


def target_size(config: PrepareConfig) -> tuple[tuple[int, int], str]:
    """The training size and where it came from: ``--size``, the model's ``train.resolution`` or generate size
    (its lorax.json), else 512."""
    if config.size is not None:
        return config.size, "--size"
    if config.model is not None:
        from lorax.models.defaults import model_defaults

        defaults = model_defaults(config.model)
        resolution = defaults.for_command("train").get("resolution")
        if resolution:
            return (int(resolution), int(resolution)), f"{config.model}'s training resolution"
        if defaults.size is not None:
            return defaults.size, f"{config.model}'s image size"
    return (DEFAULT_SIZE, DEFAULT_SIZE), "the default"


@dataclass
class _Read:
    source: Path
    image: Image.Image
    caption: str | None
    mask: Image.Image | None  # a raw NAME.mask.png (PIL L)


def _raw_mask(path: Path) -> Image.Image | None:
    from PIL import Image

    from lorax.data.images import IMAGE_EXTENSIONS, MASK_SUFFIX

    for ext in sorted(IMAGE_EXTENSIONS):
        candidate = path.with_name(path.stem + MASK_SUFFIX + ext)
        if candidate.is_file():
            try:
                with Image.open(candidate) as opened:
                    return opened.convert("L")
            except Exception as err:
                raise InputError(f"unreadable mask ({type(err).__name__})", path=candidate) from None
    return None


def prepare_folder(config: PrepareConfig, progress: Progress | None = None) -> PrepareResult:
    """Prepare ``config.raw_dir`` into ``config.output`` (nothing written with ``dry_run``).

    Raises:
        ConfigError, InputError, OutputExistsError, ModelNotFoundError: one line each.
    """
    import numpy as np
    from PIL import Image, ImageOps

    from lorax.data.buckets import make_buckets, nearest_bucket
    from lorax.data.captioner import Captioner
    from lorax.data.images import IMAGE_EXTENSIONS, MASK_SUFFIX, find_images, read_metadata_jsonl
    from lorax.data.maskers import make_masker
    from lorax.data.prepare import (
        apply_geometry,
        hamming,
        mask_box,
        perceptual_hash,
        pixel_digest,
        plan_geometry,
    )
    from lorax.data.upscaler import LANCZOS, Swin2SRUpscaler
    from lorax.io.atomic import FILES_FOLDER, atomic_path, check_output

    progress = progress or NullProgress()
    config.validate()
    raw = Path(config.raw_dir)
    if not raw.is_dir():
        raise InputError("the raw image folder does not exist or is not a folder", path=raw)
    out = Path(config.output)
    if out.resolve() == raw.resolve():
        raise ConfigError("-o must be a new folder, not the raw folder itself")
    paths = find_images(raw)
    if not paths:
        raise InputError(f"no images (looked for {' '.join(sorted(IMAGE_EXTENSIONS))})", path=raw)
    if not config.dry_run:
        check_output(out, config.force, FILES_FOLDER)
    target, source = target_size(config)
    progress.log(f"preparing {len(paths)} images at {target[0]}x{target[1]} ({source})")
    bucket_sizes = make_buckets(max(target)) if config.buckets else None
    metadata = read_metadata_jsonl(raw)

    masker = make_masker(config.masker, model=config.mask_model, prompt=config.mask_prompt)
    captioner = Captioner(config.captioner, prompt=config.caption_prompt) if config.captioner else None
    upscaler = Swin2SRUpscaler(config.upscaler) if config.upscaler else None
    upscaler_name = f"{upscaler.name} ({config.upscaler})" if upscaler is not None else LANCZOS
    result = PrepareResult(out, target, config.buckets, config.dry_run, upscaler_name)
    if upscaler is not None:
        progress.log(f"small images are upscaled by {upscaler_name}")
    digests: dict[str, Path] = {}
    hashes: list[tuple[int, Path]] = []
    names: set[str] = set()

    def read(path: Path) -> _Read | None:
        try:
            with Image.open(path) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened).convert("RGB")
        except Exception as err:
            detail = " ".join(f"{type(err).__name__}: {err}".split())
            result.dropped.append(DroppedImage(path, "unreadable", detail))
            progress.log(f"dropping unreadable image {path} ({detail})")
            return None
        digest = pixel_digest(image)
        if digest in digests:
            result.dropped.append(DroppedImage(path, "duplicate", f"same pixels as {digests[digest].name}"))
            return None
        digests[digest] = path
        if config.dedupe_distance >= 0:
            phash = perceptual_hash(image)
            near = min(((hamming(phash, h), p) for h, p in hashes), default=None, key=lambda t: t[0])
            if near is not None and near[0] <= config.dedupe_distance:
                result.dropped.append(
                    DroppedImage(path, "duplicate", f"looks like {near[1].name} (pHash distance {near[0]})")
                )
                return None
            hashes.append((phash, path))
        caption = None
        if not (config.force and captioner is not None):
            rel = path.relative_to(raw).as_posix()
            caption = metadata.get(rel)
            txt = path.with_suffix(".txt")
            if caption is None and txt.is_file():
                caption = txt.read_text(encoding="utf-8").strip()
        mask = None if config.force else _raw_mask(path)
        return _Read(path, image, caption, mask)

    def unique_name(stem: str) -> str:
        name, k = stem, 1
        while name.lower() in names:
            k += 1
            name = f"{stem}-{k}"
        names.add(name.lower())
        return name

    def batches() -> Iterator[list[_Read]]:
        batch: list[_Read] = []
        with progress.task("preparing", total=len(paths)) as task:
            for path in paths:
                item = read(path)
                task.advance()
                if item is not None:
                    batch.append(item)
                if len(batch) == BATCH:
                    yield batch
                    batch = []
            if batch:
                yield batch

    with contextlib.ExitStack() as stack:
        folder = (
            None
            if config.dry_run
            else stack.enter_context(atomic_path(out, config.force, kind=FILES_FOLDER, directory=True))
        )
        for batch in batches():
            need_mask = [b for b in batch if b.mask is None] if masker is not None else []
            computed = masker.masks([b.image for b in need_mask]) if masker is not None and need_mask else []
            masks: dict[Path, tuple[Any, str]] = {}
            for b, m in zip(need_mask, computed, strict=True):
                masks[b.source] = (m, masker.name)  # type: ignore[union-attr]
                if not (m >= 0.5).any():
                    progress.log(f"{b.source}: --masker {config.masker} found no subject; its mask is empty")
            for b in batch:
                if b.mask is not None:
                    m = (
                        np.asarray(b.mask.resize(b.image.size, Image.Resampling.BILINEAR), dtype=np.float32)
                        / 255
                    )
                    masks[b.source] = (m, "kept")
            crops = []
            for b in batch:
                mask = masks.get(b.source)
                goal = nearest_bucket(b.image.size, bucket_sizes) if bucket_sizes else target
                box = mask_box(mask[0]) if mask is not None and config.crop == "subject" else None
                geometry = plan_geometry(b.image.size, goal, config.crop, box)
                source_image = b.image
                if upscaler is not None and geometry.upscaled:
                    source_image = upscaler.upscale(b.image, geometry.resized)
                crops.append((b, geometry, apply_geometry(source_image, geometry)))
            need_caption = [c for c in crops if c[0].caption is None] if captioner is not None else []
            new_captions = (
                captioner.captions([c[2] for c in need_caption]) if captioner and need_caption else []
            )
            captioned = {c[0].source: t for c, t in zip(need_caption, new_captions, strict=True)}
            for b, geometry, image in crops:
                name = unique_name(b.source.stem)
                if b.caption is not None:
                    caption, caption_from = b.caption, "kept"
                elif b.source in captioned:
                    caption, caption_from = config.prefix + captioned[b.source], "captioner"
                elif config.prefix.strip():
                    caption, caption_from = config.prefix.strip().rstrip(","), "prefix"
                else:
                    caption, caption_from = None, "none"
                mask_image = None
                coverage = None
                mask_from = None
                if b.source in masks:
                    m, mask_from = masks[b.source]
                    pil = Image.fromarray(np.round(np.clip(m, 0, 1) * 255).astype(np.uint8))
                    mask_image = apply_geometry(pil, geometry, mask=True)
                    coverage = float((np.asarray(mask_image) >= 128).mean())
                if folder is not None:
                    image.save(folder / f"{name}.png", format="PNG")
                    if caption is not None:
                        (folder / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
                    if mask_image is not None:
                        mask_image.save(folder / f"{name}{MASK_SUFFIX}.png", format="PNG")
                result.images.append(
                    PreparedImage(
                        source=b.source,
                        name=f"{name}.png",
                        source_size=b.image.size,
                        size=image.size,
                        upscaled=geometry.upscaled,
                        upscaled_by=(upscaler.name if upscaler else LANCZOS) if geometry.upscaled else None,
                        caption=caption,
                        caption_from=caption_from,
                        mask_from=mask_from,
                        mask_coverage=None if coverage is None else round(coverage, 4),
                    )
                )
        if not result.images:
            raise InputError(
                f"none of the {len(paths)} images can be used ({len(result.dropped)} dropped); nothing was written",
                path=raw,
            )
    return result
