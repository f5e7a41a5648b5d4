"""AUTOMATIC1111's LoRA prompt syntax: ``<lora:NAME>``, ``<lora:NAME:W>``, ``<lora:NAME:TE_W:UNET_W>``.

As in A1111's ``extensions-builtin/Lora/extra_networks_lora.py``: the first number is the text-encoder multiplier,
the second the UNet's (one number sets both; none means 1); ``te=`` / ``unet=`` name them explicitly. ``NAME`` is a
LoRA file's name without its extension, looked up (in sub-folders too) in the LoRA folder, else the file whose
``ss_output_name`` is ``NAME`` (A1111's alias). The tags are taken out of the prompt the model sees; the
``parameters`` text of each PNG carries them again so the prompt pastes back into A1111 unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lorax.errors import ConfigError, InputError

# A1111's extra-network tag: <name:arg:arg…> (modules/extra_networks.py re_extra_net)
_TAG = re.compile(r"<(\w+):([^>]+)>")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


@dataclass(frozen=True)
class PromptLora:
    """One ``<lora:…>`` tag of a prompt."""

    name: str
    unet_scale: float = 1.0
    text_scale: float = 1.0


def parse_tag(body: str) -> PromptLora:
    """``sks-dog:0.8`` (what follows ``lora:``) → a :class:`PromptLora`, A1111's argument order."""
    items = body.split(":")
    positional = [i for i in items if "=" not in i]
    named = dict(i.split("=", 1) for i in items if "=" in i)
    if not positional or not positional[0].strip():
        raise ConfigError(f"<lora:{body}>: a LoRA tag needs a name, e.g. <lora:sks-dog:0.8>")
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown or len(positional) > 3:
        raise ConfigError(f"<lora:{body}>: write <lora:NAME:WEIGHT> or <lora:NAME:TE_WEIGHT:UNET_WEIGHT>")
    try:
        te = float(positional[1]) if len(positional) > 1 else 1.0
        te = float(named.get("te", te))
        unet = float(positional[2]) if len(positional) > 2 else te
        unet = float(named.get("unet", unet))
    except ValueError:
        raise ConfigError(f"<lora:{body}>: the weights must be numbers, e.g. <lora:sks-dog:0.8>") from None
    return PromptLora(positional[0].strip(), unet, te)


def split_prompt(prompt: str) -> tuple[str, list[PromptLora]]:
    """The prompt without its ``<lora:…>`` tags (other extra-network tags are left alone), and the tags."""
    found: list[PromptLora] = []

    def take(match: re.Match[str]) -> str:
        if match.group(1) != "lora":
            return match.group(0)
        found.append(parse_tag(match.group(2)))
        return ""

    text = _TAG.sub(take, prompt)
    if found:
        text = re.sub(r"[ \t]{2,}", " ", text).strip()
        text = re.sub(r"\s+,", ",", text).strip(" ,")
    return text, found


def format_tag(name: str, unet_scale: float, text_scale: float) -> str:
    """The tag A1111 reads back as these scales."""
    name = name.replace(":", "").replace(">", "")
    if unet_scale == text_scale:
        return f"<lora:{name}:{unet_scale:g}>"
    return f"<lora:{name}:{text_scale:g}:{unet_scale:g}>"


def with_tags(prompt: str, tags: list[str]) -> str:
    """``prompt`` with the tags appended, as A1111 users write them."""
    return " ".join([prompt, *tags]) if prompt else " ".join(tags)


def resolve_name(name: str, folder: Path) -> Path:
    """The LoRA file ``NAME`` stands for in ``folder`` (A1111's lookup: file name without extension, then alias)."""
    if not folder.is_dir():
        raise InputError(f"<lora:{name}>: the LoRA folder does not exist (pass --lora-dir)", path=folder)
    candidates = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in LORA_SUFFIXES)
    direct = [p for p in candidates if p.name == name]  # <lora:file.safetensors>
    matches = direct or [p for p in candidates if p.stem == name]
    if not matches:
        matches = [p for p in candidates if p.suffix == ".safetensors" and _alias(p) == name]
    if not matches:
        raise InputError(
            f"<lora:{name}>: no LoRA file {name}.safetensors (or .pt) in the LoRA folder; pass --lora-dir",
            path=folder,
        )
    if len(matches) > 1:
        listed = ", ".join(str(p.relative_to(folder)) for p in matches[:4])
        raise InputError(f"<lora:{name}> matches {len(matches)} files ({listed}); rename one", path=folder)
    return matches[0]


def _alias(path: Path) -> str | None:
    from lorax.errors import LoraxError
    from lorax.io.safetensors_io import read_header

    try:
        return read_header(path).metadata.get("ss_output_name")
    except LoraxError:
        return None
