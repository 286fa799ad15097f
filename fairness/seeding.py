"""Deterministic seeds derived from names and indices (never Python's salted ``hash()``).

Every random stream in the project (prompt choice, initial noise, OT target draws) is keyed by
``derive_seed(base_seed, *keys)``, so a run is reproducible image by image, independent of how
many workers share it and of where it was resumed.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def derive_seed(base_seed: int, *keys: object) -> int:
    """A 63-bit seed from ``base_seed`` and any printable keys, stable across processes."""
    text = "\x1f".join([str(int(base_seed))] + [str(k) for k in keys])
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") >> 1


def numpy_rng(base_seed: int, *keys: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(base_seed, *keys))


def torch_generator(base_seed: int, *keys: object, device: str | torch.device = "cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(base_seed, *keys))
    return g


def image_noise(
    base_seed: int,
    prompt: str,
    indices: list[int] | range,
    shape: tuple[int, ...],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Initial latents for images ``indices`` of ``prompt``: image i's noise depends only on
    (seed, prompt, i), so any split of a batch across workers draws the same images."""
    out = [
        torch.randn(shape, generator=torch_generator(base_seed, "noise", prompt, int(i)), dtype=torch.float32)
        for i in indices
    ]
    if not out:
        return torch.zeros((0, *shape), device=device, dtype=dtype)
    return torch.stack(out).to(device=device, dtype=dtype)
