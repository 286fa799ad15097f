"""The toy world's perception networks and the build that trains them into a bundle.

The toy world plays the paper's whole perception stack with tiny networks, registered as
bundle backends so the losses and metrics reach them through the same interfaces as real
models (MTCNN, CLIP, DINO, FairFace classifiers):

- ``toyworld.detector``: a fully convolutional object-mask network; the box is the extent of
  the largest connected blob (the face-detector analog; not differentiated through).
- ``toyworld.classifier``: heads for the protected attributes (``attributes`` = the world's
  ``ATTRIBUTES``) plus the semantic ``shape`` head, exposed separately as
  ``semantic_attributes`` so debiasing targets can never name it. Two architecture variants,
  so the evaluation classifier is independent of the training one (different architecture,
  seed and data, as in the paper).
- ``toyworld.encoder``: a self-supervised, augmentation-invariant image encoder (DINO analog).
- ``toyworld.clip``: a small CLIP trained contrastively on the world's prompts (conv image
  tower + ``transformers.CLIPTextModel`` text tower; the tokenizer's BPE tables live in the
  bundle config, so raw prompt strings go straight into ``encode_text``).
- ``toyworld.embedder``: an augmentation-invariant crop embedder (the face-embedding analog)
  whose bank of real object crops anchors the realism loss.

:func:`build_perception` renders data, trains everything and writes the bundle folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from scipy import ndimage
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fairness.models.tokenizer import build_clip_tokenizer
from fairness.perception.base import (
    AttributeClassifier,
    FaceEmbedder,
    ImageEncoder,
    Regions,
    TextImageEncoder,
)
from fairness.perception.bundle import register_backend
from fairness.perception.regions import square_crop
from fairness.seeding import derive_seed, numpy_rng
from fairness.toyworld import world as W
from fairness.toyworld.render import object_alpha, render

log = logging.getLogger(__name__)

MIN_BLOB_PIXELS = 6  # smaller blobs are noise: the smallest object covers ~25 pixels
EDGE_THRESHOLD = 0.3  # pixels next to the blob above this count towards the box (thin tips)
TEXT_MAX_LENGTH = 20  # the longest world prompt is 15 tokens (one per word and comma)


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


def _trunk(variant: str, width: int) -> tuple[nn.Sequential, int]:
    """A small conv trunk and its feature size. Two genuinely different designs so that
    independently trained models do not share inductive biases: ``a`` is 3x3 convs with max
    pooling, ReLU and a 3x3 max-pooled readout; ``b`` opens with a 5x5 conv, downsamples by strided
    convs, uses GELU and reads out a 3x3 spatial grid."""
    w = width
    if variant == "a":
        net = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.AdaptiveMaxPool2d(3), nn.Flatten(),
        )
        return net, 18 * w
    if variant == "b":
        net = nn.Sequential(
            nn.Conv2d(3, w, 5, padding=2), nn.GELU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.GELU(),
            nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(3), nn.Flatten(),
        )
        return net, 18 * w
    raise ValueError(f"unknown trunk variant {variant!r} (expected 'a' or 'b')")


class ToyDetector(nn.Module):
    """Per-pixel object coverage; ``detect`` returns the box of the largest blob.

    The blob is the largest connected region with p > 0.5; its box also takes in the pixels
    bordering it with p > ``EDGE_THRESHOLD``, because the network is least sure exactly at the
    one-pixel tips of triangles and diamonds, which decide the box extent.
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=4, dilation=4), nn.ReLU(),
            nn.Conv2d(width, 1, 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, H, W)`` object-mask logits."""
        return self.net(images - 0.5)

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> list[torch.Tensor]:
        weight = self.net[0].weight
        probs = torch.sigmoid(self(images.to(weight.dtype)))[:, 0].float().cpu().numpy()
        out = []
        for p in probs:
            labels, n = ndimage.label(p > 0.5)
            if n == 0:
                out.append(torch.zeros(0, 5, device=images.device))
                continue
            counts = np.bincount(labels.ravel())[1:]
            best = int(counts.argmax()) + 1
            if counts[best - 1] < MIN_BLOB_PIXELS:
                out.append(torch.zeros(0, 5, device=images.device))
                continue
            blob = labels == best
            ys, xs = np.nonzero(ndimage.binary_dilation(blob) & (p > EDGE_THRESHOLD))
            score = float(p[blob].mean())
            row = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1, score]
            out.append(torch.tensor([row], dtype=torch.float32, device=images.device))
        return out


class ToyClassifier(AttributeClassifier):
    """Protected-attribute heads (``attributes``) plus the semantic ``shape`` head
    (``semantic_attributes``); ``forward`` returns logits for both."""

    def __init__(self, variant: str = "a", input_size: int = 24, width: int = 12) -> None:
        super().__init__()
        self.attributes = {k: list(v) for k, v in W.ATTRIBUTES.items()}
        self.semantic_attributes = {"shape": list(W.SHAPES)}
        self.input_size = input_size
        self.trunk, feat = _trunk(variant, width)
        heads = {**self.attributes, **self.semantic_attributes}
        self.heads = nn.ModuleDict({k: nn.Linear(feat, len(v)) for k, v in heads.items()})

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        if crops.shape[-1] != self.input_size or crops.shape[-2] != self.input_size:
            crops = F.interpolate(crops, size=(self.input_size, self.input_size), mode="bilinear",
                                  align_corners=False)
        h = self.trunk(crops - 0.5)
        return {k: head(h) for k, head in self.heads.items()}


class ToyEncoder(ImageEncoder):
    """Conv trunk + linear projection to an L2-normalised embedding (DINO analog)."""

    def __init__(self, name: str = "dino", variant: str = "a", width: int = 12, dim: int = 32,
                 image_size: int = W.IMAGE_SIZE) -> None:
        super().__init__()
        self.name = name
        self.image_size = image_size
        self.trunk, feat = _trunk(variant, width)
        self.proj = nn.Linear(feat, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        return F.normalize(self.proj(self.trunk(images - 0.5)), dim=-1)


class ToyEmbedder(FaceEmbedder):
    """Crop embedder for the realism loss (same design as :class:`ToyEncoder`, on crops)."""

    def __init__(self, variant: str = "a", width: int = 12, dim: int = 32, input_size: int = 24) -> None:
        super().__init__()
        self.input_size = input_size
        self.encoder = ToyEncoder(name="embedder", variant=variant, width=width, dim=dim, image_size=input_size)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return self.encoder(crops)


def tokenizer_config(words: list[str]) -> dict[str, Any]:
    """The BPE tables of a CLIP tokenizer over ``words``, small enough to keep in bundle.json.

    Storing the tables (not the word list) pins the exact token ids the text tower was trained
    with, even if the project's tokenizer builder changes later.
    """
    with tempfile.TemporaryDirectory(prefix="toyclip-tok-") as tmp:
        build_clip_tokenizer(words, tmp, model_max_length=TEXT_MAX_LENGTH)
        vocab = json.loads((Path(tmp) / "vocab.json").read_text())
        lines = (Path(tmp) / "merges.txt").read_text().splitlines()[1:]
    return {"vocab": vocab, "merges": [line.split() for line in lines if line]}


class ToyCLIP(TextImageEncoder):
    """A small CLIP: conv image tower and ``CLIPTextModel`` text tower in one embedding space.

    ``vocab`` / ``merges`` (see :func:`tokenizer_config`) rebuild the exact tokenizer it was
    trained with, so the bundle needs no tokenizer files; raw prompts go in ``encode_text``.
    """

    def __init__(self, vocab: dict[str, int], merges: list[list[str]], name: str = "clip", variant: str = "a",
                 width: int = 16, dim: int = 32, text_hidden: int = 32, text_layers: int = 2) -> None:
        super().__init__()
        self.name = name
        self.tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m) for m in merges],
                                       model_max_length=TEXT_MAX_LENGTH, pad_token="<|endoftext|>")
        tok = self.tokenizer
        self.text_model = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
            num_hidden_layers=text_layers, num_attention_heads=2, max_position_embeddings=TEXT_MAX_LENGTH,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ))
        self.text_proj = nn.Linear(text_hidden, dim, bias=False)
        self.image_tower = ToyEncoder(name=name, variant=variant, width=width, dim=dim)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_tower(images)

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(list(prompts), padding="max_length", max_length=TEXT_MAX_LENGTH,
                              truncation=True, return_tensors="pt").input_ids

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        pooled = self.text_model(input_ids=ids.to(self.text_proj.weight.device)).pooler_output
        return F.normalize(self.text_proj(pooled), dim=-1)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.encode_ids(self.token_ids(prompts))


@register_backend("toyworld.detector")
def _make_detector(config: dict[str, Any]) -> ToyDetector:
    return ToyDetector(**config)


@register_backend("toyworld.classifier")
def _make_classifier(config: dict[str, Any]) -> ToyClassifier:
    return ToyClassifier(**config)


@register_backend("toyworld.encoder")
def _make_encoder(config: dict[str, Any]) -> ToyEncoder:
    return ToyEncoder(**config)


@register_backend("toyworld.clip")
def _make_clip(config: dict[str, Any]) -> ToyCLIP:
    return ToyCLIP(**config)


@register_backend("toyworld.embedder")
def _make_embedder(config: dict[str, Any]) -> ToyEmbedder:
    return ToyEmbedder(**config)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RenderedSet:
    """Rendered images with their scenes, boxes and per-pixel object masks."""

    images: torch.Tensor  # (N, 3, 32, 32)
    coverage: torch.Tensor  # (N, 1, 32, 32): share of each pixel the object covers
    boxes: torch.Tensor  # (N, 4), zeros where there is no object
    found: torch.Tensor  # (N,) bool
    scenes: list[W.Scene]

    def labels(self, name: str, classes: list[str]) -> torch.Tensor:
        return torch.tensor([classes.index(getattr(s, name)) if s.has_object else -1 for s in self.scenes])


def _uniform_scene(rng: np.random.Generator, no_object_share: float) -> W.Scene:
    """A scene with uniformly drawn shape and attributes (classifiers must see every
    combination equally often, not the concepts' biased laws) in a random context."""
    with_objects = [c for c in W.concepts() if c.has_objects]
    contexts = W.all_contexts()
    concept = with_objects[int(rng.integers(len(with_objects)))]
    context = contexts[int(rng.integers(len(contexts)))]
    scene = W.sample_scene(rng, dataclasses.replace(concept, no_object_rate=0.0), context)
    if rng.random() < no_object_share:
        return dataclasses.replace(scene, shape=None, tone=None, color=None, pattern=None, has_object=False)
    pick = {k: v[int(rng.integers(len(v)))] for k, v in W.ATTRIBUTES.items()}
    return dataclasses.replace(scene, shape=W.SHAPES[int(rng.integers(len(W.SHAPES)))], **pick)


def _render_scenes(scenes: list[W.Scene], rng: np.random.Generator) -> RenderedSet:
    images, masks, boxes = [], [], []
    for s in scenes:
        img, box = render(s, rng)
        images.append(img)
        masks.append(object_alpha(s)[0] if s.has_object else np.zeros(img.shape[1:]))
        boxes.append(box if box is not None else np.zeros(4, np.float32))
    return RenderedSet(
        images=torch.from_numpy(np.stack(images)),
        coverage=torch.from_numpy(np.stack(masks)).float()[:, None],
        boxes=torch.from_numpy(np.stack(boxes)),
        found=torch.tensor([s.has_object for s in scenes]),
        scenes=list(scenes),
    )


def _uniform_data(seed: int, key: str, n: int, no_object_share: float) -> RenderedSet:
    rng = numpy_rng(seed, "toyworld-perception", key)
    return _render_scenes([_uniform_scene(rng, no_object_share) for _ in range(n)], rng)


def _detected_boxes(detector: ToyDetector, images: torch.Tensor, fallback: torch.Tensor,
                    batch: int = 512) -> torch.Tensor:
    """The detector's boxes (what the losses will crop), ``fallback`` where it finds nothing."""
    dets = [d for i in range(0, len(images), batch) for d in detector.detect(images[i:i + batch])]
    boxes = fallback.clone()
    for i, d in enumerate(dets):
        if len(d):
            boxes[i] = d[0, :4].cpu()
    return boxes


def _crops(images: torch.Tensor, boxes: torch.Tensor, size: int, jitter: float = 0.0,
           gen: torch.Generator | None = None) -> torch.Tensor:
    """Square crops around ``boxes``, each coordinate moved by up to ``jitter`` pixels."""
    if jitter > 0:
        boxes = boxes + (torch.rand(boxes.shape, generator=gen) * 2 - 1) * jitter
    n = len(images)
    regions = Regions(boxes=boxes, scores=torch.ones(n), found=torch.ones(n, dtype=torch.bool))
    return square_crop(images, regions, size)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _fit(model: nn.Module, loss_fn: Callable[[], torch.Tensor], steps: int, lr: float) -> None:
    """Adam with cosine decay; ``loss_fn()`` draws its own batch."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    model.train()
    last = float("nan")
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        last = float(loss.detach())
    model.eval()
    log.info("trained %s: %d steps, final loss %.4f", type(model).__name__, steps, last)


def _nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR loss: each embedding must pick its other view among all 2B - 1 others."""
    z = torch.cat([a, b])
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    n = len(a)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


def _views(scenes: list[W.Scene], rng: np.random.Generator) -> RenderedSet:
    """A second rendering of each scene: new background texture and colour jitter, object
    moved by up to 1.5 px and rescaled by up to 5% (what the encoders should ignore)."""
    moved = []
    for s in scenes:
        if s.has_object:
            dx, dy = rng.uniform(-1.5, 1.5, size=2)
            s = dataclasses.replace(s, cx=s.cx + dx, cy=s.cy + dy, size=s.size * rng.uniform(0.95, 1.05))
        moved.append(s)
    return _render_scenes(moved, rng)


def _train_detector(seed: int, n: int, steps: int, device: str) -> ToyDetector:
    torch.manual_seed(derive_seed(seed, "detector"))
    model = ToyDetector().to(device)
    data = _uniform_data(seed, "detector", n, no_object_share=0.2)
    gen = torch.Generator().manual_seed(derive_seed(seed, "detector-batches"))

    def loss() -> torch.Tensor:
        idx = torch.randint(0, len(data.images), (64,), generator=gen)
        logits = model(data.images[idx].to(device))
        # Soft coverage targets put p = 0.5 exactly where the renderer's box rule (coverage
        # >= 0.5) puts the object's edge, so boxes come out pixel-accurate.
        return F.binary_cross_entropy_with_logits(logits, data.coverage[idx].to(device))

    _fit(model, loss, steps, lr=5e-3)
    return model.cpu()


def _train_classifier(detector: ToyDetector, seed: int, key: str, config: dict[str, Any], n: int,
                      steps: int, device: str) -> ToyClassifier:
    torch.manual_seed(derive_seed(seed, key))
    model = ToyClassifier(**config).to(device)
    data = _uniform_data(seed, key, n, no_object_share=0.0)
    boxes = _detected_boxes(detector, data.images, data.boxes)
    heads = {**model.attributes, **model.semantic_attributes}
    labels = {k: data.labels(k, v) for k, v in heads.items()}
    gen = torch.Generator().manual_seed(derive_seed(seed, key, "batches"))

    def loss() -> torch.Tensor:
        idx = torch.randint(0, len(data.images), (96,), generator=gen)
        crops = _crops(data.images[idx], boxes[idx], model.input_size, 1.0, gen)
        crops = (crops + 0.02 * torch.randn(crops.shape, generator=gen)).clamp(0, 1)
        logits = model(crops.to(device))
        return sum(F.cross_entropy(logits[k], labels[k][idx].to(device)) for k in heads)

    _fit(model, loss, steps, lr=4e-3)
    return model.cpu()


def _train_encoder(seed: int, key: str, config: dict[str, Any], n: int, steps: int, device: str) -> ToyEncoder:
    torch.manual_seed(derive_seed(seed, key))
    model = ToyEncoder(**config).to(device)
    rng = numpy_rng(seed, "toyworld-perception", key)
    scenes = [W.sample_training_pair(rng)[2] for _ in range(n)]
    view_a = _render_scenes(scenes, rng).images
    view_b = _views(scenes, rng).images
    gen = torch.Generator().manual_seed(derive_seed(seed, key, "batches"))

    def loss() -> torch.Tensor:
        idx = torch.randint(0, n, (64,), generator=gen)
        return _nt_xent(model(view_a[idx].to(device)), model(view_b[idx].to(device)))

    _fit(model, loss, steps, lr=3e-3)
    return model.cpu()


def _train_embedder(seed: int, config: dict[str, Any], n: int, steps: int, device: str) -> ToyEmbedder:
    torch.manual_seed(derive_seed(seed, "embedder"))
    model = ToyEmbedder(**config).to(device)
    data = _uniform_data(seed, "embedder", n, no_object_share=0.0)
    rng = numpy_rng(seed, "toyworld-perception", "embedder-views")
    view_b = _views(data.scenes, rng)
    gen = torch.Generator().manual_seed(derive_seed(seed, "embedder", "batches"))
    size = model.input_size

    def loss() -> torch.Tensor:
        idx = torch.randint(0, n, (64,), generator=gen)
        a = _crops(data.images[idx], data.boxes[idx], size, 1.0, gen)
        b = _crops(view_b.images[idx], view_b.boxes[idx], size, 1.0, gen)
        return _nt_xent(model(a.to(device)), model(b.to(device)))

    _fit(model, loss, steps, lr=3e-3)
    return model.cpu()


def _train_clip(seed: int, key: str, config: dict[str, Any], n: int, steps: int, device: str) -> ToyCLIP:
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

    _fit(model, loss, steps, lr=3e-3)
    return model.cpu()


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def _iou(a: torch.Tensor, b: torch.Tensor) -> float:
    ix = (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])).clamp(min=0)
    iy = (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])).clamp(min=0)
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union)


