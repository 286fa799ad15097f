"""Small trainable perception backends: the plumbing for tests and a template for new ones.

They implement every interface with a few conv layers, register as ``tiny.*`` bundle
backends, and :func:`build_tiny_bundle` writes a loadable bundle folder with random weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from fairness.perception.base import AttributeClassifier, FaceEmbedder, TextImageEncoder
from fairness.perception.bundle import register_backend


def _trunk(width: int, out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
        nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        nn.Linear(4 * width, out),
    )


class TinyDetector(nn.Module):
    """Objectness + box regression; boxes are predicted as fractions of the image."""

    def __init__(self, width: int = 8, threshold: float = 0.0):
        super().__init__()
        self.net = _trunk(width, 5)
        self.threshold = threshold

    def detect(self, images: torch.Tensor) -> list[torch.Tensor]:
        out = self.net(images.float())
        h, w = images.shape[-2:]
        frac = torch.sigmoid(out[:, 1:])
        x0 = torch.minimum(frac[:, 0], frac[:, 2]) * 0.5 * w
        y0 = torch.minimum(frac[:, 1], frac[:, 3]) * 0.5 * h
        x1 = w - torch.minimum(frac[:, 0], frac[:, 2]) * 0.5 * w
        y1 = h - torch.minimum(frac[:, 1], frac[:, 3]) * 0.5 * h
        boxes = torch.stack([x0, y0, x1, y1, torch.sigmoid(out[:, 0])], 1)
        return [b[None] if out[i, 0] > self.threshold else b.new_zeros(0, 5) for i, b in enumerate(boxes)]


class TinyClassifier(AttributeClassifier):
    def __init__(self, attributes: dict[str, list[str]], input_size: int = 16, width: int = 8):
        super().__init__()
        self.attributes = {k: list(v) for k, v in attributes.items()}
        self.input_size = input_size
        self.trunk = _trunk(width, 4 * width)
        self.heads = nn.ModuleDict({a: nn.Linear(4 * width, len(c)) for a, c in self.attributes.items()})

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        z = F.silu(self.trunk(crops))
        return {a: head(z) for a, head in self.heads.items()}


class TinyEncoder(TextImageEncoder):
    """Image tower plus a bag-of-characters text tower, both into one normalised space."""

    def __init__(self, name: str = "tiny", dim: int = 16, width: int = 8):
        super().__init__()
        self.name, self.dim = name, dim
        self.image = _trunk(width, dim)
        self.text = nn.EmbeddingBag(128, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images), dim=-1)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        ids = [torch.tensor([min(ord(c), 127) for c in p] or [0]) for p in prompts]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        device = self.text.weight.device
        return F.normalize(self.text(torch.cat(ids).to(device), offsets.to(device)), dim=-1)


class TinyEmbedder(FaceEmbedder):
    def __init__(self, input_size: int = 16, dim: int = 16, width: int = 8):
        super().__init__()
        self.input_size = input_size
        self.net = _trunk(width, dim)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(crops), dim=-1)


@register_backend("tiny.detector")
def _detector(config: dict[str, Any]) -> TinyDetector:
    return TinyDetector(**config)


@register_backend("tiny.classifier")
def _classifier(config: dict[str, Any]) -> TinyClassifier:
    return TinyClassifier(**config)


@register_backend("tiny.encoder")
def _encoder(config: dict[str, Any]) -> TinyEncoder:
    return TinyEncoder(**config)


@register_backend("tiny.embedder")
def _embedder(config: dict[str, Any]) -> TinyEmbedder:
    return TinyEmbedder(**config)


def build_tiny_bundle(out_dir: str | Path, attributes: dict[str, list[str]], seed: int = 0,
                      detector_threshold: float = -1e9, bank_size: int = 32) -> Path:
    """Write a random-weight bundle folder (every image detected unless a threshold is given)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    parts: dict[str, tuple[str, dict[str, Any], nn.Module]] = {
        "detector": ("tiny.detector", {"threshold": detector_threshold}, TinyDetector(threshold=detector_threshold)),
        "train_classifier": ("tiny.classifier", {"attributes": attributes}, TinyClassifier(attributes)),
        "eval_classifier": ("tiny.classifier", {"attributes": attributes}, TinyClassifier(attributes)),
        "enc_a": ("tiny.encoder", {"name": "enc_a"}, TinyEncoder("enc_a")),
        "enc_b": ("tiny.encoder", {"name": "enc_b"}, TinyEncoder("enc_b")),
        "face_embedder": ("tiny.embedder", {}, TinyEmbedder()),
    }
    specs = {}
    for key, (backend, config, module) in parts.items():
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(out / f"{key}.safetensors"))
        specs[key] = {"backend": backend, "config": config, "weights": f"{key}.safetensors"}
    save_file({"bank": F.normalize(torch.randn(bank_size, 16), dim=-1)}, str(out / "face_bank.safetensors"))
    manifest = {
        "components": {
            "detector": specs["detector"], "train_classifier": specs["train_classifier"],
            "eval_classifier": specs["eval_classifier"], "encoders": {"enc_a": specs["enc_a"], "enc_b": specs["enc_b"]},
            "text_image_encoder": specs["enc_a"], "face_embedder": specs["face_embedder"],
        },
        "semantic_encoders": ["enc_a", "enc_b"],
        "eval_encoders": {"clip_i": "enc_a", "dino": "enc_b"},
        "face_bank": "face_bank.safetensors",
    }
    (out / "bundle.json").write_text(json.dumps(manifest, indent=2))
    return out
