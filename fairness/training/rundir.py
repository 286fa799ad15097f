"""The run directory: resolved config, step log, checkpoints, best adapter, metrics.

Layout::

    RUN/config.yaml                 resolved, validated config (diffable)
    RUN/log.jsonl                   one row per iteration (every loss term, skips)
    RUN/val.jsonl                   one row per validation
    RUN/checkpoints/step_000200/    state.pt (adapter, optimizer, EMA, counters)
    RUN/best/                       exported adapter of the best validation checkpoint
    RUN/adapter/                    exported final adapter (EMA weights when enabled)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.root / "checkpoints"

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def log_path(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def val_path(self) -> Path:
        return self.root / "val.jsonl"

    def append(self, path: Path, row: dict[str, Any]) -> None:
        with path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")

    def read_rows(self, path: Path) -> list[dict[str, Any]]:
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def truncate_logs(self, last_step: int) -> None:
        """Drop rows after ``last_step`` (a resumed run rewrites them identically)."""
        for path in (self.log_path, self.val_path):
            rows = [r for r in self.read_rows(path) if r["step"] <= last_step]
            path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}"

    def save_checkpoint(self, step: int, state: dict[str, Any]) -> Path:
        """Write atomically (temp folder, then rename) so a crash never leaves half a checkpoint."""
        final = self.checkpoint_dir(step)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(state, tmp / "state.pt")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoints.exists():
            return None
        done = sorted(p for p in self.checkpoints.glob("step_*") if not p.name.endswith(".tmp") and (p / "state.pt").exists())
        return done[-1] if done else None

    @staticmethod
    def load_checkpoint(path: Path) -> dict[str, Any]:
        return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
