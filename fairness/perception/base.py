"""Perception interfaces: what the losses and metrics need to see in an image.

Every image tensor here is ``(B, 3, H, W)`` float in ``[0, 1]``. Backends (the toy world's
small networks, MTCNN, CLIP, DINO, ...) implement these interfaces; the losses, the training
loop and the evaluation only ever talk to the interfaces, so one code path serves all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class Regions:
    """The largest detected region of each image in a batch.

    ``boxes`` is ``(B, 4)`` ``x0, y0, x1, y1`` in pixels (meaningless where ``found`` is False);
    ``scores`` is ``(B,)``; ``found`` is a ``(B,)`` bool mask: images without a detection are
    excluded from the alignment and face losses, never crash them.
    """

    boxes: torch.Tensor
    scores: torch.Tensor
    found: torch.Tensor

    def __post_init__(self) -> None:
        b = self.found.shape[0]
        if self.boxes.shape != (b, 4) or self.scores.shape != (b,):
            raise ValueError(
                f"Regions shapes disagree: boxes {tuple(self.boxes.shape)}, scores "
                f"{tuple(self.scores.shape)}, found {tuple(self.found.shape)}"
            )


@runtime_checkable
class RegionDetector(Protocol):
    """Finds the face (or object) in each image. Detection is not differentiated through."""

    def detect(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per image, a ``(n_i, 5)`` tensor of ``x0, y0, x1, y1, score`` (``n_i`` may be 0)."""
        ...


class AttributeClassifier(nn.Module):
    """Predicts class logits for several attributes from a square crop.

    Subclasses set ``attributes`` (attribute name -> ordered class names) and ``input_size``
    (the crop side in pixels), and return ``{attribute: (B, K) logits}`` from ``forward``.
    Logits rather than probabilities so the cross-entropy of the alignment loss stays stable.
    """

    attributes: dict[str, list[str]]
    input_size: int

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def probabilities(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: logits.softmax(-1) for name, logits in self(crops).items()}


class ImageEncoder(nn.Module):
    """Maps images to L2-normalised embeddings (the CLIP / DINO role). ``name`` labels logs."""

    name: str

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TextImageEncoder(ImageEncoder):
    """An image encoder with a text tower in the same space (CLIP-T needs both)."""

    def encode_text(self, prompts: list[str]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class FaceEmbedder(nn.Module):
    """Embeds face (object) crops into L2-normalised vectors for the realism loss.

    ``input_size`` is the crop side it expects.
    """

    input_size: int

    def forward(self, crops: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError
