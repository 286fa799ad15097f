r"""Adjusted DFT with deferred, batched vector-Jacobian products and unbiased step subsampling.

The adjusted gradient (:mod:`fairness.dft.engine`, mode ``adjusted``) detaches the U-Net's input
at every step, so the only path from a trainable weight :math:`\theta` to :math:`z_0` through
step t is that step's noise prediction :math:`\epsilon_t = \epsilon_\theta(z_t, t, c)`, and the
solver chain :math:`z_0 = \mathrm{solve}(z_T, \epsilon_1, \dots, \epsilon_T)` is cheap and linear.
The gradient is therefore

.. math:: g = \sum_t C_t\, J_t^\top \frac{\partial L}{\partial \epsilon_t},
   \qquad J_t = \frac{\partial \epsilon_\theta(z_t, t, c)}{\partial \theta},

a sum of independent per-step U-Net VJPs whose only coupling is the upstream vector
:math:`\partial L / \partial \epsilon_t`. Mode ``adjusted_batched`` computes it in this order:

1. a no-grad sampling pass recording each step's scaled input and noise prediction (the images
   are the same as plain sampling's);
2. the solver chain is replayed with autograd on the recorded predictions (no U-Net), giving
   :math:`z_0` with a graph, which the caller decodes and scores: the same images decide the OT
   targets and receive the gradient;
3. in the backward pass, :class:`_DeferredSteps` re-runs the U-Net on the recorded (step,
   image) pairs, ``vjp_batch`` pairs and both CFG branches per call (a timestep per row), and
   returns :math:`\sum_t C_t J_t^\top v_t` in one ``autograd.grad`` per call. ``vjp_batch``
   bounds the activation memory whatever the batch and the number of steps.

The cost is T no-grad U-Net calls plus one forward+backward per *selected* step, with no
checkpoint recomputation and large U-Net batches. Step subsampling (``grad_steps = K < T``)
splits the T steps into K contiguous strata of near-equal size :math:`n_s`, draws one step
uniformly in each and weights its VJP by :math:`n_s`: :math:`E[n_s v_{i_s}] = \sum_{i \in S_s}
v_i`, so the estimator is unbiased for :math:`g` (stratification lowers its variance against
drawing K steps at random, since neighbouring steps' VJPs are alike). The other steps still run
(without grad): the images and the targets are exact, only the gradient is estimated.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

import torch
from diffusers import StableDiffusionPipeline

from fairness.checksums import tensor_sha256
from fairness.dft.engine import SamplingConfig, adjusted_coefficients, fresh_scheduler, sampler_timesteps, scale_grad, solve, unet_eps
from fairness.seeding import torch_generator


@dataclass(frozen=True)
class StepPlan:
    """Which sampler steps receive the gradient, and the weight of each (its stratum's size)."""

    indices: list[int]
    weights: list[float]


def plan_steps(num_steps: int, grad_steps: int | None, generator: torch.Generator) -> StepPlan:
    """One step drawn uniformly from each of ``grad_steps`` contiguous strata of the
    ``num_steps`` steps (all steps, weight 1, when ``grad_steps`` is None or >= ``num_steps``)."""
    if grad_steps is None or grad_steps >= num_steps:
        return StepPlan(list(range(num_steps)), [1.0] * num_steps)
    if grad_steps < 1:
        raise ValueError(f"grad_steps must be >= 1, got {grad_steps}")
    bounds = torch.linspace(0, num_steps, grad_steps + 1, dtype=torch.float64).round().long().tolist()
    indices, weights = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        indices.append(lo + int(torch.randint(hi - lo, (1,), generator=generator)))
        weights.append(float(hi - lo))
    return StepPlan(indices, weights)


_STEP_SEED: ContextVar[int | None] = ContextVar("dft_step_seed", default=None)


@contextlib.contextmanager
def step_seed(seed: int) -> Iterator[None]:
    """Key the step draws of ``adjusted_batched`` sampling inside this block by ``seed``.

    The trainer keys it by iteration, so every worker draws the same steps and any split of the
    batch over workers gives the single process's gradient (a context variable: Ray Train's
    workers are threads, each with its own context)."""
    token = _STEP_SEED.set(seed)
    try:
        yield
    finally:
        _STEP_SEED.reset(token)


def step_generator(latents: torch.Tensor) -> torch.Generator:
    """The step draw's generator: the enclosing :func:`step_seed`'s, else keyed by the batch's
    noise (reproducible too, but a different draw for each share of a split batch)."""
    seed = _STEP_SEED.get()
    if seed is not None:
        return torch_generator(seed, "dft-steps")
    return torch_generator(0, "dft-steps", tensor_sha256(latents.float()))


@dataclass
class _Recorded:
    """What the backward pass needs to recompute the selected steps' noise predictions."""

    pipe: StableDiffusionPipeline
    z_in: torch.Tensor  # (K, B, C, H, W) scaled U-Net inputs of the selected steps
    timesteps: torch.Tensor  # (K,)
    guidance: float
    vjp_batch: int
    has_uncond: bool
    autocast: tuple[str, torch.dtype, bool]  # (device type, dtype, enabled) of the forward pass


class _DeferredSteps(torch.autograd.Function):
    """Forward: the recorded noise predictions, unchanged. Backward: their U-Net VJPs, computed
    ``vjp_batch`` (step, image) pairs per U-Net call, into the conditioning and the trainable
    U-Net weights."""

    @staticmethod
    def forward(ctx, rec: _Recorded, eps: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rec = rec
        ctx.save_for_backward(*inputs)
        return eps.view_as(eps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        rec: _Recorded = ctx.rec
        inputs = ctx.saved_tensors
        n_text = 2 if rec.has_uncond else 1
        text = [x.detach().requires_grad_(need) for x, need in zip(inputs[:n_text], ctx.needs_input_grad[2:2 + n_text])]
        params = list(inputs[n_text:])
        wrt = [x for x in text if x.requires_grad] + params
        totals: list[torch.Tensor | None] = [None] * len(wrt)
        steps, batch = rec.z_in.shape[:2]
        z_rows, upstream = rec.z_in.flatten(0, 1), grad.flatten(0, 1)  # row = step * batch + image
        t_rows = rec.timesteps.repeat_interleave(batch)
        device_type, dtype, enabled = rec.autocast
        for r0 in range(0, steps * batch, rec.vjp_batch):
            rows = slice(r0, min(r0 + rec.vjp_batch, steps * batch))
            with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
                # the conditioning of each row: its image's (the same for every step)
                text_rows = [x.repeat(steps, 1, 1)[rows] for x in text]
                cond, uncond = (text_rows[1], text_rows[0]) if rec.has_uncond else (text_rows[0], None)
                eps = unet_eps(rec.pipe, z_rows[rows], t_rows[rows], cond, uncond, rec.guidance)
            parts = torch.autograd.grad(eps, wrt, upstream[rows].to(eps.dtype), allow_unused=True)
            totals = [p if acc is None else acc if p is None else acc + p for acc, p in zip(totals, parts)]
        by_input = dict(zip(map(id, wrt), totals))
        text_grads = [by_input.get(id(x)) for x in text]
        return (None, None, *text_grads, *totals[len(wrt) - len(params):])


def denoise_batched(
    pipe: StableDiffusionPipeline,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    config: SamplingConfig,
) -> torch.Tensor:
    """z_0 of the sampler from ``latents``, whose backward pass is the adjusted gradient (exact,
    or its unbiased step-subsampled estimate when ``config.grad_steps`` < ``config.num_steps``)."""
    use_cfg = uncond is not None and config.guidance_scale != 1.0
    timesteps = sampler_timesteps(pipe, config.num_steps).to(latents.device)  # a solver may make more calls than steps
    plan = plan_steps(len(timesteps), config.grad_steps, step_generator(latents))
    selected = set(plan.indices)
    eps_all: list[torch.Tensor] = []
    z_sel: list[torch.Tensor] = []

    def record(i: int, t: torch.Tensor, z_in: torch.Tensor) -> torch.Tensor:
        eps = unet_eps(pipe, z_in, t, cond, uncond if use_cfg else None, config.guidance_scale)
        eps_all.append(eps)
        if i in selected:
            z_sel.append(z_in)
        return eps

    with torch.no_grad():
        solve(pipe, latents, config.num_steps, record, detach_input=True)
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    text = [uncond, cond] if use_cfg else [cond]
    if not torch.is_grad_enabled() or not (params or any(x.requires_grad for x in text)):
        return solve(pipe, latents, config.num_steps, lambda i, t, z_in: eps_all[i], detach_input=True)
    device_type = latents.device.type
    rec = _Recorded(pipe, torch.stack(z_sel), timesteps[plan.indices], config.guidance_scale, config.vjp_batch, use_cfg,
                    (device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type)))
    deferred = _DeferredSteps.apply(rec, torch.stack([eps_all[i] for i in plan.indices]), *text, *params)
    coeffs = adjusted_coefficients(fresh_scheduler(pipe), timesteps)
    weighted = {i: scale_grad(deferred[k], (coeffs[i] * w).to(deferred.dtype))
                for k, (i, w) in enumerate(zip(plan.indices, plan.weights))}
    return solve(pipe, latents, config.num_steps, lambda i, t, z_in: weighted.get(i, eps_all[i]), detach_input=True)
