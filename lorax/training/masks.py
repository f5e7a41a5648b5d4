"""Loss masks: a weight per latent pixel from a mask image per training image (the seed's ``lora_pti`` masks).

A mask is found by the image's file name in ``--mask-dir``: ``NAME.mask.png`` first (as ``lorax prepare`` writes
them beside the images, so ``--mask-dir`` may be the training folder itself), else the same stem with any image
extension (never the image itself), or computed with
``--auto-mask`` (foreground = pixels far from the image's border colour: right for plain-background images such as
the shapes world). It is cropped and flipped exactly like its image, resized to the latent size, mapped from [0, 1]
to [0.5, 1.5], then weighted as the seed does: ``w = (m + 0.01) ** temperature / max``. Prediction and target are
both multiplied by ``w`` (``LossInputs(..., weight=w)``).

``lorax train`` weights its loss as kohya's masked loss (its masked_loss option) does instead (``weighting="kohya"``): the mask in
[0, 1], area-downsampled to the latent size, multiplies the per-pixel squared error (so a black region gives no
gradient at all), the mean still taken over every pixel. Its masks come from ``NAME.mask.png`` beside each image (what
``lorax prepare`` writes; ``find_images`` skips those files), from ``--mask-dir`` or from ``--auto-mask``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.data.images import IMAGE_EXTENSIONS, MASK_SUFFIX, ImageItem, is_mask_file
from lorax.errors import InputError
from lorax.training.job import DiffusionBatches
from lorax.training.sdxl import SdxlBatches

if TYPE_CHECKING:
    import torch

AUTO_THRESHOLD = (
    0.3  # RGB distance from the border colour that counts as foreground (the shapes scorers' value)
)


def _some(names: Sequence[str], shown: int = 3) -> str:
    """The first ``shown`` names, and how many more there are: ``a.png, b.png, c.png and 4 more``."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def mask_beside(image: Path) -> Path | None:
    """``NAME.mask.<ext>`` next to ``NAME.<ext>`` (any image extension, ``.png`` first), or ``None``."""
    for ext in (".png", *sorted(IMAGE_EXTENSIONS - {".png"})):
        for candidate in (image.with_name(image.stem + MASK_SUFFIX + e) for e in (ext, ext.upper())):
            if candidate.is_file():
                return candidate
    return None


def masks_beside(items: Sequence[ImageItem]) -> list[Path | None]:
    """Each image's ``NAME.mask.png`` where it has one (``None``: no mask, the whole image counts)."""
    return [mask_beside(it.path) for it in items]


def find_masks(items: Sequence[ImageItem], mask_dir: Path) -> list[Path]:
    """The mask of every image, by stem (``NAME.mask.png`` before ``NAME.png``); raises naming the images that
    have none."""
    mask_dir = Path(mask_dir)
    if not mask_dir.is_dir():
        raise InputError("--mask-dir is not a folder", path=mask_dir)
    marked: dict[str, Path] = {}  # NAME.mask.png, by NAME
    by_stem: dict[str, Path] = {}
    for p in sorted(mask_dir.iterdir()):
        if not (p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS):
            continue
        if is_mask_file(p):
            marked.setdefault(p.stem[: -len(MASK_SUFFIX)], p)
        else:
            by_stem.setdefault(p.stem, p)

    def mask_of(item: ImageItem) -> Path | None:
        found = marked.get(item.path.stem) or by_stem.get(item.path.stem)
        if found is not None and found.resolve() == item.path.resolve():
            return None  # the image itself (--mask-dir is the training folder): not a mask
        return found

    found = {it.path: mask_of(it) for it in items}
    missing = [it.path.name for it in items if found[it.path] is None]
    if missing:
        raise InputError(
            f"--mask-dir has no mask for {len(missing)} of {len(items)} images ({_some(missing)}); "
            "give every image a mask of the same name",
            path=mask_dir,
        )
    return [found[it.path] for it in items]  # type: ignore[misc]


def foreground_mask(pixels: Any) -> Any:
    """``[H, W]`` in {0, 1}: pixels of ``[H, W, 3]`` (floats in [0, 1]) far from the median border colour."""
    import numpy as np

    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background = np.median(border, axis=0)
    distance = np.sqrt(((pixels - background) ** 2).sum(axis=-1))
    return (distance > AUTO_THRESHOLD).astype(np.float32)


