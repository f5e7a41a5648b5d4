"""One name per concept, global flags anywhere, paths on stdout and tables on stderr, devices that exist, and help
text that shows what was typed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_generate import make_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from lorax.zoo.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("conv-model") / "tiny"
    tiny_pipeline("sd1").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lora(model_dir, tmp_path_factory) -> Path:
    from lorax.formats import save_lora
    from lorax.services.generate import load_model

    path = tmp_path_factory.mktemp("conv-lora") / "style.safetensors"
    save_lora(make_lora(load_model(str(model_dir)), 3), path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("conv-images")
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8")).save(
        folder / "a.png"
    )
    return folder


def _commands():
    from lorax.cli.app import COMMAND_ORDER

    return COMMAND_ORDER


def test_help_of_every_command_keeps_its_brackets(cli):
    import typer.main

    from lorax.cli.app import app

    group = typer.main.get_command(app)
    checked = 0
    for name in _commands():
        cmd = group.commands[name]  # type: ignore[attr-defined]
        from typer.testing import CliRunner

        shown = CliRunner().invoke(app, [name, "--help"], terminal_width=100)
        assert shown.exit_code == 0, shown.output
        flat = re.sub(r"[\s│╭╮╰╯─]+", "", shown.stdout)
        texts = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        for text in texts:
            for token in re.findall(r"\S*\[[^\]\s]*\]\S*", text):
                assert re.sub(r"\s+", "", token) in flat, f"lorax {name} --help lost {token!r}"
                checked += 1
    assert checked >= 3  # [[datasets]] and friends at least


def test_rich_markup_in_help_is_shown_as_typed():
    """A help string with rich-looking markup renders literally (the mechanism, on a made-up command)."""
    import typer
    from typer.testing import CliRunner

    from lorax.cli.app import LoraxCommand, LoraxGroup

    demo = typer.Typer(cls=LoraxGroup)

    @demo.command(cls=LoraxCommand)
    def show(
        x: str = typer.Option("a", help="keys [[lora]] and linear[a]B and [bold]b[/bold] and linear:A:B"),
    ) -> None:
        """Doc with [red]markup[/red]."""

    @demo.command()
    def other() -> None:
        pass

    out = CliRunner().invoke(demo, ["show", "--help"], terminal_width=200).stdout
    assert (
        "[[lora]]" in out and "linear[a]B" in out and "[bold]b[/bold]" in out and "[red]markup[/red]" in out
    )
    assert "linear:A:B" in out  # not an emoji


def test_global_flags_after_the_command(cli, tmp_path, lora):
    out = tmp_path / "c.safetensors"
    result = cli("convert", lora, "-o", out, "-q")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(out) and result.stderr == ""
    bad = cli("inspect", tmp_path / "missing.safetensors", "--debug")
    assert bad.exit_code != 0 and isinstance(bad.exception, Exception)
    assert bad.exception is not None and "missing.safetensors" in str(bad.exception)  # a traceback: --debug


def test_file_commands_path_on_stdout_table_on_stderr(cli, tmp_path, lora, model_dir):
    for args, out in [
        (("convert", lora, "--to", "diffusers"), tmp_path / "conv.safetensors"),
        (("mix", lora, lora), tmp_path / "mix.safetensors"),
        (("merge", lora, lora), tmp_path / "ll.safetensors"),
    ]:
        result = cli(*args, "-o", out)
        assert result.exit_code == 0, result.stderr
        assert result.stdout.strip() == str(out), (args, result.stdout)
        assert str(out.name) in result.stderr  # the table names it too


def test_merge_output_suffix_decides_the_layout(cli, tmp_path, lora, model_dir):
    single = tmp_path / "merged.safetensors"
    result = cli("merge", model_dir, f"{lora}:0.5", "-o", single)
    assert result.exit_code == 0, result.stderr
    assert single.is_file() and result.stdout.strip() == str(single)
    from lorax.io.safetensors_io import read_header

    assert any(k.startswith("model.diffusion_model.") for k in read_header(single).tensors)
    folder = tmp_path / "merged-folder"
    result = cli("merge", model_dir, f"{lora}:0.5", "-o", f"{folder}/")
    assert result.exit_code == 0, result.stderr
    assert (folder / "model_index.json").is_file()


def test_merge_scale_and_its_alpha_alias_agree(cli, tmp_path, lora, model_dir):
    from lorax.io.safetensors_io import SafetensorsFile

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert cli("merge", model_dir, lora, "--scale", "0.3", "--text-scale", "0.2", "-o", a).exit_code == 0
    assert cli("merge", model_dir, lora, "--alpha", "0.3", "--alpha-text", "0.2", "-o", b).exit_code == 0
    fa, fb = SafetensorsFile(a), SafetensorsFile(b)
    names = fa.keys()
    assert names == fb.keys()
    assert all(torch.equal(fa.get(k), fb.get(k)) for k in names)
    c = tmp_path / "c.safetensors"
    assert cli("merge", model_dir, lora, "--scale", "0.9", "-o", c).exit_code == 0
    assert any(not torch.equal(fa.get(k), SafetensorsFile(c).get(k)) for k in names)


def test_train_network_alpha_is_kohyas_name(cli, tmp_path, images, model_dir):
    from lorax.io.safetensors_io import read_header

    for flag in ("--network-alpha", "--alpha"):
        out = tmp_path / f"{flag.strip('-')}.safetensors"
        result = cli(
            "train", images, "--instance-prompt", "x", "--model", model_dir, "-o", out,
            "--steps", "1", "--resolution", "32", "--rank", "4", flag, "2",
        )  # fmt: skip
        assert result.exit_code == 0, result.stderr
        assert read_header(out).metadata["ss_network_alpha"] == "2"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "gpu"])
def test_device_cuda_without_a_gpu_is_an_error(cli, tmp_path, images, model_dir, device):
    gen = cli("generate", "a", "--model", model_dir, "--device", device, "-o", tmp_path / "g", "--steps", "1")
    train = cli(
        "train", images, "--instance-prompt", "x", "--model", model_dir, "-o", tmp_path / "t.safetensors",
        "--steps", "1", "--device", device,
    )  # fmt: skip
    for result in (gen, train):
        assert result.exit_code == 1
        assert "no CUDA GPU" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t.safetensors").exists() and not list((tmp_path).glob("g/*.png"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_fp16_mixed_precision_on_cpu_is_refused(cli, tmp_path, images, model_dir):
    result = cli(
        "train", images, "--instance-prompt", "x", "--model", model_dir, "-o", tmp_path / "t.safetensors",
        "--steps", "1", "--mixed-precision", "fp16",
    )  # fmt: skip
    assert result.exit_code == 1 and "--mixed-precision fp16 needs a CUDA GPU" in result.stderr


def test_generate_dtype_speaks_fp32(cli, tmp_path, model_dir):
    result = cli(
        "generate", "a", "--model", model_dir, "--dtype", "fp32", "-o", tmp_path, "--steps", "1", "--json"
    )
    assert result.exit_code == 0, result.stderr
    assert "float32" in result.stderr
    bad = cli("generate", "a", "--model", model_dir, "--dtype", "half", "-o", tmp_path, "--steps", "1")
    assert bad.exit_code == 1 and "fp16" in bad.stderr


def test_shell_completion_completes_commands_and_flags(monkeypatch, capsys):
    """Click's completion protocol, as the installed bash script calls it."""
    from lorax.cli.app import app

    for words, cword, expected in [("lorax me", "1", "merge"), ("lorax merge --sc", "2", "--scale")]:
        monkeypatch.setenv("_LORAX_COMPLETE", "complete_bash")
        monkeypatch.setenv("COMP_WORDS", words)
        monkeypatch.setenv("COMP_CWORD", cword)
        with pytest.raises(SystemExit):
            app(prog_name="lorax")
        assert expected in capsys.readouterr().out.split()


