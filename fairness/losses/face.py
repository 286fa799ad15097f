r"""Face-realism preserving loss: keep edited faces near some real face.

.. math:: L_\mathrm{face} = \frac1{N_f}\sum_{i:\,\mathrm{face}} \Big(1 - \max_j \cos\big(\mathrm{emb}(\mathrm{crop}(x_i)), F_j\big)\Big)

with :math:`F` a bank of L2-normalised embeddings of real faces (objects, in the toy world).
"""

from __future__ import annotations

import torch

from fairness.perception.base import FaceEmbedder


def face_realism_loss(crops: torch.Tensor, found: torch.Tensor, embedder: FaceEmbedder, bank: torch.Tensor) -> torch.Tensor:
    if not bool(found.any()):
        return crops.sum() * 0.0
    emb = torch.nn.functional.normalize(embedder(crops[found]).float(), dim=-1)
    sims = emb @ torch.nn.functional.normalize(bank.float(), dim=-1).T
    return (1 - sims.max(dim=1).values).mean()
