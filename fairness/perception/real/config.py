"""What every real backend does with its bundle.json ``config``: check keys, pick a dtype, seed.

A misspelt key in a hand-edited bundle.json must fail loudly rather than silently fall back to
a default (a 4 GB model loaded with the wrong weights). Random-weight test networks are built
under a fixed seed so every process of a distributed run builds the same one.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

import torch

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_keys(config: dict[str, Any], known: Iterable[str], backend: str) -> None:
    """Raise ``ValueError`` naming any key of ``config`` outside ``known``."""
    known = set(known)
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{backend}: unknown config key(s) {unknown}; known: {sorted(known)}")


def precision_dtype(precision: str, backend: str) -> torch.dtype:
    """The torch dtype for ``precision`` ("fp32", "fp16", "bf16")."""
    if precision not in PRECISIONS:
        raise ValueError(f"{backend}: precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a network's random initialisation under ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
