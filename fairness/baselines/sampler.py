"""One sampling loop for the inference-time peers, with the noise prediction left to the method.

The peers change only how a step's noise prediction is made (Fair Diffusion adds semantic
guidance, distribution guidance edits the U-Net's mid-block features), so they share this loop
and :func:`fairness.dft.engine.generate`'s conventions: prompts encoded by
:func:`~fairness.dft.engine.encode_prompts`, a fresh copy of the pipeline's scheduler, noise
scaled by ``init_noise_sigma``, images in [0, 1]. With classifier-free guidance and nothing
added, :func:`sample` gives :func:`~fairness.dft.engine.generate`'s images for the same noise
(a test checks it), so every difference a comparison measures is the method's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from diffusers import StableDiffusionPipeline

from fairness.dft.engine import decode, encode_prompts, fresh_scheduler


class NoisePrediction(Protocol):
    """Step ``i`` (0-based) at timestep ``t``: the guided noise prediction for ``z_in``."""

    def __call__(self, i: int, t: torch.Tensor, z_in: torch.Tensor) -> torch.Tensor: ...


def cfg_embeddings(pipe: StableDiffusionPipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(unconditional, conditional) text-encoder states for ``prompts`` in the U-Net's dtype."""
    dtype = pipe.unet.dtype
    return (encode_prompts(pipe, [""] * len(prompts)).to(dtype), encode_prompts(pipe, prompts).to(dtype))


def cfg_prediction(pipe: StableDiffusionPipeline, uncond: torch.Tensor, cond: torch.Tensor,
                   guidance_scale: float) -> NoisePrediction:
    """Plain classifier-free guidance: ``eps_u + s (eps_c - eps_u)`` from one batched U-Net call."""

    def predict(i: int, t: torch.Tensor, z_in: torch.Tensor) -> torch.Tensor:
        both = pipe.unet(torch.cat([z_in, z_in]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        eps_u, eps_c = both.chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

    return predict


@torch.no_grad()
def sample(pipe: StableDiffusionPipeline, noise: torch.Tensor, num_steps: int,
           make_prediction: Callable[[torch.Tensor], NoisePrediction]) -> torch.Tensor:
    """Images ``(B, 3, H, W)`` in [0, 1] from ``noise``; ``make_prediction(timesteps)`` builds the
    step function once the schedule is known (methods that index by step need it)."""
    scheduler = fresh_scheduler(pipe)
    device = pipe.unet.device
    scheduler.set_timesteps(num_steps, device=device)
    z = noise.to(device=device, dtype=pipe.unet.dtype) * scheduler.init_noise_sigma
    predict = make_prediction(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        z_in = scheduler.scale_model_input(z, t)
        z = scheduler.step(predict(i, t, z_in), t, z, return_dict=True).prev_sample
    return decode(pipe, z).float()
