"""The bank of real object-crop embeddings that anchors the realism loss (the face bank)."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from fairness.seeding import numpy_rng
from fairness.toyworld import world as W
from fairness.toyworld.perception.data import detected_boxes, object_crops, render_scenes, uniform_scene
from fairness.toyworld.perception.detector import ToyDetector
from fairness.toyworld.perception.encoder import ToyEmbedder


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
                        s = uniform_scene(rng, 0.0)
                        scenes.append(dataclasses.replace(s, shape=shape, tone=tone, color=color, pattern=pattern))
    data = render_scenes(scenes, rng)
    boxes = detected_boxes(detector, data.images, data.boxes)
    return F.normalize(embedder(object_crops(data.images, boxes, embedder.input_size)), dim=-1)
