"""The training set as a deterministic plan of batches.

Every random choice (the order of an epoch, each image's crop and flip, caption shuffling and dropout) is drawn from
a generator seeded by ``(seed, epoch, index)``, never from global state. So batch ``k`` of epoch ``e`` is the same
whether a run got there directly or was resumed from a checkpoint, and several processes (``accelerate launch``) each
take their own share of the same plan.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from lorax.data.buckets import make_buckets, nearest_bucket
from lorax.data.captions import augment_caption
from lorax.data.images import ImageItem
from lorax.data.templates import TEMPLATES, template_prompt
from lorax.data.transforms import load_training_image

if TYPE_CHECKING:
    import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of plain values (stable across runs, platforms and processes)."""
    digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class DataOptions:
    """How images become training examples."""

    resolution: int = 512
    random_crop: bool = False
    flip: bool = False
    buckets: bool = False
    repeats: int = 1
    batch_size: int = 1
    caption_shuffle: bool = False
    keep_tokens: int = 1
    caption_dropout: float = 0.0
    template: str | None = None
    seed: int = 0
    # kohya's bucket bounds (min_bucket_reso, max_bucket_reso, bucket_reso_steps); None: lorax's defaults
    bucket_min: int | None = None
    bucket_max: int | None = None
    bucket_step: int | None = None

    @classmethod
    def from_config(cls, config: Any, resolution: int, **extra: Any) -> DataOptions:
        """The data fields of a training config (train, invert and pivot configs share their names)."""
        values = {
            f.name: getattr(config, f.name)
            for f in fields(cls)
            if f.name != "resolution" and hasattr(config, f.name)
        }
        return cls(resolution=resolution, **{**values, **extra})


@dataclass(frozen=True)
class ImageKey:
    """What fully determines an image's pixels (for latent caching): source, item, flip and target size."""

    source: str  # "instance" or "class"
    item: int
    flip: bool
    size: tuple[int, int]


@dataclass
class Batch:
    """Instance examples first, then (with prior preservation) as many class examples."""

    pixels: torch.Tensor | None  # [B, 3, H, W] in [-1, 1]; None when asked for none (with_pixels=False)
    captions: list[str]
    keys: list[ImageKey]
    num_instance: int


