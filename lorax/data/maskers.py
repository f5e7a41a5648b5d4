"""Subject masks for ``lorax prepare``: the offline border masker, CLIPSeg (transformers) and a face detector
(OpenCV's bundled Haar cascade). Each masker maps a list of RGB PIL images to ``[H, W]`` float masks in [0, 1]
at each image's own size (white = subject), the form training's loss masks read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from lorax.errors import ConfigError, ModelNotFoundError

MASKERS = ("border", "clipseg", "face", "none")


class Masker(Protocol):
    name: str

    def masks(self, images: Sequence[Any]) -> list[np.ndarray]: ...


class BorderMasker:
    """Foreground from the border's colour statistics (``lorax.data.prepare.border_mask``); needs no model."""

    name = "border"

    def masks(self, images: Sequence[Any]) -> list[np.ndarray]:
        from lorax.data.prepare import border_mask

        return [border_mask(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0) for img in images]


def load_transformers(spec: str, what: str, model_cls: Any) -> tuple[Any, Any]:
    """A processor and model from a local folder or the Hugging Face cache (never the network)."""
    import warnings

    from transformers import AutoProcessor

    from lorax.libraries import quiet_libraries

    try:
        with quiet_libraries(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            processor = AutoProcessor.from_pretrained(spec, local_files_only=True)
            model = model_cls.from_pretrained(spec, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(
            f"{what} {spec!r} cannot be loaded from a local folder or the Hugging Face cache ({first}); "
            "download it first (e.g. `hf download MODEL`) or pass a folder"
        ) from None
    model.eval()
    return processor, model


class ClipSegMasker:
    """CLIPSeg (``CLIPSegForImageSegmentation``): the sigmoid of its logits for ``prompt``, resized to the image
    and divided by its maximum, so the surest subject pixel is 1 (a soft mask, as the seed's CLIPSeg masks)."""

    name = "clipseg"

    def __init__(self, model: str, prompt: str, batch_size: int = 8) -> None:
        from transformers import CLIPSegForImageSegmentation

        self.prompt = prompt
        self.batch_size = batch_size
        self.processor, self.model = load_transformers(
            model, "--masker clipseg model", CLIPSegForImageSegmentation
        )

    def masks(self, images: Sequence[Any]) -> list[np.ndarray]:
        import torch
        import torch.nn.functional as F

        out: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            batch = [img.convert("RGB") for img in images[start : start + self.batch_size]]
            inputs = self.processor(
                text=[self.prompt] * len(batch), images=batch, padding=True, return_tensors="pt"
            )
            with torch.inference_mode():
                logits = self.model(**inputs).logits
            if logits.ndim == 2:  # one image: transformers squeezes the batch dimension
                logits = logits[None]
            probs = torch.sigmoid(logits.float())
            for img, prob in zip(batch, probs, strict=True):
                full = F.interpolate(prob[None, None], size=(img.height, img.width), mode="bilinear")[0, 0]
                full = full / full.max().clamp_min(1e-6)
                out.append(full.numpy().astype(np.float32))
        return out


class FaceMasker:
    """Faces found by OpenCV's frontal-face Haar cascade (shipped inside ``opencv-python-headless`` 4.x; 5.x dropped
    the cascades, hence ``pip install 'lorax[face]'`` pins ``<5``), each filled
    as an ellipse over its box grown by ``grow`` and softened at the edge; no face: an empty mask (``prepare`` logs
    a line for it)."""

    name = "face"

    def __init__(self, grow: float = 1.2) -> None:
        try:
            import cv2
        except ImportError:
            raise ConfigError("--masker face needs OpenCV: pip install 'opencv-python-headless<5'") from None
        if not hasattr(cv2, "CascadeClassifier"):
            raise ConfigError(
                f"--masker face needs OpenCV 4 (its Haar cascades); OpenCV {cv2.__version__} has none: "
                "pip install 'opencv-python-headless<5'"
            )
        path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"  # type: ignore[attr-defined]
        self.detector = cv2.CascadeClassifier(path)
        if self.detector.empty():
            raise ModelNotFoundError(f"OpenCV's face cascade cannot be read from {path}")
        self.grow = grow

    def boxes(self, image: Any) -> list[tuple[int, int, int, int]]:
        """Faces as (x, y, width, height) boxes."""

        grey = np.asarray(image.convert("L"))
        side = max(24, min(grey.shape) // 12)
        found = self.detector.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
        return [tuple(int(v) for v in box) for box in found]  # type: ignore[misc]

    def mask_from_boxes(
        self, size: tuple[int, int], boxes: Sequence[tuple[int, int, int, int]]
    ) -> np.ndarray:
        from PIL import Image, ImageDraw, ImageFilter

        mask = Image.new("L", size, 0)
        draw = ImageDraw.Draw(mask)
        for x, y, w, h in boxes:
            cx, cy = x + w / 2, y + h / 2
            rx, ry = w * self.grow / 2, h * self.grow * 1.15 / 2  # a face is taller than its detector box
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
        if boxes:
            mask = mask.filter(ImageFilter.GaussianBlur(max(1.0, min(b[2] for b in boxes) / 20)))
        return np.asarray(mask, dtype=np.float32) / 255.0

    def masks(self, images: Sequence[Any]) -> list[np.ndarray]:
        return [self.mask_from_boxes(img.size, self.boxes(img)) for img in images]


def make_masker(name: str, *, model: str | None = None, prompt: str | None = None) -> Masker | None:
    """The masker ``--masker NAME`` asks for (``none``: no masks)."""
    if name == "none":
        return None
    if name == "border":
        return BorderMasker()
    if name == "face":
        return FaceMasker()
    if name == "clipseg":
        if not prompt:
            raise ConfigError('--masker clipseg needs --mask-prompt, e.g. --mask-prompt "a dog"')
        return ClipSegMasker(model or "CIDAS/clipseg-rd64-refined", prompt)
    raise ConfigError(f"--masker {name!r} is unknown; choose one of {', '.join(MASKERS)}")
