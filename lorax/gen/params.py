"""Generation parameters in a PNG ``parameters`` text chunk, in AUTOMATIC1111's "infotext" convention.

The text is three parts::

    a red circle on a white background
    Negative prompt: blurry
    Steps: 20, Sampler: DDIM, CFG scale: 7.5, Seed: 1, Size: 64x64, Model: shapes, Lora hashes: "red: 0123456789ab"

The prompt (possibly several lines), an optional ``Negative prompt:`` line, and one line of ``Key: value`` pairs
separated by ``, ``. A value containing ``,``, ``:``, ``"`` or a line break is written as a JSON string, as A1111
does, so every value reads back exactly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lorax.errors import FormatError

PARAMETERS_KEY = "parameters"
_NEGATIVE = "Negative prompt:"
# One `Key: value` pair: a key of words, then a JSON string or anything up to the next comma (A1111's re_param).
_PAIR = re.compile(r'\s*(\w[\w \-/+()]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


@dataclass
class Parameters:
    """A prompt, its negative prompt and the ordered ``Key: value`` fields of one generated image."""

    prompt: str
    negative_prompt: str = ""
    fields: dict[str, str] = field(default_factory=dict)


def quote(value: object) -> str:
    """A1111's quoting: plain text unless it holds a separator, then a JSON string."""
    text = str(value)
    if any(c in text for c in ',:"\n') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def format_parameters(prompt: str, negative_prompt: str, fields: Mapping[str, object]) -> str:
    """The ``parameters`` text for one image."""
    for key in fields:
        if not re.fullmatch(r"\w[\w \-/+()]*", key) or key.endswith(" "):
            raise ValueError(f"not a valid parameters key: {key!r}")
    lines = [prompt]
    if negative_prompt:
        lines.append(f"{_NEGATIVE} {negative_prompt}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            return str(json.loads(value))
        except json.JSONDecodeError:
            return value
    return value


def parse_fields(line: str) -> dict[str, str]:
    """``Key: value, Key: "quoted, value"`` → an ordered dict of strings."""
    return {key.strip(): _unquote(value) for key, value in _PAIR.findall(line)}


def parse_parameters(text: str) -> Parameters:
    """Read back what :func:`format_parameters` wrote (or what A1111 writes)."""
    lines = text.split("\n")
    fields: dict[str, str] = {}
    if len(lines) > 1 and len(_PAIR.findall(lines[-1])) >= 3:
        fields = parse_fields(lines[-1])
        lines = lines[:-1]
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        if not in_negative and line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE) :].removeprefix(" ")
        (negative_lines if in_negative else prompt_lines).append(line)
    return Parameters("\n".join(prompt_lines), "\n".join(negative_lines), fields)


def parse_scales(value: str) -> dict[str, tuple[float, float]]:
    """``"name: 0.8/0.5, other: 1/1"`` (the ``Lora scales`` field: UNet/text-encoder scale) → a dict."""
    scales: dict[str, tuple[float, float]] = {}
    for item in value.split(","):
        if not item.strip():
            continue
        name, _, pair = item.rpartition(":")
        unet, _, text = pair.strip().partition("/")
        scales[name.strip()] = (float(unet), float(text or unet))
    return scales


def read_png_parameters(path: str | Path) -> Parameters:
    """The parameters stored in a PNG written by ``lorax generate`` (or A1111)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            text = getattr(image, "text", {}).get(PARAMETERS_KEY) or image.info.get(PARAMETERS_KEY)
    except (OSError, UnidentifiedImageError) as err:
        raise FormatError(f"cannot read the image ({err})", path=path) from None
    if not text:
        raise FormatError("the image has no 'parameters' text chunk", path=path)
    return parse_parameters(str(text))


def save_png(image: object, path: str | Path, parameters: str) -> None:
    """Write ``image`` (a PIL image) as PNG with ``parameters`` in a text chunk (iTXt when not Latin-1)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)
    image.save(path, format="PNG", pnginfo=info)  # type: ignore[attr-defined]
