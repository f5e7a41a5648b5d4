"""``lorax score``: CLIP alignment of generated images, and the shapes world's scores on the built-in model.

Text alignment is the cosine of an image's CLIP embedding and its prompt's (the seed's ``text_alignment``); image
alignment is the mean cosine of an image's embedding and each reference image's (the seed's ``image_alignment``).
Embeddings are transformers' ``CLIPModel.get_image_features`` / ``get_text_features``, L2-normalised. A prompt is
``--prompt``, else the one a ``lorax generate`` (or A1111) PNG records, less its ``<lora:…>`` tags.

``sweep``: generate with one LoRA at each scale (``lorax generate --sweep-scale``), score every scale's images and
draw both alignments against the scale (the trade-off the seed's README shows with α).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorax.errors import FormatError, InputError
from lorax.progress import NullProgress, Progress
from lorax.services.common import refuse

if TYPE_CHECKING:
    import torch
    from PIL import Image

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
SHAPES_MODEL = "shapes"


@dataclass
class ScoreConfig:
    images: list[Path] = field(default_factory=list)  # files or folders of images
    prompt: str | None = None
    reference: Path | None = None
    clip: str = DEFAULT_CLIP
    shapes: bool | None = None  # None: when every image says it came from the shapes model
    sweep: Path | None = None  # a LoRA: generate over ``scales`` first
    model: str = SHAPES_MODEL
    scales: list[float] = field(default_factory=lambda: list(DEFAULT_SCALES))
    n: int = 4
    seed: int = 0
    out_dir: Path = Path("lorax-score")
    force: bool = False

    def validate(self) -> None:
        problems: list[str] = []
        if self.sweep is None and not self.images:
            problems.append("give IMAGES to score, or --sweep LORA --prompt P to generate them")
        if self.sweep is not None:
            if self.images:
                problems.append("--sweep generates its own images: give no IMAGES with it")
            if not self.prompt:
                problems.append("--sweep needs --prompt")
            if not self.scales:
                problems.append("--scales is empty")
            if self.n < 1:
                problems.append(f"-n must be at least 1 (got {self.n})")
        refuse(problems)


@dataclass
class ImageScore:
    path: Path
    prompt: str | None
    text_alignment: float | None
    image_alignment: float | None
    shapes: dict[str, Any] | None = None  # asked / seen colour, shape, background


@dataclass
class Summary:
    n: int
    text_alignment: float | None
    image_alignment: float | None
    shapes: dict[str, float | None] | None = None  # colour / shape / background accuracy


@dataclass
class SweepPoint:
    scale: float
    summary: Summary


@dataclass
class ScoreResult:
    clip: str
    images: list[ImageScore]
    mean: Summary
    reference: Path | None = None
    n_reference: int = 0
    sweep: list[SweepPoint] | None = None
    plot: Path | None = None


class ClipEmbedder:
    """Normalised CLIP embeddings of images and texts."""

    def __init__(self, spec: str) -> None:
        from transformers import CLIPModel

        from lorax.data.maskers import load_transformers

        self.processor, self.model = load_transformers(spec, "--clip model", CLIPModel)

    @staticmethod
    def _features(out: Any) -> torch.Tensor:
        import torch

        features = (
            out if isinstance(out, torch.Tensor) else out.pooler_output
        )  # transformers 5: an output object
        return features / features.norm(dim=-1, keepdim=True)

    def images(self, images: Sequence[Image.Image], batch_size: int = 16) -> torch.Tensor:
        import torch

        chunks = []
        for start in range(0, len(images), batch_size):
            batch = [img.convert("RGB") for img in images[start : start + batch_size]]
            inputs = self.processor(images=batch, return_tensors="pt")
            with torch.inference_mode():
                chunks.append(
                    self._features(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
                )
        return torch.cat(chunks)

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        import torch

        inputs = self.processor(text=list(texts), return_tensors="pt", padding=True, truncation=True)
        with torch.inference_mode():
            return self._features(
                self.model.get_text_features(
                    input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
                )
            )


def collect_images(paths: Sequence[Path]) -> list[Path]:
    """Files as given, folders as their images (sorted; sweep and grid sheets left out)."""
    from lorax.data.images import find_images

    out: list[Path] = []
    for path in paths:
        path = Path(path)
        if path.is_dir():
            found = [p for p in find_images(path) if not p.stem.endswith(("-grid", "-sweep", "-alignment"))]
            if not found:
                raise InputError("no images in the folder", path=path)
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise InputError("no such image or folder", path=path)
    return out


def _open(path: Path) -> Image.Image:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except Exception as err:
        raise InputError(f"cannot read the image ({type(err).__name__})", path=path) from None


def _recorded(path: Path) -> tuple[str | None, str | None]:
    """The prompt (without ``<lora:…>`` tags) and model a generated PNG records; ``None`` where it records none."""
    from lorax.gen.params import read_png_parameters
    from lorax.gen.prompt_loras import split_prompt

    try:
        params = read_png_parameters(path)
    except FormatError:
        return None, None
    return split_prompt(params.prompt)[0].strip(), params.fields.get("Model")


def score_images(
    paths: Sequence[Path],
    embedder: ClipEmbedder,
    *,
    prompt: str | None,
    reference: torch.Tensor | None = None,
    shapes: bool | None = None,
) -> tuple[list[ImageScore], Summary]:
    """Per-image scores and their means; ``reference``: normalised embeddings of the reference images."""
    from lorax.zoo.shapes import score_images as shapes_scores

    images = [_open(p) for p in paths]
    recorded = [_recorded(p) for p in paths]
    prompts = [prompt if prompt is not None else rec[0] for rec in recorded]
    if shapes is None:
        shapes = all(rec[1] == SHAPES_MODEL for rec in recorded)
    embeddings = embedder.images(images)
    text: list[float | None] = [None] * len(images)
    asked = sorted({p for p in prompts if p})
    if asked:
        by_prompt = dict(zip(asked, embedder.texts(asked), strict=True))
        for i, p in enumerate(prompts):
            if p:
                text[i] = float(embeddings[i] @ by_prompt[p])
    image: list[float | None] = [None] * len(images)
    if reference is not None:
        image = [float((embeddings[i] @ reference.T).mean()) for i in range(len(images))]
    rows = [ImageScore(p, q, t, a) for p, q, t, a in zip(paths, prompts, text, image, strict=True)]
    summary_shapes = None
    if shapes:
        judged = [(i, p) for i, p in enumerate(prompts) if p]
        if judged:
            scores = shapes_scores([images[i] for i, _ in judged], [p for _, p in judged])
            for (i, _), reading in zip(judged, scores["readings"], strict=True):
                rows[i].shapes = {"asked": reading["asked"], "seen": reading["seen"]}
            summary_shapes = {k: scores[k] for k in ("colour", "shape", "background")}
    return rows, Summary(len(rows), _mean(text), _mean(image), summary_shapes)


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def score(config: ScoreConfig, progress: Progress | None = None) -> ScoreResult:
    """Score ``config.images`` (or, with ``sweep``, generate over the scales first and plot).

    Raises:
        ConfigError, InputError, ModelNotFoundError, OutputExistsError: one line each.
    """
    progress = progress or NullProgress()
    config.validate()
    paths = collect_images(config.images) if config.sweep is None else []
    ref_paths = collect_images([config.reference]) if config.reference is not None else []
    plot_path = None
    if config.sweep is not None:
        from lorax.io.atomic import check_output
        from lorax.services.generate import slugify

        if not config.sweep.is_file():
            raise InputError("no such LoRA file (--sweep)", path=config.sweep)
        plot_path = config.out_dir / f"{slugify(config.prompt or '')}-alignment.png"
        check_output(plot_path, config.force)
    with progress.task(f"loading CLIP {config.clip}"):
        embedder = ClipEmbedder(config.clip)
    reference = embedder.images([_open(p) for p in ref_paths]) if ref_paths else None
    if config.sweep is None:
        with progress.task("scoring", total=None):
            rows, summary = score_images(
                paths, embedder, prompt=config.prompt, reference=reference, shapes=config.shapes
            )
        return ScoreResult(config.clip, rows, summary, config.reference, len(ref_paths))
    return _sweep(config, embedder, reference, len(ref_paths), plot_path, progress)  # type: ignore[arg-type]


def _sweep(
    config: ScoreConfig,
    embedder: ClipEmbedder,
    reference: torch.Tensor | None,
    n_reference: int,
    plot_path: Path,
    progress: Progress,
) -> ScoreResult:
    from lorax.io.atomic import atomic_path
    from lorax.services.generate import GenerateConfig, LoraSpec, generate

    made = generate(
        GenerateConfig(
            prompts=[config.prompt or ""],
            model=config.model,
            loras=[LoraSpec(config.sweep)],
            n=config.n,
            seed=config.seed,
            sweep=list(config.scales),
            out_dir=config.out_dir,
            force=config.force,
        ),
        progress,
    )
    shapes = config.shapes if config.shapes is not None else config.model == SHAPES_MODEL
    rows: list[ImageScore] = []
    points: list[SweepPoint] = []
    for scale in config.scales:
        frames = [im.path for im in made.images if im.kind == "sweep" and im.scale == scale]
        scored, summary = score_images(
            frames, embedder, prompt=config.prompt, reference=reference, shapes=shapes
        )
        rows += scored
        points.append(SweepPoint(scale, summary))
    all_text = [r.text_alignment for r in rows]
    all_image = [r.image_alignment for r in rows]
    with atomic_path(plot_path, config.force) as tmp:
        write_alignment_plot(
            points, tmp, title=f"{config.sweep.name if config.sweep else ''}: {config.prompt}"
        )
    return ScoreResult(
        config.clip,
        rows,
        Summary(len(rows), _mean(all_text), _mean(all_image)),
        config.reference,
        n_reference,
        points,
        plot_path,
    )


TEXT_COLOUR, IMAGE_COLOUR = (200, 60, 30), (30, 90, 200)
SHAPES_COLOURS = {"colour": (150, 60, 170), "shape": (40, 150, 70)}


def write_alignment_plot(points: Sequence[SweepPoint], path: Path, *, title: str = "") -> None:
    """A 640×400 chart (Pillow only): text and image alignment (mean cosines, left axis) against the LoRA scale,
    and on the shapes model the colour and shape accuracy (dashed, right axis 0…1)."""
    from PIL import Image, ImageDraw

    width, height, margin = 640, 400, 56
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((margin, 12), title[:90], fill="black")
    series = [
        ("text alignment", TEXT_COLOUR, [(p.scale, p.summary.text_alignment) for p in points]),
        ("image alignment", IMAGE_COLOUR, [(p.scale, p.summary.image_alignment) for p in points]),
    ]
    values = [v for _, _, pts in series for _, v in pts if v is not None]
    scales = [p.scale for p in points]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.05, hi + 0.05
    pad = (hi - lo) * 0.08
    lo, hi = lo - pad, hi + pad
    s0, s1 = min(scales), max(scales)
    span = (s1 - s0) or 1.0

    def xy(scale: float, value: float) -> tuple[float, float]:
        x = margin + (scale - s0) / span * (width - 2 * margin)
        y = height - margin - (value - lo) / (hi - lo) * (height - 2 * margin)
        return x, y

    draw.rectangle((margin, margin, width - margin, height - margin), outline="gray")
    for k, (label, colour, pts) in enumerate(series):
        drawn = [xy(s, v) for s, v in pts if v is not None]
        if len(drawn) > 1:
            draw.line(drawn, fill=colour, width=2)
        for x, y in drawn:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        if drawn:
            draw.text((margin + 130 * k, 30), label, fill=colour)
    legend = len([1 for _, _, pts in series if any(v is not None for _, v in pts)])
    for key, colour in SHAPES_COLOURS.items():
        acc = [(p.scale, (p.summary.shapes or {}).get(key)) for p in points]
        drawn = [
            (margin + (sc - s0) / span * (width - 2 * margin), height - margin - v * (height - 2 * margin))
            for sc, v in acc
            if v is not None
        ]
        if not drawn:
            continue
        for (x0, y0), (x1, y1) in itertools.pairwise(drawn):
            for t in range(0, 10, 2):  # dashes
                draw.line(
                    (x0 + (x1 - x0) * t / 10, y0 + (y1 - y0) * t / 10, x0 + (x1 - x0) * (t + 1) / 10,
                     y0 + (y1 - y0) * (t + 1) / 10), fill=colour, width=2,
                )  # fmt: skip
        for x, y in drawn:
            draw.rectangle((x - 3, y - 3, x + 3, y + 3), fill=colour)
        draw.text((margin + 130 * legend, 30), f"{key} accuracy (right)", fill=colour)
        legend += 1
        draw.text((width - margin + 6, margin - 6), "1", fill="black")
        draw.text((width - margin + 6, height - margin - 6), "0", fill="black")
    draw.text((4, margin - 6), f"{hi:.3f}", fill="black")
    draw.text((4, height - margin - 6), f"{lo:.3f}", fill="black")
    for s in scales:
        x, _ = xy(s, lo)
        draw.text((x - 8, height - margin + 6), f"{s:g}", fill="black")
    draw.text((width // 2 - 30, height - margin + 22), "LoRA scale", fill="black")
    img.save(path, format="PNG")
