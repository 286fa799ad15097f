"""What every perception network's training shares: the optimiser loop and the SimCLR loss."""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def fit(model: nn.Module, loss_fn: Callable[[], torch.Tensor], steps: int, lr: float) -> None:
    """Adam with cosine decay; ``loss_fn()`` draws its own batch."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(steps, 1))))
    model.train()
    last = float("nan")
    for _ in range(steps):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        last = float(loss.detach())
    model.eval()
    log.info("trained %s: %d steps, final loss %.4f", type(model).__name__, steps, last)


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR loss: each embedding must pick its other view among all 2B - 1 others.

    With ``z = [a; b]`` and ``s_ij = z_i . z_j / temperature``, it is the mean over ``i`` of
    ``-log(exp(s_{i,p(i)}) / sum_{j != i} exp(s_ij))``, ``p(i)`` being ``i``'s other view.
    """
    z = torch.cat([a, b])
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    n = len(a)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)
