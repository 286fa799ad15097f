"""``real.zero_shot``: an attribute classifier from CLIP and a few prompts per class.

The paper's classifiers are MobileNets trained on CelebA / FairFace, whose weights are not
published. A zero-shot CLIP classifier needs no labelled data and no download beyond CLIP
itself, is differentiable with respect to the face crop (the alignment loss backpropagates
through it), and is configured entirely in bundle.json::

    {"attributes": {"gender": {"male": ["a photo of a man"], "female": ["a photo of a woman"]}},
     "clip": {"model": "ViT-H-14", "pretrained": "laion2b_s32b_b79k"}}

Class order is the order of the JSON object. ``logits = s * <img, t_k>`` with ``t_k`` the mean
of a class's normalised prompt embeddings, renormalised, and ``s`` CLIP's own logit scale.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fairness.perception.base import AttributeClassifier
from fairness.perception.bundle import register_backend
from fairness.perception.real.config import check_keys
from fairness.perception.real.openclip import OpenClipEncoder, clip_from_config

Prompts = dict[str, dict[str, list[str]]]


def parse_prompts(attributes: Any) -> Prompts:
    """Validate ``{attribute: {class: prompt | [prompts]}}`` (order kept)."""
    if not isinstance(attributes, dict) or not attributes:
        raise ValueError("real.zero_shot: config.attributes must map attribute -> {class: [prompts]}")
    out: Prompts = {}
    for attr, classes in attributes.items():
        if not isinstance(classes, dict) or len(classes) < 2:
            raise ValueError(f"real.zero_shot: attribute {attr!r} needs at least two classes with prompts")
        out[attr] = {}
        for cls, prompts in classes.items():
            prompts = [prompts] if isinstance(prompts, str) else list(prompts)
            if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
                raise ValueError(f"real.zero_shot: class {attr}.{cls} needs one or more non-empty prompts")
            out[attr][cls] = prompts
    return out


class ZeroShotClassifier(AttributeClassifier):
    """Per attribute, ``(B, K)`` logits of a crop against the class prompts' text embeddings."""

    def __init__(self, encoder: OpenClipEncoder, prompts: Prompts, logit_scale: float | None = None):
        super().__init__()
        self.encoder = encoder
        self.attributes = {a: list(classes) for a, classes in prompts.items()}
        self.input_size = encoder.image_size
        self.prompts = prompts
        scale = logit_scale if logit_scale is not None else float(encoder.model.logit_scale.detach().float().exp().clamp(max=100))
        self.logit_scale = scale
        with torch.no_grad():
            for i, classes in enumerate(prompts.values()):
                emb = torch.stack([F.normalize(encoder.encode_text(p).mean(0), dim=-1) for p in classes.values()])
                # not in the state dict: recomputed from the prompts whenever CLIP is loaded
                self.register_buffer(f"_text_{i}", emb, persistent=False)

    def class_embeddings(self, attribute: str) -> torch.Tensor:
        """``(K, D)`` unit text embeddings of ``attribute``'s classes, in class order."""
        return getattr(self, f"_text_{list(self.attributes).index(attribute)}").float()

    def forward(self, crops: torch.Tensor) -> dict[str, torch.Tensor]:
        image = self.encoder(crops)  # float32, unit norm
        return {a: self.logit_scale * image @ self.class_embeddings(a).T for a in self.attributes}


@register_backend("real.zero_shot")
def _make(config: dict[str, Any], root: Path | None = None) -> ZeroShotClassifier:
    check_keys(config, {"attributes", "clip", "logit_scale"}, "real.zero_shot")
    prompts = parse_prompts(config.get("attributes"))
    clip = clip_from_config(dict(config.get("clip", {})), root, "real.zero_shot", field_prefix="config.clip.")
    scale = config.get("logit_scale")
    return ZeroShotClassifier(OpenClipEncoder(clip, name="zero_shot"), prompts,
                              float(scale) if scale is not None else None)
