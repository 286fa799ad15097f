"""Differentiable image preprocessing for frozen real networks (CLIP, DINO, FaceNet).

The libraries' own transforms go through PIL, which cuts the gradient the alignment and
semantics losses send back to the generated pixels. These are the same steps (resize, center
crop, normalise) on tensors with ``torch.nn.functional.interpolate`` (``antialias=False``, so
the backward pass stays a plain bilinear/bicubic adjoint on every device).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MODES = {"bilinear", "bicubic"}
_RESIZE_MODES = {"shortest", "squash"}


@dataclass(frozen=True)
class Preprocess:
    """``[0, 1]`` images -> a network's input.

    ``resize_mode`` "shortest" scales the shorter side to ``resize_size`` (default ``size``)
    and center-crops ``size`` (CLIP, DINO); "squash" resizes straight to ``size``. The output
    is ``(x - mean) / std`` in ``dtype`` (the network's, so fp16 networks get fp16 input).
    """

    size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    resize_size: int | None = None

    def __post_init__(self) -> None:
        if self.interpolation not in _MODES:
            raise ValueError(f"interpolation must be one of {sorted(_MODES)}, got {self.interpolation!r}")
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {sorted(_RESIZE_MODES)}, got {self.resize_mode!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need three (RGB) values")

    def __call__(self, images: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got shape {tuple(images.shape)}")
        x = images.float()
        if self.resize_mode == "squash":
            x = resize(x, (self.size, self.size), self.interpolation)
        else:
            x = center_crop(resize_shortest(x, self.resize_size or self.size, self.interpolation), self.size)
        x = normalize(x, self.mean, self.std)
        return x if dtype is None else x.to(dtype)


def resize(images: torch.Tensor, size: tuple[int, int], interpolation: str = "bicubic") -> torch.Tensor:
    """Resize to ``(H, W)``; a no-op (same tensor) when already that size."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode=interpolation, align_corners=False, antialias=False)


def resize_shortest(images: torch.Tensor, side: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Scale so the shorter side is ``side`` pixels (aspect ratio kept, longer side rounded)."""
    h, w = images.shape[-2:]
    scale = side / min(h, w)
    return resize(images, (max(side, round(h * scale)), max(side, round(w * scale))), interpolation)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size x size`` window (images must be at least that large)."""
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot center-crop {size} px from a {h}x{w} image")
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top:top + size, left:left + size]


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - m) / s


def module_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype of a module's weights (what its input must be cast to)."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
