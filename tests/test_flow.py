"""Flux's flow-matching objective (issue 17 item 1, the library part): ``lorax.training.flow``.

Oracles: diffusers' own functions on the same inputs and seeds (``compute_density_for_timestep_sampling``,
``compute_loss_weighting_for_sd3``, FluxPipeline's packing, position ids and ``calculate_shift``, the sigmas of
``FlowMatchEulerDiscreteScheduler``), hand computations from the published formulas, and one training step computed
inline the way diffusers' ``examples/dreambooth/train_dreambooth_lora_flux.py`` computes it, on a tiny transformer.
"""

from __future__ import annotations

import math

import pytest
import torch

from lorax.errors import ConfigError, MismatchError
from lorax.training import flow
from lorax.training.flow import FlowConfig

# The scheduler config of FLUX.1-dev (scheduler/scheduler_config.json); schnell's is shift 1.0, no dynamic shifting.
FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)  # fmt: skip
# A tiny Flux transformer (16 input channels: 4-channel latents packed 2×2); tests/test_flux_lora.py's layout.
TINY = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
)  # fmt: skip


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- sampling -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sampling", "scheme", "params"),
    [
        ("uniform", "none", {}),
        ("logit-normal", "logit_normal", dict(logit_mean=0.3, logit_std=1.2)),
        ("mode", "mode", dict(mode_scale=1.29)),
    ],
)
def test_density_draws_are_diffusers(sampling: str, scheme: str, params: dict) -> None:
    from diffusers.training_utils import compute_density_for_timestep_sampling

    ours = flow.sample_sigmas(FlowConfig(sampling=sampling, **params), 64, gen(3))
    theirs = compute_density_for_timestep_sampling(
        scheme, 64, logit_mean=params.get("logit_mean"), logit_std=params.get("logit_std"),
        mode_scale=params.get("mode_scale"), generator=gen(3),
    )  # fmt: skip
    assert torch.equal(ours, theirs)


def test_draws_are_reproducible_from_the_generator() -> None:
    for sampling in flow.SAMPLINGS:
        config = FlowConfig(sampling=sampling)
        a = flow.sample_sigmas(config, 16, gen(5), image_seq_len=1024)
        b = flow.sample_sigmas(config, 16, gen(5), image_seq_len=1024)
        c = flow.sample_sigmas(config, 16, gen(6), image_seq_len=1024)
        assert torch.equal(a, b) and not torch.equal(a, c), sampling
        assert a.dtype == torch.float32 and bool(((a >= 0) & (a <= 1)).all()), sampling


def test_sigmoid_shift_and_flux_shift_by_hand() -> None:
    """sigmoid(k·n); s·u/(1 + (s−1)u) with u = sigmoid(k·n) is sigmoid(k·n + ln s); Flux's is sigmoid(k·n + μ)."""
    n = torch.randn(32, generator=gen(1))
    k = 1.7
    ours = flow.sample_sigmas(FlowConfig(sampling="sigmoid", sigmoid_scale=k), 32, gen(1))
    torch.testing.assert_close(ours, 1 / (1 + torch.exp(-k * n)))
    ours = flow.sample_sigmas(FlowConfig(sampling="shift", shift=3.1582, sigmoid_scale=k), 32, gen(1))
    torch.testing.assert_close(ours, torch.sigmoid(k * n + math.log(3.1582)))
    mu = 0.5 + (1024 - 256) * (1.15 - 0.5) / (4096 - 256)  # 0.63 for a 512² image: 64² latents, 32² tokens
    ours = flow.sample_sigmas(
        FlowConfig(sampling="flux-shift", sigmoid_scale=k), 32, gen(1), image_seq_len=1024
    )
    torch.testing.assert_close(ours, torch.sigmoid(k * n + mu))


