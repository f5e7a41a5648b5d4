"""``lorax generate`` and ``lorax.adapters.apply``: LoRAs on a live pipeline against hand-merged weights.

Oracles: the weights merged by hand (``W0 + s · (alpha / r) · up @ down``, computed here, not by lorax), diffusers'
own ``set_adapters`` for block weights and ``load_textual_inversion`` for learned tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lorax.adapters.apply import (
    LoraRequest,
    apply_loras,
    block_weight,
    diffusers_block_dict,
    register_tokens,
)
from lorax.adapters.state import LoraModule, LoraState
from lorax.errors import ConfigError, InputError, MismatchError, OutputExistsError
from lorax.gen.params import parse_scales, read_png_parameters
from lorax.services.generate import GenerateConfig, LoraSpec, generate, load_model

PROMPT = "a red circle on a white background"
STEPS = 3
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "v_proj")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lorax.zoo.tiny import tiny_pipeline

    folder = tmp_path_factory.mktemp("tiny") / "tiny-sd1"
    tiny_pipeline("sd1", seed=0).save_pretrained(folder)
    return folder


@pytest.fixture()
def pipe(tiny_dir: Path):
    p = load_model(str(tiny_dir))
    p.set_progress_bar_config(disable=True)
    return p


def make_lora(
    pipe,
    seed: int,
    *,
    unet=UNET_TARGETS,
    text=TEXT_TARGETS,
    rank: int = 4,
    alpha: float = 2.0,
    magnitude: float = 0.1,
    family: str | None = "sd1",
) -> LoraState:
    """Random low-rank modules on the given targets, keyed the on-disk way (``text_model.`` kept)."""
    g = torch.Generator().manual_seed(seed)
    modules: dict[str, LoraModule] = {}
    for name, m in pipe.unet.named_modules():
        if name.endswith(unet) and isinstance(m, torch.nn.Linear):
            modules[f"unet.{name}"] = LoraModule(
                torch.randn(rank, m.in_features, generator=g),
                torch.randn(m.out_features, rank, generator=g) * magnitude,
                alpha,
            )
        elif name.endswith(unet) and isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1):
            modules[f"unet.{name}"] = LoraModule(
                torch.randn(rank, m.in_channels, 1, 1, generator=g),
                torch.randn(m.out_channels, rank, 1, 1, generator=g) * magnitude,
                alpha,
            )
    for name, m in pipe.text_encoder.named_modules():
        if name.endswith(text) and isinstance(m, torch.nn.Linear):
            modules[f"text_encoder.text_model.{name}"] = LoraModule(
                torch.randn(rank, m.in_features, generator=g),
                torch.randn(m.out_features, rank, generator=g) * magnitude,
                alpha,
            )
    return LoraState(modules, family=family)


def _hand_block(path: str, blocks: dict[str, float] | None) -> float:
    if not blocks:
        return 1.0
    head = path.split(".")[0]
    side = {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(head)
    if side in ("down", "up") and f"{side}.{path.split('.')[1]}" in blocks:
        return blocks[f"{side}.{path.split('.')[1]}"]
    return blocks.get(side, 1.0) if side else 1.0


def merge_by_hand(pipe, state: LoraState, unet_scale: float, text_scale: float, blocks=None) -> None:
    """``W += s · (alpha / r) · up @ down`` on every targeted weight, computed here."""
    with torch.no_grad():
        for key, m in state.modules.items():
            component, _, path = key.partition(".")
            model = getattr(pipe, component)
            if component == "text_encoder" and not hasattr(model, "text_model"):
                path = path.removeprefix("text_model.")
            weight = model.get_submodule(path).weight
            r = m.down.shape[0]
            delta = (m.alpha / r) * (m.up.reshape(m.up.shape[0], -1) @ m.down.reshape(r, -1))
            s = unet_scale * _hand_block(path, blocks) if component == "unet" else text_scale
            weight += s * delta.reshape(weight.shape)


def images_np(pipe, seed: int = 7, prompt: str = PROMPT, n: int = 1) -> np.ndarray:
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    with torch.inference_mode():
        return pipe(
            prompt,
            num_inference_steps=STEPS,
            num_images_per_prompt=n,
            generator=generators,
            output_type="np",
        ).images


def png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def run(pipe, out: Path, loras=(), **overrides) -> list:
    config = GenerateConfig(
        prompts=[overrides.pop("prompt", PROMPT)],
        model=overrides.pop("model", "tiny-sd1"),  # a label here: the pipeline is given
        loras=list(loras),
        n=overrides.pop("n", 2),
        seed=overrides.pop("seed", 11),
        steps=overrides.pop("steps", STEPS),
        out_dir=out,
        **overrides,
    )
    return generate(config, pipe=pipe).images


# ---- the LoRA math on a live pipeline ---------------------------------------------------------------------------


def test_lora_at_scale_equals_hand_merged_weights(tiny_dir: Path, pipe) -> None:
    state = make_lora(pipe, 1)
    base = images_np(pipe)
    applied = apply_loras(pipe, [LoraRequest(state, "a", unet_scale=0.7, text_scale=0.4)])
    live = images_np(pipe)
    merged = load_model(str(tiny_dir))
    merged.set_progress_bar_config(disable=True)
    merge_by_hand(merged, state, 0.7, 0.4)
    reference = images_np(merged)
    assert np.abs(live - base).max() > 0.05, "the LoRA must change the images for this test to mean anything"
    np.testing.assert_allclose(live, reference, atol=2e-4)
    # taken off again: the base model's images, bit for bit
    applied.remove()
    np.testing.assert_array_equal(images_np(pipe), base)


def test_scale_zero_is_the_base_model_exactly(pipe) -> None:
    base = images_np(pipe)
    apply_loras(pipe, [LoraRequest(make_lora(pipe, 2), "a", unet_scale=0.0, text_scale=0.0)])
    np.testing.assert_array_equal(images_np(pipe), base)


def test_two_loras_equal_their_hand_summed_deltas(tiny_dir: Path, pipe) -> None:
    a = make_lora(pipe, 3)
    b = make_lora(pipe, 4, unet=("to_k", "to_v", "proj_in"), rank=2, alpha=1.0)
    apply_loras(pipe, [LoraRequest(a, "a", 0.6), LoraRequest(b, "b", 1.3, text_scale=0.5)])
    live = images_np(pipe)
    merged = load_model(str(tiny_dir))
    merged.set_progress_bar_config(disable=True)
    merge_by_hand(merged, a, 0.6, 0.6)
    merge_by_hand(merged, b, 1.3, 0.5)
    np.testing.assert_allclose(live, images_np(merged), atol=2e-4)


def test_fused_equals_unfused_and_removes_cleanly(pipe) -> None:
    state = make_lora(pipe, 5)
    base = images_np(pipe)
    request = LoraRequest(state, "a", 0.8, blocks={"down": 0.5, "up": 1.5})
    applied = apply_loras(pipe, [request])
    unfused = images_np(pipe)
    applied.remove()
    fused = apply_loras(pipe, [request], fuse=True)
    from peft.tuners.tuners_utils import BaseTunerLayer

    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules()), "fused: no PEFT wrappers left"
    np.testing.assert_allclose(images_np(pipe), unfused, atol=2e-4)
    with pytest.raises(ConfigError):
        fused.set_scales(0.5, 0.5)
    fused.remove()
    np.testing.assert_array_equal(images_np(pipe), base)


def test_block_weights_match_diffusers_set_adapters(tiny_dir: Path, pipe) -> None:
    """For attention-only LoRAs, lorax's down/mid/up weights are diffusers' own ``set_adapters`` dict."""
    state = make_lora(pipe, 6, text=())
    blocks = {"down": 0.0, "mid": 2.0, "up": 0.5, "up.1": 1.5}
    apply_loras(pipe, [LoraRequest(state, "a", 0.9, blocks=blocks)])
    ours = images_np(pipe)

    from lorax.adapters.apply import peft_state_dict

    oracle = load_model(str(tiny_dir))
    oracle.set_progress_bar_config(disable=True)
    oracle.load_lora_weights(peft_state_dict(state, oracle), adapter_name="a")
    oracle.set_adapters(["a"], [{"unet": diffusers_block_dict(oracle.unet, blocks, scale=0.9)}])
    np.testing.assert_allclose(ours, images_np(oracle), atol=1e-5)

    merged = load_model(str(tiny_dir))
    merged.set_progress_bar_config(disable=True)
    merge_by_hand(merged, state, 0.9, 0.0, blocks)
    np.testing.assert_allclose(ours, images_np(merged), atol=2e-4)


def test_block_weight_lookup() -> None:
    blocks = {"down": 0.5, "up.1": 0.0, "mid": 2.0}
    assert block_weight(blocks, "down_blocks.1.attentions.0.proj_in") == 0.5
    assert block_weight(blocks, "up_blocks.1.resnets.0.conv1") == 0.0
    assert block_weight(blocks, "up_blocks.0.attentions.0.proj_in") == 1.0
    assert block_weight(blocks, "mid_block.attentions.0.proj_out") == 2.0
    assert block_weight(blocks, "conv_in") == 1.0
    assert block_weight(None, "down_blocks.0.x") == 1.0


class _FullDelta:
    """A non-low-rank module (like LoHa/LoKr): only a delta, which must be added to the weight."""

    def __init__(self, delta: torch.Tensor) -> None:
        self._delta = delta

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._delta.to(dtype)

    @property
    def out_features(self) -> int:
        return int(self._delta.shape[0])


def test_delta_modules_are_patched_and_restored(pipe) -> None:
    base = images_np(pipe)
    target = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    weight = pipe.unet.get_submodule(target).weight
    delta = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * 0.5
    state = LoraState({f"unet.{target}": _FullDelta(delta)})
    applied = apply_loras(pipe, [LoraRequest(state, "d", 0.5)])
    live = images_np(pipe)
    with torch.no_grad():
        expected = weight.detach().clone()
    applied.set_scales(2.0, 2.0)  # 0.5 · 2 = 1
    torch.testing.assert_close(pipe.unet.get_submodule(target).weight, expected + 0.5 * delta)
    applied.remove()
    np.testing.assert_array_equal(images_np(pipe), base)
    assert np.abs(live - base).max() > 1e-3


def test_several_loras_on_one_weight_patch_and_fuse_together(pipe) -> None:
    """Two delta-only LoRAs and a low-rank one on the same weight: scales change, fusing adds all three, and
    removing gives the base weight back bit for bit."""
    target = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    weight = pipe.unet.get_submodule(target).weight
    w0 = weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    d1, d2 = torch.randn(weight.shape, generator=g) * 0.1, torch.randn(weight.shape, generator=g) * 0.1
    low_rank = make_lora(pipe, 14, unet=(target,), text=())
    m = low_rank.modules[f"unet.{target}"]
    lr_delta = (m.alpha / m.rank) * (m.up @ m.down)
    requests = [
        LoraRequest(LoraState({f"unet.{target}": _FullDelta(d1)}), "one", 0.5),
        LoraRequest(LoraState({f"unet.{target}": _FullDelta(d2)}), "two", 0.3),
        LoraRequest(low_rank, "three", 0.7),
    ]
    applied = apply_loras(pipe, requests)
    torch.testing.assert_close(pipe.unet.get_submodule(target).weight, w0 + 0.5 * d1 + 0.3 * d2)
    applied.set_scales(2.0, 2.0)
    torch.testing.assert_close(pipe.unet.get_submodule(target).weight, w0 + 1.0 * d1 + 0.6 * d2)
    applied.remove()
    assert torch.equal(pipe.unet.get_submodule(target).weight, w0)

    fused = apply_loras(pipe, requests, fuse=True)
    torch.testing.assert_close(
        pipe.unet.get_submodule(target).weight, w0 + 0.5 * d1 + 0.3 * d2 + 0.7 * lr_delta
    )
    fused.remove()
    assert torch.equal(pipe.unet.get_submodule(target).weight, w0)


def test_loha_dora_and_full_difference_modules_match_their_definitions(tiny_dir: Path, pipe) -> None:
    """LyCORIS-style modules through generate's weight patching equal their published deltas, computed here."""
    from lorax.adapters.lycoris import DoraModule, FullDiffModule, LohaModule

    g = torch.Generator().manual_seed(4)
    loha_path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    dora_path = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    full_path = "mid_block.attentions.0.proj_out"
    loha_w = pipe.unet.get_submodule(loha_path).weight
    out_f, in_f = loha_w.shape
    w1a, w1b = torch.randn(out_f, 2, generator=g) * 0.3, torch.randn(2, in_f, generator=g) * 0.3
    w2a, w2b = torch.randn(out_f, 2, generator=g) * 0.3, torch.randn(2, in_f, generator=g) * 0.3
    dora_w = pipe.unet.get_submodule(dora_path).weight
    d_out, d_in = dora_w.shape
    down, up = torch.randn(2, d_in, generator=g) * 0.3, torch.randn(d_out, 2, generator=g) * 0.3
    magnitude = dora_w.detach().norm(dim=1) * (1 + 0.2 * torch.rand(d_out, generator=g))
    full = pipe.unet.get_submodule(full_path)
    diff = torch.randn(full.weight.shape, generator=g) * 0.05
    diff_b = torch.randn(full.bias.shape, generator=g) * 0.05
    state = LoraState(
        {
            f"unet.{loha_path}": LohaModule(w1a, w1b, w2a, w2b, alpha=1.0),
            f"unet.{dora_path}": DoraModule(down, up, 2.0, magnitude),
            f"unet.{full_path}": FullDiffModule(diff, diff_b),
        }
    )
    base = images_np(pipe)
    applied = apply_loras(pipe, [LoraRequest(state, "ly", 0.7)])
    live = images_np(pipe)

    merged = load_model(str(tiny_dir))
    merged.set_progress_bar_config(disable=True)
    with torch.no_grad():
        w = merged.unet.get_submodule(loha_path).weight
        w += 0.7 * (1.0 / 2) * (w1a @ w1b) * (w2a @ w2b)
        w = merged.unet.get_submodule(dora_path).weight
        v = w + (2.0 / 2) * (up @ down)
        adapted = magnitude[:, None] * v / v.norm(dim=1, keepdim=True)
        w.copy_(w + 0.7 * (adapted - w))
        layer = merged.unet.get_submodule(full_path)
        layer.weight += 0.7 * diff.reshape(layer.weight.shape)
        layer.bias += 0.7 * diff_b
    assert np.abs(live - base).max() > 0.01
    np.testing.assert_allclose(live, images_np(merged), atol=2e-4)
    applied.remove()
    np.testing.assert_array_equal(images_np(pipe), base)


