"""Cluster definitions: they parse, ask for A100s, pin the image, and name real commands/configs/apps."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from fairness.cli import build_parser
from fairness.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
RAY_IMAGE = f"rayproject/ray:{ray.__version__}-py311-gpu"
MANIFESTS = ["rayjob-debias.yaml", "rayjob-tune.yaml", "rayservice.yaml"]


def _load(name: str) -> dict[str, Any]:
    return yaml.safe_load((CLUSTERS / name).read_text())


def _cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec = manifest["spec"]
    return spec.get("rayClusterSpec") or spec["rayClusterConfig"]


def _containers(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _gpus(cluster: dict[str, Any], replicas_key: str) -> int:
    return sum(int(g[replicas_key]) * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
               for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"])


def _workdir() -> str:
    return re.search(r"^WORKDIR (\S+)", (CLUSTERS / "Dockerfile").read_text(), re.M).group(1)


def test_ray_pin_matches_the_installed_ray():
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split("\n") if "==" in line)
    assert pins["ray"] == ray.__version__
    import torch
    import torchvision

    # torch and torchvision only import as the pinned pair (README "Install notes").
    assert torch.__version__.split("+")[0] == pins["torch"]
    assert torchvision.__version__.split("+")[0] == pins["torchvision"]


def test_launcher_head_and_autoscaling_a100_group():
    cfg = _load("a100-cluster.yaml")
    assert cfg["provider"]["type"] == "aws" and cfg["docker"]["image"] == RAY_IMAGE
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    (a100,) = [t for t in types.values() if t["node_config"]["InstanceType"] == "p4d.24xlarge"]
    assert a100["min_workers"] == 0 and 1 <= a100["max_workers"] <= cfg["max_workers"]
    assert a100["resources"]["GPU"] == 8 and a100["resources"]["accelerator_type:A100"] == 1
    assert types[cfg["head_node_type"]]["resources"]["GPU"] == 0
    assert cfg["file_mounts"] == {_workdir(): "."}  # the checkout the setup commands install
    setup = " ".join(cfg["setup_commands"])
    assert f"-c {_workdir()}/constraints.txt" in setup and f'"{_workdir()}[ray]"' in setup
    assert "torch torchvision" in setup and "--no-deps facenet-pytorch" in setup  # as `make setup`
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--port=6379" in head and "--dashboard-port=8265" in head


def test_dockerfile_pins_the_ray_image_and_installs_the_project():
    text = (CLUSTERS / "Dockerfile").read_text()
    assert f"FROM {RAY_IMAGE}\n" in text
    assert 'pip install --no-cache-dir -c constraints.txt ".[ray]"' in text
    # The three steps of `make setup`: the torch/torchvision pair first, facenet without its pins.
    assert "-c constraints.txt torch torchvision" in text and "--no-deps facenet-pytorch" in text


@pytest.mark.parametrize("name", MANIFESTS)
def test_kuberay_manifests_pin_image_ports_and_a100s(name):
    manifest = _load(f"kuberay/{name}")
    assert manifest["apiVersion"] == "ray.io/v1"
    cluster = _cluster_spec(manifest)
    assert cluster["rayVersion"] == ray.__version__
    images = {c["image"] for c in _containers(cluster)}
    assert len(images) == 1
    (image,) = images
    assert image.endswith(f":0.1.0-ray{ray.__version__}-py311-gpu")  # the Dockerfile's tag, never :latest
    head_ports = {p["containerPort"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]
                  for p in c["ports"]}
    assert {6379, 8265} <= head_ports
    for group in cluster["workerGroupSpecs"]:
        spec = group["template"]["spec"]
        assert spec["nodeSelector"] == {"node.kubernetes.io/instance-type": "p4d.24xlarge"}
        assert all(c["resources"]["limits"]["nvidia.com/gpu"] == "8" for c in spec["containers"])


def test_debias_job_runs_a_real_command_with_a_real_config():
    manifest = _load("kuberay/rayjob-debias.yaml")
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[0] == "fairness"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "debias" and (args.workers, args.gpus_per_worker) == (8, 1)
    load_config(ROOT / args.config)
    assert args.workers * args.gpus_per_worker <= _gpus(_cluster_spec(manifest), "maxReplicas")
    assert yaml.safe_load(manifest["spec"]["runtimeEnvYAML"])["working_dir"] == _workdir()


def test_tune_job_runs_a_real_command_with_valid_settings():
    from pipelines.tune import TuneSettings, apply_overrides

    manifest = _load("kuberay/rayjob-tune.yaml")
    argv = shlex.split(manifest["spec"]["entrypoint"])
    assert argv[:2] == ["fairness", "tune"]  # `fairness tune` parses its own options
    config = argv[argv.index("--config") + 1]
    settings = TuneSettings.model_validate(yaml.safe_load((ROOT / config).read_text()))
    base = load_config(ROOT / settings.base).model_dump(mode="json")
    for key, spec in settings.search.items():  # what run_tune checks before starting Ray
        apply_overrides(base, {key: next(iter(spec.values()))[0]})
    cluster = _cluster_spec(manifest)
    assert settings.gpus_per_trial * settings.max_concurrent <= _gpus(cluster, "maxReplicas")
    assert cluster["workerGroupSpecs"][0]["minReplicas"] == 0 and cluster["enableInTreeAutoscaling"]


def test_rayservice_import_path_builds_the_serve_app():
    import importlib

    from ray.serve import Application

    from pipelines.serve import ServeConfig

    manifest = _load("kuberay/rayservice.yaml")
    serve_config = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    (app,) = serve_config["applications"]
    module, attr = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), attr)
    assert isinstance(builder(app["args"]), Application)
    config = ServeConfig.model_validate(app["args"])
    assert config.default_model in config.adapters
    assert config.num_gpus_per_replica * config.num_replicas <= _gpus(_cluster_spec(manifest), "replicas")
    port = serve_config["http_options"]["port"]
    head = _cluster_spec(manifest)["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert port == 8000 and port in {p["containerPort"] for p in head["ports"]}
    # The proxy binds 0.0.0.0 in the pod: every container must get the API keys (docs/serving.md).
    assert serve_config["http_options"]["host"] == "0.0.0.0"
    cluster = _cluster_spec(manifest)
    containers = [head] + [g["template"]["spec"]["containers"][0] for g in cluster["workerGroupSpecs"]]
    for c in containers:
        (env,) = [e for e in c["env"] if e["name"] == "FAIRNESS_API_KEYS"]
        assert env["valueFrom"]["secretKeyRef"]["name"] == "fairness-api-keys"