def test_shift_values_by_hand() -> None:
    half = torch.tensor([0.5, 1.0])
    assert flow.shift_sigmas(half, FlowConfig(sampling="shift", shift=3.0)).tolist() == [0.75, 1.0]
    assert flow.shift_sigmas(half, FlowConfig(sampling="uniform")).tolist() == [0.5, 1.0]
    at_max = flow.shift_sigmas(half, FlowConfig(sampling="flux-shift"), image_seq_len=4096)
    torch.testing.assert_close(at_max, torch.tensor([math.exp(1.15) / (math.exp(1.15) + 1), 1.0]))
    with pytest.raises(ValueError, match="sequence length"):
        flow.shift_sigmas(half, FlowConfig(sampling="flux-shift"))


def test_mu_is_calculate_shift() -> None:
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = FlowConfig()
    for seq in (64, 256, 1024, 4096, 6000):
        assert flow.flux_mu(seq, config) == calculate_shift(seq, 256, 4096, 0.5, 1.15)
    other = FlowConfig(base_shift=0.3, max_shift=1.5, base_seq_len=128, max_seq_len=2048)
    assert flow.flux_mu(777, other) == calculate_shift(777, 128, 2048, 0.3, 1.5)


def test_flux_shift_is_the_schedulers_dynamic_shift() -> None:
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    t = np.linspace(1.0, 1 / 28, 28)  # FluxPipeline's sigmas for 28 steps
    scheduler.set_timesteps(sigmas=t, mu=calculate_shift(1024, 256, 4096, 0.5, 1.15))
    ours = flow.shift_sigmas(torch.tensor(t, dtype=torch.float32), FlowConfig(sampling="flux-shift"), 1024)
    torch.testing.assert_close(ours, scheduler.sigmas[:-1], rtol=1e-6, atol=1e-7)


def test_discrete_table_is_the_schedulers() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    assert torch.equal(
        flow.sigma_table(FlowConfig()), FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER).sigmas
    )
    # kohya's training scheduler, --discrete_flow_shift 3
    kohya = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    config = FlowConfig(sampling="shift", shift=3.0)
    assert torch.equal(flow.shift_sigmas(flow.sigma_table(config), config), kohya.sigmas)

    # diffusers' draw: u → index ⌊u·T⌋ into the (unshifted) table
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    u = compute_density_for_timestep_sampling("none", 64, generator=gen(2))
    ours = flow.sample_sigmas(FlowConfig(sampling="uniform", discrete=True), 64, gen(2))
    assert torch.equal(ours, scheduler.sigmas[(u * 1000).long()])
    # kohya's `sigma` sampling over its shifted table, with the sigmoid draw of `shift`
    n = torch.randn(64, generator=gen(2))
    ours = flow.sample_sigmas(FlowConfig(sampling="shift", shift=3.0, discrete=True), 64, gen(2))
    assert torch.equal(ours, kohya.sigmas[(torch.sigmoid(n) * 1000).long()])


def test_timesteps_are_the_schedulers_scale_and_the_transformer_takes_sigma() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    timesteps, model = flow.flux_timesteps(scheduler.sigmas)
    assert torch.equal(timesteps, scheduler.timesteps)  # σ·1000, what kohya and diffusers call timesteps
    assert torch.equal(model, scheduler.timesteps / 1000)  # what both pass as `timestep`
    torch.testing.assert_close(model, scheduler.sigmas, rtol=2e-7, atol=0)


# --- weighting, packing, ids, guidance ------------------------------------------------------------------------------


@pytest.mark.parametrize("weighting", flow.WEIGHTINGS)
def test_weighting_is_diffusers(weighting: str) -> None:
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = torch.rand(50, generator=gen(4)).clamp(min=1e-3).view(-1, 1, 1, 1)
    assert torch.equal(
        flow.loss_weighting(weighting, sigmas), compute_loss_weighting_for_sd3(weighting, sigmas)
    )


def test_weighting_by_hand() -> None:
    s = torch.tensor([0.5, 0.25])
    assert flow.loss_weighting("none", s).tolist() == [1.0, 1.0]
    assert flow.loss_weighting("sigma_sqrt", s).tolist() == [4.0, 16.0]
    torch.testing.assert_close(
        flow.loss_weighting("cosmap", s), torch.tensor([4 / math.pi, 2 / (math.pi * 0.625)])
    )


