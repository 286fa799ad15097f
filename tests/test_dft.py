"""Adjusted DFT: the gradient the engine computes equals an independent per-step VJP sum.

The U-Net input is detached, so the solver chain is linear in each step's noise prediction:
z_0 = a z_T + sum_t b_t eps_t with scalar b_t. Hence dL/d(eps_t) = b_t dL/dz_0, and the adjusted
gradient is sum_t C_t VJP(eps_t, b_t dL/dz_0). We compute b_t by perturbing eps_t in a re-run of
the scheduler chain (no autograd through the solver), the VJPs one U-Net call at a time, and
compare with the engine's single backward pass, in float64.
"""

from __future__ import annotations

import pytest
import torch

from fairness.adapters import AdapterSpec, attach_adapter
from fairness.dft.engine import SamplingConfig, adjusted_coefficients, decode, encode_prompts, fresh_scheduler, generate
from fairness.models.tiny import build_tiny_pipeline

STEPS, GUIDANCE = 6, 3.0
PROMPTS = ["a photo of the doctor", "a photo of the nurse"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    pipe = build_tiny_pipeline(seed=0).to(torch.float64)
    adapter = attach_adapter(pipe, AdapterSpec(rank=4))
    with torch.no_grad():  # non-zero LoRA so every LoRA matrix gets a gradient
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
            p.data = p.data.double()
    noise = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return pipe, adapter, noise, target


def loss_fn(images, target):
    return ((images - target) ** 2).mean()


def engine_grad(pipe, adapter, noise, target, mode):
    for p in adapter.parameters():
        p.grad = None
    cfg = SamplingConfig(num_steps=STEPS, guidance_scale=GUIDANCE, mode=mode, checkpoint_unet=True, checkpoint_vae=True)
    loss_fn(generate(pipe, PROMPTS, noise, cfg), target).backward()
    return torch.cat([p.grad.flatten() for p in adapter.parameters()])


def chain(pipe, z_T, eps_list):
    """Re-run only the solver updates with given noise predictions (no U-Net)."""
    sched = fresh_scheduler(pipe)
    sched.set_timesteps(STEPS)
    z = z_T
    for t, eps in zip(sched.timesteps, eps_list):
        z = sched.step(eps, t, z).prev_sample
    return z


def vjp_grad(pipe, adapter, noise, target):
    sched = fresh_scheduler(pipe)
    sched.set_timesteps(STEPS)
    params = adapter.parameters()

    def eps_at(z, t):
        cond = encode_prompts(pipe, PROMPTS)
        uncond = encode_prompts(pipe, [""] * len(PROMPTS))
        z_in = sched.scale_model_input(z, t)
        both = pipe.unet(torch.cat([z_in, z_in]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        e_u, e_c = both.chunk(2)
        return e_u + GUIDANCE * (e_c - e_u)

    # Forward without any graph, recording the trajectory and the noise predictions.
    zs, eps_list, z = [], [], noise * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            zs.append(z)
            e = eps_at(z, t)
            eps_list.append(e)
            z = sched.step(e, t, z).prev_sample
    z0 = chain(pipe, noise * sched.init_noise_sigma, eps_list)
    torch.testing.assert_close(z0, z)
    z0 = z0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(loss_fn(decode(pipe, z0), target), z0)
    coeffs = adjusted_coefficients(sched, sched.timesteps)
    total = [torch.zeros_like(p) for p in params]
    for i, t in enumerate(sched.timesteps):
        # b_t from the solver chain, which is affine in eps_t: add a unit constant to eps_t and read
        # off the change of z_0 (a large step keeps the scheduler's float32 constants' rounding small).
        delta = torch.ones_like(eps_list[i])
        bumped = [e + delta if j == i else e for j, e in enumerate(eps_list)]
        with torch.no_grad():
            b_t = ((chain(pipe, noise * sched.init_noise_sigma, bumped) - z0) / delta).mean()
        e = eps_at(zs[i], t)
        grads = torch.autograd.grad((e * (coeffs[i] * b_t * g)).sum(), params, allow_unused=True)
        total = [acc + (gr if gr is not None else 0) for acc, gr in zip(total, grads)]
    return torch.cat([x.flatten() for x in total])


def test_adjusted_gradient_matches_independent_vjp_sum(setup):
    pipe, adapter, noise, target = setup
    a = engine_grad(pipe, adapter, noise, target, "adjusted")
    b = vjp_grad(pipe, adapter, noise, target)
    rel = ((a - b).norm() / b.norm()).item()
    print(f"adjusted vs per-step VJP sum: relative error {rel:.3e}")
    assert b.norm() > 0
    assert rel < 1e-6


def test_naive_gradient_differs_from_adjusted(setup):
    pipe, adapter, noise, target = setup
    a = engine_grad(pipe, adapter, noise, target, "adjusted")
    n = engine_grad(pipe, adapter, noise, target, "naive")
    assert ((a - n).norm() / n.norm()).item() > 1e-2


def test_coefficients_standardised_and_match_formula():
    pipe = build_tiny_pipeline(seed=0)
    sched = fresh_scheduler(pipe)
    sched.set_timesteps(20)
    c = adjusted_coefficients(sched, sched.timesteps)
    assert abs(c.log().mean().item()) < 1e-12
    t = int(sched.timesteps[5])
    a_bar, beta = sched.alphas_cumprod[t].double(), sched.betas[t].double()
    raw = 1 / ((1 / a_bar.sqrt()) * beta / (1 - a_bar).sqrt())
    all_raw = torch.stack([1 / ((1 / sched.alphas_cumprod[int(s)].double().sqrt()) * sched.betas[int(s)].double()
                                / (1 - sched.alphas_cumprod[int(s)].double()).sqrt()) for s in sched.timesteps])
    torch.testing.assert_close(c[5], raw / all_raw.log().mean().exp())


def test_plain_sampling_matches_stock_pipeline():
    pipe = build_tiny_pipeline(seed=0)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = generate(pipe, ["a photo of the doctor"] * 2, noise, SamplingConfig(num_steps=5, guidance_scale=7.5, mode="none"))
    stock = pipe("a photo of the doctor", num_images_per_prompt=2, latents=noise, num_inference_steps=5,
                 guidance_scale=7.5, output_type="pt").images
    torch.testing.assert_close(ours, stock)
