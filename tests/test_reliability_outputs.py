"""Issue 13, outputs: --force replaces only the same kind, an OUT that appears meanwhile is kept, stale temp files are
reported and removed with --force, SIGHUP cleans up like SIGTERM, an unwritable destination fails before step 1."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_helpers import save, tiny_lora, tiny_single
from PIL import Image
from safetensors.torch import load_file

from lorax.errors import OutputExistsError


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if not ln.startswith("lorax: warning: ")]
    assert len(lines) == 1 and lines[0].startswith("lorax: error: "), stderr
    return lines[0]


def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if p.name.endswith((".tmp", ".old", ".work"))]


@pytest.fixture()
def lora(tmp_path: Path) -> Path:
    return save(tiny_lora("sd1", seed=3), tmp_path / "lora.safetensors")


def _same_tensors(path: Path, reference: Path) -> None:
    """Read with safetensors itself: the file is whole and holds the input's tensors."""
    got, want = load_file(path), load_file(reference)
    assert set(got) == set(want)
    assert all(torch.equal(got[k].float(), want[k].float()) for k in want)


# ---- item 2: --force replaces only an output of the same kind ----------------------------------------------------


def test_force_does_not_replace_a_folder_with_a_file(cli, tmp_path: Path, lora: Path) -> None:
    folder = tmp_path / "loras"
    (folder / "keep").mkdir(parents=True)
    (folder / "a.safetensors").write_bytes(b"user's file")
    (folder / "keep" / "b.txt").write_text("nested")
    before = sorted((p.relative_to(folder), p.is_file() and p.read_bytes()) for p in folder.rglob("*"))
    result = cli("convert", lora, "-o", folder, "--force")
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert str(folder) in line and "a folder" in line and "nothing was touched" in line, line
    after = sorted((p.relative_to(folder), p.is_file() and p.read_bytes()) for p in folder.rglob("*"))
    assert after == before
    assert not _temps(tmp_path)


def test_force_does_not_replace_a_plain_folder_with_a_model_folder(cli, tmp_path: Path) -> None:
    """A model folder is one with model_index.json; --force never replaces another folder by one."""
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"not a model")
    result = cli("convert", tiny_single("sd1"), "-o", folder, "--force")
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert "model_index.json" in line and str(folder) in line, line
    assert [p.name for p in folder.iterdir()] == ["a.png"] and (
        folder / "a.png"
    ).read_bytes() == b"not a model"


def test_force_replaces_a_file_with_a_file(cli, tmp_path: Path, lora: Path) -> None:
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"an older output")
    refused = cli("convert", lora, "-o", out)
    assert refused.exit_code == 1 and "--force" in _one_error_line(refused.stderr)
    assert out.read_bytes() == b"an older output"
    result = cli("convert", lora, "-o", out, "--force")
    assert result.exit_code == 0, result.stderr
    _same_tensors(out, lora)
    assert not _temps(tmp_path)


def test_checkpoint_replaces_only_a_checkpoint(tmp_path: Path) -> None:
    """A training checkpoint (a folder holding state.json) is replaced by one; a folder of other files is not."""
    from lorax.io.atomic import CHECKPOINT, atomic_path

    ckpt = tmp_path / "step-000002"
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("mine")
    refused = pytest.raises(OutputExistsError, match=r"without state\.json")
    with refused, atomic_path(ckpt, force=True, directory=True, kind=CHECKPOINT) as tmp:
        (tmp / "state.json").write_text("{}")
    assert [p.name for p in ckpt.iterdir()] == ["notes.txt"]
    (ckpt / "notes.txt").unlink()
    (ckpt / "state.json").write_text('{"old": true}')
    with atomic_path(ckpt, force=True, directory=True, kind=CHECKPOINT) as tmp:
        (tmp / "state.json").write_text("{}")
    assert (ckpt / "state.json").read_text() == "{}"
    assert not _temps(tmp_path)


# ---- item 6: an OUT that appears during the run is never overwritten without --force ------------------------------


def _intruding_atomic_path(monkeypatch: pytest.MonkeyPatch, intruder: bytes) -> None:
    """Another program writes OUT while lorax writes its temp file."""
    import lorax.io.atomic as atomic

    real = atomic.atomic_path

    @contextmanager
    def racing(path, force=False, **kwargs):  # type: ignore[no-untyped-def]
        with real(path, force, **kwargs) as tmp:
            yield tmp
            Path(path).write_bytes(intruder)

    monkeypatch.setattr(atomic, "atomic_path", racing)