def test_packing_is_the_pipelines() -> None:
    from diffusers import FluxPipeline

    x = torch.randn(2, 16, 12, 8, generator=gen(7))
    packed = flow.pack_latents(x)
    assert packed.shape == (2, 6 * 4, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 16, 12, 8))
    assert torch.equal(flow.unpack_latents(packed, 12, 8), FluxPipeline._unpack_latents(packed, 96, 64, 8))
    assert torch.equal(flow.unpack_latents(packed, 12, 8), x)
    # one patch by hand: token (row 1, column 2) holds channel 0's 2×2 block at latent rows 2–3, columns 4–5 first
    assert packed[0, 1 * 4 + 2, :4].tolist() == x[0, 0, 2:4, 4:6].flatten().tolist()


def test_packing_refuses_odd_sizes() -> None:
    with pytest.raises(MismatchError, match="even height and width"):
        flow.pack_latents(torch.zeros(1, 16, 7, 8))
    with pytest.raises(MismatchError, match="not 8×8 latents"):
        flow.unpack_latents(torch.zeros(1, 15, 64), 8, 8)


def test_position_ids_are_the_pipelines() -> None:
    from diffusers import FluxPipeline

    ids = flow.image_ids(6, 4, "cpu", torch.bfloat16)
    assert torch.equal(ids, FluxPipeline._prepare_latent_image_ids(2, 6, 4, "cpu", torch.bfloat16))
    assert ids.shape == (24, 3) and ids[4 * 5 + 3].tolist() == [0.0, 5.0, 3.0]
    assert torch.equal(flow.text_ids(9), torch.zeros(9, 3))


def test_guidance_for_dev_and_none_for_schnell() -> None:
    assert flow.guidance_vector(True, 3).tolist() == [1.0, 1.0, 1.0]
    assert flow.guidance_vector(True, 2, 3.5).dtype == torch.float32
    assert flow.guidance_vector(False, 3) is None
    assert FlowConfig().guidance == 1.0


# --- one step -------------------------------------------------------------------------------------------------------


def test_one_step_by_hand() -> None:
    """x0 = 0.2, ε = −1, σ = 0.25: x_t = 0.75·0.2 − 0.25 = −0.1, target −1.2, timestep 250; prediction 0.3."""
    x0, eps = torch.full((1, 4, 2, 2), 0.2), torch.full((1, 4, 2, 2), -1.0)
    for weighting, w in (("none", 1.0), ("sigma_sqrt", 16.0), ("cosmap", 2 / (math.pi * (1 - 0.5 + 0.125)))):
        s = flow.noisy_sample(x0, FlowConfig(weighting=weighting), None, torch.tensor([0.25]), eps)
        torch.testing.assert_close(s.noisy, torch.full_like(x0, -0.1))
        torch.testing.assert_close(s.target, torch.full_like(x0, -1.2))
        assert s.timesteps.tolist() == [250.0] and s.model_timesteps.tolist() == [0.25]
        loss = flow.weighted_mse(torch.full_like(x0, 0.3), s)
        torch.testing.assert_close(loss, torch.tensor([w * 1.5**2]))
    mask = torch.zeros(1, 1, 2, 2)
    mask[..., 0, 0] = 1.0  # a quarter of the pixels count
    torch.testing.assert_close(
        flow.weighted_mse(torch.full_like(x0, 0.3), s, mask), torch.tensor([w * 2.25 / 4])
    )


def test_config_errors_name_every_field() -> None:
    with pytest.raises(ConfigError) as err:
        FlowConfig(sampling="cosine", weighting="snr", shift=0.0, max_seq_len=128)
    message = str(err.value)
    for part in ("sampling: 'cosine'", "flux-shift", "weighting: 'snr'", "shift: must be > 0", "max_seq_len"):
        assert part in message


