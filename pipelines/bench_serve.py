"""Load test of the image server: concurrent requests -> latency percentiles and images/s as JSON.

    python -m pipelines.bench_serve --out bench/serve.json              # starts a tiny demo server
    python -m pipelines.bench_serve --url http://127.0.0.1:8000 --out bench/serve.json

Without ``--url`` it saves a tiny random-weight SD pipeline and a LoRA adapter to a temporary
folder, serves them on a free loopback port, fires the requests and shuts Serve down. Every
request gets its own seed, so the server cannot answer from a cache. Latency is per request,
client-side (HTTP round trip); images/s is all images over the wall time of the whole burst.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import requests
import torch

from fairness.adapters import AdapterSpec, attach_adapter, export_adapter
from fairness.models.tiny import build_tiny_pipeline

DEMO_PROMPT = "a photo of the face of the doctor"


def build_demo_assets(root: str | Path) -> tuple[Path, dict[str, Path]]:
    """A tiny SD pipeline under ``root/sd`` and adapters exported from it (``fair-lora``: text-encoder
    LoRA; ``fair-tokens``: two soft tokens), both perturbed at random so that they change the images."""
    root = Path(root)
    model = root / "sd"
    build_tiny_pipeline(seed=0, tokenizer_dir=root / "tokenizer").save_pretrained(model)
    adapters = {}
    for name, spec in (("fair-lora", AdapterSpec(kind="text_lora", rank=4)),
                       ("fair-tokens", AdapterSpec(kind="soft_tokens", num_tokens=2))):
        adapter = attach_adapter(build_tiny_pipeline(seed=0, tokenizer_dir=root / "tokenizer"), spec)
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for param in adapter.parameters():
                param.add_(torch.randn(param.shape, generator=gen) * 0.3)
        adapters[name] = export_adapter(adapter, root / name)
    return model, adapters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_test(base_url: str, *, requests_total: int = 50, concurrency: int = 50, n: int = 1,
              model: str | None = None, steps: int | None = None, prompt: str = DEMO_PROMPT,
              timeout_s: float = 600) -> dict[str, Any]:
    """Send ``requests_total`` generations, ``concurrency`` at a time; count errors, time each."""
    url = base_url.rstrip("/") + "/v1/images/generations"

    def one(i: int) -> tuple[float, int, int]:
        body: dict[str, Any] = {"prompt": prompt, "n": n, "seed": i, "response_format": "b64_json"}
        body.update({k: v for k, v in (("model", model), ("steps", steps)) if v is not None})
        start = time.perf_counter()
        try:
            resp = requests.post(url, json=body, timeout=timeout_s)
            images = len(resp.json().get("data", [])) if resp.ok else 0
            status = resp.status_code
        except requests.RequestException:
            status, images = 0, 0
        return time.perf_counter() - start, status, images

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(requests_total)))
    wall = time.perf_counter() - start
    latencies = np.array([r[0] for r in results])
    statuses: dict[str, int] = {}
    for _, status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    images = sum(r[2] for r in results)
    return {
        "requests": requests_total, "concurrency": concurrency, "n": n, "model": model, "steps": steps,
        "errors": sum(1 for r in results if r[1] != 200), "status_counts": statuses, "images": images,
        "wall_s": round(wall, 3), "images_per_s": round(images / wall, 3),
        "latency_s": {"p50": round(float(np.percentile(latencies, 50)), 3),
                      "p95": round(float(np.percentile(latencies, 95)), 3),
                      "mean": round(float(latencies.mean()), 3), "max": round(float(latencies.max()), 3)},
    }


def write_results(results: dict[str, Any], out: str | Path) -> Path:
    """``results`` plus where they were measured, as JSON."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**results, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                       "torch": torch.__version__}}
    path.write_text(json.dumps(record, indent=2))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.bench_serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running server (default: start a tiny demo server)")
    parser.add_argument("--out", default="bench/serve.json")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("-n", type=int, default=1, help="images per request")
    parser.add_argument("--model", default=None, help="model to request (default: the server's default)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps per request (demo server: 4)")
    parser.add_argument("--max-batch-size", type=int, default=8, help="demo server's images per sampler call")
    args = parser.parse_args(argv)
    settings = {"requests_total": args.requests, "concurrency": args.concurrency, "n": args.n, "model": args.model,
                "steps": args.steps}
    if args.url:
        results = load_test(args.url, **settings)
    else:
        results = _bench_demo_server(args.max_batch_size, settings)
    path = write_results(results, args.out)
    print(json.dumps({k: results[k] for k in ("errors", "images_per_s", "latency_s")}), f"-> {path}")
    return 0 if results["errors"] == 0 else 1


def _bench_demo_server(max_batch_size: int, settings: dict[str, Any]) -> dict[str, Any]:
    # A throwaway local cluster: Ray's own ports on loopback too, no usage report, no auth token
    # file (read when Ray is imported, so set first; an explicit environment wins).
    for key, value in (("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("RAY_USAGE_STATS_ENABLED", "0"),
                       ("RAY_AUTH_MODE", "disabled")):
        os.environ.setdefault(key, value)
    from ray import serve

    from pipelines.serve import ServeConfig, run_server

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model, adapters = build_demo_assets(tmp)
        config = ServeConfig(model=str(model), adapters={k: str(v) for k, v in adapters.items()}, steps=4,
                             max_batch_size=max_batch_size, max_n=min(4, max_batch_size))
        try:
            url = run_server(config, port=free_port(), blocking=False)
            results = load_test(url, **settings)
        finally:
            serve.shutdown()
    return {**results, "server": {"demo": True, "max_batch_size": max_batch_size, "default_steps": config.steps,
                                  "size": "32x32", "replicas": config.num_replicas}}


if __name__ == "__main__":
    raise SystemExit(main())
