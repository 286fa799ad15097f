r"""Distribution guidance ("Balancing Act", Parihar et al., CVPR 2024) on any ``UNet2DConditionModel``.

The generator is not finetuned. An *attribute distribution predictor* (ADP) reads the U-Net's
mid-block output :math:`h` (SD 1.5: 1280x8x8; the toy world: 64x4x4), one linear head per
sampler timestep over the flattened, standardised :math:`h`. It learns from pseudo-labels: the
training classifier's classes of the images the model itself generates
(:func:`train_adp`). During sampling a forward hook on ``unet.mid_block`` replaces the batch's
:math:`h` by

.. math::

    h \leftarrow h - \eta\,\nabla_h\, \lambda\, L\big(\tfrac{1}{B}\textstyle\sum_i
    \mathrm{softmax}(f_t(h_i) / T),\ D\big)

with :math:`L` the KL divergence :math:`KL(D \,\|\, \bar p)` (the official code) or the squared
distance, :math:`\lambda` the loss strength (500), :math:`\eta` the step (600) and :math:`T` the
temperature (8), summed over the target's attributes. The same edit is applied to the
conditional and unconditional halves of the classifier-free-guidance batch, so it does not
depend on the guidance scale. The pushed quantity is the *batch's* distribution: a batch of
one image gets pushed toward the most likely class mix, not toward a fair one; use batches.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from fairness.adapters.io import base_model_identity
from fairness.baselines.sampler import (
    NoisePrediction,
    cfg_embeddings,
    cfg_prediction,
    sample,
)
from fairness.baselines.texts import BaselineError
from fairness.perception.bundle import PerceptionBundle
from fairness.perception.regions import detect_largest, square_crop
from fairness.seeding import derive_seed, image_noise, numpy_rng, torch_generator

ADP_MANIFEST = "adp.json"
ADP_WEIGHTS = "adp.safetensors"
Loss = Literal["kl", "l2"]


class AttributeDistributionPredictor(nn.Module):
    """Per-timestep linear heads on the flattened mid-block output (centred, scaled per
    timestep); logits per attribute.

    A timestep the heads were not trained on uses the nearest trained one, so an ADP trained
    at 12 steps still guides a 15-step sampler (less well: the manifest records its steps).
    """

    def __init__(self, feature_shape: Sequence[int], timesteps: Sequence[int], attributes: dict[str, list[str]]):
        super().__init__()
        self.feature_shape = tuple(int(x) for x in feature_shape)
        self.attributes = {a: list(c) for a, c in attributes.items()}
        dim, out = int(np.prod(self.feature_shape)), sum(len(c) for c in self.attributes.values())
        self.register_buffer("timesteps", torch.tensor(list(timesteps), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(len(timesteps), dim))
        # One scale per timestep, not per feature: guidance follows the gradient with respect to
        # h itself, and per-feature scales would push the near-constant features hardest.
        self.register_buffer("std", torch.ones(len(timesteps), 1))
        self.heads = nn.ModuleList(nn.Linear(dim, out) for _ in timesteps)

    def head_index(self, t: torch.Tensor | int) -> int:
        return int((self.timesteps - int(t)).abs().argmin())

    def forward(self, h: torch.Tensor, index: int) -> dict[str, torch.Tensor]:
        x = (h.flatten(1).float() - self.mean[index]) / self.std[index]
        logits = self.heads[index](x)
        return dict(zip(self.attributes, logits.split([len(c) for c in self.attributes.values()], dim=1)))


@contextlib.contextmanager
def mid_block_hook(pipe: StableDiffusionPipeline, edit: Callable[[torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """While open, every output ``h`` of ``pipe.unet.mid_block`` goes through ``edit`` (which may
    record it and return None, or return a replacement)."""
    if getattr(pipe.unet, "mid_block", None) is None:
        raise BaselineError("distribution guidance needs a U-Net with a mid block (unet.mid_block is None)")
    handle = pipe.unet.mid_block.register_forward_hook(lambda module, args, out: edit(out))
    try:
        yield
    finally:
        handle.remove()


def mid_block_shape(pipe: StableDiffusionPipeline) -> tuple[int, int, int]:
    """(channels, height, width) of the mid-block output at the model's native size."""
    c = pipe.unet.config
    down = 2 ** (len(c.block_out_channels) - 1)
    return (int(c.block_out_channels[-1]), int(c.sample_size) // down, int(c.sample_size) // down)


def distribution_loss(probs: torch.Tensor, target: torch.Tensor, kind: Loss) -> torch.Tensor:
    """Distance of the batch's mean predicted distribution ``probs`` (K,) from ``target`` (K,)."""
    if kind == "kl":
        keep = target > 0
        return (target[keep] * (target[keep].log() - probs[keep].clamp_min(1e-8).log())).sum()
    return ((probs - target) ** 2).sum()


@dataclass(frozen=True)
class GuidanceParams:
    """The official code's settings: loss strength 500, step 600, temperature 8, KL."""

    strength: float = 500.0
    step_size: float = 600.0
    temperature: float = 8.0
    loss: Loss = "kl"


def guided_prediction(pipe: StableDiffusionPipeline, adp: AttributeDistributionPredictor, uncond: torch.Tensor,
                      cond: torch.Tensor, guidance_scale: float, targets: dict[str, torch.Tensor],
                      params: GuidanceParams) -> tuple[NoisePrediction, Callable[[torch.Tensor], torch.Tensor]]:
    """The CFG step plus the hook's edit; the edit reads the step's timestep from the prediction."""
    batch = cond.shape[0]
    state: dict[str, int] = {}
    plain = cfg_prediction(pipe, uncond, cond, guidance_scale)

    def edit(h: torch.Tensor) -> torch.Tensor:
        h_cond = h[batch:] if h.shape[0] == 2 * batch else h
        with torch.enable_grad():
            x = h_cond.detach().float().requires_grad_(True)
            logits = adp(x, state["index"])
            loss = sum(distribution_loss((logits[a] / params.temperature).softmax(-1).mean(0), target, params.loss)
                       for a, target in targets.items())
            (grad,) = torch.autograd.grad(params.strength * loss, x)
        delta = (-params.step_size * grad).to(h.dtype)
        return h + (delta.repeat(h.shape[0] // batch, 1, 1, 1) if h.shape[0] != batch else delta)

    def predict(i: int, t: torch.Tensor, z_in: torch.Tensor) -> torch.Tensor:
        state["index"] = adp.head_index(t)
        return plain(i, t, z_in)

    return predict, edit


def distribution_guidance_generate(pipe: StableDiffusionPipeline, adp: AttributeDistributionPredictor,
                                   prompts: list[str], noise: torch.Tensor, num_steps: int, guidance_scale: float,
                                   targets: dict[str, np.ndarray], params: GuidanceParams) -> torch.Tensor:
    """Images of one batch under distribution guidance toward ``targets`` (attribute -> law)."""
    unknown = [a for a in targets if a not in adp.attributes]
    if unknown:
        raise BaselineError(f"the ADP predicts {sorted(adp.attributes)}, not {unknown}: train it for them "
                            "(`fairness baseline train-adp --attributes ...`)")
    device = pipe.unet.device
    adp = adp.to(device)
    law = {a: torch.as_tensor(np.asarray(p), dtype=torch.float32, device=device) for a, p in targets.items()}
    with torch.no_grad():
        uncond, cond = cfg_embeddings(pipe, prompts)
    predict, edit = guided_prediction(pipe, adp, uncond, cond, guidance_scale, law, params)
    with mid_block_hook(pipe, edit):
        return sample(pipe, noise, num_steps, lambda timesteps: predict)


# -- training ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ADPTrainConfig:
    """How the ADP is trained: ``images_per_prompt`` generated images per prompt, labelled by
    the training classifier; ``val_fraction`` of them (seeded) held out to measure it."""

    images_per_prompt: int = 8
    num_steps: int = 15
    guidance_scale: float = 5.0
    batch_size: int = 32
    epochs: int = 60
    lr: float = 1e-3
    weight_decay: float = 1e-3
    val_fraction: float = 0.2
    seed: int = 0


@torch.no_grad()
def sample_recording(pipe: StableDiffusionPipeline, prompt: str, noise: torch.Tensor, num_steps: int,
                     guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain CFG images of ``prompt``, the conditional mid-block outputs ``(B, T, D)`` (float16,
    CPU) at every step, and the schedule's timesteps."""
    batch = len(noise)
    steps: list[torch.Tensor] = []
    schedule: list[torch.Tensor] = []
    uncond, cond = cfg_embeddings(pipe, [prompt] * batch)

    def record(h: torch.Tensor) -> None:
        steps.append(h[batch:].flatten(1).to(torch.float16).cpu())

    def prediction(timesteps: torch.Tensor) -> NoisePrediction:
        schedule.append(timesteps.cpu().long())
        return cfg_prediction(pipe, uncond, cond, guidance_scale)

    with mid_block_hook(pipe, record):
        images = sample(pipe, noise, num_steps, prediction)
    return images, torch.stack(steps, dim=1), schedule[0]


@torch.no_grad()
def collect_features(pipe: StableDiffusionPipeline, bundle: PerceptionBundle, prompts: Sequence[str],
                     cfg: ADPTrainConfig, progress: bool = True) -> tuple[torch.Tensor, torch.Tensor, dict[str, np.ndarray]]:
    """Conditional mid-block outputs ``(N, T, D)`` (float16) of the images with a detected object,
    the schedule's timesteps, and the training classifier's class per image and attribute."""
    c = pipe.unet.config
    shape = (c.in_channels, c.sample_size, c.sample_size)
    clf = bundle.train_classifier
    feats, labels = [], {a: [] for a in clf.attributes}
    timesteps = torch.zeros(0, dtype=torch.long)
    jobs = [(p, s) for p in prompts for s in range(0, cfg.images_per_prompt, cfg.batch_size)]
    for prompt, start in tqdm(jobs, desc="adp features", disable=not progress, unit="batch"):
        idx = range(start, min(start + cfg.batch_size, cfg.images_per_prompt))
        noise = image_noise(cfg.seed, prompt, idx, shape)
        images, h, timesteps = sample_recording(pipe, prompt, noise, cfg.num_steps, cfg.guidance_scale)
        regions = detect_largest(bundle.detector, images)
        logits = clf(square_crop(images, regions, clf.input_size))
        found = regions.found.cpu()
        feats.append(h[found])
        for a in labels:
            labels[a].append(logits[a].argmax(-1).cpu()[found].numpy())
    return torch.cat(feats), timesteps, {a: np.concatenate(v) for a, v in labels.items()}


def _fit(adp: AttributeDistributionPredictor, feats: torch.Tensor, labels: dict[str, np.ndarray],
         train: np.ndarray, cfg: ADPTrainConfig, progress: bool) -> None:
    x = feats[train].float()
    adp.mean.copy_(x.mean(0))
    adp.std.copy_(x.std(dim=(0, 2)).clamp_min(1e-6)[:, None])
    y = {a: torch.as_tensor(v[train], dtype=torch.long) for a, v in labels.items()}
    opt = torch.optim.AdamW(adp.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch_generator(cfg.seed, "adp-batches")
    for _ in tqdm(range(cfg.epochs), desc="adp epochs", disable=not progress, unit="epoch"):
        for batch in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
            loss = sum(nn.functional.cross_entropy(adp(x[batch, k], k)[a], y[a][batch])
                       for k in range(len(adp.heads)) for a in y)
            opt.zero_grad()
            loss.backward()
            opt.step()


@torch.no_grad()
def held_out_accuracy(adp: AttributeDistributionPredictor, feats: torch.Tensor, labels: dict[str, np.ndarray],
                      rows: np.ndarray) -> dict[str, list[float]]:
    """Per attribute, the accuracy of each timestep's head on ``rows``."""
    x = feats[rows].float()
    return {a: [float((adp(x[:, k], k)[a].argmax(-1).numpy() == v[rows]).mean()) for k in range(len(adp.heads))]
            for a, v in labels.items()}


def train_adp(pipe: StableDiffusionPipeline, bundle: PerceptionBundle, prompts: Sequence[str], out_dir: str | Path,
              cfg: ADPTrainConfig = ADPTrainConfig(), attributes: Sequence[str] | None = None,
              progress: bool = True) -> dict[str, Any]:
    """Generate, pseudo-label, fit the heads, measure them on held-out images and save; returns
    the manifest (``metrics``: per-timestep held-out accuracy and the majority-class rate, the
    accuracy of always answering the commonest label, which is what "above chance" must beat)."""
    if not prompts:
        raise BaselineError("train-adp needs at least one prompt")
    known = bundle.train_classifier.attributes
    chosen = list(attributes or known)
    unknown = [a for a in chosen if a not in known]
    if unknown:
        raise BaselineError(f"unknown attribute(s) {unknown}; the training classifier knows {sorted(known)}")
    start = time.perf_counter()
    feats, timesteps, labels = collect_features(pipe, bundle, prompts, cfg, progress)
    labels = {a: labels[a] for a in chosen}
    if len(feats) < 10:
        raise BaselineError(f"only {len(feats)} generated images had a detected object; give more prompts or images")
    order = numpy_rng(cfg.seed, "adp-split").permutation(len(feats))
    n_val = max(1, int(round(cfg.val_fraction * len(feats))))
    val, train = order[:n_val], order[n_val:]
    with torch.random.fork_rng(devices=[]):  # the heads' initial weights from the config's seed, not the global stream
        torch.manual_seed(derive_seed(cfg.seed, "adp-init"))
        adp = AttributeDistributionPredictor(mid_block_shape(pipe), timesteps.tolist(), {a: known[a] for a in chosen})
    _fit(adp, feats, labels, train, cfg, progress)
    seconds = time.perf_counter() - start
    acc = held_out_accuracy(adp, feats, labels, val)
    majority = {a: float(np.bincount(v[val]).max() / len(val)) for a, v in labels.items()}
    manifest = {
        "attributes": adp.attributes, "feature_shape": list(adp.feature_shape), "timesteps": timesteps.tolist(),
        "base_model": base_model_identity(pipe), "train": cfg.__dict__, "prompts": len(prompts),
        "images": int(len(feats)), "train_seconds": seconds,
        "metrics": {"val_images": int(n_val), "val_accuracy": acc, "majority_rate": majority,
                    "val_accuracy_mean": {a: float(np.mean(v)) for a, v in acc.items()},
                    "val_accuracy_last": {a: v[-1] for a, v in acc.items()}},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in adp.state_dict().items()}, str(out / ADP_WEIGHTS))
    (out / ADP_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def load_adp(path: str | Path, pipe: StableDiffusionPipeline | None = None) -> tuple[AttributeDistributionPredictor, dict[str, Any]]:
    """The ADP saved in ``path`` and its manifest; refuses one trained on another U-Net."""
    folder = Path(path)
    if not (folder / ADP_MANIFEST).is_file() or not (folder / ADP_WEIGHTS).is_file():
        raise FileNotFoundError(f"no attribute distribution predictor at {folder} ({ADP_MANIFEST} / {ADP_WEIGHTS} "
                                "missing): train one with `fairness baseline train-adp --out "
                                f"{folder} ...` (docs/baselines.md)")
    manifest = json.loads((folder / ADP_MANIFEST).read_text())
    if pipe is not None:
        ours, theirs = base_model_identity(pipe)["unet_config"], manifest["base_model"]["unet_config"]
        if ours != theirs or tuple(manifest["feature_shape"]) != mid_block_shape(pipe):
            raise BaselineError(f"the ADP at {folder} was trained on another U-Net ({manifest['base_model'].get('path')}); "
                                "train one for this model")
    adp = AttributeDistributionPredictor(manifest["feature_shape"], manifest["timesteps"], manifest["attributes"])
    adp.load_state_dict(load_file(str(folder / ADP_WEIGHTS)))
    return adp.eval().requires_grad_(False), manifest

