"""The pure helpers of ``lorax generate``: A1111 parameters text, scale schedules, grids, flag parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorax.errors import ConfigError, FormatError
from lorax.gen.grid import make_grid
from lorax.gen.params import (
    format_parameters,
    parse_parameters,
    parse_scales,
    quote,
    read_png_parameters,
    save_png,
)
from lorax.gen.schedule import parse_schedule
from lorax.services.generate import parse_lora_arg, parse_size, read_prompts, slugify

CASES = [
    ("a red circle", "", {"Steps": "20", "Sampler": "DDIM", "CFG scale": "7.5", "Seed": "1"}),
    (
        'a "quoted", tricky: prompt',
        "blurry, low quality",
        {"Steps": "4", "Lora hashes": "a: 0123456789ab, b: ba9876543210", "Lora scales": "a: 0.8/0.5"},
    ),
    ("two\nlines", "neg\nmore", {"Size": "64x64", "Model": "shapes", "Note": ' spaces , "and" \\ back '}),
    ("ünïcødé ✓ prompt", "", {"Seed": "4294967295", "Model": "ünï", "Version": "lorax 0.1.0"}),
]


@pytest.mark.parametrize(("prompt", "negative", "fields"), CASES)
def test_parameters_round_trip_exactly(
    prompt: str, negative: str, fields: dict[str, str], tmp_path: Path
) -> None:
    from PIL import Image

    text = format_parameters(prompt, negative, fields)
    back = parse_parameters(text)
    assert (back.prompt, back.negative_prompt, back.fields) == (prompt, negative, fields)
    assert list(back.fields) == list(fields)  # order kept
    path = tmp_path / "x.png"
    save_png(Image.new("RGB", (4, 4)), path, text)
    read = read_png_parameters(path)
    assert (read.prompt, read.negative_prompt, read.fields) == (prompt, negative, fields)


def test_parameters_read_an_a1111_infotext() -> None:
    """Text as AUTOMATIC1111 writes it (its quoting of a value with commas)."""
    text = (
        "masterpiece, a cat <lora:style:0.8>\n"
        "Negative prompt: lowres\n"
        "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, "
        'Model hash: 6ce0161689, Model: v1-5, Lora hashes: "style: abcdef123456", Version: v1.9.4'
    )
    back = parse_parameters(text)
    assert back.prompt == "masterpiece, a cat <lora:style:0.8>"
    assert back.negative_prompt == "lowres"
    assert back.fields["Sampler"] == "DPM++ 2M"
    assert back.fields["Lora hashes"] == "style: abcdef123456"
    assert back.fields["Version"] == "v1.9.4"
    assert len(back.fields) == 10


def test_quote_and_scales() -> None:
    assert quote("plain") == "plain"
    assert quote("a, b") == '"a, b"'
    assert parse_scales("a: 0.8/0.5, b_2: 1/1, c: 0.25") == {
        "a": (0.8, 0.5),
        "b_2": (1.0, 1.0),
        "c": (0.25, 0.25),
    }
    with pytest.raises(ValueError):
        format_parameters("p", "", {"bad:key": 1})


def test_png_without_parameters_is_a_clear_error(tmp_path: Path) -> None:
    from PIL import Image

    plain = tmp_path / "plain.png"
    Image.new("RGB", (2, 2)).save(plain)
    with pytest.raises(FormatError, match=r"plain\.png.*no 'parameters'"):
        read_png_parameters(plain)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"junk")
    with pytest.raises(FormatError, match=r"junk\.png"):
        read_png_parameters(junk)


def test_schedules() -> None:
    linear = parse_schedule("linear:0:1")
    assert [linear.for_step(i, 5) for i in range(5)] == pytest.approx([0, 0.25, 0.5, 0.75, 1])
    cosine = parse_schedule("cosine:1:0")
    assert cosine.for_step(0, 3) == pytest.approx(1.0)
    assert cosine.for_step(1, 3) == pytest.approx(0.5)
    assert cosine.for_step(2, 3) == pytest.approx(0.0)
    step = parse_schedule("step:0.5")
    assert [step.for_step(i, 4) for i in range(4)] == [0.0, 0.0, 1.0, 1.0]
    assert [parse_schedule("step:0.5:1:0.2").for_step(i, 3) for i in range(3)] == [1.0, 0.2, 0.2]
    listed = parse_schedule("1,0,1")
    assert [listed.for_step(i, 5) for i in range(5)] == pytest.approx([1, 0.5, 0, 0.5, 1])
    assert [parse_schedule("0.1,0.2,0.3").for_step(i, 3) for i in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert parse_schedule("0.7").for_step(3, 10) == 0.7
    assert parse_schedule("linear:0:1").for_step(0, 1) == 0.0
    for bad in ("linear:0", "step:2", "wobble:1:2", "a,b", ""):
        with pytest.raises(ConfigError, match="--scale-schedule"):
            parse_schedule(bad)


def test_grid_layout() -> None:
    from PIL import Image

    cells = [Image.new("RGB", (16, 16), (i * 40, 0, 0)) for i in range(6)]
    sheet = make_grid(cells, 3, col_labels=["0", "0.5", "1"], gap=2, min_cell=32)
    assert sheet.size == (3 * 32 + 4 * 2, 14 + 2 * 32 + 3 * 2)
    # the fifth cell (row 1, column 1) sits where the layout says, scaled 2×
    assert sheet.getpixel((2 + 1 * 34 + 5, 14 + 2 + 1 * 34 + 5)) == (160, 0, 0)
    with pytest.raises(ValueError):
        make_grid([], 2)


def test_flag_parsing(tmp_path: Path) -> None:
    assert parse_lora_arg("x.safetensors:0.8") == parse_lora_arg("x.safetensors:0.8")
    spec = parse_lora_arg("dir/x.safetensors:0.8:0.4")
    assert (str(spec.path), spec.scale, spec.text_scale) == ("dir/x.safetensors", 0.8, 0.4)
    spec = parse_lora_arg("x.safetensors")
    assert (spec.scale, spec.text_scale) == (1.0, None)
    odd = tmp_path / "odd:1.5"
    odd.write_bytes(b"")
    assert parse_lora_arg(str(odd)).path == odd  # a file that exists is taken whole
    assert parse_size("64x32") == (64, 32) and parse_size("48") == (48, 48)
    with pytest.raises(ConfigError, match="--size"):
        parse_size("big")
    assert read_prompts("a\n\n# c\n  b  \n") == ["a", "b"]
    assert slugify("A Red, Circle!  <s1>") == "a-red-circle-s1"
    assert slugify("!!!") == "image"
