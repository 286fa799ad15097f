r"""Structure-preserving loss: hold the outline of what is coloured while its colour changes.

.. math:: L_\mathrm{struct} = \frac1N \sum_i \big(1 - \cos(S(x_i), S(o_i))\big),
   \qquad S(x) = \lVert \nabla\, (\max_c x_c - \min_c x_c) \rVert

``S`` is the Sobel gradient magnitude of the per-pixel saturation, flattened. The paper's
image-semantics weights are smallest exactly on the face (:math:`\lambda_3`), which is right
when the face *is* the attribute; where the region also carries what the prompt asked for (the
toy world's object: its shape is the concept, its hue and shade are the attributes), nothing then
holds the outline, and debiasing swaps the concept. Saturation is blind to hue, and a shade
change scales it nearly uniformly, which the cosine ignores; plain Sobel edges of the colour
channels are not enough, since a textured background's edges outweigh the outline once the
outline's contrast changes with the shade. So this term, with its own weight, can hold the outline
while the alignment loss recolours the region. Parameter-free: nothing to train.
"""

from __future__ import annotations

import torch

from fairness.losses.semantics import image_semantics_loss
from fairness.perception.base import ImageEncoder

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


class OutlineEncoder(ImageEncoder):
    """Maps ``(B, 3, H, W)`` images in ``[0, 1]`` to L2-normalised flattened outline maps ``S(x)``."""

    name = "structure"

    def __init__(self) -> None:
        super().__init__()
        kernel = torch.stack([_SOBEL_X, _SOBEL_X.T]).unsqueeze(1)  # (2, 1, 3, 3): d/dx, d/dy
        self.register_buffer("kernel", kernel, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        rgb = images.float()
        saturation = (rgb.max(1).values - rgb.min(1).values).unsqueeze(1)
        grads = torch.nn.functional.conv2d(torch.nn.functional.pad(saturation, (1, 1, 1, 1), mode="replicate"),
                                           self.kernel.to(saturation.device))
        # eps inside the root: the gradient of sqrt at 0 (flat regions) would be infinite.
        magnitude = (grads.pow(2).sum(1) + 1e-6).sqrt().flatten(1)
        return torch.nn.functional.normalize(magnitude, dim=-1)


def structure_loss(images: torch.Tensor, original_outlines: torch.Tensor, encoder: OutlineEncoder) -> torch.Tensor:
    """Mean over images of ``1 - cos`` between their outline maps and the originals': the
    image-semantics loss with this one encoder, without the paper's gradient weights."""
    return image_semantics_loss(images, {encoder.name: original_outlines.to(images.device)}, [encoder])[0]
