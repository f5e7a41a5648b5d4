"""Pictures people look at (issue 14 item 4): labelled X/Y sheets, ``generate --xy``, labelled sweeps, the loss plot
and the validation-samples sheet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lorax.gen.grid import font, make_grid, wrap, xy_grid


def ink(sheet: Image.Image, box: tuple[int, int, int, int]) -> int:
    """Dark pixels (text) inside ``box`` = (left, top, right, bottom)."""
    a = np.asarray(sheet.convert("L").crop(box))
    return int((a < 128).sum())


def cells(rows: int, cols: int, size: int = 32) -> list[list[Image.Image]]:
    return [
        [Image.new("RGB", (size, size), (200, 40 + 50 * r, 40 + 40 * c)) for c in range(cols)]
        for r in range(rows)
    ]


def test_xy_grid_places_cells_and_labels_like_a1111() -> None:
    grid = cells(2, 3)
    sheet = xy_grid(grid, col_labels=["x0", "x1", "x2"], row_labels=["y0", "y1"], title="a prompt", gap=4)
    # 32-pixel cells are scaled 4× (to ≥ 128) by a whole factor; find them by their exact colours
    a = np.asarray(sheet)
    for r in range(2):
        for c in range(3):
            colour = grid[r][c].getpixel((0, 0))
            ys, xs = np.nonzero((a == colour).all(axis=-1))
            assert xs.max() - xs.min() + 1 == 128 and ys.max() - ys.min() + 1 == 128
            if c:  # columns left to right, rows top to bottom, one gap apart
                prev = np.nonzero((a == grid[r][c - 1].getpixel((0, 0))).all(axis=-1))[1]
                assert xs.min() == prev.max() + 1 + 4
    ys, xs = np.nonzero((a == grid[0][0].getpixel((0, 0))).all(axis=-1))
    top, left = int(ys.min()), int(xs.min())
    # text above each column (in its own span), at the left of each row, and the title above that
    for c in range(3):
        x = left + c * 132
        assert ink(sheet, (x, top - 20, x + 128, top)) > 10
    for r in range(2):
        y = top + r * 132
        assert ink(sheet, (0, y, left, y + 128)) > 10
    assert ink(sheet, (0, 0, sheet.width, 12)) > 10
    plain = xy_grid(
        grid, col_labels=["x0", "x1", "x2"]
    )  # no row labels, no title: no left column, less height
    assert plain.width < sheet.width and plain.height < sheet.height


def test_long_labels_wrap_within_their_cell() -> None:
    fnt = font(16)
    lines = wrap("a red circle on a white background with a long tail", fnt, 100)
    assert len(lines) > 2
    assert all(fnt.getbbox(line)[2] - fnt.getbbox(line)[0] <= 100 for line in lines)
    assert " ".join(lines) == "a red circle on a white background with a long tail"
    cut = wrap("x" * 80, fnt, 60)  # one word wider than the cell is cut, nothing lost
    assert "".join(cut) == "x" * 80 and len(cut) > 1
    short = xy_grid(cells(1, 2), col_labels=["a", "b"])
    long = xy_grid(cells(1, 2), col_labels=["a", "a label long enough to need three lines or more"])
    assert long.width == short.width and long.height > short.height + 20


def test_small_cells_are_scaled_by_a_whole_factor_and_big_ones_kept() -> None:
    small = xy_grid(cells(1, 1, 20), col_labels=["s"], min_cell=128)
    a = np.asarray(small)
    _, xs = np.nonzero((a == (200, 40, 40)).all(axis=-1))
    assert xs.max() - xs.min() + 1 == 140  # 20 × 7 ≥ 128
    big = xy_grid(cells(1, 1, 200), col_labels=["b"], min_cell=128)
    _ys, xs = np.nonzero((np.asarray(big) == (200, 40, 40)).all(axis=-1))
    assert xs.max() - xs.min() + 1 == 200


def test_bad_grids_are_refused() -> None:
    with pytest.raises(ValueError):
        xy_grid([], col_labels=[])
    with pytest.raises(ValueError, match="one image per column"):
        xy_grid(cells(2, 2), col_labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="row label"):
        xy_grid(cells(2, 2), col_labels=["a", "b"], row_labels=["only one"])
    mixed = cells(1, 2)
    mixed[0][1] = Image.new("RGB", (16, 16))
    with pytest.raises(ValueError, match="same size"):
        xy_grid(mixed, col_labels=["a", "b"])
    assert make_grid([Image.new("RGB", (16, 16))] * 4, 2).size == (2 * 64 + 3 * 2, 2 * 64 + 3 * 2)


# ---- lorax generate --xy and the labelled sweep, through the CLI on the tiny model -------------------------------

PROMPT = "a red circle on a white background"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lorax.zoo.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("grid-model") / "tiny-sd1"
    tiny_pipeline("sd1", seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two kohya LoRA files for the tiny model, ``style-a`` and ``style-b``."""
    from test_generate import make_lora

    from lorax.formats import save_lora
    from lorax.services.generate import load_model

    pipe = load_model(str(tiny_model))
    folder = tmp_path_factory.mktemp("grid-loras")
    for name, seed in (("style-a", 31), ("style-b", 32)):
        save_lora(make_lora(pipe, seed, magnitude=0.3), folder / f"{name}.safetensors", format="kohya")
    return folder


