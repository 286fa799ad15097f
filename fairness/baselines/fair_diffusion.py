r"""Fair Diffusion (Friedrich et al. 2023): per image, semantic guidance (SEGA) toward one class.

No training. For every image and every attribute a class is drawn with the target's
probabilities; SEGA then guides the sample toward that class's edit text and away from the
other classes' texts. The SEGA step is diffusers' ``SemanticStableDiffusionPipeline`` math
(one edit weight per concept, no cooldown), written inside our sampler so that each image of a
batch can get its own directions, on DPM-Solver++ like every other method here:

.. math::

    g_c = s_e\,d_c\,(\epsilon_c - \epsilon_u), \quad
    g_c \leftarrow g_c \cdot 1[|g_c| \ge q_\lambda(|g_c|)], \quad
    g = \textstyle\sum_c g_c + s_m m, \quad m \leftarrow \beta m + (1 - \beta) g

with :math:`d_c = +1` toward and :math:`-1` away, :math:`q_\lambda` the ``edit_threshold``
quantile of :math:`|g_c|` per image and channel, and :math:`g` added to the classifier-free
guided prediction from step ``warm-up`` on (the momentum :math:`m` builds up during warm-up).
A test checks it against ``SemanticStableDiffusionPipeline`` on the same latents.

The draw of image ``i`` is keyed by the bytes of its initial noise, so the same noise gets the
same direction whatever batch it shares (audits, serving and comparisons agree image by image).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from fairness.baselines.sampler import NoisePrediction, cfg_embeddings, sample
from fairness.dft.engine import encode_prompts
from fairness.seeding import numpy_rng


@dataclass(frozen=True)
class SegaParams:
    """Fair Diffusion's published settings (ml-research/Fair-Diffusion); warm-up is a share of
    the steps, as its 10 of 50 steps (``edit_warmup_steps``) would be most of a 12-step sampler."""

    guidance_scale: float = 4.0
    warmup: float = 0.2
    threshold: float = 0.95
    momentum_scale: float = 0.3
    momentum_beta: float = 0.6

    def warmup_steps(self, num_steps: int) -> int:
        return int(round(self.warmup * num_steps))


def noise_key(noise: torch.Tensor) -> str:
    """A stable name for one image's initial noise (its float32 bytes, SHA-256)."""
    return hashlib.sha256(noise.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()[:32]


def draw_classes(noise: torch.Tensor, probs: np.ndarray, seed: int, attribute: str) -> np.ndarray:
    """One class per image, drawn with ``probs`` from a stream keyed by (seed, attribute, noise)."""
    u = np.array([numpy_rng(seed, "fair-diffusion", attribute, noise_key(z)).random() for z in noise])
    return np.minimum(np.searchsorted(np.cumsum(probs), u, side="right"), len(probs) - 1)


def sega_prediction(pipe: StableDiffusionPipeline, uncond: torch.Tensor, cond: torch.Tensor, edits: torch.Tensor,
                    signs: torch.Tensor, guidance_scale: float, params: SegaParams, num_steps: int) -> NoisePrediction:
    """The SEGA step for a batch: ``edits`` are the C edit texts' states ``(C, L, D)``, ``signs``
    ``(B, C)`` the direction of each concept for each image (+1 toward, -1 away)."""
    batch, concepts = cond.shape[0], edits.shape[0]
    warmup = params.warmup_steps(num_steps)
    texts = torch.cat([uncond, cond, edits.repeat_interleave(batch, dim=0)])
    direction = signs.T.reshape(concepts, batch, 1, 1, 1).to(cond.dtype)
    momentum: list[torch.Tensor] = []

    def predict(i: int, t: torch.Tensor, z_in: torch.Tensor) -> torch.Tensor:
        out = pipe.unet(z_in.repeat(2 + concepts, 1, 1, 1), t, encoder_hidden_states=texts).sample
        eps_u, eps_c = out[:batch], out[batch:2 * batch]
        eps_e = out[2 * batch:].reshape(concepts, batch, *eps_u.shape[1:])
        guidance = guidance_scale * (eps_c - eps_u)
        edit = params.guidance_scale * direction * (eps_e - eps_u)
        cut = torch.quantile(edit.abs().flatten(start_dim=3).float(), params.threshold, dim=3).to(edit.dtype)
        edit = torch.where(edit.abs() >= cut[..., None, None], edit, torch.zeros_like(edit)).sum(0)
        if not momentum:
            momentum.append(torch.zeros_like(edit))
        edit = edit + params.momentum_scale * momentum[0]
        momentum[0] = params.momentum_beta * momentum[0] + (1 - params.momentum_beta) * edit
        if i >= warmup:
            guidance = guidance + edit
        return eps_u + guidance

    return predict


def fair_diffusion_generate(pipe: StableDiffusionPipeline, prompts: list[str], noise: torch.Tensor,
                            num_steps: int, guidance_scale: float, edit_texts: dict[str, list[str]],
                            targets: dict[str, np.ndarray], params: SegaParams, seed: int) -> torch.Tensor:
    """Fair Diffusion images: per attribute of ``edit_texts`` a class drawn per image from
    ``targets[attribute]``, guided toward its text and away from the attribute's other texts."""
    texts = [text for attr in edit_texts for text in edit_texts[attr]]
    signs = torch.zeros(len(prompts), len(texts))
    start = 0
    for attr, items in edit_texts.items():
        chosen = draw_classes(noise, targets[attr], seed, attr)
        for k in range(len(items)):
            signs[:, start + k] = torch.from_numpy(np.where(chosen == k, 1.0, -1.0))
        start += len(items)
    with torch.no_grad():
        uncond, cond = cfg_embeddings(pipe, prompts)
        edits = encode_prompts(pipe, texts).to(pipe.unet.dtype)
    signs = signs.to(cond.device)
    return sample(pipe, noise, num_steps,
                  lambda timesteps: sega_prediction(pipe, uncond, cond, edits, signs, guidance_scale, params, num_steps))