def test_lora_for_another_family_is_refused(pipe) -> None:
    from lorax.models.families import module_table

    # the real SD2 layout: cross attention reads 1024-wide text states, SD1 (and this tiny model) others
    table = module_table("sd2", "unet")
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    out_features, in_features = table[key][:2]
    state = LoraState(
        {f"unet.{key}": LoraModule(torch.zeros(1, in_features), torch.zeros(out_features, 1))}, family="sd2"
    )
    with pytest.raises(MismatchError, match=r"made for sd2, the model is sd1.*shapes differ"):
        apply_loras(pipe, [LoraRequest(state, "x")])
    wrong_path = LoraState({"unet.down_blocks.9.attn.to_q": LoraModule(torch.zeros(1, 4), torch.zeros(4, 1))})
    with pytest.raises(MismatchError, match="does not have"):
        apply_loras(pipe, [LoraRequest(wrong_path, "y")])
    # a linear pair aimed at the 3×3 output convolution
    wrong_kernel = LoraState({"unet.conv_out": LoraModule(torch.zeros(1, 32), torch.zeros(4, 1))})
    with pytest.raises(MismatchError, match=r"shapes differ at unet\.conv_out"):
        apply_loras(pipe, [LoraRequest(wrong_kernel, "z")])


def test_sdxl_lora_on_unet_and_both_text_encoders_equals_hand_merged(tmp_path: Path) -> None:
    import copy

    from lorax.zoo.tiny import tiny_pipeline

    xl = tiny_pipeline("sdxl", seed=0)
    xl.set_progress_bar_config(disable=True)
    merged = copy.deepcopy(xl)
    g = torch.Generator().manual_seed(0)
    modules: dict[str, LoraModule] = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        for name, m in getattr(xl, component).named_modules():
            if name.endswith(("to_q", "to_v", "q_proj", "v_proj")) and isinstance(m, torch.nn.Linear):
                disk = name if component == "unet" or name.startswith("text_model.") else f"text_model.{name}"
                modules[f"{component}.{disk}"] = LoraModule(
                    torch.randn(2, m.in_features, generator=g),
                    torch.randn(m.out_features, 2, generator=g) * 0.1,
                )
    state = LoraState(modules, family="sdxl")
    assert {k.split(".")[0] for k in modules} == {"unet", "text_encoder", "text_encoder_2"}
    live = run(
        xl, tmp_path / "live", [LoraSpec(state=state, scale=0.7, text_scale=0.4)], model="tiny-sdxl", n=1
    )
    base = run(xl, tmp_path / "base", model="tiny-sdxl", n=1)  # the LoRA is off again after the first run
    with torch.no_grad():
        for key, m in modules.items():
            component, _, path = key.partition(".")
            model = getattr(merged, component)
            if not hasattr(model, "text_model"):
                path = path.removeprefix("text_model.")
            model.get_submodule(path).weight += (0.7 if component == "unet" else 0.4) * (m.up @ m.down)
    reference = run(merged, tmp_path / "merged", model="tiny-sdxl", n=1)
    assert np.abs(png(live[0].path) - png(base[0].path)).max() > 10
    assert np.abs(png(live[0].path) - png(reference[0].path)).max() <= 1


