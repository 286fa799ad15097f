"""The originals bank: what training needs from the frozen model's images, precomputed.

For every image of a planned iteration (prompt, noise seed, image index, sampler steps) the bank
stores the frozen model's per-attribute class, whether a face was found, and the semantic
encoders' features: exactly :class:`~fairness.training.objective.OriginalsInfo`. Training with a
bank skips generating the originals and gets the same loss (same keys, same numbers).
Rows are flat records, so the bank is a plain parquet dataset (Ray Data writes it in parallel).

The row keys do not say which model, guidance, resolution or perception made the rows, so the
bank carries a fingerprint of them (:func:`bank_fingerprint`, in ``_fingerprint.json`` beside
the parquet files; the leading underscore keeps it out of pyarrow's dataset discovery). A job
whose fingerprint differs is refused, naming the fields, instead of training on stale originals.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow.dataset as pads
import torch

from fairness.config import DebiasConfig
from fairness.models.loading import model_resolution
from fairness.training.objective import OriginalsInfo

Key = tuple[str, int, int, int]  # prompt, noise seed, image index, sampler steps
FINGERPRINT_FILE = "_fingerprint.json"


class BankMismatch(ValueError):
    """An originals bank that was not built for this job."""


def bank_fingerprint(cfg: DebiasConfig) -> dict[str, Any]:
    """Everything in a job's config that changes a bank row for the same key: the frozen model
    and its precision, the sampler's guidance and step range, the resolution, the perception
    bundle, and the loss pieces whose features the rows store (semantic encoders, structure
    term). Loss weights and thresholds are left out: they do not change the originals (Tune
    trials share one bank). JSON-normalised, so it compares equal to its stored copy."""
    fp = {
        "model": cfg.model.path, "dtype": cfg.model.dtype, "resolution": model_resolution(cfg.model.path),
        "guidance_scale": cfg.dft.guidance_scale, "steps": cfg.dft.steps, "perception": cfg.perception,
        "semantic_encoders": cfg.loss.semantic_encoders, "structure": cfg.loss.structure_weight > 0,
    }
    return json.loads(json.dumps(fp))


def write_fingerprint(path: str | Path, fingerprint: dict[str, Any]) -> None:
    (Path(path) / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=1, sort_keys=True) + "\n")


def read_fingerprint(path: str | Path) -> dict[str, Any] | None:
    file = Path(path) / FINGERPRINT_FILE
    return json.loads(file.read_text()) if file.exists() else None


def check_fingerprint(stored: dict[str, Any] | None, expected: dict[str, Any], where: str | Path) -> None:
    """Raise :class:`BankMismatch` naming every field where the bank and the job differ."""
    if stored is None:
        raise BankMismatch(f"originals bank {where} has no {FINGERPRINT_FILE}, so nothing says which job it was "
                           "built for; rebuild it with `fairness bank` for this config")
    differ = [k for k in sorted(set(stored) | set(expected)) if stored.get(k) != expected.get(k)]
    if differ:
        lines = "\n  ".join(f"{k}: bank {stored.get(k)!r}, job {expected.get(k)!r}" for k in differ)
        raise BankMismatch(f"originals bank {where} was built for another job ({', '.join(differ)} differ):\n  {lines}\n"
                           "rebuild it with `fairness bank` for this config, or unset train.originals_bank")


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
        self.path = path
        self.fingerprint = read_fingerprint(path)
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

    def check(self, expected: dict[str, Any], attributes: Iterable[str] = ()) -> None:
        """Refuse (:class:`BankMismatch`) a bank built for another job, or one that lacks the
        class of an attribute the job targets."""
        check_fingerprint(self.fingerprint, expected, self.path)
        missing = [a for a in attributes if f"class.{a}" not in self.classes]
        if missing:
            have = sorted(c[len("class."):] for c in self.classes)
            raise BankMismatch(f"originals bank {self.path} stores classes of {have}, the job targets {missing} too; "
                               "rebuild it with `fairness bank` for this config")

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