def natural_data(seed: int, key: str, n: int) -> RenderedSet:
    """``n`` images as the generator is trained to draw them: random concept, template and
    context, attributes from the concept's biased law (about 7% without an object)."""
    rng = numpy_rng(seed, "toyworld-perception", key)
    return _render_scenes([W.sample_training_pair(rng)[2] for _ in range(n)], rng)


@torch.no_grad()
def measure_detector(detector: ToyDetector, data: RenderedSet) -> dict[str, float]:
    """Objectness accuracy, and the share of true objects found with box IoU > 0.8."""
    dets = detector.detect(data.images)
    said = torch.tensor([len(d) > 0 for d in dets])
    ious = [_iou(d[0, :4], data.boxes[i]) if len(d) else 0.0
            for i, d in enumerate(dets) if data.found[i]]
    return {
        "objectness_accuracy": float((said == data.found).float().mean()),
        "box_iou_over_0.8": float(np.mean([v > 0.8 for v in ious])),
        "box_iou_mean": float(np.mean(ious)),
    }


@torch.no_grad()
def measure_classifier(classifier: ToyClassifier, detector: ToyDetector, data: RenderedSet) -> dict[str, float]:
    """Per-head accuracy on the crops the detector produces (objects only)."""
    keep = torch.nonzero(data.found).flatten()
    images = data.images[keep]
    boxes = _detected_boxes(detector, images, data.boxes[keep])
    logits = classifier(_crops(images, boxes, classifier.input_size))
    scenes = [data.scenes[i] for i in keep.tolist()]
    out = {}
    for k, classes in {**classifier.attributes, **classifier.semantic_attributes}.items():
        truth = torch.tensor([classes.index(getattr(s, k)) for s in scenes])
        out[k] = float((logits[k].argmax(1) == truth).float().mean())
    return out


