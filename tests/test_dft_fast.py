"""Mode ``adjusted_batched``: the same images and the same adjusted gradient as mode ``adjusted``
(step-by-step graph), whatever the VJP batching; with step subsampling, an unbiased estimate.

All gradients are taken in float64 on a tiny random SD pipeline, through the VAE decode and a
fixed image loss, with LoRA on the text encoder and on the U-Net (both gradient paths of
:class:`fairness.dft.batched._DeferredSteps`: into the conditioning and into U-Net weights).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from fairness.adapters import AdapterSpec, attach_adapter
from fairness.config import DFTConfig
from fairness.dft.batched import plan_steps, step_generator, step_seed
from fairness.dft.engine import SamplingConfig, generate
from fairness.models.tiny import build_tiny_pipeline
from fairness.seeding import torch_generator

STEPS, GUIDANCE = 6, 3.0
PROMPTS = ["a photo of the doctor", "a photo of the nurse"]


@pytest.fixture(scope="module")
def setup():
    pipe = build_tiny_pipeline(seed=0).to(torch.float64)
    torch.manual_seed(0)
    adapter = attach_adapter(pipe, AdapterSpec(kind="both_lora", rank=4))
    with torch.no_grad():  # non-zero LoRA so every LoRA matrix gets a gradient
        for p in adapter.parameters():
            p.data = (torch.randn_like(p) * 0.2).double()
    noise = torch.randn(2, 4, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    target = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    return pipe, adapter, noise, target


def grad_of(setup, seed: int | None = None, **sampling) -> torch.Tensor:
    """The adapter's gradient of a fixed image loss; ``seed`` keys the step draw."""
    pipe, adapter, noise, target = setup
    for p in adapter.parameters():
        p.grad = None
    cfg = SamplingConfig(num_steps=STEPS, guidance_scale=GUIDANCE, **sampling)
    with step_seed(seed) if seed is not None else contextlib.nullcontext():
        images = generate(pipe, PROMPTS, noise, cfg)
    ((images - target) ** 2).mean().backward()
    return torch.cat([p.grad.flatten() for p in adapter.parameters()])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def exact(setup) -> torch.Tensor:
    return grad_of(setup, mode="adjusted")


@pytest.mark.parametrize("vjp_batch", [1, 5, 2 * STEPS])  # one pair per call, uneven chunks, all at once
def test_batched_vjps_equal_step_by_step_gradient(setup, exact, vjp_batch):
    batched = grad_of(setup, mode="adjusted_batched", vjp_batch=vjp_batch)
    assert exact.norm() > 0
    torch.testing.assert_close(batched, exact, rtol=1e-9, atol=1e-12 * float(exact.abs().max()))


def test_batched_images_equal_plain_sampling(setup):
    pipe, _, noise, _ = setup
    with torch.no_grad():
        plain = generate(pipe, PROMPTS, noise, SamplingConfig(num_steps=STEPS, guidance_scale=GUIDANCE, mode="none"))
    batched = generate(pipe, PROMPTS, noise, SamplingConfig(num_steps=STEPS, guidance_scale=GUIDANCE,
                                                            mode="adjusted_batched", grad_steps=2))
    assert batched.requires_grad
    torch.testing.assert_close(batched.detach(), plain)


def test_plan_steps_one_per_stratum():
    for num_steps, k in ((20, 4), (23, 5), (7, 7), (5, 9), (6, None)):
        plan = plan_steps(num_steps, k, torch_generator(0, "plan", num_steps))
        kk = min(k or num_steps, num_steps)
        assert len(plan.indices) == kk and plan.indices == sorted(set(plan.indices))
        assert sum(plan.weights) == num_steps  # the strata tile the steps
        bounds = [0]
        for w in plan.weights:
            bounds.append(bounds[-1] + int(w))
        assert all(lo <= i < hi for i, lo, hi in zip(plan.indices, bounds[:-1], bounds[1:]))
    draws = {tuple(plan_steps(20, 4, torch_generator(s, "plan")).indices) for s in range(50)}
    assert len(draws) > 10  # random, not a fixed subset


def test_step_draw_is_keyed_by_the_noise_or_the_seed():
    a, b = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)

    def draw(z):
        return tuple(plan_steps(20, 4, step_generator(z)).indices)

    assert draw(a) == draw(a.clone())
    assert len({draw(b * s) for s in range(1, 30)}) > 1
    with step_seed(3):  # what the trainer does: the same draw for every share of the batch
        outer = draw(a)
        assert draw(b) == outer
        with step_seed(4):
            pass
        assert draw(a) == outer  # the inner scope restored the outer seed

    def seeded(s):
        with step_seed(s):
            return draw(a)

    assert len({seeded(s) for s in range(30)}) > 1


