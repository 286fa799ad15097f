r"""Direct finetuning (DFT): sample with a diffusers scheduler and backpropagate through it.

``StableDiffusionPipeline.__call__`` runs under ``no_grad``, so training has its own sampling
loop over the same components. Modes:

* ``adjusted`` (Shen et al. 2024, sec. 4.2): the U-Net sees ``z_t.detach()`` at every step
  (:math:`B_t = I`), the scheduler update keeps the non-detached :math:`z_t`, and the gradient
  reaching step t's noise prediction is multiplied by :math:`C_t = 1/A_t`,
  :math:`A_t = \frac{1}{\sqrt{\bar\alpha_t}} \frac{\beta_t}{\sqrt{1-\bar\alpha_t}}`, with all
  :math:`C_t` divided by their geometric mean.
* ``naive``: the exact gradient through every U-Net call (explodes; kept for comparison).
* ``adjusted_batched``: the same adjusted gradient, computed as a no-grad sampling pass followed
  by batched U-Net vector-Jacobian products over the recorded steps (:mod:`fairness.dft.batched`),
  optionally through an unbiased random subset of ``grad_steps`` steps.
* ``none``: no gradient at all (originals, audits).

Because the U-Net input is detached, step t contributes a single U-Net vector-Jacobian product,
so gradient checkpointing each U-Net call keeps memory at one call's activations plus the
latent trajectory. The VAE decode can run in slices of ``vae_slice`` images, each checkpointed on
its own, so the backward pass recomputes one slice's decoder activations at a time (diffusers'
``vae.enable_slicing()`` slices the forward only: checkpointing the whole decode would then
recompute every slice's activations at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch
from diffusers import SchedulerMixin, StableDiffusionPipeline
from torch.utils.checkpoint import checkpoint

Mode = Literal["adjusted", "adjusted_batched", "naive", "none"]


class _ScaleGrad(torch.autograd.Function):
    """Exact identity forward; gradient times ``weight`` backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        return grad * weight.to(grad.dtype), None


def scale_grad(x: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """Multiply the gradient flowing back through ``x`` by ``weight`` (broadcastable)."""
    if not x.requires_grad:
        return x
    return _ScaleGrad.apply(x, torch.as_tensor(weight, device=x.device))


def adjusted_coefficients(scheduler: SchedulerMixin, timesteps: torch.Tensor) -> torch.Tensor:
    """Standardised :math:`C_t` for the given timesteps (float64, geometric mean 1)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
    betas = scheduler.betas.to(torch.float64)
    t = timesteps.long().cpu()
    a_bar, beta = alphas_cumprod[t], betas[t]
    a_t = beta / (a_bar.sqrt() * (1 - a_bar).sqrt())
    c_t = 1.0 / a_t
    return c_t / c_t.log().mean().exp()


@dataclass
class SamplingConfig:
    num_steps: int = 20
    guidance_scale: float = 7.5
    mode: Mode = "adjusted"
    checkpoint_unet: bool = True
    checkpoint_vae: bool = True
    vae_slice: int | None = None  # decode this many images at a time (None: the whole batch)
    # adjusted_batched only: backpropagate through this many of the steps (None: all, exact)...
    grad_steps: int | None = None
    vjp_batch: int = 16  # ...and this many (step, image) VJPs per U-Net call (bounds activation memory)


def fresh_scheduler(pipe: StableDiffusionPipeline) -> SchedulerMixin:
    """A new scheduler instance with the pipeline's config (multistep solvers keep state)."""
    return type(pipe.scheduler).from_config(pipe.scheduler.config)


def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str]) -> torch.Tensor:
    """Text-encoder hidden states for ``prompts`` (differentiable: LoRA / soft tokens learn here)."""
    tok = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt",
    )
    device = pipe.text_encoder.device
    return pipe.text_encoder(tok.input_ids.to(device))[0]


def unet_eps(pipe: StableDiffusionPipeline, z_in: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
             uncond: torch.Tensor | None, guidance: float) -> torch.Tensor:
    """Classifier-free-guided noise prediction from one batched U-Net call; ``t`` is one timestep
    or one per row of ``z_in`` (several sampler steps batched together)."""
    if uncond is None or guidance == 1.0:
        return pipe.unet(z_in, t, encoder_hidden_states=cond).sample
    t_both = torch.cat([t, t]) if t.ndim else t
    both = pipe.unet(torch.cat([z_in, z_in]), t_both, encoder_hidden_states=torch.cat([uncond, cond])).sample
    eps_u, eps_c = both.chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


