"""SHA-256 of files, read in blocks (checkpoint manifests and same-weights checks share it), and
of tensors' values (keys derived from a batch's noise)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file's bytes (1 MiB at a time, so multi-GB weights stay out of memory)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_sha256(tensor: "torch.Tensor") -> str:
    """Hex SHA-256 of a tensor's values in C order (its dtype's bytes, wherever it lives)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