# ---- learned tokens ----------------------------------------------------------------------------------------------


def test_tokens_match_diffusers_textual_inversion(tiny_dir: Path, pipe) -> None:
    dim = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    vectors = torch.randn(2, dim, generator=torch.Generator().manual_seed(3))
    register_tokens(pipe, {"<s1>": {"text_encoder": vectors}})
    oracle = load_model(str(tiny_dir))
    oracle.load_textual_inversion(vectors, token=["<s1>", "<s1>_1"])
    prompt = "a <s1> circle"
    ours, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    theirs, _ = oracle.encode_prompt(prompt, "cpu", 1, False)
    torch.testing.assert_close(ours, theirs)
    plain, _ = pipe.encode_prompt("a circle", "cpu", 1, False)
    assert not torch.allclose(ours, plain)
    with pytest.raises(MismatchError, match="already in the model's vocabulary"):
        register_tokens(pipe, {"<s1>": {"text_encoder": vectors}})
    with pytest.raises(MismatchError, match="wide vectors"):
        register_tokens(pipe, {"<s9>": {"text_encoder": torch.zeros(1, dim + 1)}})


def test_tokens_bundled_in_a_lora_are_registered(tiny_dir: Path, tmp_path: Path, pipe) -> None:
    """A pivotal-tuning LoRA (modules + tokens) equals diffusers' textual-inversion loader plus hand-merged weights."""
    state = make_lora(pipe, 13)
    vectors = torch.randn(1, 32, generator=torch.Generator().manual_seed(5))
    state.embeddings = {"<p1>": {"text_encoder": vectors}}
    live = run(pipe, tmp_path / "live", [LoraSpec(state=state, scale=0.5)], prompt="a <p1> star", n=1)
    oracle = load_model(str(tiny_dir))
    oracle.load_textual_inversion(vectors[0], token="<p1>")
    merge_by_hand(oracle, state, 0.5, 0.5)
    reference = run(oracle, tmp_path / "ref", prompt="a <p1> star", n=1)
    assert np.abs(png(live[0].path) - png(reference[0].path)).max() <= 1