def test_output_that_appears_meanwhile_is_kept(cli, tmp_path: Path, lora: Path, monkeypatch) -> None:
    out = tmp_path / "out.safetensors"
    _intruding_atomic_path(monkeypatch, b"written by someone else")
    result = cli("convert", lora, "-o", out)
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert str(out) in line and "appeared while lorax was writing it" in line, line
    assert out.read_bytes() == b"written by someone else"
    assert not _temps(tmp_path)


def test_output_that_appears_meanwhile_is_replaced_with_force(
    cli, tmp_path: Path, lora: Path, monkeypatch
) -> None:
    out = tmp_path / "out.safetensors"
    _intruding_atomic_path(monkeypatch, b"written by someone else")
    result = cli("convert", lora, "-o", out, "--force")
    assert result.exit_code == 0, result.stderr
    _same_tensors(out, lora)
    assert not _temps(tmp_path)


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "link-fallback"])
def test_final_rename_never_replaces(tmp_path: Path, monkeypatch, renameat2: bool) -> None:
    """Both ways of renaming without replacing (renameat2 RENAME_NOREPLACE; a hard link where it is missing)."""
    import lorax.io.atomic as atomic

    if not renameat2:
        monkeypatch.setattr(atomic, "_renameat2", None)
    elif atomic._renameat2 is None:
        pytest.skip("no renameat2 here")
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        atomic._rename_noreplace(src, dst)
    assert dst.read_bytes() == b"old" and src.read_bytes() == b"new"
    dst.unlink()
    atomic._rename_noreplace(src, dst)
    assert dst.read_bytes() == b"new" and not src.exists()


def test_two_writers_to_one_output_one_wins(tmp_path: Path) -> None:
    """Two atomic writes to one OUT that both started before either finished: the second is refused."""
    from lorax.io.atomic import atomic_path

    out = tmp_path / "out.bin"
    with pytest.raises(OutputExistsError, match="appeared while"), atomic_path(out) as second:
        second.write_bytes(b"second")
        with atomic_path(out) as first:  # started after the second, finishes before it
            first.write_bytes(b"first")
    assert out.read_bytes() == b"first"
    assert not _temps(tmp_path)


def test_full_disk_names_out_and_removes_the_folders_it_made(
    cli, tmp_path: Path, lora: Path, monkeypatch
) -> None:
    """ENOSPC while writing: one line naming OUT (not the temp), no temp, and the folders made for OUT are gone."""
    import lorax.io.atomic as atomic

    real = atomic.atomic_path

    @contextmanager
    def full(path, force=False, **kwargs):  # type: ignore[no-untyped-def]
        with real(path, force, **kwargs) as tmp:
            yield tmp
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))

    monkeypatch.setattr(atomic, "atomic_path", full)
    out = tmp_path / "new" / "deeper" / "out.safetensors"
    result = cli("convert", lora, "-o", out)
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert str(out) in line and "no space left" in line and ".tmp" not in line, line
    assert not (tmp_path / "new").exists()
    assert not _temps(tmp_path)


# ---- item 8: leftovers and SIGHUP ----------------------------------------------------------------------------------


def test_stale_temp_is_reported_then_removed_with_force(cli, tmp_path: Path, lora: Path) -> None:
    out = tmp_path / "out.safetensors"
    stale = tmp_path / ".out.safetensors.0123456789ab.tmp"
    stale.write_bytes(b"x" * 2500)
    first = cli("convert", lora, "-o", out)
    assert first.exit_code == 0, first.stderr
    warning = [ln for ln in first.stderr.splitlines() if stale.name in ln]
    assert len(warning) == 1 and "2.5 KB" in warning[0] and "--force" in warning[0], first.stderr
    assert stale.exists()
    second = cli("convert", lora, "-o", out, "--force")
    assert second.exit_code == 0, second.stderr
    assert any(stale.name in ln and "removed" in ln for ln in second.stderr.splitlines()), second.stderr
    assert not stale.exists()
    _same_tensors(out, lora)


