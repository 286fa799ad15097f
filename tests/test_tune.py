"""Ray Tune over the loss weights, C and lr (tiny budget)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fairness.config import load_config
from pipelines.tune import TuneSettings, apply_overrides, run_tune
from tests.helpers import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]


def test_best_config_diffs_against_the_base_only_where_the_search_changed_it():
    base = load_config(Path(__file__).parent.parent / "pipelines" / "configs" / "toyworld" / "main.yaml")
    tuned = apply_overrides(base.model_dump(mode="json"), {"train.lr": 1e-3, "loss.img.lambda1": 4.0})
    changed = [(a, b) for a, b in zip(base.to_yaml().splitlines(), tuned.to_yaml().splitlines()) if a != b]
    assert [b.strip() for _, b in changed] == ["lambda1: 4.0", "lr: 0.001"]


def test_tune_writes_results_and_a_loadable_best_config(tmp_path, ray_session):
    tiny = tiny_config(tmp_path)
    base = tmp_path / "base.yaml"
    base.write_text(tiny.to_yaml())
    settings = TuneSettings(base=str(base), num_samples=3, max_concurrent=2, iterations=2, checkpoint_every=1,
                            search={"train.lr": {"loguniform": [1e-4, 1e-2]}, "loss.img.lambda1": {"uniform": [1, 10]},
                                    "loss.confidence_threshold": {"uniform": [0.5, 0.9]}})
    out = run_tune(settings, tmp_path / "tune")
    rows = list(csv.DictReader(open(out["results"])))
    assert len(rows) == 4 and {"objective", "train.lr", "loss.img.lambda1"} <= set(rows[0])
    # the base config's own values ran as a trial, beside the three sampled ones
    base_rows = [r for r in rows if r["trial"] == "base"]
    assert len(base_rows) == 1 and [r["trial"] for r in rows].count("sampled") == 3
    assert float(base_rows[0]["train.lr"]) == tiny.train.lr
    assert float(base_rows[0]["loss.confidence_threshold"]) == tiny.loss.confidence_threshold
    full = [r for r in rows if int(r["steps_run"]) == 2]  # the whole budget (iterations=2)
    assert full and rows[: len(full)] == full  # trials ASHA stopped early rank after them
    for r in rows:  # each trial's objective is its best checkpoint's, as its job would export
        history = [json.loads(line) for line in
                   open(next((tmp_path / "tune" / "ray").glob(f"*/*{r['trial_id']}*/result.json")))]
        assert float(r["objective"]) == pytest.approx(min(h["objective"] for h in history))
    assert float(rows[0]["objective"]) == min(float(r["objective"]) for r in full)
    best = load_config(out["best_config"])
    assert best.train.lr == pytest.approx(float(rows[0]["train.lr"]))
    assert best.train.iterations == tiny.train.iterations  # the base budget, not the trial's

    # the same run directory again resumes the finished search: nothing reruns, same summary
    trial_dirs = sorted((tmp_path / "tune" / "ray").glob("*/_trial*"))
    again = run_tune(settings, tmp_path / "tune")
    assert sorted((tmp_path / "tune" / "ray").glob("*/_trial*")) == trial_dirs
    assert list(csv.DictReader(open(again["results"]))) == rows


def test_unknown_search_key_fails_before_ray_starts(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(tiny_config(tmp_path).to_yaml())
    settings = TuneSettings(base=str(base), search={"loss.lamda": {"uniform": [0, 1]}})
    with pytest.raises(Exception, match="lamda"):
        run_tune(settings, tmp_path / "tune")


@pytest.mark.slow  # ~80 s on 2 cores: CI runs it with `make test-slow`
def test_an_interrupted_search_resumes_where_it_stopped(tmp_path, ray_session):
    """A search killed mid-way goes on from the run directory: no trial reruns from scratch."""
    base = tmp_path / "base.yaml"
    base.write_text(tiny_config(tmp_path).to_yaml())
    settings = {"base": str(base), "num_samples": 2, "max_concurrent": 1, "iterations": 4, "checkpoint_every": 1,
                "grace_period": 4, "search": {"train.lr": {"loguniform": [1e-4, 1e-2]}}}
    run_dir = tmp_path / "tune"
    script = tmp_path / "search.py"
    script.write_text(
        "import sys, ray\n"
        f"sys.path.insert(0, {str(Path(__file__).parent.parent)!r})\n"
        "from pipelines.tune import TuneSettings, run_tune\n"
        "ray.init(address='local', num_cpus=1, include_dashboard=False, log_to_driver=False)\n"
        f"run_tune(TuneSettings.model_validate({settings!r}), {str(run_dir)!r})\n")

    def reports() -> int:
        return sum(len(p.read_text().splitlines()) for p in run_dir.glob("ray/*/_trial*/result.json"))

    proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while reports() < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray processes it started
    proc.wait()
    assert 2 <= reports() < 3 * 4 and not (run_dir / "results.csv").exists()  # stopped part-way

    out = run_tune(TuneSettings.model_validate(settings), run_dir)
    rows = list(csv.DictReader(open(out["results"])))
    assert len(rows) == 3 and {int(r["steps_run"]) for r in rows} == {4}
    for log in run_dir.glob("ray/*/_trial*/run/log.jsonl"):  # each step trained once: resumed, not restarted
        assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3, 4]