def test_two_pivot_loras_with_the_same_token_are_told_apart(tiny_dir: Path, tmp_path: Path, pipe) -> None:
    """Both files bring ``<s1>``: the second file's token becomes ``<s2-0>`` and ``<1>`` / ``<2>`` in a prompt name
    each file's tokens (the seed's LoRAManager convention)."""
    a, b = make_lora(pipe, 15), make_lora(pipe, 16)
    va = torch.randn(1, 32, generator=torch.Generator().manual_seed(6))
    vb = torch.randn(1, 32, generator=torch.Generator().manual_seed(7))
    a.embeddings = {"<s1>": {"text_encoder": va}}
    b.embeddings = {"<s1>": {"text_encoder": vb}}
    live = run(
        pipe,
        tmp_path / "live",
        [LoraSpec(state=a, scale=0.5), LoraSpec(state=b, scale=0.5)],
        prompt="<1> and <2>",
        n=1,
    )
    assert read_png_parameters(live[0].path).prompt == "<s1> and <s2-0>"
    oracle = load_model(str(tiny_dir))
    oracle.load_textual_inversion(va[0], token="<s1>")
    oracle.load_textual_inversion(vb[0], token="<s2-0>")
    merge_by_hand(oracle, a, 0.5, 0.5)
    merge_by_hand(oracle, b, 0.5, 0.5)
    reference = run(oracle, tmp_path / "ref", prompt="<s1> and <s2-0>", n=1)
    assert np.abs(png(live[0].path) - png(reference[0].path)).max() <= 1


