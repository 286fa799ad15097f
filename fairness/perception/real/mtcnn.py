"""``real.mtcnn``: faces found by facenet-pytorch's MTCNN, with the weights its wheel ships.

MTCNN is the one real face detector whose weights come with a registry package, so a real
bundle detects faces without any download. It runs batched on the images' GPU when there is
one. Detection is never differentiated through (the crop that follows is), so this is a plain
object, not an ``nn.Module``: ``PerceptionBundle.to(device, fp16)`` leaves it alone, and it keeps
computing in float32 where its thresholds were tuned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fairness.perception.bundle import register_backend
from fairness.perception.real.config import check_keys


@dataclass(frozen=True)
class MTCNNConfig:
    """``min_prob`` drops detections MTCNN itself keeps (its last stage passes 0.7); generated
    faces the classifiers should judge are far above it. ``batch_size`` bounds GPU memory."""

    device: str = "auto"
    min_face_size: int = 20
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    factor: float = 0.709
    min_prob: float = 0.9
    batch_size: int = 32

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> "MTCNNConfig":
        check_keys(config, cls.__dataclass_fields__, "real.mtcnn")
        cfg = dict(config)
        if "thresholds" in cfg:
            cfg["thresholds"] = tuple(float(t) for t in cfg["thresholds"])
            if len(cfg["thresholds"]) != 3:
                raise ValueError("real.mtcnn: thresholds needs three values (P-, R-, O-net)")
        return cls(**cfg)


class MTCNNDetector:
    """A :class:`~fairness.perception.base.RegionDetector` over ``facenet_pytorch.MTCNN``."""

    def __init__(self, config: MTCNNConfig | None = None):
        from facenet_pytorch import MTCNN  # the weights are inside the wheel

        self.config = config or MTCNNConfig()
        self._mtcnn = MTCNN(keep_all=True, select_largest=False, min_face_size=self.config.min_face_size,
                            thresholds=list(self.config.thresholds), factor=self.config.factor, device="cpu")
        self._mtcnn.eval().requires_grad_(False)
        self._on = torch.device("cpu")

    def _device_for(self, images: torch.Tensor) -> torch.device:
        if self.config.device != "auto":
            return torch.device(self.config.device)
        if images.device.type == "cuda":
            return images.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def _move(self, device: torch.device) -> None:
        if device != self._on:
            self._mtcnn.to(device)
            self._mtcnn.device = device
            self._on = device

    @torch.no_grad()
    def detect(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per image a ``(n_i, 5)`` float tensor ``x0, y0, x1, y1, p`` on the images' device.

        Boxes are clipped to the image; faces under ``min_prob`` are dropped; no face -> (0, 5).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected (B, 3, H, W) images, got shape {tuple(images.shape)}")
        device = self._device_for(images)
        self._move(device)
        h, w = images.shape[-2:]
        out: list[torch.Tensor] = []
        for start in range(0, images.shape[0], self.config.batch_size):
            chunk = images[start:start + self.config.batch_size].detach().to(device, torch.float32)
            # MTCNN wants HWC pixels in 0..255, as decoded from a uint8 file.
            hwc = (chunk.clamp(0, 1) * 255).round().permute(0, 2, 3, 1).contiguous()
            boxes, probs = self._mtcnn.detect(hwc)
            # With numpy 2 a batch comes back as object arrays (None where nothing was found).
            for i in range(hwc.shape[0]):
                out.append(_detections(boxes[i], probs[i], self.config.min_prob, w, h, images.device))
        return out


def _detections(boxes: Any, probs: Any, min_prob: float, width: int, height: int,
                device: torch.device) -> torch.Tensor:
    if boxes is None or len(boxes) == 0:
        return torch.zeros(0, 5, device=device)
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    p = torch.as_tensor(np.asarray(probs, dtype=np.float32).reshape(-1))
    b[:, 0::2] = b[:, 0::2].clamp(0, width)
    b[:, 1::2] = b[:, 1::2].clamp(0, height)
    keep = p >= min_prob
    return torch.cat([b[keep], p[keep, None]], dim=1).to(device)


@register_backend("real.mtcnn")
def _make(config: dict[str, Any]) -> MTCNNDetector:
    return MTCNNDetector(MTCNNConfig.from_dict(config))
