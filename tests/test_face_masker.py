"""``lorax prepare --masker face`` on a real portrait: scikit-image's ``astronaut.png`` (NASA's portrait of Eileen
Collins, public domain), which ships inside the scikit-image wheel (read from the package folder, never fetched)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# The face in astronaut.png (512×512), marked by hand: the photo was viewed at 4× with a 10 px grid over
# x 125–325, y 25–225, and the box drawn back on it to check it. Left/right: the cheeks' edges beside the ears
# (hair excluded); top: the forehead's top under the fringe; bottom: the chin. (left, top, right, bottom), pixels.
FACE_BOX = (184, 78, 265, 177)


def astronaut_file() -> Path:
    pytest.importorskip("cv2")
    skimage_data = pytest.importorskip("skimage.data")
    path = Path(skimage_data.__file__).parent / "astronaut.png"
    if not path.is_file():
        pytest.skip(f"this scikit-image does not ship {path.name}")
    return path


def test_face_mask_covers_the_hand_marked_face_of_a_real_portrait(cli, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copyfile(astronaut_file(), raw / "astronaut.png")
    out = tmp_path / "data"
    result = cli("prepare", raw, "-o", out, "--masker", "face", "--size", "512", "--crop", "none", "--json")
    assert result.exit_code == 0, result.stderr
    assert "found no subject" not in result.stderr
    mask = np.asarray(Image.open(out / "astronaut.mask.png"))
    assert mask.shape == (512, 512)  # --crop none at the photo's own size: mask pixels are photo pixels
    left, top, right, bottom = FACE_BOX
    inside = float((mask[top : bottom + 1, left : right + 1] >= 128).mean())
    area = float((mask >= 128).mean())
    print(f"face masker: {inside:.1%} of the hand-marked face box is white; white is {area:.1%} of the photo")
    assert inside >= 0.8 and area < 0.4
    report = json.loads(result.stdout)
    assert report["images"][0]["mask_from"] == "face"
    assert report["images"][0]["mask_coverage"] == pytest.approx(area, abs=1e-4)


def test_subject_crop_centres_on_the_face(cli, tmp_path):
    """The portrait pasted at the right of a 1536×512 grey canvas: ``--crop subject`` cuts the 256 square around
    the face (resize to 768×256, then the window centred on the mask's box), ``--crop center`` the grey middle."""
    raw = tmp_path / "raw"
    raw.mkdir()
    wide = Image.new("RGB", (1536, 512), (128, 128, 128))
    wide.paste(Image.open(astronaut_file()).convert("RGB"), (1024, 0))
    wide.save(raw / "wide.png")
    masks = {}
    for crop in ("subject", "center"):
        out = tmp_path / crop
        result = cli("prepare", raw, "-o", out, "--masker", "face", "--size", "256", "--crop", crop, "-q")
        assert result.exit_code == 0, result.stderr
        masks[crop] = np.asarray(Image.open(out / "wide.mask.png")) >= 128
    assert not masks["center"].any()  # the middle of the canvas is grey: no face in it
    # where the hand-marked face lands in the resized picture (scale ½); the window is centred on it, ±8 px
    face_x = (1024 + (FACE_BOX[0] + FACE_BOX[2]) / 2) / 2
    left = round(face_x) - 128
    want = wide.resize((768, 256), Image.Resampling.LANCZOS).crop((left - 8, 0, left + 8 + 256, 256))
    got = np.asarray(Image.open(tmp_path / "subject" / "wide.png")).astype(np.int16)
    errors = [np.abs(np.asarray(want)[:, d : d + 256].astype(np.int16) - got).mean() for d in range(17)]
    shift = int(np.argmin(errors)) - 8
    assert errors[shift + 8] < 1.0, errors  # the output is that crop, to within Lanczos rounding
    xs = np.nonzero(masks["subject"])[1]
    print(
        f"subject crop: window {shift:+d} px off the hand-marked face's centre; mask box x {xs.min()}-{xs.max()}"
    )
    assert abs(shift) <= 8 and abs((xs.min() + xs.max()) / 2 - 128) <= 8


def test_a_faceless_picture_gets_an_empty_mask_and_a_log_line(cli, tmp_path):
    pytest.importorskip("cv2")
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(raw / "noise.png")
    out = tmp_path / "data"
    result = cli("prepare", raw, "-o", out, "--masker", "face", "--size", "128")
    assert result.exit_code == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "found no subject" in line]
    assert len(lines) == 1 and "noise.png" in lines[0] and "--masker face" in lines[0], result.stderr
    assert not np.asarray(Image.open(out / "noise.mask.png")).any()