# ---- the service -------------------------------------------------------------------------------------------------


def test_same_seed_same_images_and_parameters_read_back(tmp_path: Path, pipe) -> None:
    state = make_lora(pipe, 8)
    spec = LoraSpec(state=state, scale=0.75, text_scale=0.5, name="style")
    first = run(pipe, tmp_path / "a", [spec], negative="blurry, dark")
    second = run(pipe, tmp_path / "b", [spec], negative="blurry, dark")
    assert [p.path.name for p in first] == [f"a-red-circle-on-a-white-background-{s}.png" for s in (11, 12)]
    for x, y in zip(first, second, strict=True):
        np.testing.assert_array_equal(png(x.path), png(y.path))
    params = read_png_parameters(first[1].path)
    assert params.prompt == PROMPT
    assert params.negative_prompt == "blurry, dark"
    assert params.fields["Seed"] == "12"
    assert params.fields["Steps"] == str(STEPS)
    assert params.fields["Sampler"] == "DDIM"
    assert params.fields["Size"] == "16x16"
    assert parse_scales(params.fields["Lora scales"]) == {"style": (0.75, 0.5)}
    assert first[1].parameters == params_text(first[1].path)


def params_text(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as image:
        return image.text["parameters"]  # type: ignore[attr-defined]


def test_generate_with_lora_equals_merged_model(tiny_dir: Path, tmp_path: Path, pipe) -> None:
    state = make_lora(pipe, 9)
    base = run(pipe, tmp_path / "base")
    zero = run(load_model(str(tiny_dir)), tmp_path / "zero", [LoraSpec(state=state, scale=0.0)])
    live = run(load_model(str(tiny_dir)), tmp_path / "live", [LoraSpec(state=state, scale=0.6)])
    merge_by_hand(pipe, state, 0.6, 0.6)
    merged = run(pipe, tmp_path / "merged")
    for b, z, lv, m in zip(base, zero, live, merged, strict=True):
        np.testing.assert_array_equal(png(z.path), png(b.path))  # scale 0 is the base, exactly
        assert np.abs(png(lv.path) - png(b.path)).max() > 10
        assert np.abs(png(lv.path) - png(m.path)).max() <= 1  # 8-bit rounding of fp-equal images


def test_sweep_writes_frames_and_a_grid(tmp_path: Path, tiny_dir: Path, pipe) -> None:
    state = make_lora(pipe, 10)
    images = run(pipe, tmp_path / "s", [LoraSpec(state=state)], sweep=[0.0, 0.5, 1.0], n=2)
    frames = [i for i in images if i.kind == "sweep"]
    grids = [i for i in images if i.kind == "sweep-grid"]
    assert len(frames) == 6 and len(grids) == 1
    assert grids[0].path.name == "a-red-circle-on-a-white-background-11-sweep.png"
    base = run(load_model(str(tiny_dir)), tmp_path / "base", n=2)
    full = run(load_model(str(tiny_dir)), tmp_path / "full", [LoraSpec(state=state)], n=2)
    by_name = {i.path.name: i for i in frames}
    for b, f in zip(base, full, strict=True):
        np.testing.assert_array_equal(png(by_name[b.path.name.replace(".png", "-s0.png")].path), png(b.path))
        np.testing.assert_array_equal(png(by_name[f.path.name.replace(".png", "-s1.png")].path), png(f.path))
    from PIL import Image

    with Image.open(grids[0].path) as sheet:
        assert sheet.width > 3 * 16 and sheet.height > 2 * 16
    assert read_png_parameters(grids[0].path).fields["Lora sweep"] == "0,0.5,1"
    assert parse_scales(
        read_png_parameters(by_name[f"{base[0].path.stem}-s0.5.png"].path).fields["Lora scales"]
    )


def test_scale_schedule_sets_each_steps_scale(pipe, tmp_path: Path) -> None:
    """The UNet sees the schedule's value at every step (read off the PEFT layer during each forward)."""
    state = make_lora(pipe, 11, text=())
    seen: list[float] = []
    layer_path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"

    def record(module, args) -> None:
        seen.append(float(pipe.unet.get_submodule(layer_path).scaling["lora"]))

    pipe.unet.register_forward_pre_hook(record)
    run(
        pipe,
        tmp_path / "sched",
        [LoraSpec(state=state, scale=0.5, name="lora")],
        schedule="linear:0:1",
        steps=5,
        n=1,
    )
    # rank 4, alpha 2 → PEFT scaling = weight · alpha / r with r = 4 and alpha = r after folding: weight itself
    assert seen == pytest.approx([0.5 * t for t in (0.0, 0.25, 0.5, 0.75, 1.0)])


def test_constant_schedule_equals_fixed_scale(tiny_dir: Path, tmp_path: Path, pipe) -> None:
    state = make_lora(pipe, 12)
    # the schedule multiplies the UNet scale only: the text encoder stays at the LoRA's own scale
    fixed = run(pipe, tmp_path / "fixed", [LoraSpec(state=state, scale=0.5, text_scale=1.0)])
    scheduled = run(
        load_model(str(tiny_dir)), tmp_path / "sched", [LoraSpec(state=state)], schedule="0.5,0.5"
    )
    for a, b in zip(fixed, scheduled, strict=True):
        np.testing.assert_array_equal(png(a.path), png(b.path))


def test_img2img_and_grid(tmp_path: Path, pipe) -> None:
    from PIL import Image

    init = tmp_path / "init.png"
    Image.new("RGB", (24, 24), (200, 30, 30)).save(init)
    images = run(pipe, tmp_path / "i2i", init_image=init, strength=0.5, grid=True, n=3, steps=4)
    assert [i.kind for i in images] == ["image", "image", "image", "grid"]
    assert images[0].width == 24
    fields = read_png_parameters(images[0].path).fields
    assert fields["Denoising strength"] == "0.5" and fields["Size"] == "24x24"
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="cannot read the init image"):
        run(pipe, tmp_path / "bad", init_image=bad)


