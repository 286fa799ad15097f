"""The run directory: resolved config, step log, checkpoints, best adapter, metrics.

Layout::

    RUN/config.yaml                 resolved, validated config (diffable)
    RUN/log.jsonl                   one row per iteration (every loss term, skips)
    RUN/val.jsonl                   one row per validation
    RUN/checkpoints/step_000200/    state.pt (adapter, optimizer, EMA, counters) and
                                    manifest.json (its SHA-256 and size, written after it)
    RUN/best/                       exported adapter of the best validation checkpoint
    RUN/adapter/                    exported final adapter (EMA weights when enabled)

Checkpoints survive the faults a long job meets:

* a kill (SIGKILL, OOM, preemption) mid-write leaves only a ``.tmp`` folder, never read;
* a checkpoint whose ``state.pt`` does not match its manifest (truncated, corrupt) or cannot be
  read is skipped with a warning naming it, and the one before it is used;
* a failed write (disk full) removes the partial folder, leaves every earlier checkpoint intact
  and raises :class:`CheckpointError`: the job stops (``fairness debias`` exits 2) rather than
  train on without a way back.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from fairness.checksums import file_sha256

STATE = "state.pt"
CHECKPOINT_MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (the earlier ones are intact)."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        """The rows of a JSONL log. A last line cut short (the process was killed while writing
        it) is dropped; a bad line anywhere else raises."""
        if not path.exists():
            return []
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        rows = [json.loads(line) for line in lines[:-1]]
        if lines:
            try:
                rows.append(json.loads(lines[-1]))
            except ValueError:
                warnings.warn(f"{path}: dropping a last row cut short ({lines[-1][:60]!r})", RuntimeWarning, stacklevel=2)
        return rows

    def truncate_logs(self, last_step: int) -> None:
        """Drop rows after ``last_step`` (a resumed run rewrites them identically)."""
        for path in (self.log_path, self.val_path):
            rows = [r for r in self.read_rows(path) if r["step"] <= last_step]
            path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints / f"step_{step:06d}"

    def save_checkpoint(self, step: int, state: dict[str, Any]) -> Path:
        """Write atomically: ``state.pt`` then its manifest (SHA-256, size) into a temp folder,
        flushed to disk, then renamed, so a crash never leaves half a checkpoint. A failed
        write (e.g. disk full) removes the temp folder and raises :class:`CheckpointError`;
        earlier checkpoints are never touched."""
        final = self.checkpoint_dir(step)
        tmp = final.with_name(final.name + ".tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            torch.save(state, tmp / STATE)
            _fsync(tmp / STATE)
            manifest = {"step": step, "file": STATE, "bytes": (tmp / STATE).stat().st_size,
                        "sha256": file_sha256(tmp / STATE)}
            (tmp / CHECKPOINT_MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            _fsync(tmp / CHECKPOINT_MANIFEST)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as either
            shutil.rmtree(tmp, ignore_errors=True)
            previous = self.latest_checkpoint()
            kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
            raise CheckpointError(f"could not write the checkpoint of step {step} to {final}: {exc}; {kept}. "
                                  "Free disk space and rerun the same command to resume.") from exc
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return final

    def checkpoint_dirs(self) -> list[Path]:
        """Completed checkpoint folders (``state.pt`` present), newest first, unverified."""
        if not self.checkpoints.exists():
            return []
        done = [p for p in self.checkpoints.glob("step_*") if not p.name.endswith(".tmp") and (p / STATE).exists()]
        return sorted(done, reverse=True)

    @staticmethod
    def verify_checkpoint(path: Path) -> str | None:
        """Why ``path`` cannot be trusted, or None when its ``state.pt`` matches its manifest.
        A checkpoint without a manifest (written before they existed) is not checked here."""
        manifest_path = Path(path) / CHECKPOINT_MANIFEST
        if not manifest_path.exists():
            return None
        try:
            manifest = json.loads(manifest_path.read_text())
            size, digest = manifest["bytes"], manifest["sha256"]
        except (ValueError, KeyError, TypeError) as exc:
            return f"unreadable {CHECKPOINT_MANIFEST} ({exc})"
        state = Path(path) / STATE
        actual = state.stat().st_size
        if actual != size:
            return f"{STATE} has {actual} bytes, its manifest says {size} (truncated?)"
        if file_sha256(state) != digest:
            return f"{STATE} does not match the SHA-256 in its manifest (corrupt)"
        return None

    def usable_checkpoints(self) -> Iterator[tuple[Path, dict[str, Any]]]:
        """(folder, state) of the checkpoints that verify and load, newest first; each one
        skipped is named in a warning."""
        for path in self.checkpoint_dirs():
            problem = self.verify_checkpoint(path)
            if problem is None:
                try:
                    yield path, self.load_checkpoint(path)
                    continue
                except Exception as exc:  # noqa: BLE001 - any unreadable pickle is "corrupt"
                    problem = f"cannot be read ({type(exc).__name__}: {exc})"
            warnings.warn(f"skipping checkpoint {path}: {problem}; falling back to the one before it",
                          RuntimeWarning, stacklevel=2)

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint whose ``state.pt`` matches its manifest (warns on each skipped)."""
        for path in self.checkpoint_dirs():
            problem = self.verify_checkpoint(path)
            if problem is None:
                return path
            warnings.warn(f"skipping checkpoint {path}: {problem}; falling back to the one before it",
                          RuntimeWarning, stacklevel=2)
        return None

    @staticmethod
    def load_checkpoint(path: Path) -> dict[str, Any]:
        return torch.load(Path(path) / STATE, map_location="cpu", weights_only=False)