def test_every_option_a_message_names_exists():
    """issue 12.8: a hint that names ``--format`` to ``convert`` (whose option is ``--to``) sends the user nowhere.
    Every ``--option`` written in lorax's sources is an option of some lorax command (or, in a standalone script,
    one its own argparse parser adds)."""
    import typer.main

    import lorax
    from lorax.cli.app import app

    group = typer.main.get_command(app)
    options = {"--help"} | {
        o for p in group.params for o in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]
    }
    for cmd in group.commands.values():  # type: ignore[attr-defined]
        options |= {
            o for p in cmd.params for o in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]
        }
    assert {"--to", "--format", "--force"} <= options
    options.add(
        "--network_alpha"
    )  # kohya sd-scripts' own option, named in --network-alpha's help as its origin
    options.add(
        "--use_fsdp"
    )  # `accelerate launch --use_fsdp`: accelerate's own option, how users choose FSDP
    # the per-line options of a kohya prompt file (--sample-prompts), not command-line flags
    options |= {
        "--n",
        "--s",
        "--l",
        "--d",
        "--w",
        "--h",
        "--ss",
        "--cn",
    }  # --ss, --cn: kohya's, refused by lorax
    unknown = []
    for source in sorted(Path(lorax.__file__).parent.rglob("*.py")):
        text = source.read_text(encoding="utf-8")
        own = set(
            re.findall(r"add_argument\(\s*\"(--[a-z][a-z0-9-]*)\"", text)
        )  # argparse scripts (lorax.zoo)
        for option in sorted(set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*(?:-[a-z0-9_]+)*", text))):
            if option not in options and option not in own:
                unknown.append(f"{source.relative_to(source.parents[1])}: {option}")
    assert not unknown, unknown
