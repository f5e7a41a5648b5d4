"""Memory options of lorax train: the fp8 frozen base (--fp8-base), block swap (--blocks-to-swap) and the text
encoders' outputs cached on disk (--cache-text-to-disk), on tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorax.training import flow
from lorax.training.block_swap import install_block_swap, model_blocks
from lorax.training.quantized_base import FP8_MAX, Fp8Linear, quantize_linears, weight_bytes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_FLUX = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
)  # fmt: skip


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_flux(seed: int = 0) -> nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**TINY_FLUX)
    model.requires_grad_(False)
    return model


def flux_inputs(seed: int = 1) -> tuple[torch.Tensor, flow.FluxCond]:
    g = gen(seed)
    return torch.randn(2, 4, 8, 6, generator=g), flow.FluxCond(
        torch.randn(2, 7, 32, generator=g), torch.randn(2, 32, generator=g)
    )


def flux_loss(model: nn.Module, latents: torch.Tensor, cond: flow.FluxCond, seed: int = 5) -> torch.Tensor:
    objective = flow.FlowObjective(flow.FlowConfig(sampling="uniform", discrete=True))
    return objective.loss(model, latents, cond, gen(seed)).mean()


# ---------------------------------------------------------------------------------------------------------------
# fp8 base


def test_fp8_weights_within_e4m3_rounding_of_the_originals() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(96, 80)
    with torch.no_grad():
        linear.weight[0, :8] = torch.tensor([0.0, 1e-7, -1e-7, 3.0, -3.0, 0.5, 1e-4, -2.5])
    w = linear.weight.detach().clone()
    q = Fp8Linear(linear)
    scale = float(w.abs().max()) / 448
    assert q.scale == scale and q.codes.dtype == torch.uint8 and q.codes.shape == w.shape
    # e4m3fn: 3 mantissa bits (relative error ≤ 2⁻⁴ when rounding a normal number), subnormal step 2⁻⁹ (absolute
    # error ≤ 2⁻¹⁰ in units of the scale); the largest weight maps to 448 exactly
    bound = 2.0**-4 * w.abs() + scale * 2.0**-10
    err = (q.weight - w).abs()
    assert bool((err <= bound).all())
    assert float(err.max()) > 0  # it is rounded (the test would see an unquantised weight)
    top = w.abs().argmax()
    assert float(q.weight.flatten()[top]) == float(w.flatten()[top])
    assert float(q.codes.view(torch.float8_e4m3fn).float().abs().max()) == FP8_MAX


def test_fp8_forward_within_the_bound_of_the_fp32_forward() -> None:
    torch.manual_seed(1)
    linear = nn.Linear(64, 48)
    x = torch.randn(5, 64)
    ref = linear(x).detach()
    w = linear.weight.detach().clone()
    q = Fp8Linear(linear)
    scale = float(w.abs().max()) / 448
    # |Σ_j x_j (ŵ_ij - w_ij)| ≤ Σ_j |x_j| (2⁻⁴ |w_ij| + s·2⁻¹⁰)  (the bias is kept exactly)
    bound = x.abs() @ (2.0**-4 * w.abs() + scale * 2.0**-10).t()
    out = q(x).detach()
    assert bool(((out - ref).abs() <= bound + 1e-6).all())
    assert not torch.equal(out, ref)
    # the gradient to the input uses the same dequantised weight
    xg = x.clone().requires_grad_(True)
    q(xg).sum().backward()
    assert xg.grad is not None
    torch.testing.assert_close(xg.grad, q.weight.sum(0).expand(5, -1), rtol=1e-6, atol=1e-6)


def test_fp8_base_stores_a_byte_a_weight_and_flux_output_stays_close() -> None:
    model = tiny_flux()
    latents, cond = flux_inputs()
    before = weight_bytes(model)
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    linear_weights = sum(m.weight.numel() for m in linears.values())
    with torch.no_grad():
        ref = flux_loss(model, latents, cond)
    assert quantize_linears(model) == len(linears)
    assert (
        weight_bytes(model) == before - 3 * linear_weights
    )  # 4 bytes → 1 for every linear weight, biases kept
    assert all(isinstance(model.get_submodule(n), Fp8Linear) for n in linears)
    with torch.no_grad():
        out = flux_loss(model, latents, cond)
    assert out != ref and abs(float(out - ref)) < 0.05 * abs(float(ref))


def test_lora_trains_on_an_fp8_base_and_saves_the_same_format() -> None:
    from lorax.training.lora import inject_lora, lora_tensors

    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out", "ff.net.2"]

    def train(fp8: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
        model = tiny_flux()
        if fp8:
            quantize_linears(model)
        params = inject_lora(model, targets, rank=4, alpha=4, seed=3)
        assert all(p.dtype == torch.float32 and p.requires_grad for p in params)
        opt = torch.optim.AdamW(params, lr=1e-2)
        latents, cond = flux_inputs()
        losses = []
        for _ in range(15):
            loss = flux_loss(
                model, latents, cond, seed=7
            )  # the same noise and timestep: a loss that can fall
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        return losses, lora_tensors(model)

    fp8_losses, fp8_lora = train(True)
    ref_losses, ref_lora = train(False)
    assert fp8_losses[-1] < 0.7 * fp8_losses[0], fp8_losses
    assert abs(fp8_losses[-1] - ref_losses[-1]) < 0.1 * ref_losses[-1]  # as a full-precision base learns
    assert {k: (v.shape, v.dtype) for k, v in fp8_lora.items()} == {
        k: (v.shape, v.dtype) for k, v in ref_lora.items()
    }
    assert any("base_layer" in k for k in fp8_lora) is False


def test_quantize_refuses_an_injected_model() -> None:
    from lorax.errors import ConfigError
    from lorax.training.lora import inject_lora

    model = nn.Sequential(nn.Linear(8, 8))
    inject_lora(model, ["0"], rank=2, alpha=2)
    with pytest.raises(ConfigError, match="before the LoRA layers"):
        quantize_linears(model)


# ---------------------------------------------------------------------------------------------------------------
# block swap


def _lora_flux(seed: int = 0) -> tuple[nn.Module, list[torch.nn.Parameter]]:
    from lorax.training.lora import inject_lora

    model = tiny_flux(seed)
    params = inject_lora(model, ["to_q", "to_v", "proj_mlp", "ff.net.2"], rank=4, alpha=4, seed=2)
    with torch.no_grad():
        for p in params:
            p.add_(
                torch.randn(p.shape, generator=gen(9)) * 0.05
            )  # nonzero B: every LoRA weight gets a gradient
    model.enable_gradient_checkpointing()
    return model, params


def _loss_and_grads(
    model: nn.Module, params: list[torch.nn.Parameter]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    latents, cond = flux_inputs()
    model.zero_grad(set_to_none=True)
    loss = flux_loss(model, latents, cond)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]  # type: ignore[union-attr]


def test_block_swap_gives_identical_loss_and_lora_gradients_on_flux() -> None:
    ref_model, ref_params = _lora_flux()
    ref_loss, ref_grads = _loss_and_grads(ref_model, ref_params)
    assert all(float(g.abs().sum()) > 0 for g in ref_grads)

    model, params = _lora_flux()
    blocks = model_blocks(model)
    assert blocks == [*model.transformer_blocks, *model.single_transformer_blocks]
    swap = install_block_swap(model, 3, "cpu")
    loss, grads = _loss_and_grads(model, params)
    assert torch.equal(loss, ref_loss)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.equal(g, r)
    swap.remove()
    after_loss, _ = _loss_and_grads(model, params)
    assert torch.equal(after_loss, ref_loss)


def test_block_swap_parks_frozen_tensors_out_of_the_parameters_and_fetches_each_layer() -> None:
    model, params = _lora_flux()
    names_before = {n for n, _ in model.named_parameters()}
    swap = install_block_swap(model, 2, "cpu", torch.float64)
    swapped = model_blocks(model)[-2:]
    assert all(b in model.single_transformer_blocks for b in swapped)
    parked = {id(p.cpu) for items in swap.parked.values() for p in items}
    live = {n for n, _ in model.named_parameters()}
    # the parked frozen weights are no parameters any more (model.to(device) never copies them), the LoRA's are
    assert names_before - live and all("lora_" not in n for n in names_before - live)
    assert {n for n in names_before if "lora_" in n} <= live
    assert all(id(p) not in parked for p in model.parameters())
    assert all(p.cpu.dtype == torch.float64 for items in swap.parked.values() for p in items)
    model.to(torch.float32)  # placing the model leaves the parked tensors where (and as) they are
    assert all(p.cpu.dtype == torch.float64 for items in swap.parked.values() for p in items)
    swap.remove()

    model, params = _lora_flux()
    swap = install_block_swap(model, 2, "cpu")
    order: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    seen_during: list[bool] = []

    def record(module: nn.Module, *_: object) -> None:
        order.append(names[module])
        # while a layer runs its parked attributes are set (here to the device copies)
        seen_during.append(all(getattr(module, p.name) is not None for p in swap.parked[module]))

    for module in swap.parked:
        module.register_forward_pre_hook(record)
    _loss_and_grads(model, params)
    layers = len(swap.parked)
    # the forward fetches each parked layer once, and gradient checkpointing's recomputation in the backward again
    assert swap.fetches == 2 * layers == len(order)
    first, second = order[:layers], order[layers:]
    assert sorted(first) == sorted(second) == sorted(names[m] for m in swap.parked)
    block_of = [n.split(".")[1] for n in second]
    assert block_of.index("1") < block_of.index("0")  # the backward runs the blocks in reverse order
    assert all(seen_during)
    # after the step every parked attribute is the CPU tensor again
    for module, items in swap.parked.items():
        assert all(getattr(module, p.name) is p.cpu for p in items)


def test_block_swap_on_an_sd_unet_with_checkpointed_resnets() -> None:
    from lorax.training.lora import inject_lora
    from lorax.zoo.tiny import tiny_pipeline

    def run(swap_blocks: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        unet = tiny_pipeline("sd1").unet
        unet.requires_grad_(False)
        params = inject_lora(unet, ["to_q", "to_v", "conv1"], rank=2, alpha=2, seed=1)
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=gen(4)) * 0.05)
        unet.enable_gradient_checkpointing()
        unet.train()
        if swap_blocks:
            install_block_swap(unet, swap_blocks, "cpu")
        g = gen(3)
        x = torch.randn(1, unet.config.in_channels, 16, 16, generator=g)
        ctx = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
        loss = unet(x, torch.tensor([10]), ctx).sample.pow(2).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in params]  # type: ignore[union-attr]

    ref_loss, ref_grads = run(0)
    loss, grads = run(3)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads, strict=True))


def test_block_swap_bad_counts_are_one_line_errors() -> None:
    from lorax.errors import ConfigError

    model = tiny_flux()
    with pytest.raises(ConfigError, match="has 4 blocks; swap at most 4"):
        install_block_swap(model, 5, "cpu")
    with pytest.raises(ConfigError, match="at least 1"):
        install_block_swap(model, 0, "cpu")


# ---------------------------------------------------------------------------------------------------------------
# text-encoder outputs on disk


@pytest.fixture
def sd_parts():  # type: ignore[no-untyped-def]
    from lorax.zoo.tiny import tiny_pipeline

    pipe = tiny_pipeline("sd1", words=["sks", "star"])
    pipe.text_encoder.requires_grad_(False)
    return pipe


def _counting(encoder: nn.Module) -> list[int]:
    calls = [0]
    encoder.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_disk_text_cache_hits_on_the_next_run_and_never_calls_the_encoder(
    sd_parts, tmp_path, monkeypatch
) -> None:
    from lorax.training.text import PromptEncoder, encode
    from lorax.training.text_cache import attach_disk_cache

    monkeypatch.setenv("LORAX_CACHE", str(tmp_path))
    prompts = ["a sks star", "a star", "a sks star"]
    first = PromptEncoder(sd_parts.tokenizer, sd_parts.text_encoder, "cpu", cache=True)
    cache = attach_disk_cache(first)
    out = first(prompts)
    assert cache.written == 2 and cache.hits == 0
    assert len(list(cache.folder.glob("*.safetensors"))) == 2
    with torch.no_grad():
        fresh = encode(sd_parts.tokenizer, sd_parts.text_encoder, prompts, "cpu")
    torch.testing.assert_close(out, fresh, rtol=0, atol=1e-6)

    calls = _counting(sd_parts.text_encoder)
    second = PromptEncoder(sd_parts.tokenizer, sd_parts.text_encoder, "cpu", cache=True)
    again = attach_disk_cache(second)
    assert again.folder == cache.folder
    assert torch.equal(second(prompts), out)
    assert again.hits == 2 and again.written == 0 and calls[0] == 0
    second(["a new caption"])  # a caption not seen before is encoded and written
    assert calls[0] == 1 and again.written == 1


def test_disk_text_cache_misses_for_another_encoder_clip_skip_or_a_bad_file(
    sd_parts, tmp_path, monkeypatch
) -> None:
    from lorax.training.text import PromptEncoder
    from lorax.training.text_cache import attach_disk_cache

    monkeypatch.setenv("LORAX_CACHE", str(tmp_path))
    enc = PromptEncoder(sd_parts.tokenizer, sd_parts.text_encoder, "cpu", cache=True)
    base = attach_disk_cache(enc)
    before = enc(["a sks star"])
    skip = attach_disk_cache(
        PromptEncoder(sd_parts.tokenizer, sd_parts.text_encoder, "cpu", cache=True, clip_skip=2)
    )
    assert skip.folder != base.folder
    # a corrupt file is encoded again and rewritten, not read
    (file,) = base.folder.glob("*.safetensors")
    file.write_bytes(b"not a safetensors file")
    enc2 = PromptEncoder(sd_parts.tokenizer, sd_parts.text_encoder, "cpu", cache=True)
    cache2 = attach_disk_cache(enc2)
    assert torch.equal(enc2(["a sks star"]), before) and cache2.hits == 0 and cache2.written == 1
    # another model (one weight changed) gets another folder: a miss, never the old embedding
    with torch.no_grad():
        sd_parts.text_encoder.get_input_embeddings().weight[0, 0] += 1.0
    enc3 = PromptEncoder(sd_parts.tokenizer, sd_parts.text_encoder, "cpu", cache=True)
    cache3 = attach_disk_cache(enc3)
    assert cache3.folder != base.folder
    enc3(["a sks star"])
    assert cache3.hits == 0 and cache3.written == 1


def test_disk_text_cache_keeps_sdxl_tuples(tmp_path, monkeypatch) -> None:
    from lorax.training.sdxl import SdxlPromptEncoder
    from lorax.training.text_cache import attach_disk_cache
    from lorax.zoo.tiny import tiny_pipeline

    monkeypatch.setenv("LORAX_CACHE", str(tmp_path))
    pipe = tiny_pipeline("sdxl")
    encoders = [pipe.text_encoder.requires_grad_(False), pipe.text_encoder_2.requires_grad_(False)]

    def encoder() -> SdxlPromptEncoder:
        return SdxlPromptEncoder([pipe.tokenizer, pipe.tokenizer_2], encoders, "cpu", cache=True)

    first = encoder()
    attach_disk_cache(first)
    a = first(["a red circle", "a blue star"])
    second = encoder()
    cache = attach_disk_cache(second)
    b = second(["a blue star", "a red circle"])
    assert cache.hits == 2 and cache.written == 0
    assert torch.equal(a.hidden.flip(0), b.hidden) and torch.equal(a.pooled.flip(0), b.pooled)


def test_disk_text_cache_needs_a_caching_encoder(sd_parts) -> None:
    from lorax.errors import ConfigError
    from lorax.training.text import PromptEncoder
    from lorax.training.text_cache import attach_disk_cache

    with pytest.raises(ConfigError, match=r"--cache-text-to-disk: .* not cached"):
        attach_disk_cache(PromptEncoder(sd_parts.tokenizer, sd_parts.text_encoder, "cpu", cache=False))


# ---------------------------------------------------------------------------------------------------------------
# lorax train with the options


@pytest.fixture(scope="module")
def train_inputs(tmp_path_factory):  # type: ignore[no-untyped-def]
    import numpy as np
    from PIL import Image

    from lorax.zoo.tiny import tiny_pipeline

    root = tmp_path_factory.mktemp("memory")
    tiny_pipeline("sd1", words=["sks", "star"]).save_pretrained(root / "model")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        arr = np.full((32, 32, 3), 255, dtype=np.uint8)
        arr[6:26, 6 + i : 26 + i] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(root / "images" / f"star-{i}.png")
    return root


def _train(root, out, **changes):  # type: ignore[no-untyped-def]
    from lorax.progress import NullProgress
    from lorax.services.train import train
    from lorax.training.config import TrainConfig

    values = dict(
        data_dir=root / "images", output=out, model=str(root / "model"), instance_prompt="a sks star",
        resolution=32, steps=3, learning_rate=1e-3, device="cpu", save_dtype="fp32",
    )  # fmt: skip
    return train(TrainConfig(**{**values, **changes}), NullProgress())


def test_train_with_fp8_base_block_swap_and_disk_text_cache(train_inputs, tmp_path, monkeypatch) -> None:
    from safetensors.torch import load_file

    monkeypatch.setenv("LORAX_CACHE", str(tmp_path / "cache"))
    plain = _train(train_inputs, tmp_path / "plain.safetensors")
    opts = dict(fp8_base=True, blocks_to_swap=2, gradient_checkpointing=True, cache_text_to_disk=True)
    result = _train(train_inputs, tmp_path / "memory.safetensors", **opts)
    ours, ref = load_file(result.output), load_file(plain.output)
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in ref.items()}
    assert all(bool(torch.isfinite(v).all()) for v in ours.values())
    assert any(not torch.equal(ours[k], ref[k]) for k in ours)  # the fp8 base changed the steps a little
    (folder,) = (tmp_path / "cache" / "text").iterdir()
    assert len(list(folder.glob("*.safetensors"))) == 1  # one caption


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--blocks-to-swap", "2"], "--blocks-to-swap needs --gradient-checkpointing"),
        (["--blocks-to-swap", "-1"], "Invalid value for '--blocks-to-swap'"),
        (["--cache-text-to-disk", "--train-text"], "--cache-text-to-disk caches frozen text encoders"),
        (["--cache-text-to-disk", "--no-cache-text"], "not with --train-text or --no-cache-text"),
    ],
)
def test_bad_memory_options_are_one_line_errors(tmp_path, args, message) -> None:
    from typer.testing import CliRunner

    from lorax.cli.app import app

    (tmp_path / "a.png").write_bytes(b"")
    result = CliRunner().invoke(app, ["train", str(tmp_path), "-o", str(tmp_path / "x.safetensors"), *args])
    assert result.exit_code != 0
    text = " ".join(result.output.split())
    assert message in text, text
    assert "Traceback" not in result.output