@torch.no_grad()
def measure_clip(clip: ToyCLIP, data: RenderedSet) -> dict[str, float]:
    """Zero-shot CLIP-T checks: does the best-matching prompt (same template) have the
    image's shape, and does the best context for the image's concept match its background?"""
    template = W.TEMPLATES["seen"][0]
    objs = [c for c in W.concepts() if c.has_objects]
    by_shape = {s: next(c for c in objs if c.shape == s) for s in W.SHAPES}
    contexts = W.all_contexts()
    emb = clip(data.images)
    shape_ok, ctx_ok = [], []
    for i, s in enumerate(data.scenes):
        if not s.has_object:
            continue
        texts = clip.encode_text([W.make_prompt(by_shape[sh], template, s.context) for sh in W.SHAPES])
        shape_ok.append(W.SHAPES[int((texts @ emb[i]).argmax())] == s.shape)
        texts = clip.encode_text([W.make_prompt(W.concept(s.concept), template, x) for x in contexts])
        ctx_ok.append(contexts[int((texts @ emb[i]).argmax())] == s.context)
    return {"shape_top1": float(np.mean(shape_ok)), "context_top1": float(np.mean(ctx_ok))}


@torch.no_grad()
def measure_encoder(encoder: ImageEncoder, seed: int, key: str, n: int) -> dict[str, float]:
    """Retrieval of a re-rendered view among ``n`` others, and mean cosine of views vs. pairs."""
    rng = numpy_rng(seed, "toyworld-perception", key)
    scenes = [W.sample_training_pair(rng)[2] for _ in range(n)]
    a = encoder(_render_scenes(scenes, rng).images)
    b = encoder(_views(scenes, rng).images)
    sim = a @ b.T
    off = sim[~torch.eye(n, dtype=torch.bool)]
    return {"view_top1": float((sim.argmax(1) == torch.arange(n)).float().mean()),
            "cos_same_scene": float(sim.diag().mean()), "cos_other_scene": float(off.mean())}


