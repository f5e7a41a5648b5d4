"""The one ``PATH[:NUMBER[:NUMBER]]`` grammar that merge/mix inputs and ``generate --lora`` share."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorax.gen.config import parse_lora_arg
from lorax.services.common import LoraSpec
from lorax.specs import split_numbers


@pytest.mark.parametrize(
    ("text", "most", "path", "numbers"),
    [
        ("a.safetensors", 2, "a.safetensors", []),
        ("a.safetensors:0.8", 2, "a.safetensors", [0.8]),
        ("a.safetensors:0.8:0.3", 2, "a.safetensors", [0.8, 0.3]),
        ("a.safetensors:0.8:0.3", 1, "a.safetensors:0.8", [0.3]),
        ("dir/a:b.safetensors", 2, "dir/a:b.safetensors", []),  # not a number: part of the path
        (":0.5", 2, ":0.5", []),  # nothing would be left of the path
        ("a.safetensors:1e-1", 1, "a.safetensors", [0.1]),
    ],
)
def test_split_numbers(text: str, most: int, path: str, numbers: list[float]) -> None:
    assert split_numbers(text, most) == (Path(path), numbers)


def test_an_existing_path_with_a_colon_is_taken_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("style:0.5").write_bytes(b"")
    assert split_numbers("style:0.5", 2) == (Path("style:0.5"), [])
    assert LoraSpec.parse("style:0.5") == LoraSpec(Path("style:0.5"))
    assert parse_lora_arg("style:0.5").scale == 1.0


def test_merge_and_generate_read_the_same_text_the_same_way() -> None:
    merge, gen = LoraSpec.parse("x.safetensors:0.7"), parse_lora_arg("x.safetensors:0.7")
    assert (merge.path, merge.alpha) == (gen.path, gen.scale) == (Path("x.safetensors"), 0.7)
    assert parse_lora_arg("x.safetensors:0.7:0.2").text_scale == 0.2
