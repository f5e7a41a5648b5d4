"""The module tables shipped in lorax/models/tables/ are the full-size models' own (read off meta models), and
naming a kohya LoRA's modules with them needs neither diffusers nor transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorax.models.families import FAMILIES


@pytest.mark.parametrize(
    ("family", "component"), [(f, c) for f, components in FAMILIES.items() for c in components]
)
def test_shipped_table_equals_the_meta_model(family, component):
    from lorax.models.families import meta_model, module_table, weight_table

    shipped = module_table(family, component)
    built = weight_table(meta_model(family, component), component)
    assert list(shipped.items()) == list(built.items())  # same paths, shapes and traversal order


def test_reading_a_kohya_lora_imports_no_model_library(tmp_path):
    import torch

    from lorax.adapters.state import LoraModule, LoraState
    from lorax.formats import save_lora

    path = tmp_path / "x.safetensors"
    module = LoraModule(torch.ones(4, 1280), torch.ones(1280, 4), 4.0)
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    te = "text_encoder_2.text_model.encoder.layers.3.self_attn.q_proj"
    save_lora(
        LoraState({key: LoraModule(torch.ones(4, 640), torch.ones(640, 4), 4.0), te: module}, family="sdxl"),
        path,
        format="kohya",
    )
    code = (
        "import sys; from lorax.formats import load_lora; s = load_lora(sys.argv[1]); "
        "print(sorted(s.modules)); print([m for m in ('diffusers', 'transformers') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    modules, imported = out.stdout.strip().splitlines()
    assert modules == str(sorted([key, te]))
    assert imported == "[]"
