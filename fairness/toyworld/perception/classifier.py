"""The toy world's attribute classifier (the FairFace-classifier analog)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fairness.perception.base import AttributeClassifier
from fairness.toyworld import world as W
from fairness.toyworld.perception.trunk import conv_trunk


class ToyClassifier(AttributeClassifier):
    """Protected-attribute heads (``attributes``) plus the semantic ``shape`` head
    (``semantic_attributes``); ``forward`` returns logits for both."""

    def __init__(self, variant: str = "a", input_size: int = 24, width: int = 12) -> None:
        super().__init__()
        self.attributes = {k: list(v) for k, v in W.ATTRIBUTES.items()}
        self.semantic_attributes = {"shape": list(W.SHAPES)}
        self.input_size = input_size
        self.trunk, feat = conv_trunk(variant, width)
        heads = {**self.attributes, **self.semantic_attributes}
        self.heads = nn.ModuleDict({k: nn.Linear(feat, len(v)) for k, v in heads.items()})

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        if crops.shape[-1] != self.input_size or crops.shape[-2] != self.input_size:
            crops = F.interpolate(crops, size=(self.input_size, self.input_size), mode="bilinear",
                                  align_corners=False)
        h = self.trunk(crops - 0.5)
        return {k: head(h) for k, head in self.heads.items()}