def test_temp_of_a_run_still_writing_is_not_taken_for_stale(cli, tmp_path: Path, lora: Path) -> None:
    """A temp file another lorax holds (locked) is neither reported as stale nor removed, even with --force."""
    out = tmp_path / "out.safetensors"
    live = tmp_path / ".out.safetensors.abcdef012345.tmp"
    live.write_bytes(b"being written")
    with open(live, "rb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        refused = cli("convert", lora, "-o", out)
        assert refused.exit_code == 1
        assert "another lorax run is writing it now" in _one_error_line(refused.stderr)
        forced = cli("convert", lora, "-o", out, "--force")
        assert forced.exit_code == 0, forced.stderr
        assert "stale" not in forced.stderr
    assert live.read_bytes() == b"being written"


def test_sighup_raises_like_sigterm_but_nohup_is_respected() -> None:
    from lorax.io.atomic import SignalInterrupt, SignalsAsInterrupt

    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with pytest.raises(SignalInterrupt) as caught, SignalsAsInterrupt():
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(1)  # the handler runs between bytecodes; this is never reached in full
        assert caught.value.signum == signal.SIGHUP
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL  # put back as it was
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
        with SignalsAsInterrupt():
            assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGHUP, before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from lorax.zoo.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("reliability-model") / "model"
    tiny_pipeline("sd1").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("reliability-images")
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    return folder


def test_sighup_to_train_leaves_no_temp_and_exits_129(
    tmp_path: Path, model_dir: Path, image_dir: Path
) -> None:
    out = tmp_path / "run" / "out.safetensors"
    checkpoints = tmp_path / "run" / "out.checkpoints"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorax",
            "train",
            str(image_dir),
            "--model",
            str(model_dir),
            "--instance-prompt",
            "x",
            "--resolution",
            "32",
            "--steps",
            "100000",
            "--checkpoint-every",
            "1",
            "--device",
            "cpu",
            "-o",
            str(out),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # A terminal's job has SIGHUP at its default; nohup's (ignored) is respected and not tested here.
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL),
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and not (checkpoints / "step-000002").exists():
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert (checkpoints / "step-000002").exists(), "training never reached step 2"
        proc.send_signal(
            signal.SIGHUP
        )  # checkpoints are written every step, so one is often being written now
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 129, err[-2000:]
    assert b"interrupted by signal SIGHUP" in err
    assert not out.exists()
    assert not _temps(tmp_path), _temps(tmp_path)


# ---- item 9: an unwritable destination fails before step 1 ---------------------------------------------------------


def _train_args(image_dir: Path, model_dir: Path, out: Path, *extra: object) -> list[object]:
    return [
        "train",
        image_dir,
        "--model",
        model_dir,
        "--instance-prompt",
        "x",
        "--resolution",
        "32",
        "--steps",
        "2",
        "--device",
        "cpu",
        "-o",
        out,
        *extra,
    ]


def _train(cli, image_dir: Path, model_dir: Path, out: Path):  # type: ignore[no-untyped-def]
    return cli(*_train_args(image_dir, model_dir, out))


@pytest.fixture()
def no_step(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records every training step's loss computation (there must be none)."""
    from lorax.training.objective import DiffusionObjective

    calls: list[int] = []
    real = DiffusionObjective.loss

    def counted(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(DiffusionObjective, "loss", counted)
    return calls


def test_train_to_read_only_folder_fails_before_step_1(
    cli, tmp_path: Path, image_dir: Path, model_dir: Path, monkeypatch, no_step: list[int]
) -> None:
    import lorax.io.atomic as atomic

    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(path).parent == tmp_path / "dest" and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "open", read_only)
    (tmp_path / "dest").mkdir()
    out = tmp_path / "dest" / "out.safetensors"
    result = _train(cli, image_dir, model_dir, out)
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert str(out) in line and "read-only" in line and ".tmp" not in line, line
    assert no_step == []
    assert list((tmp_path / "dest").iterdir()) == []


def test_train_under_a_file_fails_before_step_1(
    cli, tmp_path: Path, image_dir: Path, model_dir: Path, no_step: list[int]
) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    out = blocker / "out.safetensors"
    result = _train(cli, image_dir, model_dir, out)
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert str(out) in line and "not a folder" in line, line
    assert no_step == []
    assert blocker.read_text() == "a file, not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 folder anyway")
def test_train_to_unwritable_folder_fails_before_step_1(
    cli, tmp_path: Path, image_dir: Path, model_dir: Path, no_step: list[int]
) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    dest.chmod(0o555)
    try:
        out = dest / "out.safetensors"
        result = _train(cli, image_dir, model_dir, out)
        assert result.exit_code == 1
        line = _one_error_line(result.stderr)
        assert str(out) in line and "no permission" in line, line
        assert no_step == []
    finally:
        dest.chmod(0o755)


def test_checkpoints_that_cannot_fit_fail_before_step_1(
    cli, tmp_path: Path, image_dir: Path, model_dir: Path, monkeypatch, no_step: list[int]
) -> None:
    """The disk's free space is compared with the checkpoints asked for (weights and two moments, fp32 each)."""
    import shutil as _shutil

    import lorax.io.atomic as atomic

    free = 1000
    monkeypatch.setattr(
        atomic.shutil, "disk_usage", lambda p: _shutil._ntuple_diskusage(10**9, 10**9 - free, free)
    )
    out = tmp_path / "out.safetensors"
    result = cli(*_train_args(image_dir, model_dir, out, "--steps", "5", "--checkpoint-every", "2"))
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert "out.checkpoints" in line and "2 checkpoints" in line and "1.0 KB free" in line, line
    assert no_step == []
    assert not out.exists() and not _temps(tmp_path)