class TrainData:
    """Instance images (with repeats), optional class images for prior preservation, and the batch plan."""

    def __init__(
        self,
        items: Sequence[ImageItem],
        options: DataOptions,
        *,
        class_items: Sequence[ImageItem] = (),
        class_prompt: str | None = None,
        class_pools: Sequence[Sequence[int]] | None = None,
        process_index: int = 0,
        num_processes: int = 1,
    ) -> None:
        if not items:
            raise ValueError("no training images")
        if options.template is not None and options.template not in TEMPLATES:
            raise ValueError(f"unknown template {options.template!r}")
        self.items = list(items)
        self.class_items = list(class_items)
        self.class_prompt = class_prompt
        self.options = options
        self.process_index = process_index
        self.num_processes = num_processes
        res = options.resolution
        self.buckets = (
            make_buckets(res, step=options.bucket_step, low=options.bucket_min, high=options.bucket_max)
            if options.buckets
            else [(res, res)]
        )
        self.item_bucket = [nearest_bucket(it.size, self.buckets) for it in self.items]
        self.example_items = _expand(self.items, options.repeats)
        self.class_examples = _expand(self.class_items, 1)
        # per instance image, the class images it pairs with (several concepts, each with its own); else all
        self.class_pools = [list(pool) for pool in class_pools] if class_pools is not None else None

    def __len__(self) -> int:
        """Examples per epoch: images × repeats (kohya folders: each image × its folder's repeats)."""
        return len(self.example_items)

    def _all_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(derive_seed(self.options.seed, "order", epoch))
        order = list(range(len(self)))
        rng.shuffle(order)
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index in order:
            by_bucket.setdefault(self.item_bucket[self.example_items[index]], []).append(index)
        bs = self.options.batch_size
        batches = [
            group[i : i + bs] for _, group in sorted(by_bucket.items()) for i in range(0, len(group), bs)
        ]
        if len(by_bucket) > 1:
            rng.shuffle(batches)
        return batches

    def batches_per_epoch(self) -> int:
        """Batches this process sees per epoch (with several processes, the remainder is dropped)."""
        total = len(self._all_batches(0))
        return total if self.num_processes == 1 else max(1, total // self.num_processes)

    def epoch_plan(self, epoch: int) -> list[list[int]]:
        """This process's batches of epoch ``epoch``, each a list of example indices of one bucket."""
        batches = self._all_batches(epoch)
        if self.num_processes == 1:
            return batches
        mine = batches[self.process_index :: self.num_processes]
        return mine[: self.batches_per_epoch()] or batches[:1]

    def example(self, epoch: int, index: int) -> tuple[ImageKey, str, random.Random]:
        """The key (image, flip, size) and caption of example ``index`` in ``epoch``, and its crop generator."""
        opts = self.options
        rng = random.Random(derive_seed(opts.seed, "example", epoch, index))
        item_index = self.example_items[index]
        item = self.items[item_index]
        own = item.options
        flip = _pick(own, "flip", opts.flip) and rng.random() < 0.5
        caption = item.caption
        if opts.template is not None:
            caption = template_prompt(opts.template, caption, rng)
        caption = augment_caption(
            caption,
            rng,
            shuffle=_pick(own, "shuffle_caption", opts.caption_shuffle),
            keep_tokens=_pick(own, "keep_tokens", opts.keep_tokens),
            dropout=_pick(own, "caption_dropout", opts.caption_dropout),
        )
        key = ImageKey("instance", item_index, flip, self.item_bucket[item_index])
        return key, caption, rng

    def class_example(
        self, epoch: int, index: int, size: tuple[int, int]
    ) -> tuple[ImageKey, str, random.Random]:
        rng = random.Random(derive_seed(self.options.seed, "class", epoch, index))
        pool = self.class_examples
        if self.class_pools is not None:
            pool = self.class_pools[self.example_items[index]]
        item_index = pool[index % len(pool)]
        item = self.class_items[item_index]
        flip = _pick(item.options, "flip", self.options.flip) and rng.random() < 0.5
        caption = item.caption or self.class_prompt
        assert caption is not None
        return ImageKey("class", item_index, flip, size), caption, rng

    def load(self, key: ImageKey, rng: random.Random | None = None) -> torch.Tensor:
        """The pixels of ``key`` (``rng`` draws the crop when random cropping)."""
        items = self.items if key.source == "instance" else self.class_items
        item = items[key.item]
        return load_training_image(
            item.path,
            key.size,
            random_crop=_pick(item.options, "random_crop", self.options.random_crop),
            flip=key.flip,
            rng=rng or random.Random(0),
        )

    def batch_keys(
        self, epoch: int, indices: Sequence[int]
    ) -> tuple[list[ImageKey], list[str], list[random.Random]]:
        keys, captions, rngs = [], [], []
        for index in indices:
            key, caption, rng = self.example(epoch, index)
            keys.append(key)
            captions.append(caption)
            rngs.append(rng)
        if self.class_items:
            size = keys[0].size
            for index in indices:
                key, caption, rng = self.class_example(epoch, index, size)
                keys.append(key)
                captions.append(caption)
                rngs.append(rng)
        return keys, captions, rngs

    def batch(self, epoch: int, indices: Sequence[int], *, with_pixels: bool = True) -> Batch:
        """The batch made of example ``indices`` in ``epoch`` (pixels left as ``None`` when not wanted)."""
        import torch

        keys, captions, rngs = self.batch_keys(epoch, indices)
        pixels = (
            torch.stack([self.load(k, r) for k, r in zip(keys, rngs, strict=True)]) if with_pixels else None
        )
        return Batch(pixels, captions, keys, len(indices))

    def all_keys(self) -> list[ImageKey]:
        """Every distinct image key training can ask for (only meaningful without random crops)."""
        flips = (False, True) if self.options.flip else (False,)
        keys = [
            ImageKey("instance", i, f, self.item_bucket[i]) for i in range(len(self.items)) for f in flips
        ]
        class_sizes = sorted(set(self.item_bucket))
        keys += [
            ImageKey("class", i, f, s)
            for i in range(len(self.class_items))
            for f in flips
            for s in class_sizes
        ]
        return keys


def _expand(items: Sequence[ImageItem], repeats: int) -> list[int]:
    """Example index → item index: round k holds every item with more than k repeats (each × ``repeats``).

    With equal repeats this is ``index % len(items)``.
    """
    counts = [it.repeats * repeats for it in items]
    return [i for k in range(max(counts, default=0)) for i, n in enumerate(counts) if k < n]


def _pick(options: Any, name: str, default: Any) -> Any:
    """A kohya subset's own setting where it has one, else the run's."""
    value = getattr(options, name, None) if options is not None else None
    return default if value is None else value
