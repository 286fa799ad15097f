"""The originals bank: what training needs from the frozen model's images, precomputed.

For every image of a planned iteration (prompt, noise seed, image index, sampler steps) the bank
stores the frozen model's per-attribute class, whether a face was found, and the semantic
encoders' features: exactly :class:`~fairness.training.objective.OriginalsInfo`. Training with a
bank skips generating the originals and gets the same loss (same keys, same numbers).
Rows are flat records, so the bank is a plain parquet dataset (Ray Data writes it in parallel).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.dataset as pads
import torch

from fairness.training.objective import OriginalsInfo

Key = tuple[str, int, int, int]  # prompt, noise seed, image index, sampler steps


def info_to_rows(info: OriginalsInfo, prompt: str, noise_seed: int, indices: list[int], num_steps: int) -> list[dict[str, Any]]:
    rows = []
    for j, idx in enumerate(indices):
        row: dict[str, Any] = {"prompt": prompt, "noise_seed": int(noise_seed), "index": int(idx),
                               "num_steps": int(num_steps), "found": bool(info.found[j])}
        row.update({f"class.{a}": int(c[j]) for a, c in info.classes.items()})
        row.update({f"feature.{e}": f[j].float().cpu().numpy().tolist() for e, f in info.features.items()})
        rows.append(row)
    return rows


class OriginalsBank:
    """Parquet-backed lookup ``(prompt, noise_seed, indices, steps) -> OriginalsInfo``."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"originals bank not found: {path}")
        table = pads.dataset(str(path), format="parquet").to_table()
        if table.num_rows == 0:
            raise ValueError(f"originals bank {path} is empty")
        cols = table.to_pydict()
        self.classes = [c for c in cols if c.startswith("class.")]
        self.features = [c for c in cols if c.startswith("feature.")]
        self.rows: dict[Key, int] = {}
        for i, key in enumerate(zip(cols["prompt"], cols["noise_seed"], cols["index"], cols["num_steps"])):
            self.rows[key] = i
        self.cols = cols

    def __len__(self) -> int:
        return len(self.rows)

    def has(self, prompt: str, noise_seed: int, indices: list[int], num_steps: int) -> bool:
        return all((prompt, noise_seed, i, num_steps) in self.rows for i in indices)

    def lookup(self, prompt: str, noise_seed: int, indices: list[int], num_steps: int) -> OriginalsInfo:
        missing = [i for i in indices if (prompt, noise_seed, i, num_steps) not in self.rows]
        if missing:
            raise KeyError(f"originals bank has no rows for {prompt!r} seed {noise_seed} images {missing[:5]}")
        rows = [self.rows[(prompt, noise_seed, i, num_steps)] for i in indices]
        return OriginalsInfo(
            classes={c[len("class."):]: torch.tensor([self.cols[c][r] for r in rows]) for c in self.classes},
            features={f[len("feature."):]: torch.tensor(np.array([self.cols[f][r] for r in rows]), dtype=torch.float32)
                      for f in self.features},
            found=torch.tensor([self.cols["found"][r] for r in rows]),
        )