def load_mask(
    mask_path: Path | None,
    image_path: Path,
    image_size: tuple[int, int],
    target: tuple[int, int],
    *,
    random_crop: bool,
    flip: bool,
    rng: random.Random,
) -> Any:
    """The mask in [0, 1] as a ``[H, W]`` tensor, cropped and flipped as its image is (same ``rng`` state)."""
    import numpy as np
    import torch
    from PIL import Image

    from lorax.data.transforms import crop_box

    if mask_path is None:
        with Image.open(image_path) as opened:
            rgb = np.asarray(opened.convert("RGB"), dtype=np.float32) / 255.0
        mask = Image.fromarray((foreground_mask(rgb) * 255).astype(np.uint8), mode="L")
    else:
        try:
            with Image.open(mask_path) as opened:
                mask = opened.convert("L")
        except Exception as err:
            raise InputError(f"unreadable mask ({type(err).__name__})", path=mask_path) from None
        if mask.size != image_size:
            mask = mask.resize(image_size, Image.Resampling.BILINEAR)
    tw, th = target
    scale, (left, top) = crop_box(image_size, target, random_crop=random_crop, rng=rng)
    rw, rh = max(tw, round(image_size[0] * scale)), max(th, round(image_size[1] * scale))
    if (rw, rh) != mask.size:
        mask = mask.resize((rw, rh), Image.Resampling.BILINEAR)
    mask = mask.crop((left, top, left + tw, top + th))
    if flip:
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)


def kohya_mask_weight(masks: Any, latent_size: tuple[int, int]) -> Any:
    """``[B, H, W]`` masks in [0, 1] → ``[B, 1, h, w]`` factors of the squared error (kohya's ``apply_masked_loss``:
    area interpolation to the loss's size, no renormalisation)."""
    import torch.nn.functional as F

    return F.interpolate(masks[:, None].float(), size=latent_size, mode="area")


def mask_weight(masks: Any, latent_size: tuple[int, int], temperature: float) -> Any:
    """``[B, H, W]`` masks in [0, 1] → ``[B, 1, h, w]`` loss weights: to [0.5, 1.5], ``(m + 0.01)^T``, ``/ max``."""
    import torch.nn.functional as F

    m = F.interpolate(masks[:, None].float(), size=latent_size, mode="bilinear", align_corners=False)
    m = (m + 0.5 + 0.01).pow(temperature)
    return m / m.amax(dim=(1, 2, 3), keepdim=True)


@dataclass
class MaskedBatches(DiffusionBatches):
    """``DiffusionBatches`` whose instance examples weight the loss by their masks (class examples: weight 1)."""

    mask_paths: list[Path | None] = field(default_factory=list)  # per instance item; None → automatic mask
    temperature: float = 1.0
    weighting: str = (
        "seed"  # "seed": invert/pivot's (m + 0.01)^T weights; "kohya": train's plain mask × error
    )
    auto: bool = True  # an item without a mask path: an automatic mask (else the whole image, weight 1)

    def weights(self, epoch: int, indices: list[int], latent_size: tuple[int, int]) -> Any:
        import torch

        keys, _captions, rngs = self.data.batch_keys(
            epoch, indices
        )  # fresh generators: the images' own crops
        opts = self.data.options
        masks = []
        for key, rng in zip(keys, rngs, strict=True):
            if key.source != "instance":
                masks.append(torch.ones(key.size[1], key.size[0]))
                continue
            item = self.data.items[key.item]
            if self.mask_paths[key.item] is None and not self.auto:
                masks.append(torch.ones(key.size[1], key.size[0]))
                continue
            masks.append(
                load_mask(
                    self.mask_paths[key.item],
                    item.path,
                    item.size,
                    key.size,
                    random_crop=opts.random_crop,
                    flip=key.flip,
                    rng=rng,
                )
            )
        if self.weighting == "kohya":
            # the objective multiplies prediction and target by the weight, so the squared error by its square
            return kohya_mask_weight(torch.stack(masks), latent_size).sqrt()
        weight = mask_weight(torch.stack(masks), latent_size, self.temperature)
        for i, key in enumerate(keys):
            if key.source != "instance":
                weight[i] = 1.0
        return weight

    def loss_weight(self, epoch: int, indices: list[int], latents: torch.Tensor) -> Any:
        return self.weights(epoch, indices, (latents.shape[-2], latents.shape[-1])).to(latents.device)


class MaskedSdxlBatches(MaskedBatches, SdxlBatches):
    """Masked losses on SDXL: ``MaskedBatches``' loss weights, ``SdxlBatches``' conditioning with size/crop ids."""


def masks_beside_every(items: Sequence[ImageItem]) -> list[Path] | None:
    """invert and pivot's rule: ``NAME.mask.png`` (any image extension) beside every image, as ``lorax prepare`` writes them, or ``None``
    when no image has one. Some with and some without is refused, naming those without: a run would otherwise
    weight some images' loss and not others'."""
    found: dict[Path, Path | None] = {}
    for item in items:
        if item.path in found:
            continue
        candidates = [item.path.with_name(item.path.stem + MASK_SUFFIX + ext) for ext in IMAGE_EXTENSIONS]
        found[item.path] = next((c for c in candidates if c.is_file()), None)
    if not any(found.values()):
        return None
    missing = [p.name for p, m in found.items() if m is None]
    if missing:
        raise InputError(
            f"{len(found) - len(missing)} images have a NAME{MASK_SUFFIX}.png loss mask beside them but "
            f"{len(missing)} have none ({_some(missing)}): give every image one, or pass "
            "--ignore-masks",
            path=items[0].path.parent,
        )
    return [found[it.path] for it in items]  # type: ignore[misc]
