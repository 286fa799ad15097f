"""fairness.report.curves: two setups' curves against the noise between seeds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fairness.report import curves
from fairness.training.rundir import RunDir


def _run(root, seed: int, shift: float = 0.0, steps: int = 40, val_every: int = 10):
    """A run folder in the trainer's format: a noisy decreasing loss, a validation gap."""
    rng = np.random.default_rng(seed)
    rd = RunDir(root)
    rd.root.mkdir(parents=True, exist_ok=True)
    for s in range(1, steps + 1):
        loss = 2.0 / math.sqrt(s) + shift + 0.05 * rng.standard_normal()
        rd.append(rd.log_path, {"step": s, "loss/total": loss, "loss/align": loss / 2, "skipped": False})
        if s % val_every == 0:
            rd.append(rd.val_path, {"step": s, "val_target_gap": 0.5 - s / 200 + shift + 0.01 * rng.standard_normal()})
    return rd.root


def test_same_setup_is_within_noise_and_a_shifted_one_is_not(tmp_path):
    a = [_run(tmp_path / f"a{s}", s) for s in (0, 1)]
    same = [_run(tmp_path / f"b{s}", 10 + s) for s in (0, 1)]
    shifted = [_run(tmp_path / f"c{s}", 20 + s, shift=1.0) for s in (0, 1)]
    points = curves.compare(*curves.load_groups(a, same, window=10))
    assert {p.key for p in points} == {"loss/total", "loss/align", "val_target_gap"}
    assert [p.step for p in points if p.key == "val_target_gap"] == [10, 20, 30, 40]
    # Two seeds of the same law: most points agree (the spread of 2 draws misses some by chance).
    assert sum(p.within_noise for p in points) >= len(points) // 2
    far = curves.compare(*curves.load_groups(a, shifted, window=10))
    assert not any(p.within_noise for p in far)
    assert all(p.gap == pytest.approx(1.0 if p.key != "loss/align" else 0.5, abs=0.1) for p in far)


def test_windows_leave_out_skipped_and_nonfinite_steps_and_an_unfinished_window():
    rows = [{"step": s, "loss/total": float(s), "skipped": False} for s in range(1, 26)]
    rows[2]["skipped"] = True          # step 3
    rows[3]["loss/total"] = math.nan   # step 4
    out = curves.windowed(rows, "loss/total", 10)
    assert set(out) == {10, 20}  # steps 21-25 are not a whole window
    assert out[10] == pytest.approx(np.mean([1, 2, 5, 6, 7, 8, 9, 10]))
    assert out[20] == pytest.approx(15.5)


def test_one_run_per_group_is_refused(tmp_path):
    a = [_run(tmp_path / "a0", 0)]
    b = [_run(tmp_path / f"b{s}", s) for s in (0, 1)]
    with pytest.raises(ValueError, match="at least 2 per group"):
        curves.load_groups(a, b)


def test_a_folder_without_logs_is_named(tmp_path):
    b = [_run(tmp_path / f"b{s}", s) for s in (0, 1)]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no log rows"):
        curves.load_groups([tmp_path / "empty", b[0]], b)


def test_cli_writes_the_tables_the_points_and_the_plot(tmp_path, capsys):
    a = [str(_run(tmp_path / f"a{s}", s)) for s in (0, 1)]
    b = [str(_run(tmp_path / f"b{s}", 5 + s, shift=0.3)) for s in (0, 1)]
    prefix = tmp_path / "out" / "fast-vs-exact"
    assert curves.main(["--a", "exact", *a, "--b", "fast", *b, "--window", "20", "--out", str(prefix)]) == 0
    printed = capsys.readouterr().out
    assert "| step | exact | fast | gap | seed spread | within noise |" in printed
    assert prefix.with_suffix(".md").read_text() == printed
    data = json.loads(prefix.with_suffix(".json").read_text())
    assert data["window"] == 20 and data["a"]["runs"] == a
    assert {(p["key"], p["step"]) for p in data["points"]} >= {("loss/total", 20), ("loss/total", 40), ("val_target_gap", 40)}
    assert prefix.with_suffix(".png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        curves.main(["--a", "exact", a[0], "--b", "fast", *b])
