"""The shapes world and its scorers: determinism, captions, scorer accuracy on clean renders (held-out included)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lorax.zoo.shapes import scorers, world
from lorax.zoo.shapes.scorers import UNKNOWN, parse_prompt, read_image, score_images


def test_renders_are_deterministic_in_the_seed():
    a = world.render_batch(list(world.scenes(8, seed=3)))
    b = world.render_batch(list(world.scenes(8, seed=3)))
    c = world.render_batch(list(world.scenes(8, seed=4)))
    assert a.shape == (8, world.RESOLUTION, world.RESOLUTION, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_base_draws_never_use_held_out_concepts():
    drawn = list(world.scenes(400, seed=0))
    assert {s.shape for s in drawn} == set(world.BASE_SHAPES)
    assert {s.colour for s in drawn} == set(world.BASE_COLOURS)
    assert {s.background for s in drawn} == set(world.BACKGROUNDS)
    assert not set(world.HELDOUT_SHAPES) & set(world.BASE_SHAPES)
    assert not set(world.HELDOUT_COLOURS) & set(world.BASE_COLOURS)
    assert len(world.BASE_SHAPES) >= 4 and len(world.BASE_COLOURS) >= 5


def test_render_paints_the_background_and_the_colour():
    scene = world.Scene("square", "blue", "white", size=16, x=8, y=8)
    img = world.render(scene).astype(int)
    assert tuple(img[0, 0]) == (255, 255, 255)  # a corner is background
    assert tuple(img[16, 16]) == tuple(
        round(c * 255) for c in world.COLOURS["blue"]
    )  # the centre is the square
    # a 16-pixel square on whole pixels covers exactly 16×16 pixels
    assert int((np.abs(img - 255).sum(axis=2) > 0).sum()) == 16 * 16


def test_caption_format():
    assert world.caption("circle", "red", "white") == "a red circle on a white background"
    assert world.caption("star", None, None) == "a star"
    assert world.caption(None, "red", "black") == "a red shape on a black background"
    scene = world.Scene("cross", "cyan", "gray", size=12, x=3, y=4)
    assert scene.caption == "a cyan cross on a gray background"


def test_every_vocabulary_word_is_one_token():
    from lorax.zoo.tiny import build_tokenizer

    words = world.vocabulary()
    for needed in [*world.SHAPES, *world.COLOURS, *world.BACKGROUNDS, "sks", "background", "shape"]:
        assert needed in words
    tok = build_tokenizer(words)
    for word in words:
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, (word, ids)


@pytest.fixture(scope="module")
def clean_renders():
    # every shape and colour, held-out ones included
    drawn = list(world.scenes(420, seed=11, shapes=world.SHAPES, colours=tuple(world.COLOURS)))
    return drawn, world.render_batch(drawn)


def test_scorers_read_clean_renders(clean_renders):
    drawn, images = clean_renders
    readings = [read_image(img) for img in images]
    colour_ok = np.mean([r.colour == s.colour for r, s in zip(readings, drawn, strict=True)])
    shape_ok = np.mean([r.shape == s.shape for r, s in zip(readings, drawn, strict=True)])
    bg_ok = np.mean([r.background == s.background for r, s in zip(readings, drawn, strict=True)])
    assert colour_ok >= 0.98 and shape_ok >= 0.98 and bg_ok >= 0.98, (colour_ok, shape_ok, bg_ok)
    # and on the held-out concepts alone
    held = [
        (r, s)
        for r, s in zip(readings, drawn, strict=True)
        if s.shape in world.HELDOUT_SHAPES or s.colour in world.HELDOUT_COLOURS
    ]
    assert len(held) > 100
    assert np.mean([r.shape == s.shape and r.colour == s.colour for r, s in held]) >= 0.98


def test_scorers_read_pil_and_float_images():
    scene = world.Scene("heart", "purple", "black", size=20, x=6, y=5)
    arr = world.render(scene)
    for image in (Image.fromarray(arr), arr.astype(np.float32) / 255.0):
        assert scorers.classify_shape(image) == "heart"
        assert scorers.classify_colour(image) == "purple"


def test_no_clear_shape_is_unknown():
    blank = np.full((32, 32, 3), 128, dtype=np.uint8)
    assert read_image(blank).shape == UNKNOWN and read_image(blank).colour == UNKNOWN
    # two shapes of one colour: no single shape
    two = world.render(world.Scene("circle", "red", "white", size=12, x=1, y=1))
    other = world.render(world.Scene("square", "red", "white", size=12, x=18, y=18))
    both = np.minimum(two, other)
    assert read_image(both).shape == UNKNOWN
    # noise: no shape
    noise = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    assert read_image(noise).shape == UNKNOWN
    # a grey shape has no palette colour
    grey = np.full((32, 32, 3), 255, dtype=np.uint8)
    grey[8:24, 8:24] = 60
    assert read_image(grey).colour == UNKNOWN and read_image(grey).shape == "square"


def test_parse_prompt():
    assert parse_prompt("a red circle on a white background") == {
        "colour": "red",
        "shape": "circle",
        "background": "white",
    }
    assert parse_prompt("a sks star") == {"colour": None, "shape": "star", "background": None}
    assert parse_prompt("A photo of a purple shape, on a gray background") == {
        "colour": "purple",
        "shape": None,
        "background": "gray",
    }


def test_score_images_counts_hits_per_attribute():
    scenes = [
        world.Scene("circle", "red", "white", size=18, x=6, y=6),
        world.Scene("square", "blue", "black", size=18, x=6, y=6),
        world.Scene("triangle", "green", "gray", size=18, x=6, y=6),
        world.Scene("star", "orange", "white", size=20, x=6, y=6),
    ]
    images = [world.render(s) for s in scenes]
    prompts = [
        "a red circle on a white background",  # all right
        "a red square on a black background",  # colour wrong
        "a green circle",  # shape wrong, no background asked
        "a sks star",  # shape right, no colour asked
    ]
    result = score_images(images, prompts)
    assert result["n"] == 4
    assert result["n_colour"] == 3 and result["colour"] == pytest.approx(2 / 3)
    assert result["n_shape"] == 4 and result["shape"] == pytest.approx(3 / 4)
    assert result["n_background"] == 2 and result["background"] == pytest.approx(1.0)
    assert result["readings"][1]["seen"]["colour"] == "blue"
    one = score_images(images[:1], "a yellow heart")
    assert one["colour"] == 0.0 and one["shape"] == 0.0 and one["background"] is None
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        score_images(images[:2], prompts[:3])


def test_write_concept_dir(tmp_path):
    paths = world.write_concept_dir(tmp_path / "stars", "star", "purple", n=6, seed=1, caption="a sks star")
    assert [p.name for p in paths] == [f"{i:04d}.png" for i in range(6)]
    for p in paths:
        assert p.with_suffix(".txt").read_text() == "a sks star\n"
        image = Image.open(p)
        assert image.size == (world.RESOLUTION, world.RESOLUTION)
        assert read_image(image).shape == "star" and read_image(image).colour == "purple"
    again = world.write_concept_dir(tmp_path / "again", "star", "purple", n=6, seed=1)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]
    own = again[0].with_suffix(".txt").read_text()
    assert own.startswith("a purple star on a ") and own.endswith(" background\n")