@torch.no_grad()
def face_bank(embedder: ToyEmbedder, detector: ToyDetector, seed: int, per_combination: int) -> torch.Tensor:
    """Embeddings of real rendered object crops, ``per_combination`` for every (shape, tone,
    color, pattern), cropped from the detector's boxes exactly as the realism loss crops."""
    rng = numpy_rng(seed, "toyworld-perception", "face-bank")
    scenes = []
    for shape in W.SHAPES:
        for tone in W.ATTRIBUTES["tone"]:
            for color in W.ATTRIBUTES["color"]:
                for pattern in W.ATTRIBUTES["pattern"]:
                    for _ in range(per_combination):
                        s = _uniform_scene(rng, 0.0)
                        scenes.append(dataclasses.replace(s, shape=shape, tone=tone, color=color, pattern=pattern))
    data = _render_scenes(scenes, rng)
    boxes = _detected_boxes(detector, data.images, data.boxes)
    return F.normalize(embedder(_crops(data.images, boxes, embedder.input_size)), dim=-1)


@torch.no_grad()
def measure_embedder(embedder: ToyEmbedder, detector: ToyDetector, bank: torch.Tensor, data: RenderedSet) -> dict[str, float]:
    """Nearest-bank cosine for fresh real crops vs. for crops of uniform noise: the realism
    loss only works if real objects sit much closer to the bank than garbage does."""
    keep = torch.nonzero(data.found).flatten()
    boxes = _detected_boxes(detector, data.images[keep], data.boxes[keep])
    real = embedder(_crops(data.images[keep], boxes, embedder.input_size))
    gen = torch.Generator().manual_seed(derive_seed(0, "embedder-noise"))
    noise = embedder(torch.rand(len(keep), 3, embedder.input_size, embedder.input_size, generator=gen))
    return {"real_nearest_cos": float((real @ bank.T).amax(1).mean()),
            "noise_nearest_cos": float((noise @ bank.T).amax(1).mean())}


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------

