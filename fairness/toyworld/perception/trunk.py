"""The small conv trunks that every toy-world network is built on."""

from __future__ import annotations

from torch import nn


def conv_trunk(variant: str, width: int) -> tuple[nn.Sequential, int]:
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