def gen(cli, model: Path, out: Path, *args: str):
    return cli("generate", *args, "--model", model, "-o", out, "--steps", "3", "--seed", "5")


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def contains(sheet: Path, cell: Path) -> bool:
    """The cell image, scaled by a whole factor, appears somewhere in the sheet exactly."""
    big, small = pixels(sheet), pixels(cell)
    h, w = small.shape[:2]
    factor = 128 // w if w < 128 else 1
    factor += 1 if w * factor < 128 else 0
    scaled = small.repeat(factor, 0).repeat(factor, 1)
    ys, xs = np.nonzero((big == scaled[0, 0]).all(axis=-1))
    for y, x in zip(ys, xs, strict=True):
        window = big[y : y + h * factor, x : x + w * factor]
        if window.shape == scaled.shape and (window == scaled).all():
            return True
    return False


def test_xy_scale_by_prompt_writes_cells_and_one_labelled_sheet(
    cli, tiny_model: Path, lora_dir: Path, tmp_path: Path
) -> None:
    import json

    from lorax.gen.params import read_png_parameters

    lora = lora_dir / "style-a.safetensors"
    result = gen(
        cli, tiny_model, tmp_path / "xy", PROMPT, "--lora", lora, "--xy", "scale=0,1", "--xy", "prompt=red,blue",
        "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["kind"] for r in records] == ["xy"] * 4 + ["xy-grid"]
    cells = [Path(r["path"]) for r in records[:4]]
    assert [p.name for p in cells] == [
        "a-red-circle-on-a-white-background-5-s0-p0.png",
        "a-red-circle-on-a-white-background-5-s1-p0.png",
        "a-red-circle-on-a-white-background-5-s0-p1.png",
        "a-red-circle-on-a-white-background-5-s1-p1.png",
    ]
    # each cell is exactly the image of the plain command it stands for (scale 0: the model alone)
    blue = PROMPT.replace("red", "blue")
    one = gen(cli, tiny_model, tmp_path / "one", blue, "--lora", f"{lora}:1")
    base = gen(cli, tiny_model, tmp_path / "base", blue)
    assert one.exit_code == 0 and base.exit_code == 0, one.output + base.output
    np.testing.assert_array_equal(pixels(cells[3]), pixels(Path(one.stdout.strip())))
    np.testing.assert_array_equal(pixels(cells[2]), pixels(Path(base.stdout.strip())))
    assert np.abs(pixels(cells[3]) - pixels(cells[2])).max() > 10
    assert read_png_parameters(cells[2]).prompt.startswith(blue)
    sheet = Path(records[-1]["path"])
    assert sheet.name == "a-red-circle-on-a-white-background-5-xy.png"
    assert all(contains(sheet, c) for c in cells)
    fields = read_png_parameters(sheet).fields  # A1111's xyz_grid keys
    assert (fields["X Type"], fields["X Values"]) == ("LoRA scale", "0,1")
    assert (fields["Y Type"], fields["Y Values"]) == ("Prompt S/R", "red,blue")
    with Image.open(sheet) as picture:  # the title, the column labels and the row labels take room
        assert picture.width > 2 * 128 + 40 and picture.height > 2 * 128 + 40


def test_xy_lora_axis_picks_one_file_per_column(
    cli, tiny_model: Path, lora_dir: Path, tmp_path: Path
) -> None:
    result = gen(
        cli, tiny_model, tmp_path / "xy", PROMPT, "--lora-dir", lora_dir, "--xy", "lora=style-a,style-b,none"
    )
    assert result.exit_code == 0, result.output
    paths = [Path(p) for p in result.stdout.split()]
    assert [p.name.rsplit("-5-", 1)[1] for p in paths] == [
        "lora-style-a.png",
        "lora-style-b.png",
        "lora-none.png",
        "xy.png",
    ]
    for name, cell in (("style-b", paths[1]), (None, paths[2])):
        args = ["--lora", str(lora_dir / f"{name}.safetensors")] if name else []
        alone = gen(cli, tiny_model, tmp_path / f"alone-{name}", PROMPT, *args)
        assert alone.exit_code == 0, alone.output
        np.testing.assert_array_equal(pixels(cell), pixels(Path(alone.stdout.strip())))
    from lorax.gen.params import read_png_parameters

    assert "style-a" not in read_png_parameters(paths[1]).fields["Lora hashes"]
    assert "Lora hashes" not in read_png_parameters(paths[2]).fields


def test_xy_seed_by_steps_and_guidance(cli, tiny_model: Path, tmp_path: Path) -> None:
    from lorax.gen.params import read_png_parameters

    result = gen(cli, tiny_model, tmp_path / "xy", PROMPT, "--xy", "seed=7,8", "--xy", "steps=2,4")
    assert result.exit_code == 0, result.output
    paths = [Path(p) for p in result.stdout.split()]
    assert [p.name.removeprefix("a-red-circle-on-a-white-background-") for p in paths] == [
        "7-steps2.png",
        "8-steps2.png",
        "7-steps4.png",
        "8-steps4.png",
        "5-xy.png",
    ]
    fields = read_png_parameters(paths[2]).fields
    assert (fields["Seed"], fields["Steps"]) == ("7", "4")
    alone = cli(
        "generate", PROMPT, "--model", tiny_model, "-o", tmp_path / "a", "--steps", "4", "--seed", "7"
    )
    np.testing.assert_array_equal(pixels(paths[2]), pixels(Path(alone.stdout.strip())))
    cfg = gen(cli, tiny_model, tmp_path / "cfg", PROMPT, "--xy", "guidance=1,9")
    assert cfg.exit_code == 0, cfg.output
    first, second = (Path(p) for p in cfg.stdout.split()[:2])
    assert read_png_parameters(second).fields["CFG scale"] == "9"
    assert np.abs(pixels(first) - pixels(second)).max() > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--xy", "colour=red,blue"], "--xy 'colour': unknown kind; choose one of prompt, scale, lora"),
        (["--xy", "seed="], "--xy seed: no values"),
        (["--xy", "seed=1,,2"], "--xy seed=1,,2: an empty value"),
        (["--xy", "steps=2,x"], "--xy steps: 'x' is not a number"),
        (["--xy", "steps=0,2"], "--xy steps: '0' must be at least 1"),
        (["--xy", "seed=1,1"], "--xy seed: '1' is given twice"),
        (
            ["--xy", "prompt=square,circle"],
            "--xy prompt: the search text 'square' (the first value) is not in",
        ),
        (["--xy", "seed=1,2", "--xy", "seed=3"], "--xy seed is given twice"),
        (["--xy", "scale=0,1"], "--xy scale needs at least one --lora"),
        (["--xy", "seed=1,2", "-n", "2"], "--xy makes one image per cell"),
        (["--xy", "seed=1,2", "--grid"], "--xy writes its own labelled grid"),
        (["--xy", "lora=nowhere"], "--xy lora: 'nowhere' is neither a file nor the name of a LoRA file"),
        (["--xy", "seed"], "--xy 'seed' is not KIND=V1,V2"),
    ],
)
def test_bad_xy_is_one_line(cli, tiny_model: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = gen(cli, tiny_model, tmp_path / "bad", PROMPT, "--lora-dir", tmp_path, *args)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    assert lines[0].startswith("lorax: error: ") and message in lines[0], lines[0]
    assert not (tmp_path / "bad").exists()


def test_sweep_sheet_is_labelled_and_grid_works_with_a_sweep(
    cli, tiny_model: Path, lora_dir: Path, tmp_path: Path
) -> None:
    import json

    from lorax.gen.params import read_png_parameters

    lora = lora_dir / "style-a.safetensors"
    args = [PROMPT, "--lora", str(lora), "--sweep-scale", "0,1", "-n", "2", "--json"]
    result = gen(cli, tiny_model, tmp_path / "s", *args, "--grid")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [r["kind"] for r in records]
    assert kinds == ["sweep", "sweep", "sweep", "sweep", "grid", "grid", "sweep-grid"]
    assert [Path(r["path"]).name for r in records[4:6]] == [
        "a-red-circle-on-a-white-background-5-s0-grid.png",
        "a-red-circle-on-a-white-background-5-s1-grid.png",
    ]
    assert [r["scale"] for r in records[4:6]] == [0.0, 1.0]
    sheet = Path(records[-1]["path"])
    frames = [Path(r["path"]) for r in records[:4]]
    assert all(contains(sheet, f) for f in frames)
    assert read_png_parameters(sheet).fields["Lora sweep"] == "0,1"
    # the labels: a line of title, a line of column labels and a row-label column beside the 2×2 cells
    with Image.open(sheet) as picture:
        labelled = picture.copy()
    plain = gen(
        cli, tiny_model, tmp_path / "p", *args[:-1]
    )  # without --grid: the same sheet, no contact sheets
    assert plain.exit_code == 0 and "grid.png" not in plain.stdout
    with Image.open(sheet) as picture:
        assert picture.width > 2 * 128 + 30 and picture.height > 2 * 128 + 2 * 14
    a = np.asarray(labelled.convert("L"))
    top = int(np.nonzero((pixels(sheet) != 255).any(axis=-1).any(axis=1))[0][0])
    assert (a[top : top + 12] < 128).sum() > 20  # the title (the prompt) is drawn on top


# ---- the loss plot ------------------------------------------------------------------------------------------------

RESUME_RED = (200, 30, 30)
CHECKPOINT_GREY = (120, 120, 120)


def colour_columns(path: Path, colour: tuple[int, int, int]) -> list[int]:
    """The x columns holding at least 20 pixels of exactly ``colour`` (a vertical marker line)."""
    a = pixels(path)
    counts = (a == colour).all(axis=-1).sum(axis=0)
    return [int(x) for x in np.nonzero(counts >= 20)[0]]


def synthetic(outlier: bool, n: int = 200) -> list[list[float]]:
    rng = np.random.default_rng(0)
    rows = []
    for step in range(1, n + 1):
        loss = 0.1 + 0.2 * np.exp(-step / 40) + 0.03 * rng.random()
        if outlier and step == 3:
            loss = 9.0  # one bad batch, 30× the rest
        rows.append([step, float(loss), 1e-4 * min(1.0, step / 20), step * 0.1])
    return rows


def test_log_scale_is_chosen_for_one_outlier_not_for_a_smooth_curve() -> None:
    from lorax.training.report import wants_log_scale

    assert wants_log_scale([r[1] for r in synthetic(outlier=True)])
    assert not wants_log_scale([r[1] for r in synthetic(outlier=False)])
    assert not wants_log_scale([1.0, 2.0, 3.0, 50.0 * 2.0 / 20.0])  # max 5 = 2.5× the median
    assert wants_log_scale([1.0, 1.0, 1.0, 21.0])  # just over 20× the median
    assert not wants_log_scale([0.0, 1.0, 1.0, 100.0])  # a zero cannot go on a log axis
    assert not wants_log_scale([5.0])


def test_loss_plot_draws_both_axes_markers_and_a_log_scale(tmp_path: Path) -> None:
    from lorax.training.report import write_loss_png

    plain, marked, spiky = tmp_path / "plain.png", tmp_path / "marked.png", tmp_path / "spiky.png"
    write_loss_png(synthetic(False), plain, title="t")
    write_loss_png(synthetic(False), marked, title="t", checkpoints=[50, 100, 150], resumed_at=100)
    write_loss_png(synthetic(True), spiky, title="t")
    for path in (plain, marked, spiky):
        with Image.open(path) as image:
            assert image.size == (800, 450) and image.format == "PNG"
        assert path.stat().st_size < 100_000
    assert colour_columns(plain, CHECKPOINT_GREY) == [] and colour_columns(plain, RESUME_RED) == []
    grey = colour_columns(marked, CHECKPOINT_GREY)
    red = colour_columns(marked, RESUME_RED)
    # one dashed line per checkpoint, evenly spaced as the steps are; the resume line on the middle one's step
    groups = [g for g in np.split(np.array(grey), np.nonzero(np.diff(grey) > 3)[0] + 1) if len(g)]
    assert len(groups) == 2  # 50 and 150 (the line at 100 is under the resume marker)
    middle = float(np.mean(red))
    assert abs((groups[0].mean() + groups[1].mean()) / 2 - middle) <= 2
    # the learning rate (orange) is drawn, with its own tick labels at the right of the plot box
    orange = (pixels(marked) == (230, 126, 34)).all(axis=-1)
    assert orange[:, :700].sum() > 100 and orange[:, 735:].sum() > 20

    # the spike is drawn on a log axis, so the curve after it is not squashed flat
    def curve_height(path: Path) -> int:
        dark = (pixels(path) == (24, 64, 168)).all(axis=-1)[
            50:400, 300:700
        ]  # inside the plot box, late steps
        rows = np.nonzero(dark.any(axis=1))[0]
        return int(rows.max() - rows.min())

    assert curve_height(spiky) > 15
    flat = tmp_path / "flat.png"
    write_loss_png(synthetic(True), flat, title="t", log_scale=False)
    assert curve_height(flat) < curve_height(spiky) / 4  # on a linear axis the spike squashes the rest flat


# ---- lorax train: the loss plot's markers and the validation-samples sheet ----------------------------------------


@pytest.fixture(scope="module")
def train_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("grid-images")
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    return folder


def test_train_writes_a_marked_loss_plot_and_a_samples_sheet(
    cli, tiny_model: Path, train_images: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sks.safetensors"
    prompts = ["a red circle", "a blue square"]
    args = [
        "train", train_images, "--model", tiny_model, "--instance-prompt", "a sks circle", "--resolution", "32",
        "--steps", "4", "--checkpoint-every", "2", "--validation-every", "2", "--sample-steps", "2",
        *[a for p in prompts for a in ("--validation-prompt", p)],
    ]  # fmt: skip
    first = cli(*args, "-o", out)
    assert first.exit_code == 0, first.output
    sheet = tmp_path / "sks.samples.png"
    assert f"samples sheet {sheet}" in first.stderr
    samples = sorted((tmp_path / "sks.samples").iterdir())
    assert [p.name for p in samples] == [
        "step-000002-0.png",
        "step-000002-1.png",
        "step-000004-0.png",
        "step-000004-1.png",
    ]
    # rows are the prompts, columns the steps: each sample sits in the sheet, in that order
    with Image.open(sheet) as picture:
        assert picture.width > 2 * 128 and picture.height > 2 * 128
    where = {}
    big = pixels(sheet)
    for p in samples:
        small = pixels(p).repeat(4, 0).repeat(4, 1)
        hits = [
            (y, x)
            for y, x in zip(*np.nonzero((big == small[0, 0]).all(axis=-1)), strict=True)
            if big[y : y + 128, x : x + 128].shape == small.shape
            and (big[y : y + 128, x : x + 128] == small).all()
        ]
        assert hits, p.name
        where[p.name] = hits[0]
    assert where["step-000002-0.png"][1] < where["step-000004-0.png"][1]  # steps left to right
    assert where["step-000002-0.png"][0] < where["step-000002-1.png"][0]  # prompts top to bottom
    loss_png = tmp_path / "sks.loss.png"
    assert len(colour_columns(loss_png, CHECKPOINT_GREY)) >= 1 and not colour_columns(loss_png, RESUME_RED)

    # as after a Ctrl-C at step 3: the checkpoint at step 2 is kept, the LoRA not yet written; resume
    out.unlink()
    resumed = cli(*args, "-o", out, "--resume", tmp_path / "sks.checkpoints" / "step-000002", "--force")
    assert resumed.exit_code == 0, resumed.output
    assert colour_columns(loss_png, RESUME_RED), "the resume step is marked"
    assert len((tmp_path / "sks.samples.png").read_bytes()) > 1000
    with Image.open(sheet) as picture:  # still both steps: step 2 from the first run, step 4 from this one
        assert picture.width > 2 * 128


def test_docs_show_the_pictures_and_they_are_small() -> None:
    """docs/generate.md and docs/train.md show the sweep, the X/Y plot, the loss plot and the samples sheet that
    `make pictures` (scripts/docs_pictures.py) writes, each under 300 kB."""
    import re

    docs = Path(__file__).resolve().parent.parent / "docs"
    shown = {
        name
        for page in ("generate.md", "train.md")
        for name in re.findall(r"\]\(img/([\w.-]+\.png)\)", (docs / page).read_text(encoding="utf-8"))
    }
    assert {"generate-sweep.png", "generate-xy.png", "train-loss.png", "train-samples.png"} <= shown
    script = (docs.parent / "scripts" / "docs_pictures.py").read_text(encoding="utf-8")
    for name in shown:
        assert name in script, f"{name} is not made by scripts/docs_pictures.py"
        assert 0 < (docs / "img" / name).stat().st_size < 300_000