TRAIN_CLASSIFIER = {"variant": "a", "input_size": 24, "width": 12}
EVAL_CLASSIFIER = {"variant": "b", "input_size": 20, "width": 12}
ENCODERS = {
    # "clip" / "dino" feed the training loss, "*_eval" the metrics: other seeds and data, and
    # (like the paper's ViT-H vs ViT-bigG CLIP) a wider evaluation CLIP, a different-design DINO.
    "clip": {"variant": "a", "width": 12, "dim": 32, "text_hidden": 32, "text_layers": 2},
    "clip_eval": {"variant": "a", "width": 16, "dim": 32, "text_hidden": 32, "text_layers": 2},
    "dino": {"variant": "a", "width": 12, "dim": 32},
    "dino_eval": {"variant": "b", "width": 10, "dim": 32},
}
EMBEDDER = {"variant": "a", "width": 12, "dim": 32, "input_size": 24}


def _save(module: nn.Module, path: Path) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path))


def build_perception(out_dir: Path, seed: int = 0, quick: bool = False, device: str = "cpu") -> dict:
    """Train every toy-world perception network and write the bundle into ``out_dir``.

    ``quick`` trains for a handful of steps on a few images (a smoke test of the whole build
    in seconds); the full build takes a few minutes on one CPU thread. Returns the measured
    accuracies on freshly rendered data (also stored under ``metrics`` in ``bundle.json``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scale = (lambda full, small: small) if quick else (lambda full, small: full)
    start = time.perf_counter()
    tokenizer = tokenizer_config(W.vocabulary())

    detector = _train_detector(seed, scale(4000, 64), scale(1000, 3), device)
    train_clf = _train_classifier(detector, seed, "train-classifier", TRAIN_CLASSIFIER,
                                  scale(8000, 64), scale(1200, 3), device)
    eval_clf = _train_classifier(detector, derive_seed(seed, "independent"), "eval-classifier",
                                 EVAL_CLASSIFIER, scale(8000, 64), scale(1500, 3), device)
    encoders: dict[str, nn.Module] = {}
    for name, cfg in ENCODERS.items():
        kseed = seed if name in ("clip", "dino") else derive_seed(seed, "independent")
        if name.startswith("clip"):
            encoders[name] = _train_clip(kseed, name, {**tokenizer, "name": name, **cfg},
                                         scale(6000, 64), scale(900, 3), device)
        else:
            encoders[name] = _train_encoder(kseed, name, {"name": name, **cfg},
                                            scale(6000, 64), scale(400, 3), device)
    embedder = _train_embedder(seed, EMBEDDER, scale(6000, 64), scale(400, 3), device)
    bank = face_bank(embedder, detector, seed, per_combination=scale(14, 1))

    test = natural_data(derive_seed(seed, "measure"), "test", scale(1500, 64))
    metrics: dict[str, Any] = {
        "detector": measure_detector(detector, test),
        "train_classifier": measure_classifier(train_clf, detector, test),
        "eval_classifier": measure_classifier(eval_clf, detector, test),
        "clip": measure_clip(encoders["clip"], natural_data(derive_seed(seed, "measure"), "clip", scale(300, 16))),
        "clip_eval": measure_clip(encoders["clip_eval"], natural_data(derive_seed(seed, "measure"), "clip", scale(300, 16))),
        "dino": measure_encoder(encoders["dino"], derive_seed(seed, "measure"), "dino", scale(256, 16)),
        "dino_eval": measure_encoder(encoders["dino_eval"], derive_seed(seed, "measure"), "dino", scale(256, 16)),
        "embedder": measure_embedder(embedder, detector, bank, test),
        "face_bank_size": int(bank.shape[0]),
    }

    _save(detector, out / "detector.safetensors")
    _save(train_clf, out / "train_classifier.safetensors")
    _save(eval_clf, out / "eval_classifier.safetensors")
    for name, enc in encoders.items():
        _save(enc, out / f"{name}.safetensors")
    _save(embedder, out / "face_embedder.safetensors")
    save_file({"bank": bank.contiguous()}, str(out / "face_bank.safetensors"))

    def spec(backend: str, weights: str, config: dict[str, Any]) -> dict[str, Any]:
        return {"backend": backend, "weights": weights, "config": config}

    enc_specs = {
        name: spec("toyworld.clip" if name.startswith("clip") else "toyworld.encoder", f"{name}.safetensors",
                   {"name": name, **(tokenizer if name.startswith("clip") else {}), **cfg})
        for name, cfg in ENCODERS.items()
    }
    metrics["build_seconds"] = round(time.perf_counter() - start, 1)
    manifest = {
        "components": {
            "detector": spec("toyworld.detector", "detector.safetensors", {}),
            "train_classifier": spec("toyworld.classifier", "train_classifier.safetensors", TRAIN_CLASSIFIER),
            "eval_classifier": spec("toyworld.classifier", "eval_classifier.safetensors", EVAL_CLASSIFIER),
            "encoders": enc_specs,
            # CLIP-T is an evaluation metric, so it reads through the evaluation CLIP.
            "text_image_encoder": enc_specs["clip_eval"],
            "face_embedder": spec("toyworld.embedder", "face_embedder.safetensors", EMBEDDER),
            # Which shape a prompt asks for: the semantic-accuracy metric (CLIP-T's exact analog).
            "semantic_labeler": {"backend": "toyworld.semantic_labeler"},
        },
        "semantic_encoders": ["clip", "dino"],
        "eval_encoders": {"clip_i": "clip_eval", "dino": "dino_eval"},
        "face_bank": "face_bank.safetensors",
        "build": {"seed": seed, "quick": quick, "world_seed": W.WORLD_SEED},
        "metrics": metrics,
    }
    (out / "bundle.json").write_text(json.dumps(manifest, indent=1))
    return metrics


def main(argv: list[str] | None = None) -> None:
    """``python -m fairness.toyworld.perception OUT_DIR``: build a bundle on one CPU thread."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(json.dumps(build_perception(args.out_dir, args.seed, args.quick, args.device), indent=1))


if __name__ == "__main__":
    main()
