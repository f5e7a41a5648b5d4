"""Every problem ``train``, ``invert`` and ``pivot`` report about their config names only options that command has.

The three commands share one config class family (``TrainConfig`` → ``InvertConfig`` / ``PivotConfig``), and invert
and pivot take the keys of the options they lack from a ``--config`` file. Each invalid value a config checks is given
to each command (through a TOML ``--config`` file, where a flag may not exist), and every ``--option`` in the one-line
error must be one of that command's own options (those ``--help`` lists); a key the command has no flag for is named
as a config key.
"""

from __future__ import annotations

import json
import re
from dataclasses import fields
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from lorax.training.config import TrainConfig, flag
from lorax.training.pivot_config import InvertConfig, PivotConfig

CONFIGS: dict[str, type[TrainConfig]] = {"train": TrainConfig, "invert": InvertConfig, "pivot": PivotConfig}
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")

# (a field the message names, the invalid values; the message names it or another of the values' fields); "DIR" is
# an existing empty folder, "DATASET" a kohya dataset config
CASES: list[tuple[str, dict[str, Any]]] = [
    *[
        (name, {name: "nope"})
        for name in (
            "format",
            "optimizer",
            "lr_scheduler",
            "mixed_precision",
            "save_dtype",
            "prediction_type",
            "device",
            "template",
        )
    ],
    ("resolution", {"resolution": 30}),
    *[
        (name, {name: 0})
        for name in (
            "rank",
            "repeats",
            "batch_size",
            "grad_accum",
            "learning_rate",
            "num_class_images",
            "sample_steps",
            "steps",
            "epochs",
            "snr_gamma",
            "alpha",
        )
    ],
    *[
        (name, {name: -1})
        for name in (
            "warmup_steps",
            "keep_tokens",
            "checkpoint_every",
            "validation_every",
            "weight_decay",
            "max_grad_norm",
            "noise_offset",
            "prior_weight",
            "guidance_scale",
            "text_learning_rate",
        )
    ],
    ("caption_dropout", {"caption_dropout": 1.5}),
    ("lora_dropout", {"lora_dropout": 1.5}),
    ("epochs", {"steps": 10, "epochs": 1}),
    ("text_learning_rate", {"text_learning_rate": 1e-4, "train_text": False}),
    ("class_prompt", {"class_dir": "DIR"}),
    ("random_crop", {"cache_latents": True, "random_crop": True}),
    ("validation_prompt", {"validation_every": 5}),
    ("targets", {"targets": " , "}),
    ("dora", {"dora": True, "format": "diffusers"}),
    ("dora", {"dora": True, "targets": "all"}),
    ("dataset_config", {"dataset_config": "DATASET"}),
    # train's own (issue 19); invert and pivot refuse them
    ("save_last", {"save_last": 2}),
    ("warmup_ratio", {"warmup_ratio": 1.5}),
    ("lr_cycles", {"lr_cycles": 3}),
    ("loraplus_ratio", {"loraplus_ratio": 0}),
    ("ema_decay", {"ema_decay": 2}),
    ("clip_skip", {"clip_skip": 0}),
    # values of the wrong type (a config file's)
    ("rank", {"rank": "four"}),
    ("flip", {"flip": "yes"}),
    ("weight_decay", {"weight_decay": "much"}),
    # invert and pivot
    ("vectors", {"vectors": 0}),
    ("norm_target", {"norm_target": 0}),
    ("mask_temperature", {"mask_temperature": 0}),
    ("auto_mask", {"mask_dir": "DIR", "auto_mask": True}),
    ("token", {"token": "a b"}),
    ("token_at_data", {"token_at_data": "no-separator"}),
    ("token", {"format": "a1111", "token": "<a>|<b>"}),
    ("train_text", {"train_text": True}),
    ("dora", {"dora": True}),
    # pivot
    ("ti_steps", {"ti_steps": -1}),
    ("ti_learning_rate", {"ti_learning_rate": 0}),
    ("continue_ti_learning_rate", {"continue_ti_learning_rate": 0, "continue_inversion": True}),
    ("continue_inversion", {"continue_ti_learning_rate": 1e-3}),
    ("ti_weight_decay", {"ti_weight_decay": -1}),
    ("dora", {"dora": True, "format": "lora_diffusion"}),
]


