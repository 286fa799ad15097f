"""The toy world's object detector (the face-detector analog)."""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage
from torch import nn

MIN_BLOB_PIXELS = 6  # smaller blobs are noise: the smallest object covers ~25 pixels
EDGE_THRESHOLD = 0.3  # pixels next to the blob above this count towards the box (thin tips)


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
