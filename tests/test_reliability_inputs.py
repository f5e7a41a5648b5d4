"""Hostile and careless input (issue 13): every bad file gives one line naming the file and the problem."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest


def _write(path: Path, header: dict, data: bytes) -> Path:
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    return path


def _t(offsets: list, dtype: object = "F32", shape: object = (2,)) -> dict:
    return {
        "dtype": dtype,
        "shape": list(shape) if isinstance(shape, tuple) else shape,
        "data_offsets": offsets,
    }


# name → (header, data bytes, words the one line must hold). The safetensors crate itself is the oracle for the
# layout cases: its Metadata::validate / MetadataIncompleteBuffer refuse each of them too (checked below).
LAYOUT_CASES = {
    "overlap": ({"a": _t([0, 8]), "b": _t([0, 8])}, b"\0" * 8, "overlaps"),
    "gap": ({"a": _t([8, 16])}, b"\0" * 16, "unaccounted"),
    "uncovered-tail": ({"a": _t([0, 8])}, b"\0" * 16, "not described by the header"),
    "past-end": ({"a": _t([0, 8]), "b": _t([8, 16])}, b"\0" * 8, "truncated"),
}
TYPE_CASES = {
    "offsets-strings": ({"a": _t(["0", "8"])}, b"\0" * 8, "data_offsets"),
    "offsets-three": ({"a": _t([0, 8, 8])}, b"\0" * 8, "data_offsets"),
    "dtype-list": ({"a": _t([0, 8], dtype=["F32"])}, b"\0" * 8, "dtype"),
    "shape-negative": ({"a": _t([0, 8], shape=[-2])}, b"\0" * 8, "shape"),
    "shape-bool": ({"a": _t([0, 8], shape=[True, 2])}, b"\0" * 8, "shape"),
    "shape-string": ({"a": _t([0, 8], shape="2")}, b"\0" * 8, "shape"),
    "entry-string": ({"a": "x"}, b"", "entry"),
    "metadata-int": ({"a": _t([0, 8]), "__metadata__": {"k": 1}}, b"\0" * 8, "metadata"),
}


@pytest.mark.parametrize("case", sorted(LAYOUT_CASES | TYPE_CASES))
def test_bad_header_is_one_line_naming_file_and_tensor(cli, tmp_path: Path, case: str) -> None:
    header, data, words = {**LAYOUT_CASES, **TYPE_CASES}[case]
    path = _write(tmp_path / f"{case}.safetensors", header, data)
    result = cli("inspect", path)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith(f"lorax: error: {path}: ") and words in line, line
    assert "Error" not in line.split(": ", 2)[-1] and "--debug" not in line, line
    if case not in ("metadata-int", "entry-string", "uncovered-tail"):  # these concern no one tensor
        assert "'a'" in line or "'b'" in line, line


@pytest.mark.parametrize("case", sorted(LAYOUT_CASES))
def test_layouts_refused_are_the_ones_safetensors_refuses(tmp_path: Path, case: str) -> None:
    from safetensors import safe_open

    header, data, _ = LAYOUT_CASES[case]
    path = _write(tmp_path / "x.safetensors", header, data)
    with pytest.raises(Exception, match=r"(?i)offset|incomplete|invalid"), safe_open(str(path), "pt") as f:
        f.keys()


def test_well_formed_file_still_reads(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from lorax.io.safetensors_io import read_header

    path = tmp_path / "ok.safetensors"
    save_file(
        {"a": torch.ones(3), "b": torch.zeros(2, 2, dtype=torch.float16), "e": torch.zeros(0)}, str(path)
    )
    header = read_header(path)
    assert {k: t.shape for k, t in header.tensors.items()} == {"a": (3,), "b": (2, 2), "e": (0,)}


def test_overlapping_base_is_not_merged(cli, tmp_path: Path) -> None:
    """A base whose header points two tensors at one byte range: refused before anything is written."""
    import torch
    from safetensors.torch import save_file

    base = tmp_path / "base.safetensors"
    save_file(
        {
            "model.diffusion_model.a.weight": torch.ones(4, 4),
            "model.diffusion_model.b.weight": torch.ones(4, 4),
        },
        str(base),
    )
    raw = base.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    doc = json.loads(raw[8 : 8 + n])
    doc["model.diffusion_model.b.weight"]["data_offsets"] = doc["model.diffusion_model.a.weight"][
        "data_offsets"
    ]
    bad = _write(tmp_path / "overlap.safetensors", doc, raw[8 + n :])
    out = tmp_path / "out.safetensors"
    result = cli("convert", bad, "-o", out)
    assert result.exit_code == 1
    assert f"{bad}: " in result.stderr and "overlaps" in result.stderr, result.stderr
    assert not out.exists()


def test_header_cap_is_the_crates(tmp_path: Path) -> None:
    from lorax.errors import FormatError
    from lorax.io.safetensors_io import MAX_HEADER, read_header

    assert MAX_HEADER == 100_000_000
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", MAX_HEADER + 1) + b"{" + b" " * 64)
    with pytest.raises(FormatError, match="header claims"):
        read_header(path)


@pytest.mark.parametrize("command", ["mix", "merge"])
@pytest.mark.parametrize("scale", ["nan", "inf", "-inf", "1e39"])
def test_non_finite_scale_is_refused_naming_the_lora(cli, tmp_path: Path, command: str, scale: str) -> None:
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "a.safetensors"
    save_file(
        {"lora_unet_x.lora_down.weight": torch.ones(1, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 1)},
        str(lora),
    )
    out = tmp_path / "out.safetensors"
    args = (
        ["mix", f"{lora}:{scale}", "-o", out]
        if command == "mix"
        else ["merge", lora, f"{lora}:{scale}", "-o", out]
    )
    result = cli(*args)
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lorax: error: {lora}: "), result.stderr
    assert "not a finite number" in lines[0] and "Traceback" not in result.output, lines[0]
    assert not out.exists()


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), [1.0, 2.0]])
def test_bad_file_alpha_is_refused_naming_key_and_file(cli, tmp_path: Path, alpha: object) -> None:
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "a.safetensors"
    stem = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file(
        {
            f"{stem}.lora_down.weight": torch.ones(1, 4),
            f"{stem}.lora_up.weight": torch.ones(4, 1),
            f"{stem}.alpha": torch.tensor(alpha),
        },
        str(lora),
    )
    out = tmp_path / "out.safetensors"
    result = cli("mix", lora, "-o", out)
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lorax: error: {lora}: {stem}.alpha"), result.stderr
    assert not out.exists()


def test_fp16_overflow_is_refused_after_the_cast(cli, tmp_path: Path) -> None:
    from checkpoint_helpers import save, tiny_lora, tiny_single

    lora = save(tiny_lora("sd1", seed=8), tmp_path / "l.safetensors")
    out = tmp_path / "m.safetensors"
    result = cli("merge", tiny_single("sd1"), f"{lora}:1e9", "-o", out, "--dtype", "fp16")
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("lorax: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "not finite in F16" in errors[0] and "unet." in errors[0], errors[0]
    assert "Traceback" not in result.output
    assert not out.exists()


# ---- item 5: one rule for every alpha and weight a file gives -------------------------------------------------------

_KOHYA = "lora_unet_down_blocks_0_attentions_0_proj_in"
_DIFF = "unet.down_blocks.0.attentions.0.proj_in"


def _bad_lora(tmp_path: Path, case: str) -> tuple[Path, str]:
    """A LoRA with one bad alpha or weight, and the words its one line must hold (the key or module named)."""
    import torch
    from safetensors.torch import save_file

    nan, path = float("nan"), tmp_path / f"{case}.safetensors"
    down, up = torch.ones(1, 4), torch.ones(4, 1)
    pair = {f"{_DIFF}.lora_A.weight": down, f"{_DIFF}.lora_B.weight": up}
    kohya = {f"{_KOHYA}.lora_down.weight": down, f"{_KOHYA}.lora_up.weight": up}
    loha = {f"{_KOHYA}.hada_w{i}_{ab}": t.clone() for i in (1, 2) for ab, t in (("a", up), ("b", down))}

    def meta(config: dict) -> dict[str, str]:
        return {"lora_adapter_metadata": json.dumps({"unet.r": 1, **config})}

    cases: dict[str, tuple[dict, dict | None, str]] = {
        "kohya-rank-0": (
            {f"{_KOHYA}.lora_down.weight": torch.ones(0, 4), f"{_KOHYA}.lora_up.weight": torch.ones(4, 0)},
            None,
            f"{_DIFF} has rank 0",
        ),
        "kohya-alpha-empty": (
            {**kohya, f"{_KOHYA}.alpha": torch.ones(0)},
            None,
            f"{_KOHYA}.alpha must hold one",
        ),
        "kohya-nan-weights": (
            {**kohya, f"{_KOHYA}.lora_down.weight": torch.full((1, 4), nan)},
            None,
            f"module {_DIFF}: its down weights hold NaN",
        ),
        "diffusers-alpha-nan": ({**pair, f"{_DIFF}.alpha": torch.tensor(nan)}, None, f"{_DIFF}.alpha is nan"),
        "diffusers-alpha-vector": (
            {**pair, f"{_DIFF}.alpha": torch.ones(3)},
            None,
            f"{_DIFF}.alpha must hold one",
        ),
        "diffusers-metadata-nan": (pair, meta({"unet.lora_alpha": nan}), "unet.lora_alpha is nan"),
        "diffusers-metadata-inf": (pair, meta({"unet.lora_alpha": float("inf")}), "unet.lora_alpha is inf"),
        "diffusers-metadata-string": (
            pair,
            meta({"unet.lora_alpha": "abc"}),
            "unet.lora_alpha must be a number",
        ),
        "diffusers-metadata-pattern": (
            pair,
            meta({"unet.lora_alpha": 1, "unet.alpha_pattern": {"proj_in": nan}}),
            "unet.alpha_pattern for down_blocks.0.attentions.0.proj_in is nan",
        ),
        "lycoris-alpha-nan": ({**loha, f"{_KOHYA}.alpha": torch.tensor(nan)}, None, f"{_KOHYA}.alpha is nan"),
        "lycoris-alpha-vector": (
            {**loha, f"{_KOHYA}.alpha": torch.ones(2)},
            None,
            f"{_KOHYA}.alpha must hold one",
        ),
        "lokr-nan-weights": (
            {f"{_KOHYA}.lokr_w1": torch.ones(2, 2), f"{_KOHYA}.lokr_w2": torch.full((2, 2), nan)},
            None,
            f"module {_DIFF}: its w2 weights hold NaN",
        ),
    }
    tensors, metadata, words = cases[case]
    save_file(tensors, str(path), metadata=metadata)
    return path, words


BAD_LORAS = [
    "kohya-rank-0",
    "kohya-alpha-empty",
    "kohya-nan-weights",
    "diffusers-alpha-nan",
    "diffusers-alpha-vector",
    "diffusers-metadata-nan",
    "diffusers-metadata-inf",
    "diffusers-metadata-string",
    "diffusers-metadata-pattern",
    "lycoris-alpha-nan",
    "lycoris-alpha-vector",
    "lokr-nan-weights",
]


# inspect reads the header and the alphas only, not the weights
_HEADER_ONLY = [c for c in BAD_LORAS if "weights" not in c and "rank-0" not in c]


@pytest.mark.parametrize(
    ("case", "command"),
    [(c, cmd) for c in BAD_LORAS for cmd in ("mix", "convert")] + [(c, "inspect") for c in _HEADER_ONLY],
)
def test_bad_alpha_or_weights_are_one_line_naming_file_and_key(
    cli, tmp_path: Path, case: str, command: str
) -> None:
    lora, words = _bad_lora(tmp_path, case)
    out = tmp_path / "out.safetensors"
    args = {
        "mix": ["mix", lora, "-o", out],
        "convert": ["convert", lora, "--to", "kohya", "-o", out],
        "inspect": ["inspect", lora],
    }
    result = cli(*args[command])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lorax: error: {lora}: "), result.stderr
    assert words in lines[0] and "Error" not in lines[0] and "--debug" not in lines[0], lines[0]
    assert not out.exists()


def test_generate_refuses_a_nan_lora_before_generating(cli, tmp_path: Path) -> None:
    from lorax.zoo.tiny import tiny_pipeline

    model = tmp_path / "model"
    tiny_pipeline("sd1").save_pretrained(model)
    lora, words = _bad_lora(tmp_path, "kohya-nan-weights")
    out = tmp_path / "images"
    result = cli("generate", "x", "--model", model, "--steps", "1", "--lora", lora, "-o", out)
    assert result.exit_code == 1, result.output
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("lorax: error: ")]
    assert errors == [f"lorax: error: {lora}: {words} values"], result.stderr
    assert not out.exists()


def test_generate_refuses_a_nan_embedding(cli, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    emb = tmp_path / "bad.safetensors"
    save_file({"emb_params": torch.full((1, 32), float("nan"))}, str(emb))
    out = tmp_path / "images"
    line = _error_line(cli("generate", "x", "--model", "no-such-model-needed", "--embedding", emb, "-o", out))
    assert (
        line == f"lorax: error: {emb}: token 'bad' (text_encoder): its embedding holds NaN or infinite values"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "where", ["--lora FILE:nan", "--lora FILE:1:inf", "<lora:NAME:nan>", "--sweep-scale"]
)
def test_generate_refuses_non_finite_scales(cli, tmp_path: Path, where: str) -> None:
    import torch
    from safetensors.torch import save_file

    lora = tmp_path / "good.safetensors"
    save_file(
        {f"{_KOHYA}.lora_down.weight": torch.ones(1, 4), f"{_KOHYA}.lora_up.weight": torch.ones(4, 1)},
        str(lora),
    )
    args = {
        "--lora FILE:nan": ["x", "--lora", f"{lora}:nan"],
        "--lora FILE:1:inf": ["x", "--lora", f"{lora}:1:inf"],
        "<lora:NAME:nan>": ["x <lora:good:nan>", "--lora-dir", tmp_path],
        "--sweep-scale": ["x", "--lora", lora, "--sweep-scale", "0,nan"],
    }[where]
    out = tmp_path / "images"
    result = cli("generate", *args, "--model", "no-such-model-needed", "-o", out)
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a finite number" in lines[0], result.stderr
    assert not out.exists()


def test_merge_that_overflows_names_the_lora_and_module(cli, tmp_path: Path) -> None:
    """Finite factors whose product overflows fp32: the line names the LoRA file and the module."""
    import torch
    from checkpoint_helpers import tiny_single
    from safetensors.torch import save_file

    lora = tmp_path / "huge.safetensors"
    base = tiny_single("sd1")
    from lorax.io.safetensors_io import read_header

    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    shape = read_header(base).tensors[key].shape
    save_file(
        {
            f"{_KOHYA}.lora_down.weight": torch.full((1, *shape[1:]), 3e38),
            f"{_KOHYA}.lora_up.weight": torch.full((shape[0], 1, *([1] * (len(shape) - 2))), 3e38),
        },
        str(lora),
    )
    out = tmp_path / "m.safetensors"
    result = cli("merge", base, lora, "-o", out)
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.startswith("lorax: error: ")]
    assert len(lines) == 1 and lines[0].startswith(f"lorax: error: {lora}: merging module {_DIFF}"), (
        result.stderr
    )
    assert "not finite" in lines[0] and not out.exists()


# ---- item 10: the rest of the bare exception texts -----------------------------------------------------------------


def _error_line(result) -> str:  # type: ignore[no-untyped-def]
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorax: error: "), result.stderr
    assert "Traceback" not in result.output and "--debug" not in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("command", ["inspect", "mix", "convert"])
def test_pickle_named_safetensors_is_called_a_pickle(cli, tmp_path: Path, command: str) -> None:
    import torch

    path = tmp_path / "lora.safetensors"
    torch.save({"lora_unet_x.lora_down.weight": torch.ones(1, 4)}, path)
    out = tmp_path / "out.safetensors"
    line = _error_line(cli(command, path) if command == "inspect" else cli(command, path, "-o", out))
    assert line.startswith(f"lorax: error: {path}: is a torch pickle, not a safetensors file"), line
    assert not out.exists()


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(folder / "a.png")
    return folder


def _checkpoint(tmp_path: Path) -> Path:
    import torch

    from lorax.training.checkpoint import LoopState, save_checkpoint

    weight = torch.nn.Parameter(torch.ones(2, 2))
    optimizer = torch.optim.AdamW([weight])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return save_checkpoint(
        tmp_path / "ckpts",
        state=LoopState(global_step=1, micro_step=1),
        tensors={"w": weight},
        optimizer=optimizer,
        scheduler=scheduler,
    )


def _damage(folder: Path, how: str) -> None:
    if how == "truncated-weights":
        raw = (folder / "weights.safetensors").read_bytes()
        (folder / "weights.safetensors").write_bytes(raw[:20])
    elif how == "missing-weights":
        (folder / "weights.safetensors").unlink()
    elif how == "garbage-rng":
        (folder / "rng.pt").write_bytes(b"garbage\n")
    elif how == "wrong-rng":
        import torch

        torch.save({"a": 1}, folder / "rng.pt")
    else:
        doc = json.loads((folder / "state.json").read_text())
        doc["state"]["global_step"] = {"string-step": "2", "negative-step": -3}[how]
        (folder / "state.json").write_text(json.dumps(doc))


DAMAGE = {
    "truncated-weights": "weights.safetensors cannot be read",
    "missing-weights": "weights.safetensors is missing",
    "garbage-rng": "rng.pt is not the pickle of plain tensors",
    "wrong-rng": "rng.pt does not hold the random number generators' states",
    "string-step": "state.json's global_step is '2', not a whole number",
    "negative-step": "state.json's global_step is -3, not a whole number",
}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damaged_resume_folder_is_one_line_naming_it(cli, tmp_path: Path, images: Path, how: str) -> None:
    folder = _checkpoint(tmp_path)
    _damage(folder, how)
    out = tmp_path / "out.safetensors"
    line = _error_line(cli("train", images, "--instance-prompt", "x", "--resume", folder, "-o", out))
    assert line.startswith(f"lorax: error: {folder}: damaged checkpoint: {DAMAGE[how]}"), line
    assert not out.exists()


def test_non_utf8_caption_names_the_caption_file(cli, tmp_path: Path, images: Path) -> None:
    caption = images / "a.txt"
    caption.write_bytes(b"\xff\xfe a red \x80 square")
    out = tmp_path / "out.safetensors"
    line = _error_line(cli("train", images, "-o", out, "--steps", "1"))
    assert (
        line == f"lorax: error: {caption}: is not UTF-8 text (byte 0xff at position 0); save it as UTF-8"
    ), line


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ('steps = "ten"\n', "key steps: expected an integer (got 'ten')"),
        ("learning-rate = [1]\n", "key learning-rate: expected a number (got [1])"),
        ("flip = 3\n", "key flip: expected true or false (got 3)"),
        ('[train]\nrank = "x"\n', "[train] key rank: expected an integer (got 'x')"),
    ],
)
def test_config_value_of_wrong_type_names_the_toml_file_and_key(
    cli, tmp_path: Path, images: Path, toml: str, words: str
) -> None:
    config = tmp_path / "run.toml"
    config.write_text(toml)
    line = _error_line(
        cli("train", images, "--instance-prompt", "x", "--config", config, "-o", tmp_path / "o.safetensors")
    )
    assert line == f"lorax: error: {config}: {words}", line


# ---- item 11: a refused pickle is lorax's one line, without the libraries' advice ----------------------------------


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", ["generate", "convert"])
def test_model_folder_pickle_is_refused_in_lorax_words(cli, tmp_path: Path, command: str) -> None:
    import torch
    from safetensors.torch import load_file

    from lorax.zoo.tiny import tiny_pipeline

    model = tmp_path / "model"
    tiny_pipeline("sd1").save_pretrained(model)
    marker = tmp_path / "payload-ran"
    weights = load_file(model / "text_encoder" / "model.safetensors")
    (model / "text_encoder" / "model.safetensors").unlink()
    pickled = model / "text_encoder" / "pytorch_model.bin"
    torch.save({**weights, "payload": _Payload(marker)}, pickled)
    out = tmp_path / ("images" if command == "generate" else "model.safetensors")
    args = (
        ["generate", "x", "--model", model, "--steps", "1"] if command == "generate" else ["convert", model]
    )
    result = cli(*args, "-o", out)
    line = _error_line(result)
    assert line.startswith(f"lorax: error: {pickled}: refused: it is a pickle, and a pickle can hold code"), (
        line
    )
    assert "posix.system" in line and "in a sandbox" in line and "model.safetensors" in line, line
    assert "Re-running" not in result.stderr and "Warning" not in result.stderr, result.stderr
    assert not marker.exists() and not out.exists()


# ---- item 12: options that do not apply are refused; a one-slash path that is not there ----------------------------


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (["--rank", "4"], "--rank applies only when BASE is a LoRA"),
        (["--mode", "concat"], "--mode applies only when BASE is a LoRA"),
        (["--rank", "4", "--mode", "seed-blend"], "--rank and --mode apply only when BASE is a LoRA"),
    ],
)
def test_merge_into_a_model_refuses_lora_merge_options(cli, tmp_path: Path, extra: list, words: str) -> None:
    from checkpoint_helpers import save, tiny_lora, tiny_single

    lora = save(tiny_lora("sd1", seed=2), tmp_path / "l.safetensors")
    out = tmp_path / "m.safetensors"
    line = _error_line(cli("merge", tiny_single("sd1"), lora, "-o", out, *extra))
    assert words in line, line
    assert not out.exists()


@pytest.mark.parametrize("extra", [["--config-from", "somewhere"], ["--allow-unmatched"]])
def test_merge_of_loras_refuses_model_merge_options(cli, tmp_path: Path, extra: list) -> None:
    from checkpoint_helpers import save, tiny_lora

    a = save(tiny_lora("sd1", seed=2), tmp_path / "a.safetensors")
    b = save(tiny_lora("sd1", seed=3), tmp_path / "b.safetensors")
    out = tmp_path / "ab.safetensors"
    line = _error_line(cli("merge", a, b, "-o", out, *extra))
    assert f"{extra[0]} applies only when merging into a model" in line, line
    assert not out.exists()


def test_one_slash_path_whose_folder_exists_is_missing_without_the_hub(
    cli, tmp_path: Path, monkeypatch
) -> None:
    import lorax.io.model_paths as model_paths  # where io resolves a model spec (local, built in, Hub)

    def no_hub(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the Hub was asked about a local path")

    monkeypatch.setattr(model_paths, "hub_snapshot", no_hub)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    line = _error_line(cli("convert", "models/mine", "-o", "x.safetensors"))
    assert line == "lorax: error: models/mine: no such file or folder (models/ exists, mine is not in it)", (
        line
    )


def test_one_slash_path_neither_local_nor_cached(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.chdir(tmp_path)
    line = _error_line(cli("convert", "nobody/nothing", "-o", "x.safetensors"))
    assert line.startswith(
        "lorax: error: nobody/nothing: neither a local path (no such file or folder) nor a Hub"
    ), line
    assert "HF_HUB_OFFLINE" in line
