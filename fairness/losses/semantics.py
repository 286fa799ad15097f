r"""Image-semantics preserving loss with the paper's dynamic weights.

.. math:: L_\mathrm{img} = \frac1N \sum_i \sum_{e \in E} \big(1 - \cos(e(x_i), e(o_i))\big)

where ``o_i`` is the frozen model's image from the same prompt and initial noise, and E a
configurable list of image encoders (CLIP and DINO in the paper). The *gradient* reaching
:math:`x_i` is reweighted per pixel: :math:`\lambda_1` on the whole image when every target
class equals the original's class (that image is already fine, change it little); otherwise
:math:`\lambda_2` outside and :math:`\lambda_3` inside the face box (the face must change, the
rest should not). An image whose original shows a face but which shows none itself falls
outside these rules: it leaves the alignment loss, which is how debiasing can erase faces
rather than change them, and :func:`lost_region_weight` gives it its own weight. The forward
value is unweighted, so the logged term stays comparable across runs; the weights act through
:func:`scale_gradient`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from fairness.perception.base import ImageEncoder, Regions
from fairness.perception.regions import region_mask
from fairness.targets.assignment import AttributeTargets


@dataclass(frozen=True)
class ImgWeights:
    """:math:`\\lambda_{img,1}` and the two factors giving :math:`\\lambda_2 = f_2 \\lambda_1`,
    :math:`\\lambda_3 = f_3 \\lambda_2` (paper: 8, 0.2, 0.2 for gender)."""

    lambda1: float = 8.0
    nonface_factor: float = 0.2
    face_factor: float = 0.2

    @property
    def lambda2(self) -> float:
        return self.lambda1 * self.nonface_factor

    @property
    def lambda3(self) -> float:
        return self.lambda2 * self.face_factor


def scale_gradient(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Identity in the forward pass; multiplies the incoming gradient by ``weight``."""
    return x * weight + (x * (1 - weight)).detach()


def gradient_weight_map(
    targets: Mapping[str, AttributeTargets],
    original_classes: Mapping[str, torch.Tensor],
    weights: Mapping[str, ImgWeights],
    regions: Regions,
    height: int,
    width: int,
) -> torch.Tensor:
    """``(B, 1, H, W)`` per-pixel gradient weights; per attribute, then the minimum over them.

    An attribute whose target agrees with the original's class (or has no target: no face)
    gives :math:`\\lambda_1` everywhere; one that disagrees gives :math:`\\lambda_2` off the face
    and :math:`\\lambda_3` on it.
    """
    mask = region_mask(regions, height, width)
    out: torch.Tensor | None = None
    for attr, tgt in targets.items():
        w = weights[attr]
        t = torch.as_tensor(tgt.targets, device=mask.device)
        agree = (t < 0) | (t == original_classes[attr].to(mask.device))
        changed = mask * w.lambda3 + (1 - mask) * w.lambda2
        this = torch.where(agree.view(-1, 1, 1, 1), torch.full_like(mask, w.lambda1), changed)
        out = this if out is None else torch.minimum(out, this)
    if out is None:
        raise ValueError("gradient_weight_map needs at least one targeted attribute")
    return out


def lost_region_weight(weight_map: torch.Tensor, lost: torch.Tensor, weight: float | None) -> torch.Tensor:
    """Give every ``lost`` image (its original had a region, it has none) the weight ``weight``.

    Such an image has no target, so :func:`gradient_weight_map` treats it as already fine
    (:math:`\\lambda_1`, the paper's rule), while it has left the alignment loss altogether: a
    larger weight makes erasing the face cost more than changing it. ``None`` keeps the paper's rule.
    """
    if weight is None:
        return weight_map
    return torch.where(lost.to(weight_map.device).view(-1, 1, 1, 1), torch.full_like(weight_map, weight), weight_map)


def image_semantics_loss(
    images: torch.Tensor,
    originals_features: Mapping[str, torch.Tensor],
    encoders: Sequence[ImageEncoder],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over images of the summed cosine distances; also the per-encoder terms."""
    terms = {}
    for enc in encoders:
        feat = enc(images)
        terms[enc.name] = (1 - torch.nn.functional.cosine_similarity(feat.float(), originals_features[enc.name].float(), dim=-1)).mean()
    total = sum(terms.values()) if terms else images.sum() * 0.0
    return total, terms
