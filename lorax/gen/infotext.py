"""The PNG info of a ``lorax generate`` run: AUTOMATIC1111's infotext fields for each image and sheet.

The prompt gets a ``<lora:NAME:W>`` tag per LoRA file (so the text pastes back into A1111), and the fields name the
sampler, seed, size, model, the LoRAs' hashes (A1111's ``addnet`` hash) and scales, and lorax's own extras.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path

from lorax import __version__
from lorax.gen.config import GenerateConfig
from lorax.gen.flux import Sampling
from lorax.gen.loras import RunLoras


def file_hash(path: Path, length: int = 12, *, lora: bool = False) -> str:
    """The short SHA-256 A1111 prints for LoRA and embedding files.

    A LoRA ``.safetensors`` is hashed after its header (A1111's ``addnet_hash_safetensors``, the header's
    ``sshs_model_hash``), so editing its metadata keeps its hash; other files whole.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if lora and path.suffix.lower() == ".safetensors":
            (n,) = struct.unpack("<Q", fh.read(8))
            fh.seek(8 + n)
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def model_label(spec: str) -> str:
    path = Path(spec)
    return path.stem if path.suffix in (".safetensors", ".ckpt") else (path.name or spec)


@dataclass
class Infotext:
    """What every image of one run shares; :meth:`text` adds what one image or sheet has of its own."""

    config: GenerateConfig
    loras: RunLoras
    sampler: str
    size: tuple[int, int]
    clip_skip: int = 1
    img2img: bool = False
    schedule: str | None = None  # the --scale-schedule spec
    embeddings: list[Path] = field(default_factory=list)
    sampling: Sampling | None = None  # how the guidance is named (Flux: distilled, or none); None: CFG scale

    def __post_init__(self) -> None:
        names, specs = self.loras.names, self.loras.run.specs
        self.hashes = {
            names[i]: file_hash(spec.path, lora=True) for i, spec in enumerate(specs) if spec.path is not None
        }
        self.ti_hashes = {path.stem: file_hash(path) for path in self.embeddings}

    def prompt(self, prompt: str, factor: float | None, on: list[int]) -> str:
        """The prompt with a ``<lora:…>`` tag per LoRA file, so the PNG's parameters paste into A1111."""
        from lorax.gen.prompt_loras import format_tag, with_tags

        f = 1.0 if factor is None else factor
        names, requests, specs = self.loras.names, self.loras.requests, self.loras.run.specs
        tags = [
            format_tag(names[i], f * requests[i].unet_scale, f * requests[i].effective_text_scale)
            for i in on
            if specs[i].path is not None
        ]
        return with_tags(prompt, tags) if tags else prompt

    def fields(
        self, image_seed: int, factor: float | None, on: list[int], steps: int, guidance: float
    ) -> dict[str, object]:
        config, names, requests = self.config, self.loras.names, self.loras.requests
        fields: dict[str, object] = {"Steps": steps, "Sampler": self.sampler}
        if self.sampling is None:
            fields["CFG scale"] = f"{guidance:g}"
        else:
            fields |= self.sampling.guidance_fields(guidance)
        fields |= {
            "Seed": image_seed,
            "Size": f"{self.size[0]}x{self.size[1]}",
            "Model": model_label(config.model),
        }
        if self.clip_skip > 1:
            fields["Clip skip"] = self.clip_skip  # A1111's infotext key
        if self.img2img:
            fields["Denoising strength"] = f"{config.strength:g}"
        if self.loras.applied is not None and on:
            if any(names[i] in self.hashes for i in on):
                fields["Lora hashes"] = ", ".join(
                    f"{names[i]}: {self.hashes[names[i]]}" for i in on if names[i] in self.hashes
                )
            f = 1.0 if factor is None else factor
            fields["Lora scales"] = ", ".join(
                f"{names[i]}: {f * requests[i].unet_scale:g}/{f * requests[i].effective_text_scale:g}"
                for i in on
            )
            if config.blocks:
                fields["Lora blocks"] = ",".join(f"{k}={v:g}" for k, v in config.blocks.items())
            if self.schedule is not None:
                fields["Lora schedule"] = self.schedule
            if config.fuse:
                fields["Lora fused"] = "true"
        if self.ti_hashes:
            fields["TI hashes"] = ", ".join(f"{k}: {v}" for k, v in self.ti_hashes.items())
        fields["Version"] = f"lorax {__version__}"
        return fields

    def text(
        self,
        prompt: str,
        negative: str,
        seed: int,
        factor: float | None,
        on: list[int],
        steps: int,
        guidance: float,
        extra: dict[str, str] | None = None,
    ) -> str:
        """The whole ``parameters`` text of one image (``extra``: a sheet's own fields, last)."""
        from lorax.gen.params import format_parameters

        fields = self.fields(seed, factor, on, steps, guidance)
        return format_parameters(self.prompt(prompt, factor, on), negative, {**fields, **(extra or {})})
