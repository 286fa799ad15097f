"""The toy world's image encoder (DINO analog) and crop embedder (face-embedding analog)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fairness.perception.base import FaceEmbedder, ImageEncoder
from fairness.toyworld import world as W
from fairness.toyworld.perception.trunk import conv_trunk


class ToyEncoder(ImageEncoder):
    """Conv trunk + linear projection to an L2-normalised embedding (DINO analog)."""

    def __init__(self, name: str = "dino", variant: str = "a", width: int = 12, dim: int = 32,
                 image_size: int = W.IMAGE_SIZE) -> None:
        super().__init__()
        self.name = name
        self.image_size = image_size
        self.trunk, feat = conv_trunk(variant, width)
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
