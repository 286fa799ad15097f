"""``python -m fairness.bench dft`` end to end on a tiny model: every mode's JSON fields, and the
gradients the bench compares (official flow and batched modes against the exact adjusted one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fairness.bench import dft

MODES = ["official", "exact", "exact_batched", "exact_batched_bank", "fast_k1"]
ARGS = ["--batch", "2", "--steps", "2", "--repeats", "1", "--grad-steps", "1"]


def check(result: dict) -> None:
    modes = result["modes"]
    assert set(MODES) <= set(modes)
    for m in modes.values():
        assert m["seconds_per_training_image"] > 0 and m["peak_memory_mb"] > 0
        assert -1 <= m["cosine_vs_exact"] <= 1 + 1e-9
        assert m["speedup_vs_official"] > 0
    assert modes["exact"]["cosine_vs_exact"] == pytest.approx(1.0)
    # The official flow (targets from a separate no-grad pass, micro-batches) and the batched
    # modes compute the same adjusted gradient; the subsampled one only estimates it.
    for name in ("official", "exact_batched", "exact_batched_bank"):
        assert modes[name]["cosine_vs_exact"] > 0.999, name
    assert modes["fast_k1"]["draws"] == 2 and "cosine_min_over_draws" in modes["fast_k1"]
    assert result["fastest_meeting_cosine"] in modes
    gen = result["generation"]
    assert gen["ours"]["images_per_second"] > 0 and gen["diffusers_pipeline"]["images_per_second"] > 0


def test_bench_dft_in_process(tmp_path):
    out = tmp_path / "dft.json"
    assert dft.main([*ARGS, "--levers", "", "--in-process", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    check(json.loads(out.read_text()))


@pytest.mark.slow
def test_bench_dft_cli(tmp_path):
    """The real command: each mode in its own interpreter, with the levers."""
    out = tmp_path / "dft.json"
    subprocess.run([sys.executable, "-m", "fairness.bench", "dft", *ARGS, "--work", str(tmp_path / "work"), "--out", str(out)],
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    check(json.loads(out.read_text()))