def test_outputs_are_not_overwritten_without_force(tmp_path: Path, pipe) -> None:
    first = run(pipe, tmp_path, n=1)
    before = first[0].path.read_bytes()
    with pytest.raises(OutputExistsError, match="--force"):
        run(pipe, tmp_path, n=1)
    assert first[0].path.read_bytes() == before
    again = run(pipe, tmp_path, n=1, force=True)
    assert again[0].path == first[0].path


def test_config_problems_are_named_together() -> None:
    config = GenerateConfig(prompts=[], n=0, sweep=[0.0, 1.0], fuse=True, scheduler="nope")
    with pytest.raises(ConfigError) as err:
        config.validate()
    message = str(err.value)
    for flag in ("no prompt", "-n", "--scheduler", "--sweep-scale needs", "--fuse"):
        assert flag in message


def test_missing_token_in_prompt_is_refused(pipe, tmp_path: Path) -> None:
    with pytest.raises(MismatchError, match="<s7>"):
        run(pipe, tmp_path, prompt="a photo of <s7>")


def colour_lora(pipe, direction: torch.Tensor, magnitude: float) -> LoraState:
    """A LoRA on the UNet's output convolution that adds a constant offset along ``direction`` to the predicted
    noise (its down projection averages every input channel over the 3×3 window)."""
    conv = pipe.unet.conv_out
    down = torch.ones(1, conv.in_channels, *conv.kernel_size) / (conv.in_channels * conv.kernel_size[0] ** 2)
    up = (direction * magnitude).reshape(-1, 1, 1, 1)
    return LoraState({"unet.conv_out": LoraModule(down, up, 1.0)})


