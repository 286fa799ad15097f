"""Largest-region selection, differentiable square crops and region masks.

The crop is an affine resampling (``grid_sample``) so gradients flow from the classifier and
the face embedder back into the generated pixels; the box itself is treated as a constant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fairness.perception.base import Regions, RegionDetector


def largest_region(detections: list[torch.Tensor], device: torch.device | None = None) -> Regions:
    """Keep the largest box of each image (the paper classifies the largest face)."""
    boxes, scores, found = [], [], []
    for det in detections:
        if det.numel() == 0:
            boxes.append(torch.zeros(4))
            scores.append(torch.tensor(0.0))
            found.append(False)
            continue
        det = det.detach().float().cpu()
        area = (det[:, 2] - det[:, 0]).clamp(min=0) * (det[:, 3] - det[:, 1]).clamp(min=0)
        best = int(area.argmax())
        boxes.append(det[best, :4])
        scores.append(det[best, 4])
        found.append(True)
    out = Regions(
        boxes=torch.stack(boxes) if boxes else torch.zeros(0, 4),
        scores=torch.stack(scores) if scores else torch.zeros(0),
        found=torch.tensor(found, dtype=torch.bool),
    )
    if device is not None:
        out = Regions(out.boxes.to(device), out.scores.to(device), out.found.to(device))
    return out


@torch.no_grad()
def detect_largest(detector: RegionDetector, images: torch.Tensor) -> Regions:
    """Run ``detector`` without gradients and keep the largest region per image."""
    return largest_region(detector.detect(images.detach()), device=images.device)


def square_boxes(regions: Regions, height: int, width: int, margin: float = 0.0) -> torch.Tensor:
    """Square boxes centred on each region, side = longest box side x (1 + margin)."""
    b = regions.boxes.float()
    cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
    side = torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]).clamp(min=1.0) * (1 + margin)
    half = side / 2
    return torch.stack([cx - half, cy - half, cx + half, cy + half], dim=1)


def square_crop(images: torch.Tensor, regions: Regions, size: int, margin: float = 0.0) -> torch.Tensor:
    """Differentiable square crops resized to ``size`` (bilinear; outside the image is zero).

    Images with no region get the whole image resized, so shapes stay fixed; callers mask
    them out with ``regions.found``.
    """
    n, _, h, w = images.shape
    if n == 0:
        return images.new_zeros(0, images.shape[1], size, size)
    sq = square_boxes(regions, h, w, margin).to(images.device, images.dtype)
    full = torch.tensor([0.0, 0.0, float(w), float(h)], device=images.device, dtype=images.dtype)
    sq = torch.where(regions.found.to(images.device)[:, None], sq, full.expand_as(sq))
    # affine_grid works in [-1, 1] normalised coordinates (align_corners=False convention).
    sx = (sq[:, 2] - sq[:, 0]) / w
    sy = (sq[:, 3] - sq[:, 1]) / h
    tx = (sq[:, 0] + sq[:, 2]) / w - 1
    ty = (sq[:, 1] + sq[:, 3]) / h - 1
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, tx], 1), torch.stack([zero, sy, ty], 1)], 1)
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def region_mask(regions: Regions, height: int, width: int) -> torch.Tensor:
    """``(B, 1, H, W)`` float mask, 1 inside each image's box (all zeros where not found)."""
    ys = torch.arange(height, device=regions.boxes.device).view(1, height, 1) + 0.5
    xs = torch.arange(width, device=regions.boxes.device).view(1, 1, width) + 0.5
    b = regions.boxes.float()
    inside = (
        (xs >= b[:, 0, None, None]) & (xs <= b[:, 2, None, None])
        & (ys >= b[:, 1, None, None]) & (ys <= b[:, 3, None, None])
    )
    inside = inside & regions.found.view(-1, 1, 1)
    return inside.float().unsqueeze(1)