def _diffusers_script_loss(
    transformer, model_input, prompt_embeds, pooled, generator, weighting_scheme, guidance
):
    """One step of train_dreambooth_lora_flux.py (no prior preservation), its draws taken from ``generator``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    noise_scheduler_copy = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)

    def get_sigmas(timesteps, n_dim=4, dtype=torch.float32):
        sigmas = noise_scheduler_copy.sigmas.to(dtype=dtype)
        schedule_timesteps = noise_scheduler_copy.timesteps
        step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
        sigma = sigmas[step_indices].flatten()
        while len(sigma.shape) < n_dim:
            sigma = sigma.unsqueeze(-1)
        return sigma

    vae_scale_factor = 8
    bsz = model_input.shape[0]
    latent_image_ids = FluxPipeline._prepare_latent_image_ids(
        bsz, model_input.shape[2] // 2, model_input.shape[3] // 2, "cpu", torch.float32
    )
    noise = torch.randn(model_input.shape, generator=generator)  # the script's randn_like
    u = compute_density_for_timestep_sampling(
        weighting_scheme=weighting_scheme, batch_size=bsz, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
        generator=generator,
    )  # fmt: skip
    indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
    timesteps = noise_scheduler_copy.timesteps[indices]
    sigmas = get_sigmas(timesteps, n_dim=model_input.ndim, dtype=model_input.dtype)
    noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
    packed = FluxPipeline._pack_latents(noisy_model_input, bsz, model_input.shape[1], *model_input.shape[2:])
    guidance_t = torch.tensor([guidance]).expand(bsz) if transformer.config.guidance_embeds else None
    text_ids = torch.zeros(prompt_embeds.shape[1], 3)  # FluxPipeline.encode_prompt's
    model_pred = transformer(
        hidden_states=packed, timestep=timesteps / 1000, guidance=guidance_t, pooled_projections=pooled,
        encoder_hidden_states=prompt_embeds, txt_ids=text_ids, img_ids=latent_image_ids, return_dict=False,
    )[0]  # fmt: skip
    model_pred = FluxPipeline._unpack_latents(
        model_pred, height=model_input.shape[2] * vae_scale_factor, width=model_input.shape[3] * vae_scale_factor,
        vae_scale_factor=vae_scale_factor,
    )  # fmt: skip
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
    target = noise - model_input
    loss = torch.mean(
        (weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1
    )
    return loss.mean()


# diffusers' one --weighting_scheme is both the density and the loss weight; lorax keeps them apart.
SCHEMES = {
    "none": ("uniform", "none"),
    "sigma_sqrt": ("uniform", "sigma_sqrt"),
    "cosmap": ("uniform", "cosmap"),
    "logit_normal": ("logit-normal", "none"),
    "mode": ("mode", "none"),
}


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_training_step_is_diffusers_dreambooth_flux(guidance_embeds: bool, one_torch_thread) -> None:
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**TINY, guidance_embeds=guidance_embeds)
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])
    )
    lora = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    assert lora
    g = gen(11)
    latents = torch.randn(2, 4, 8, 6, generator=g)
    cond = flow.FluxCond(torch.randn(2, 7, 32, generator=g), torch.randn(2, 32, generator=g))

    def grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        transformer.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in lora.items()}

    for scheme, (sampling, weighting) in SCHEMES.items():
        objective = flow.FlowObjective(
            FlowConfig(sampling=sampling, weighting=weighting, discrete=True, guidance=3.5)
        )
        ours = objective.loss(transformer, latents, cond, gen(21)).mean()
        theirs = _diffusers_script_loss(
            transformer, latents, cond.prompt_embeds, cond.pooled_projections, gen(21), scheme, 3.5
        )
        assert torch.equal(ours.detach(), theirs.detach()), scheme
        ours_g, theirs_g = grads(ours), grads(theirs)
        assert any(bool(v.abs().sum() > 0) for v in ours_g.values())
        for name in lora:
            assert torch.equal(ours_g[name], theirs_g[name]), (scheme, name)

    # the guidance value reaches a dev model (and nothing for schnell): another value, another loss
    other = flow.FlowObjective(FlowConfig(sampling="uniform", discrete=True, guidance=1.0))
    same = flow.FlowObjective(FlowConfig(sampling="uniform", discrete=True, guidance=3.5))
    changed = not torch.equal(
        other.loss(transformer, latents, cond, gen(21)), same.loss(transformer, latents, cond, gen(21))
    )
    assert changed == guidance_embeds