def redness(images: np.ndarray) -> float:
    return float((images[..., 0] - images[..., 1:].mean(-1)).mean())


def test_colour_lora_raises_the_concept_score_with_scale(pipe) -> None:
    # The direction in latent space that makes the decoded images redder (the gradient through the VAE);
    # predicted noise along −d pushes the final latents along +d.
    generators = [torch.Generator().manual_seed(s) for s in (0, 1)]
    latents = pipe(
        PROMPT, num_inference_steps=STEPS, num_images_per_prompt=2, generator=generators, output_type="latent"
    ).images.detach()
    latents.requires_grad_(True)
    decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    (decoded[:, 0] - decoded[:, 1:].mean(1)).mean().backward()
    grad = latents.grad.mean(dim=(0, 2, 3))
    applied = apply_loras(pipe, [LoraRequest(colour_lora(pipe, -grad / grad.norm(), 30.0), "red")])
    scores = []
    for scale in (0.0, 0.5, 1.0):
        applied.set_scales(scale, scale)
        scores.append(redness(images_np(pipe, seed=0)))
    assert scores[0] < scores[1] < scores[2]
    assert scores[2] - scores[0] > 0.005


BLUE = "a blue circle on a white background"
RED = "a red circle on a white background"


def test_concept_lora_on_the_shapes_model_raises_the_concept_score_with_scale(tmp_path: Path) -> None:
    """On the built-in shapes model, a LoRA whose concept is "blue circles are red" (a closed-form cross-attention
    edit): through a --sweep-scale run, the scorer sees red more often, and blue less, as the scale rises."""
    from PIL import Image

    from lorax.gen.concept import concept_edit_lora
    from lorax.zoo.shapes.scorers import score_images

    shapes = load_model("shapes")
    shapes.set_progress_bar_config(disable=True)
    state = concept_edit_lora(shapes, BLUE, RED)
    images = run(
        shapes,
        tmp_path,
        [LoraSpec(state=state)],
        prompt=BLUE,
        model="shapes",  # its own sampling defaults: guidance 5
        n=8,
        seed=0,
        steps=15,
        sweep=[0, 0.5, 1],
    )
    red, blue = [], []
    for scale in (0.0, 0.5, 1.0):
        frames = [Image.open(i.path).convert("RGB") for i in images if i.kind == "sweep" and i.scale == scale]
        assert len(frames) == 8
        red.append(score_images(frames, RED)["colour"])
        blue.append(score_images(frames, BLUE)["colour"])
    assert red[0] <= red[1] <= red[2], red
    assert red[2] - red[0] >= 0.4, red
    assert blue[2] < blue[0], blue


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_same_seed_same_images_and_scale_zero_is_base(tiny_dir: Path, tmp_path: Path) -> None:
    cpu_pipe = load_model(str(tiny_dir))
    state = make_lora(cpu_pipe, 17)

    def images(out: str, loras=(), **kw) -> list[np.ndarray]:
        config = GenerateConfig(
            prompts=[PROMPT],
            model=str(tiny_dir),
            loras=list(loras),
            n=2,
            seed=3,
            steps=STEPS,
            device="cuda",
            out_dir=tmp_path / out,
            **kw,
        )
        result = generate(config)
        assert (result.device, result.dtype) == ("cuda", "float16")
        return [png(i.path) for i in result.images]

    base, again = images("base"), images("again")
    zero = images("zero", [LoraSpec(state=state, scale=0.0)])
    unfused = images("unfused", [LoraSpec(state=state)])
    fused = images("fused", [LoraSpec(state=state)], fuse=True)
    for b, a, z, u, f in zip(base, again, zero, unfused, fused, strict=True):
        np.testing.assert_array_equal(b, a)
        np.testing.assert_array_equal(b, z)
        assert np.abs(u - b).max() > 10
        assert np.abs(u - f).max() <= 2  # fp16 rounding of merged weights
