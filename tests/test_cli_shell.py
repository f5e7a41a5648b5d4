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
