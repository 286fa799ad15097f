"""Ray Train: 2 workers match 1 process; a killed worker is replaced and the run completes."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from fairness.training.loop import Trainer
from pipelines.train import fit_distributed
from tests.helpers import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.timeout(420)]


def _weights(run):
    return load_file(str(run / "adapter" / "pytorch_lora_weights.safetensors"))


def test_two_workers_match_one_process(tmp_path, ray_session):
    cfg = tiny_config(tmp_path, train__iterations=3, train__checkpoint_every=3)
    result = fit_distributed(cfg, tmp_path / "two", workers=2, progress=False)
    assert result.steps == 3
    Trainer(cfg, tmp_path / "one", progress=False).fit()
    a, b = _weights(tmp_path / "two"), _weights(tmp_path / "one")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    logs = [json.loads(x) for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3]


def _kill_rank_when(run, rank, step, killed):
    """Background: SIGKILL the worker of ``rank`` once the log reaches ``step``."""
    log, pidfile = run / "log.jsonl", run / "workers" / f"rank_{rank}.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        if log.exists() and pidfile.exists():
            rows = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
            if rows and rows[-1]["step"] >= step:
                killed["step"] = rows[-1]["step"]
                os.kill(json.loads(pidfile.read_text())["pid"], signal.SIGKILL)
                return
        time.sleep(0.2)


@pytest.mark.slow  # ~75 s on 2 cores: CI runs it with `make test-slow`
def test_killed_worker_is_replaced_and_run_completes(tmp_path, ray_session):
    every = 2
    cfg = tiny_config(tmp_path, train__iterations=6, train__checkpoint_every=every)
    run = tmp_path / "run"
    killed: dict[str, int] = {}
    watcher = threading.Thread(target=_kill_rank_when, args=(run, 1, 3, killed), daemon=True)
    watcher.start()
    result = fit_distributed(cfg, run, workers=2, max_failures=2, progress=False)
    watcher.join(timeout=1)
    assert "step" in killed, "the worker was never killed"
    attempts = [json.loads(x) for x in (run / "attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == 2, attempts  # the first attempt, then one restart
    resumed_from = attempts[1]["step"]
    assert killed["step"] - resumed_from <= every  # lost at most the steps since the last checkpoint
    assert resumed_from % every == 0 and resumed_from >= 2
    assert result.steps == 6
    steps = [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    # Same final adapter as an uninterrupted single-process run: nothing was lost or repeated.
    Trainer(cfg, tmp_path / "ref", progress=False).fit()
    a, b = _weights(run), _weights(tmp_path / "ref")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
