r"""Distributional alignment loss (Shen et al. 2024, eq. 6).

.. math:: L_\mathrm{align} = \frac{1}{N_f} \sum_{i,a} \mathbb 1[c_{i,a} \ge C_a]\,
          \mathrm{CE}(h_a(x_i), y_{i,a})

summed over the targeted attributes ``a`` and averaged over the ``N_f`` images that have a face
(images without one have target -1 and contribute nothing).
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from fairness.targets.assignment import AttributeTargets


def confident_mask(targets: AttributeTargets, threshold: float, device: torch.device) -> torch.Tensor:
    """Images whose target exists and whose confidence reaches ``threshold``."""
    t = torch.as_tensor(targets.targets, device=device)
    c = torch.as_tensor(targets.confidence, device=device)
    return (t >= 0) & (c >= threshold)


def alignment_loss(
    logits: Mapping[str, torch.Tensor],
    targets: Mapping[str, AttributeTargets],
    thresholds: Mapping[str, float],
    num_with_face: int,
) -> torch.Tensor:
    """DAL over all targeted attributes; zero (with a graph) when no image qualifies."""
    first = next(iter(logits.values()))
    total = first.sum() * 0.0
    if num_with_face == 0:
        return total
    for attr, tgt in targets.items():
        mask = confident_mask(tgt, thresholds[attr], first.device)
        if mask.any():
            y = torch.as_tensor(tgt.targets, device=first.device)[mask]
            total = total + F.cross_entropy(logits[attr][mask].float(), y, reduction="sum")
    return total / num_with_face
