"""Rendered training and test data for the perception networks, and the crops they see.

Every draw comes from ``numpy_rng(seed, "toyworld-perception", key)``, so each network's data
is fixed by the build seed and its own key.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from fairness.perception.base import Regions
from fairness.perception.regions import square_crop
from fairness.seeding import numpy_rng
from fairness.toyworld import world as W
from fairness.toyworld.perception.detector import ToyDetector
from fairness.toyworld.render import object_alpha, render


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


def uniform_scene(rng: np.random.Generator, no_object_share: float) -> W.Scene:
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


def render_scenes(scenes: list[W.Scene], rng: np.random.Generator) -> RenderedSet:
    """Render ``scenes`` (background noise from ``rng``) with their boxes and coverage masks."""
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


def uniform_data(seed: int, key: str, n: int, no_object_share: float) -> RenderedSet:
    """``n`` rendered :func:`uniform_scene` draws."""
    rng = numpy_rng(seed, "toyworld-perception", key)
    return render_scenes([uniform_scene(rng, no_object_share) for _ in range(n)], rng)


def natural_data(seed: int, key: str, n: int) -> RenderedSet:
    """``n`` images as the generator is trained to draw them: random concept, template and
    context, attributes from the concept's biased law (about 7% without an object)."""
    rng = numpy_rng(seed, "toyworld-perception", key)
    return render_scenes([W.sample_training_pair(rng)[2] for _ in range(n)], rng)


def rerendered_views(scenes: list[W.Scene], rng: np.random.Generator) -> RenderedSet:
    """A second rendering of each scene: new background texture and colour jitter, object
    moved by up to 1.5 px and rescaled by up to 5% (what the encoders should ignore)."""
    moved = []
    for s in scenes:
        if s.has_object:
            dx, dy = rng.uniform(-1.5, 1.5, size=2)
            s = dataclasses.replace(s, cx=s.cx + dx, cy=s.cy + dy, size=s.size * rng.uniform(0.95, 1.05))
        moved.append(s)
    return render_scenes(moved, rng)


def detected_boxes(detector: ToyDetector, images: torch.Tensor, fallback: torch.Tensor,
                   batch: int = 512) -> torch.Tensor:
    """The detector's boxes (what the losses will crop), ``fallback`` where it finds nothing."""
    dets = [d for i in range(0, len(images), batch) for d in detector.detect(images[i:i + batch])]
    boxes = fallback.clone()
    for i, d in enumerate(dets):
        if len(d):
            boxes[i] = d[0, :4].cpu()
    return boxes


def object_crops(images: torch.Tensor, boxes: torch.Tensor, size: int, jitter: float = 0.0,
                 gen: torch.Generator | None = None) -> torch.Tensor:
    """Square crops around ``boxes``, each coordinate moved by up to ``jitter`` pixels."""
    if jitter > 0:
        boxes = boxes + (torch.rand(boxes.shape, generator=gen) * 2 - 1) * jitter
    n = len(images)
    regions = Regions(boxes=boxes, scores=torch.ones(n), found=torch.ones(n, dtype=torch.bool))
    return square_crop(images, regions, size)