def test_subsampled_estimator_is_unbiased(setup, exact):
    """K = 2 of T = 6 steps: two strata of 3, so 9 equally likely step plans. A draw's gradient
    depends on its plan only, so the gradient of each plan is computed once (checked against
    direct draws) and many draws are averaged from them:

    * exactly: the mean over the 9 plans is the exact adjusted gradient;
    * statistically (seeds 0..n-1, plans from :func:`plan_steps` as training draws them): the
      n-draw mean's relative error shrinks like 1/sqrt(n) (a biased estimator levels off at its
      bias; the stratum weights dropped, the same check fails) and its cosine with exact -> 1.
    """
    def plan_of(seed: int) -> tuple[int, ...]:
        with step_seed(seed):
            return tuple(plan_steps(STEPS, 2, step_generator(setup[2])).indices)

    seeds: dict[tuple[int, ...], int] = {}
    for seed in range(200):
        seeds.setdefault(plan_of(seed), seed)
    assert sorted(seeds) == [(a, b) for a in range(3) for b in range(3, 6)]
    by_plan = {plan: grad_of(setup, s, mode="adjusted_batched", grad_steps=2) for plan, s in seeds.items()}
    mean = torch.stack(list(by_plan.values())).mean(0)
    torch.testing.assert_close(mean, exact, rtol=1e-9, atol=1e-12 * float(exact.abs().max()))
    for seed in (200,):  # a fresh draw is its plan's gradient
        torch.testing.assert_close(grad_of(setup, seed, mode="adjusted_batched", grad_steps=2),
                                   by_plan[plan_of(seed)])

    single = torch.tensor([rel(g, exact) for g in by_plan.values()])
    assert float(single.min()) > 1e-3  # single draws really are estimates
    spread = float(single.pow(2).mean().sqrt())  # a draw's RMS relative error (its plans are equally likely)
    blocks, ns = 64, [4, 16, 64, 256]
    plans = list(by_plan)
    grads = torch.stack([by_plan[p] for p in plans])
    drawn = torch.tensor([plans.index(plan_of(s)) for s in range(blocks * ns[-1])])

    def rms_error(n: int, weight: float = 1.0) -> float:
        """RMS relative error of the n-draw mean over ``blocks`` disjoint blocks of n draws."""
        counts = torch.nn.functional.one_hot(drawn[: blocks * n].reshape(blocks, n), len(plans)).sum(1).double()
        means = counts @ grads / n * weight
        return math.sqrt(sum(rel(m, exact) ** 2 for m in means) / blocks)

    scaled = [rms_error(n) * math.sqrt(n) / spread for n in ns]
    print(f"single-draw error {spread:.3f}; sqrt(n) x error of the n-draw mean / that: {dict(zip(ns, scaled))}")
    assert all(0.7 < x < 1.3 for x in scaled)  # error = spread / sqrt(n): no bias term
    all_draws = torch.bincount(drawn, minlength=len(plans)).double() @ grads / len(drawn)
    assert float(torch.nn.functional.cosine_similarity(all_draws, exact, dim=0)) > 0.9999
    unweighted = [rms_error(n, 1 / 3) for n in ns]  # control: the stratum weights dropped
    assert unweighted[-1] > 0.5 and unweighted[-1] > 0.9 * unweighted[0]  # levels off at its bias


def test_batched_under_autocast_follows_step_by_step(setup):
    """bf16 autocast is restored in the deferred backward pass (the recomputed U-Net runs in
    bf16 as the forward did), and the gradient stays aligned with the step-by-step one's."""
    pipe, adapter, noise, target = setup
    grads = {}
    for mode in ("adjusted", "adjusted_batched"):
        for p in adapter.parameters():
            p.grad = None
        pipe.to(torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            images = generate(pipe, PROMPTS, noise.float(), SamplingConfig(num_steps=3, guidance_scale=GUIDANCE, mode=mode))
        ((images.float() - target.float()) ** 2).mean().backward()
        grads[mode] = torch.cat([p.grad.flatten().double() for p in adapter.parameters()])
    pipe.to(torch.float64)
    assert float(torch.nn.functional.cosine_similarity(grads["adjusted"], grads["adjusted_batched"], dim=0)) > 0.99


def test_dft_config_passes_batched_keys():
    cfg = DFTConfig.model_validate({"mode": "adjusted_batched", "grad_steps": 4, "vjp_batch": 2})
    s = cfg.sampling(20)
    assert (s.mode, s.grad_steps, s.vjp_batch) == ("adjusted_batched", 4, 2)
    with pytest.raises(ValueError):
        DFTConfig.model_validate({"grad_steps": 0})


def test_trainer_runs_batched_subsampled(tmp_path):
    from tests.helpers import tiny_config

    from fairness.training.loop import Trainer

    cfg = tiny_config(tmp_path, dft__mode="adjusted_batched", dft__grad_steps=2)
    rows = [Trainer(cfg, tmp_path / f"run{i}", progress=False).train_step() for i in range(2)]
    assert rows[0]["grad_norm"] > 0 and not rows[0]["skipped"]
    assert rows[0]["grad_norm"] == rows[1]["grad_norm"]  # the step draw is reproducible
