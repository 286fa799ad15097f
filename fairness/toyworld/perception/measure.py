"""How well each trained perception network sees freshly rendered data (``metrics`` in
``bundle.json``)."""

from __future__ import annotations

import numpy as np
import torch

from fairness.perception.base import ImageEncoder
from fairness.seeding import derive_seed, numpy_rng
from fairness.toyworld import world as W
from fairness.toyworld.perception.classifier import ToyClassifier
from fairness.toyworld.perception.clip import ToyCLIP
from fairness.toyworld.perception.data import (
    RenderedSet,
    detected_boxes,
    object_crops,
    render_scenes,
    rerendered_views,
)
from fairness.toyworld.perception.detector import ToyDetector
from fairness.toyworld.perception.encoder import ToyEmbedder


def box_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes."""
    ix = (torch.minimum(a[2], b[2]) - torch.maximum(a[0], b[0])).clamp(min=0)
    iy = (torch.minimum(a[3], b[3]) - torch.maximum(a[1], b[1])).clamp(min=0)
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union)


@torch.no_grad()
def measure_detector(detector: ToyDetector, data: RenderedSet) -> dict[str, float]:
    """Objectness accuracy, and the share of true objects found with box IoU > 0.8."""
    dets = detector.detect(data.images)
    said = torch.tensor([len(d) > 0 for d in dets])
    ious = [box_iou(d[0, :4], data.boxes[i]) if len(d) else 0.0
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
    boxes = detected_boxes(detector, images, data.boxes[keep])
    logits = classifier(object_crops(images, boxes, classifier.input_size))
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
    a = encoder(render_scenes(scenes, rng).images)
    b = encoder(rerendered_views(scenes, rng).images)
    sim = a @ b.T
    off = sim[~torch.eye(n, dtype=torch.bool)]
    return {"view_top1": float((sim.argmax(1) == torch.arange(n)).float().mean()),
            "cos_same_scene": float(sim.diag().mean()), "cos_other_scene": float(off.mean())}


@torch.no_grad()
def measure_embedder(embedder: ToyEmbedder, detector: ToyDetector, bank: torch.Tensor, data: RenderedSet) -> dict[str, float]:
    """Nearest-bank cosine for fresh real crops vs. for crops of uniform noise: the realism
    loss only works if real objects sit much closer to the bank than garbage does."""
    keep = torch.nonzero(data.found).flatten()
    boxes = detected_boxes(detector, data.images[keep], data.boxes[keep])
    real = embedder(object_crops(data.images[keep], boxes, embedder.input_size))
    gen = torch.Generator().manual_seed(derive_seed(0, "embedder-noise"))
    noise = embedder(torch.rand(len(keep), 3, embedder.input_size, embedder.input_size, generator=gen))
    return {"real_nearest_cos": float((real @ bank.T).amax(1).mean()),
            "noise_nearest_cos": float((noise @ bank.T).amax(1).mean())}