# eps_fn(i, t, z_in) -> noise prediction of step i, given the scaled model input of that step.
EpsFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def solve(pipe: StableDiffusionPipeline, latents: torch.Tensor, num_steps: int, eps_fn: EpsFn,
          detach_input: bool) -> torch.Tensor:
    """The sampler's loop from ``latents`` to z_0 with the noise predictions ``eps_fn`` gives; the
    scheduler update always keeps the non-detached z_t (its graph is the cheap linear solver)."""
    scheduler = fresh_scheduler(pipe)
    scheduler.set_timesteps(num_steps, device=latents.device)
    z = latents
    for i, t in enumerate(scheduler.timesteps):
        z_in = scheduler.scale_model_input(z.detach() if detach_input else z, t)
        z = scheduler.step(eps_fn(i, t, z_in), t, z, return_dict=True).prev_sample
    return z


def sampler_timesteps(pipe: StableDiffusionPipeline, num_steps: int) -> torch.Tensor:
    """The timesteps :func:`solve` visits, one per U-Net call (on CPU)."""
    scheduler = fresh_scheduler(pipe)
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps


def denoise(
    pipe: StableDiffusionPipeline,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    config: SamplingConfig,
) -> torch.Tensor:
    """Run the sampler from ``latents`` (already scaled by ``init_noise_sigma``) to z_0."""
    if config.mode == "adjusted_batched":
        from fairness.dft.batched import denoise_batched  # imports this module: import here

        return denoise_batched(pipe, latents, cond, uncond, config)
    adjusted = config.mode == "adjusted"
    coeffs = adjusted_coefficients(fresh_scheduler(pipe), sampler_timesteps(pipe, config.num_steps)) if adjusted else None

    def eps_fn(i: int, t: torch.Tensor, z_in: torch.Tensor) -> torch.Tensor:
        if config.mode != "none" and config.checkpoint_unet:
            eps = checkpoint(unet_eps, pipe, z_in, t, cond, uncond, config.guidance_scale, use_reentrant=False)
        else:
            eps = unet_eps(pipe, z_in, t, cond, uncond, config.guidance_scale)
        return scale_grad(eps, coeffs[i].to(eps.dtype)) if coeffs is not None else eps

    return solve(pipe, latents, config.num_steps, eps_fn, detach_input=adjusted)


def _decode(pipe: StableDiffusionPipeline, z0: torch.Tensor) -> torch.Tensor:
    image = pipe.vae.decode((z0 / pipe.vae.config.scaling_factor).to(pipe.vae.dtype)).sample
    return (image / 2 + 0.5).clamp(0, 1)


def decode(pipe: StableDiffusionPipeline, z0: torch.Tensor, use_checkpoint: bool = False,
           slice_size: int | None = None) -> torch.Tensor:
    """VAE decode to images in [0, 1], ``slice_size`` images at a time (each slice checkpointed
    on its own when ``use_checkpoint``); per-image results do not depend on the slicing."""
    parts = z0.split(slice_size) if slice_size else (z0,)
    if use_checkpoint and z0.requires_grad:
        images = [checkpoint(_decode, pipe, part, use_reentrant=False) for part in parts]
    else:
        images = [_decode(pipe, part) for part in parts]
    return images[0] if len(images) == 1 else torch.cat(images)


def generate(
    pipe: StableDiffusionPipeline,
    prompts: list[str],
    noise: torch.Tensor,
    config: SamplingConfig,
) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [0, 1] for ``prompts`` (one per noise) under ``config.mode``.

    With ``mode="none"`` this is plain sampling and matches the stock pipeline's output for the
    same latents, scheduler, guidance and steps.
    """
    grad = config.mode != "none"
    with torch.set_grad_enabled(grad):
        uncond = encode_prompts(pipe, [""] * len(prompts)) if config.guidance_scale != 1.0 else None
        cond = encode_prompts(pipe, prompts)
        latents = noise.to(device=pipe.unet.device, dtype=pipe.unet.dtype) * fresh_scheduler(pipe).init_noise_sigma
        z0 = denoise(pipe, latents, cond.to(pipe.unet.dtype), None if uncond is None else uncond.to(pipe.unet.dtype), config)
        return decode(pipe, z0, use_checkpoint=grad and config.checkpoint_vae, slice_size=config.vae_slice).float()