@cache
def lorax_command():  # type: ignore[no-untyped-def]
    """The click command Typer builds from lorax's app (built once: Typer rebuilds it on every ``CliRunner`` call)."""
    import typer

    from lorax.cli.app import app

    return typer.main.get_command(app)


def run(*args: Any):  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    return CliRunner().invoke(lorax_command(), [str(a) for a in args])


def command_options(command: str) -> set[str]:
    """The options ``lorax COMMAND --help`` lists (from the click command that renders it)."""
    cmd = lorax_command().commands[command]
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}


@pytest.mark.parametrize("command", list(CONFIGS))
def test_config_only_keys_are_exactly_the_fields_without_an_option(cli, command: str) -> None:
    """``CONFIG_ONLY`` (the keys a message names as config keys) is pinned to the command's options, both ways."""
    cls = CONFIGS[command]
    options = command_options(command)
    without = {f.name for f in fields(cls) if flag(f.name) not in options}
    assert without == set(cls.CONFIG_ONLY)
    levers = set(FLAG.findall(" ".join(cls.memory_flags())))  # the out-of-memory message's
    assert levers and levers <= options, sorted(levers - options)
    help_text = cli(command, "--help").stdout
    assert "--learning-rate" in help_text and "--help" in help_text


def _values(values: dict[str, Any], tmp: Path) -> dict[str, Any]:
    out = {}
    for key, value in values.items():
        if value == "DIR":
            value = str(tmp / "folder")
        elif value == "DATASET":
            value = str(tmp / "dataset.toml")
        out[key] = value
    return out


def _toml(values: dict[str, Any]) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


@pytest.mark.parametrize("command", list(CONFIGS))
def test_every_config_problem_names_only_this_commands_options(tmp_path: Path, command: str) -> None:
    cls = CONFIGS[command]
    options = command_options(command) | {"--output"}  # -o/--output is named as such
    (tmp_path / "folder").mkdir()
    (tmp_path / "data").mkdir()
    (tmp_path / "dataset.toml").write_text(
        f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "data"}"\n'
    )
    field_names = {f.name for f in fields(cls)}
    checked = 0
    for field, raw in CASES:
        if not set(raw) <= field_names:
            continue
        values = _values(raw, tmp_path)
        base = {"data_dir": tmp_path / "data", "output": tmp_path / "out.safetensors"}
        try:
            problems = cls.from_sources({**base, **values}, validate=False).problems()
        except Exception as err:  # a value of the wrong type: refused while reading it
            problems = [str(err)]
        if not problems:
            continue  # this command accepts these values (pivot trains the text encoder by default …)
        toml = tmp_path / f"case{checked}.toml"
        toml.write_text(_toml(values))
        result = run(command, tmp_path / "data", "-o", tmp_path / "out.safetensors", "--config", toml)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, (command, raw, result.stderr)
        line = lines[0]
        # a problem with the value is named by its option; a value of the wrong type by the TOML file and its key
        named_by_key = str(toml) in line and any(f"key {k}" in line for k in raw)
        assert named_by_key or any(cls.option_name(f) in line for f in {field, *raw}), (command, raw, line)
        named = set(FLAG.findall(line))
        assert named <= options, (command, raw, sorted(named - options), line)
        checked += 1
    assert checked >= 40


def test_a_key_invert_has_no_flag_for_is_named_as_a_config_key(cli, tmp_path: Path) -> None:
    """The case that was wrong: invert has no ``--weight-decay`` (its inversion's decay is a config key)."""
    (tmp_path / "data").mkdir()
    toml = tmp_path / "c.toml"
    toml.write_text("weight-decay = -1\n")
    result = cli("invert", tmp_path / "data", "-o", tmp_path / "s1.pt", "--config", toml)
    assert result.exit_code == 1
    assert "config key weight_decay must be ≥ 0 (got -1.0)" in result.stderr
    assert "--weight-decay" not in result.stderr
    assert "--weight-decay" not in cli("invert", "--help").stdout