def test_checkpoint_folder_under_a_file_fails_before_step_1(
    cli, tmp_path: Path, image_dir: Path, model_dir: Path, no_step: list[int]
) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file")
    out = tmp_path / "out.safetensors"
    result = cli(*_train_args(image_dir, model_dir, out, "--checkpoint-dir", blocker / "ckpts"))
    assert result.exit_code == 1
    line = _one_error_line(result.stderr)
    assert str(blocker / "ckpts") in line and "cannot be written" in line, line
    assert no_step == []


# ---- item 1: a non-finite stop without --checkpoint-every still leaves a usable state ----------------------------


def test_non_finite_stop_without_checkpoints_keeps_a_finite_resumable_state(
    cli, tmp_path: Path, model_dir: Path, image_dir: Path
) -> None:
    """lr 1e3 turns the weights NaN within a few steps. The state written (from memory: no --checkpoint-every) is the
    last one that trained on cleanly: finite, and a lower --learning-rate resumed from it finishes the run."""
    import re

    out = tmp_path / "hot.safetensors"
    result = cli(*_train_args(image_dir, model_dir, out, "--steps", "6", "--lr", "1e3"))
    assert result.exit_code == 1, result.output
    line = _one_error_line(result.stderr)
    found = re.search(
        r"became nan at step (\d+); the last good state, from step (\d+), is kept in (\S+) ", line
    )
    assert found, line
    stop, step, kept = int(found[1]), int(found[2]), Path(found[3])
    assert step < stop and kept.name == f"step-{step:06d}" and not out.exists()
    tensors = load_file(kept / "weights.safetensors")
    assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors.values())
    resumed = cli(*_train_args(image_dir, model_dir, out, "--steps", "6", "--lr", "1e-4", "--resume", kept))
    assert resumed.exit_code == 0, resumed.output
    assert "learning rate 0.0001 (the checkpoint was trained with 1000)" in resumed.stderr
    written = load_file(out)
    assert written and all(bool(torch.isfinite(t).all()) for t in written.values())


# ---- item 7: companions are planned with the output -------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".toml", ".loss.csv", ".loss.png", ".samples", ".samples.png"])
def test_existing_companion_is_refused_before_step_1(
    cli, tmp_path: Path, image_dir: Path, model_dir: Path, no_step: list[int], suffix: str
) -> None:
    out = tmp_path / "out.safetensors"
    companion = tmp_path / f"out{suffix}"
    if suffix == ".samples":
        companion.mkdir()
        (companion / "step-000001-0.png").write_bytes(b"an earlier run's sample")
    else:
        companion.write_bytes(b"an earlier run's file")
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    extra = ("--validation-prompt", "x", "--validation-every", "1")
    result = cli(*_train_args(image_dir, model_dir, out, *extra))
    assert result.exit_code == 1, result.output
    line = _one_error_line(result.stderr)
    assert line == f"lorax: error: {companion}: already exists; pass --force to overwrite it", line
    assert no_step == [] and not out.exists()
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file()) == before


def test_force_replaces_companions(cli, tmp_path: Path, image_dir: Path, model_dir: Path) -> None:
    import tomllib

    out = tmp_path / "out.safetensors"
    for suffix in (".toml", ".loss.csv", ".loss.png"):
        (tmp_path / f"out{suffix}").write_bytes(b"old")
    result = cli(*_train_args(image_dir, model_dir, out, "--force"))
    assert result.exit_code == 0, result.output
    assert tomllib.loads((tmp_path / "out.toml").read_text())["steps"] == 2
    assert (tmp_path / "out.loss.csv").read_text().startswith("step,loss")
    assert (tmp_path / "out.loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("command", ["invert", "pivot"])
def test_inversion_companion_is_refused_before_step_1(
    cli, tmp_path: Path, image_dir: Path, model_dir: Path, no_step: list[int], command: str
) -> None:
    out = tmp_path / ("e.pt" if command == "invert" else "e.safetensors")
    (tmp_path / "e.loss.csv").write_text("mine")
    args = [command, image_dir, "--model", model_dir, "--token", "<s1>", "--init-token", "x"]
    result = cli(*args, "--resolution", "32", "--steps", "1", "--device", "cpu", "-o", out)
    assert result.exit_code == 1, result.output
    assert _one_error_line(result.stderr).startswith(
        f"lorax: error: {tmp_path / 'e.loss.csv'}: already exists"
    )
    assert no_step == [] and not out.exists() and (tmp_path / "e.loss.csv").read_text() == "mine"
