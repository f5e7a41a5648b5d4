"""The CLI shell: version, help, error rendering, the generated reference."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lorax
from lorax.cli import docgen
from lorax.cli.app import COMMAND_ORDER, app

ROOT = Path(__file__).resolve().parents[1]


def test_version(cli):
    result = cli("--version")
    assert result.exit_code == 0
    assert result.stdout.strip() == f"lorax {lorax.__version__}"


def test_help_lists_every_registered_command(cli):
    import typer

    result = cli("--help")
    assert result.exit_code == 0
    group = typer.main.get_command(app)
    names = list(group.commands)  # type: ignore[attr-defined]
    assert names, "no command registered"
    assert names == [n for n in COMMAND_ORDER if n in names]
    for name in names:
        assert name in result.stdout
        sub = cli(name, "--help")
        assert sub.exit_code == 0, sub.output


def test_cli_reference_is_current():
    committed = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    assert committed == docgen.render(), "docs/cli.md is stale: run `make docs`"


def test_every_command_has_a_docs_page():
    import typer

    group = typer.main.get_command(app)
    for name in group.commands:  # type: ignore[attr-defined]
        page = ROOT / "docs" / f"{name}.md"
        assert page.exists(), f"docs/{name}.md missing"
        assert f"lorax {name}" in page.read_text(encoding="utf-8")


def test_python_dash_m_runs():
    out = subprocess.run(
        [sys.executable, "-m", "lorax", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().startswith("lorax ")


BROKEN_STDOUT = """
import sys
from lorax.cli.app import main

class Gone:  # stdout whose reader has gone (`| head` done reading): every write fails as a closed pipe's does
    def __getattr__(self, name):
        return getattr(sys.__stdout__, name)

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

sys.stdout = Gone()
sys.argv = ["lorax", *sys.argv[1:]]
main()
"""


def test_a_reader_that_goes_away_is_not_an_error(tmp_path):
    """`lorax inspect lora.safetensors --json | head -c 1`: the pipe's reader has gone when lorax writes its result;
    lorax stops quietly (exit 1, as click and rich do on a broken pipe), with no error line."""
    import numpy as np
    from safetensors.numpy import save_file

    lora = tmp_path / "lora.safetensors"
    down, up = np.zeros((4, 320), np.float32), np.zeros((320, 4), np.float32)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up}, str(lora))
    for args in (["inspect", str(lora), "--json"], ["inspect", str(lora)], ["convert", "--help"]):
        out = subprocess.run([sys.executable, "-c", BROKEN_STDOUT, *args], capture_output=True, text=True)
        assert out.returncode == 1, (args, out.stderr)
        assert "error" not in out.stderr.lower() and "Traceback" not in out.stderr, (args, out.stderr)
