"""Two Ray nodes on this machine: the 2-worker training runs with one worker on each node.

A head (127.0.0.2) and a second node (127.0.0.3) are started with ``ray start``; a separate
driver process connects to the head and runs :func:`pipelines.train.fit_distributed` with
``STRICT_SPREAD``, so Ray must place the two workers on different nodes. Distinct loopback
addresses make the two nodes distinct the way two machines are (``ray start --address
127.0.0.1`` would be rewritten to the machine's public address). Teardown stops only the
processes of this cluster (those whose command line names its temp dir); ``ray stop`` would
also stop the test session's shared Ray.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fairness.training.loop import Trainer
from tests.helpers import tiny_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"

DRIVER = """
import json, sys
import ray
from fairness.config import load_config
from pipelines.train import fit_distributed

cfg_path, run_dir, address = sys.argv[1:4]
ray.init(address=address, _node_ip_address="%s", log_to_driver=False)
nodes = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
result = fit_distributed(load_config(cfg_path), run_dir, workers=2, cpus_per_worker=1,
                         placement_strategy="STRICT_SPREAD", progress=False)
print(json.dumps({"nodes": nodes, "steps": result.steps}))
""" % HEAD_IP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HEAD_IP, 0))
        return s.getsockname()[1]


def _ray_start(args: list[str], cluster_env: str, temp_dir: str) -> None:
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": cluster_env}
    env.pop("RAY_ADDRESS", None)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.run([ray_bin, "start", "--num-cpus", "1", "--disable-usage-stats", *args],
                          env=env, capture_output=True, text=True, timeout=180)
    if proc.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")


def _stop_cluster(temp_dir: str) -> None:
    """SIGTERM, then SIGKILL, every process whose command line mentions ``temp_dir``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in Path("/proc").iterdir():
            if not pid.name.isdigit() or int(pid.name) == os.getpid():
                continue
            try:
                if temp_dir in (pid / "cmdline").read_bytes().decode(errors="replace"):
                    os.kill(int(pid.name), sig)
            except (OSError, ProcessLookupError):
                pass
        time.sleep(2)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def two_node_cluster():
    temp_dir = tempfile.mkdtemp(prefix="rn", dir="/tmp")  # short: Ray's socket paths are length-limited
    port = _free_port()
    try:
        # The head stays loopback-only; the joining node needs clusters enabled to join at all.
        _ray_start(["--head", "--node-ip-address", HEAD_IP, "--port", str(port), "--temp-dir", temp_dir,
                    "--include-dashboard", "false"], "0", temp_dir)
        _ray_start(["--address", f"{HEAD_IP}:{port}", "--node-ip-address", WORKER_IP], "1", temp_dir)
        yield f"{HEAD_IP}:{port}"
    finally:
        _stop_cluster(temp_dir)


def test_two_worker_training_spans_two_nodes(tmp_path, two_node_cluster):
    cfg = tiny_config(tmp_path, train__iterations=3, train__checkpoint_every=3)
    (tmp_path / "cfg.yaml").write_text(cfg.to_yaml())
    run = tmp_path / "two-nodes"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "cfg.yaml"), str(run), two_node_cluster],
                          env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(out["nodes"].values()) == [HEAD_IP, WORKER_IP]
    assert out["steps"] == 3
    placed = {json.loads((run / "workers" / f"rank_{r}.json").read_text())["node_id"] for r in (0, 1)}
    assert placed == set(out["nodes"]), "the two workers did not run on the two nodes"
    # Spanning machines changes nothing in the result: same adapter as one process.
    Trainer(cfg, tmp_path / "one", progress=False).fit()
    a = load_file(str(run / "adapter" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "one" / "adapter" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
