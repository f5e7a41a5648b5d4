"""``lorax generate`` through the CLI: files in real formats, stdout, --json, and one-line errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_generate import make_lora, merge_by_hand, png

from lorax.adapters.state import LoraModule, LoraState
from lorax.gen.params import parse_scales, read_png_parameters

PROMPT = "a red circle on a white background"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lorax.zoo.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("cli-model") / "tiny-sd1"
    tiny_pipeline("sd1", seed=0).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def lora_file(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoraState]:
    """A kohya-format LoRA (UNet attention and text-encoder attention) for the tiny model, and its state."""
    from lorax.formats import save_lora
    from lorax.services.generate import load_model

    pipe = load_model(str(model_dir))
    state = make_lora(pipe, 21)
    path = tmp_path_factory.mktemp("loras") / "style.safetensors"
    save_lora(state, path, format="kohya")
    return path, state


def gen(cli, model_dir: Path, out: Path, *args: str, input: str | None = None):
    return cli("generate", *args, "--model", model_dir, "-o", out, "--steps", "3", "--seed", "5", input=input)


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lorax: error: ")
    return lines[0]


def test_paths_on_stdout_and_prompts_from_stdin(cli, model_dir: Path, tmp_path: Path) -> None:
    result = gen(
        cli, model_dir, tmp_path, "-", "-n", "2", input="a red circle\n# a comment\n\na blue square\n"
    )
    assert result.exit_code == 0, result.output
    paths = result.stdout.split()
    assert [Path(p).name for p in paths] == [
        "001-a-red-circle-5.png",
        "001-a-red-circle-6.png",
        "002-a-blue-square-5.png",
        "002-a-blue-square-6.png",
    ]
    assert all(Path(p).is_file() for p in paths)
    assert read_png_parameters(paths[3]).prompt == "a blue square"


def test_json_lines_and_prompts_file(cli, model_dir: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a green triangle\n", encoding="utf-8")
    result = gen(cli, model_dir, tmp_path / "out", "--prompts", prompts, "--grid", "-n", "2", "--json")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["kind"] for r in records] == ["image", "image", "grid"]
    assert [r["seed"] for r in records[:2]] == [5, 6]
    assert all(Path(r["path"]).is_file() for r in records)


def test_kohya_lora_file_equals_hand_merged_model(
    cli, model_dir: Path, lora_file: tuple[Path, LoraState], tmp_path: Path
) -> None:
    """A kohya file (text-encoder attention included) through the CLI at 0.6 / text 0.3 equals the base model
    with the deltas merged by hand."""
    from lorax.services.generate import GenerateConfig, generate, load_model

    path, state = lora_file
    result = gen(cli, model_dir, tmp_path / "cli", PROMPT, "--lora", f"{path}:0.6", "--text-scale", "0.3")
    assert result.exit_code == 0, result.output
    out = Path(result.stdout.strip())
    merged = load_model(str(model_dir))
    merge_by_hand(merged, state, 0.6, 0.3)
    reference = generate(
        GenerateConfig(prompts=[PROMPT], model=str(model_dir), seed=5, steps=3, out_dir=tmp_path / "ref"),
        pipe=merged,
    ).images[0]
    base = generate(
        GenerateConfig(prompts=[PROMPT], model=str(model_dir), seed=5, steps=3, out_dir=tmp_path / "base"),
        pipe=load_model(str(model_dir)),
    ).images[0]
    assert np.abs(png(out) - png(base.path)).max() > 10
    assert np.abs(png(out) - png(reference.path)).max() <= 1
    fields = read_png_parameters(out).fields
    raw = path.read_bytes()  # A1111 hashes a LoRA .safetensors after its header (addnet_hash_safetensors)
    header_end = 8 + int.from_bytes(raw[:8], "little")
    assert fields["Lora hashes"] == f"style: {hashlib.sha256(raw[header_end:]).hexdigest()[:12]}"
    assert parse_scales(fields["Lora scales"]) == {"style": (0.6, 0.3)}


def test_sweep_and_fuse_from_the_cli(
    cli, model_dir: Path, lora_file: tuple[Path, LoraState], tmp_path: Path
) -> None:
    path, _ = lora_file
    sweep = gen(
        cli, model_dir, tmp_path / "sweep", PROMPT, "--lora", path, "--sweep-scale", "0,0.5,1", "--json"
    )
    assert sweep.exit_code == 0, sweep.output
    records = [json.loads(line) for line in sweep.stdout.splitlines()]
    assert [r["scale"] for r in records] == [0.0, 0.5, 1.0, None]
    assert records[-1]["kind"] == "sweep-grid"
    fused = gen(cli, model_dir, tmp_path / "fused", PROMPT, "--lora", path, "--fuse")
    assert fused.exit_code == 0, fused.output
    assert np.abs(png(Path(fused.stdout.strip())) - png(Path(records[2]["path"]))).max() <= 1


def test_embedding_file_registers_its_token(cli, model_dir: Path, tmp_path: Path) -> None:
    from lorax.formats import save_embeddings

    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0)) * 0.5
    emb = save_embeddings({"<s1>": {"text_encoder": vectors}}, tmp_path / "s1.safetensors")
    result = gen(cli, model_dir, tmp_path / "a", "a <s1> circle", "--embedding", emb)
    assert result.exit_code == 0, result.output
    fields = read_png_parameters(result.stdout.strip()).fields
    assert fields["TI hashes"].startswith("s1: ")
    plain = gen(cli, model_dir, tmp_path / "b", "a circle")
    assert np.abs(png(Path(result.stdout.strip())) - png(Path(plain.stdout.strip()))).max() > 0


def test_one_line_errors(cli, model_dir: Path, lora_file: tuple[Path, LoraState], tmp_path: Path) -> None:
    from lorax.formats import save_lora
    from lorax.models.families import module_table

    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    out_f, in_f = module_table("sd2", "unet")[key][:2]
    sd2 = LoraState({f"unet.{key}": LoraModule(torch.zeros(2, in_f), torch.zeros(out_f, 2))}, family="sd2")
    sd2_file = save_lora(sd2, tmp_path / "sd2.safetensors", format="diffusers")
    line = error_line(gen(cli, model_dir, tmp_path / "o", PROMPT, "--lora", sd2_file))
    assert "sd2.safetensors" in line and "the model is sd1" in line

    line = error_line(gen(cli, model_dir, tmp_path / "o", "a photo of <s9>"))
    assert "<s9>" in line

    bad = tmp_path / "init.png"
    bad.write_bytes(b"\x89PNG broken")
    line = error_line(gen(cli, model_dir, tmp_path / "o", PROMPT, "--init-image", bad))
    assert "init.png" in line and "cannot read the init image" in line

    line = error_line(gen(cli, model_dir, tmp_path / "o", PROMPT, "--lora", tmp_path / "nope.safetensors"))
    assert "nope.safetensors" in line

    line = error_line(gen(cli, model_dir, tmp_path / "o", PROMPT, "--sweep-scale", "0,1"))
    assert "--sweep-scale needs at least one --lora" in line
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_existing_outputs_need_force(cli, model_dir: Path, tmp_path: Path) -> None:
    first = gen(cli, model_dir, tmp_path, PROMPT)
    assert first.exit_code == 0, first.output
    line = error_line(gen(cli, model_dir, tmp_path, PROMPT))
    assert "--force" in line
    again = gen(cli, model_dir, tmp_path, PROMPT, "--force")
    assert again.exit_code == 0 and again.stdout == first.stdout


def test_scheduler_blocks_and_schedule_are_recorded(
    cli, model_dir: Path, lora_file: tuple[Path, LoraState], tmp_path: Path
) -> None:
    path, _ = lora_file
    result = gen(
        cli,
        model_dir,
        tmp_path,
        PROMPT,
        "--lora",
        f"{path}:0.9",
        "--scheduler",
        "dpm++2m-karras",
        "--blocks",
        "down=0.5,up.1=0",
        "--scale-schedule",
        "cosine:0:1",
        "--negative",
        "blurry",
    )
    assert result.exit_code == 0, result.output
    params = read_png_parameters(result.stdout.strip())
    assert params.negative_prompt == "blurry"
    assert params.fields["Sampler"] == "DPM++ 2M Karras"
    assert params.fields["Lora blocks"] == "down=0.5,up.1=0"
    assert params.fields["Lora schedule"] == "cosine:0:1"
    line = error_line(gen(cli, model_dir, tmp_path / "x", PROMPT, "--lora", path, "--blocks", "side=1"))
    assert "--blocks" in line


def test_pivot_file_tokens_from_the_cli(cli, model_dir: Path, tmp_path: Path) -> None:
    """A kohya file bundling a token (what `lorax pivot` writes): `<1>` in the prompt names it."""
    from lorax.formats import save_lora
    from lorax.services.generate import load_model

    state = make_lora(load_model(str(model_dir)), 22)
    state.embeddings = {
        "<krk>": {"text_encoder": torch.randn(2, 32, generator=torch.Generator().manual_seed(1))}
    }
    path = save_lora(state, tmp_path / "pivot.safetensors", format="kohya")
    result = gen(cli, model_dir, tmp_path / "a", "a <1> circle", "--lora", path)
    assert result.exit_code == 0, result.output
    # the token as the model saw it, and the LoRA as A1111 reads it back
    assert read_png_parameters(result.stdout.strip()).prompt == "a <krk> circle <lora:pivot:1>"
    direct = gen(cli, model_dir, tmp_path / "b", "a <krk> circle", "--lora", path)
    assert direct.exit_code == 0, direct.output
    assert np.array_equal(png(Path(result.stdout.strip())), png(Path(direct.stdout.strip())))
