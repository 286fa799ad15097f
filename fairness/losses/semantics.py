r"""Image-semantics preserving loss with the paper's dynamic weights.

.. math:: L_\mathrm{img} = \frac1N \sum_i \sum_{e \in E} \big(1 - \cos(e(x_i), e(o_i))\big)

where ``o_i`` is the frozen model's image from the same prompt and initial noise, and E a
configurable list of image encoders (CLIP and DINO in the paper). The *gradient* reaching
:math:`x_i` is reweighted per pixel: :math:`\lambda_1` on the whole image when every target
class equals the original's class (that image is already fine, change it little); otherwise
:math:`\lambda_2` outside and :math:`\lambda_3` inside the face box (the face must change, the
rest should not). "Agrees" is read as the paper and the official code read it (see
:func:`gradient_weight_map`): only a confident target can agree, and only with the class of a
face found in the original. An image whose original shows a face but which shows none itself falls
outside these rules: it leaves the alignment loss, which is how debiasing can erase faces
rather than change them, and :func:`lost_region_weight` gives it its own weight. The forward
value is unweighted, so the logged term stays comparable across runs; the weights act through
:func:`scale_gradient`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from fairness.losses.alignment import confident_mask
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
    *,
    thresholds: Mapping[str, float],
    original_found: torch.Tensor,
) -> torch.Tensor:
    """``(B, 1, H, W)`` per-pixel gradient weights; per attribute, then the minimum over them.

    Paper sec. 4 ("Loss", dynamic :math:`\\lambda_{img}`): :math:`\\lambda_{img,1}` "if the
    generated image's target class :math:`y_i` agrees with the original image's class
    :math:`h(d_\\mathrm{face}(o_i))`"; for the others :math:`\\lambda_{img,2}` off the face and
    :math:`\\lambda_{img,3}` on it. Per attribute, the target *agrees* when

    * it is confident (:math:`c_i \\ge C`): the official code sets targets below the threshold
      to -1 before weighing, and -1 never equals the class of an original face, so they get
      :math:`\\lambda_{img,2}` / :math:`\\lambda_{img,3}`;
    * the original shows a face: without one, :math:`h(d_\\mathrm{face}(o_i))` does not exist
      (the official code's class is then -1), so it cannot agree;
    * and it equals the original's class.

    An image whose *generated* version shows no face has no target at all (target -1) and keeps
    :math:`\\lambda_1`, the rule this project has always applied there; see
    :func:`lost_region_weight` for the case where its original showed one.
    """
    mask = region_mask(regions, height, width)
    found = original_found.to(mask.device).bool()
    out: torch.Tensor | None = None
    for attr, tgt in targets.items():
        w = weights[attr]
        t = torch.as_tensor(tgt.targets, device=mask.device)
        confident = confident_mask(tgt, thresholds[attr], mask.device)
        agree = (t < 0) | (confident & found & (t == original_classes[attr].to(mask.device)))
        changed = mask * w.lambda3 + (1 - mask) * w.lambda2
        this = torch.where(agree.view(-1, 1, 1, 1), torch.full_like(mask, w.lambda1), changed)
        out = this if out is None else torch.minimum(out, this)
    if out is None:
        raise ValueError("gradient_weight_map needs at least one targeted attribute")
    return out


def lost_region_weight(weight_map: torch.Tensor, lost: torch.Tensor, weight: float | None) -> torch.Tensor:
    """Give every ``lost`` image (its original had a region, it has none) the weight ``weight``.

    Such an image has no target, so :func:`gradient_weight_map` treats it as already fine
    (:math:`\\lambda_1`; the official code gives an image without a generated face the smallest
    factor instead), while it has left the alignment loss altogether: a larger weight makes
    erasing the face cost more than changing it. ``None`` keeps :math:`\\lambda_1`.
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
