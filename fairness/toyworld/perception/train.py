"""How each toy-world perception network is trained (data, batches and loss; :func:`fit` runs it).

Every trainer seeds its init, data and batches from ``(seed, key)`` alone, so one network's
training never depends on which others the build trains before it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fairness.seeding import derive_seed, numpy_rng
from fairness.toyworld import world as W
from fairness.toyworld.perception.classifier import ToyClassifier
from fairness.toyworld.perception.clip import ToyCLIP
from fairness.toyworld.perception.data import (
    detected_boxes,
    object_crops,
    render_scenes,
    rerendered_views,
    uniform_data,
)
from fairness.toyworld.perception.detector import ToyDetector
from fairness.toyworld.perception.encoder import ToyEmbedder, ToyEncoder
from fairness.toyworld.perception.fit import fit, nt_xent


def train_detector(seed: int, n: int, steps: int, device: str) -> ToyDetector:
    torch.manual_seed(derive_seed(seed, "detector"))
    model = ToyDetector().to(device)
    data = uniform_data(seed, "detector", n, no_object_share=0.2)
    gen = torch.Generator().manual_seed(derive_seed(seed, "detector-batches"))

    def loss() -> torch.Tensor:
        idx = torch.randint(0, len(data.images), (64,), generator=gen)
        logits = model(data.images[idx].to(device))
        # Soft coverage targets put p = 0.5 exactly where the renderer's box rule (coverage
        # >= 0.5) puts the object's edge, so boxes come out pixel-accurate.
        return F.binary_cross_entropy_with_logits(logits, data.coverage[idx].to(device))

    fit(model, loss, steps, lr=5e-3)
    return model.cpu()


def train_classifier(detector: ToyDetector, seed: int, key: str, config: dict[str, Any], n: int,
                     steps: int, device: str) -> ToyClassifier:
    torch.manual_seed(derive_seed(seed, key))
    model = ToyClassifier(**config).to(device)
    data = uniform_data(seed, key, n, no_object_share=0.0)
    boxes = detected_boxes(detector, data.images, data.boxes)
    heads = {**model.attributes, **model.semantic_attributes}
    labels = {k: data.labels(k, v) for k, v in heads.items()}
    gen = torch.Generator().manual_seed(derive_seed(seed, key, "batches"))

    def loss() -> torch.Tensor:
        idx = torch.randint(0, len(data.images), (96,), generator=gen)
        crops = object_crops(data.images[idx], boxes[idx], model.input_size, 1.0, gen)
        crops = (crops + 0.02 * torch.randn(crops.shape, generator=gen)).clamp(0, 1)
        logits = model(crops.to(device))
        return sum(F.cross_entropy(logits[k], labels[k][idx].to(device)) for k in heads)

    fit(model, loss, steps, lr=4e-3)
    return model.cpu()


def train_encoder(seed: int, key: str, config: dict[str, Any], n: int, steps: int, device: str) -> ToyEncoder:
    torch.manual_seed(derive_seed(seed, key))
    model = ToyEncoder(**config).to(device)
    rng = numpy_rng(seed, "toyworld-perception", key)
    scenes = [W.sample_training_pair(rng)[2] for _ in range(n)]
    view_a = render_scenes(scenes, rng).images
    view_b = rerendered_views(scenes, rng).images
    gen = torch.Generator().manual_seed(derive_seed(seed, key, "batches"))

    def loss() -> torch.Tensor:
        idx = torch.randint(0, n, (64,), generator=gen)
        return nt_xent(model(view_a[idx].to(device)), model(view_b[idx].to(device)))

    fit(model, loss, steps, lr=3e-3)
    return model.cpu()


def train_embedder(seed: int, config: dict[str, Any], n: int, steps: int, device: str) -> ToyEmbedder:
    torch.manual_seed(derive_seed(seed, "embedder"))
    model = ToyEmbedder(**config).to(device)
    data = uniform_data(seed, "embedder", n, no_object_share=0.0)
    rng = numpy_rng(seed, "toyworld-perception", "embedder-views")
    view_b = rerendered_views(data.scenes, rng)
    gen = torch.Generator().manual_seed(derive_seed(seed, "embedder", "batches"))
    size = model.input_size

    def loss() -> torch.Tensor:
        idx = torch.randint(0, n, (64,), generator=gen)
        a = object_crops(data.images[idx], data.boxes[idx], size, 1.0, gen)
        b = object_crops(view_b.images[idx], view_b.boxes[idx], size, 1.0, gen)
        return nt_xent(model(a.to(device)), model(b.to(device)))

    fit(model, loss, steps, lr=3e-3)
    return model.cpu()


def train_clip(seed: int, key: str, config: dict[str, Any], n: int, steps: int, device: str) -> ToyCLIP:
    """Contrastive image-text training. Captions name the concept, not the attributes, so
    every pair whose images share (shape, context) counts as a positive: a doctor and a nurse
    of the same shape are indistinguishable in pixels and must not be pushed apart."""
    torch.manual_seed(derive_seed(seed, key))
    model = ToyCLIP(**config).to(device)
    rng = numpy_rng(seed, "toyworld-perception", key)
    pairs = [W.sample_training_pair(rng) for _ in range(n)]
    images = torch.from_numpy(np.stack([p[1] for p in pairs]))
    ids = model.token_ids([p[0] for p in pairs])
    key_ids: dict[tuple[str | None, str], int] = {}
    text_keys = torch.tensor([key_ids.setdefault((W.concept(p[2].concept).shape, p[2].context), len(key_ids))
                              for p in pairs])
    image_keys = torch.tensor([key_ids.setdefault((p[2].shape, p[2].context), len(key_ids)) for p in pairs])
    gen = torch.Generator().manual_seed(derive_seed(seed, key, "batches"))

    def loss() -> torch.Tensor:
        idx = torch.randint(0, n, (128,), generator=gen)
        img = model(images[idx].to(device))
        txt = model.encode_ids(ids[idx])
        pos = (image_keys[idx, None] == text_keys[None, idx]).float()
        pos = (pos + torch.eye(len(idx))).clamp(max=1).to(device)
        logits = model.logit_scale.clamp(max=math.log(100.0)).exp() * img @ txt.T
        l_i = -(pos / pos.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        l_t = -(pos.T / pos.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
        return (l_i + l_t) / 2

    fit(model, loss, steps, lr=3e-3)
    return model.cpu()
