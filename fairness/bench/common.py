"""What every benchmark shares: peak memory, and running one case in a fresh interpreter."""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
from typing import Any

import torch


def peak_memory_mb() -> float:
    """CUDA: ``max_memory_allocated``; CPU: the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_name() -> str:
    if torch.cuda.is_available():
        return "cuda:" + torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def run_case(command: list[str], case: dict[str, Any]) -> dict[str, Any]:
    """Run one case as ``python -m fairness.bench *command --case JSON`` in a fresh interpreter
    (clean peak-memory counters); the case prints its result as the last line of stdout."""
    proc = subprocess.run([sys.executable, "-m", "fairness.bench", *command, "--case", json.dumps(case)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"bench case {case} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
