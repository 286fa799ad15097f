"""Load test of the image server: concurrent requests -> latency percentiles and images/s as JSON.

    python -m pipelines.bench_serve --out bench/serve.json              # starts a tiny demo server
    python -m pipelines.bench_serve --url http://127.0.0.1:8000 --out bench/serve.json
    python -m pipelines.bench_serve --soak --soak-seconds 120 --out bench/results/serve-soak.json

Without ``--url`` it saves a tiny random-weight SD pipeline and a LoRA adapter to a temporary
folder, serves them on a free loopback port, fires the requests and shuts Serve down. Every
request gets its own seed, so the server cannot answer from a cache. Latency is per request,
client-side (HTTP round trip); images/s is all images over the wall time of the whole burst.

``--soak`` (demo server only, loopback): workers offer more requests than the bounded queue
takes, for ``--soak-seconds`` or ``--soak-requests``, whichever ends first; a third of the way in
one replica is killed with ``ray.kill``. It passes when every request is answered 200 or 503
(back-pressure) within its timeout, no other 5xx, and the deployment is back to its replica
count; the JSON counts statuses, requests lost (no answer) and the recovery time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
              timeout_s: float = 600, api_key: str | None = None) -> dict[str, Any]:
    """Send ``requests_total`` generations, ``concurrency`` at a time; count errors, time each."""
    url = base_url.rstrip("/") + "/v1/images/generations"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def one(i: int) -> tuple[float, int, int]:
        body: dict[str, Any] = {"prompt": prompt, "n": n, "seed": i, "response_format": "b64_json"}
        body.update({k: v for k, v in (("model", model), ("steps", steps)) if v is not None})
        start = time.perf_counter()
        try:
            resp = requests.post(url, json=body, headers=headers, timeout=timeout_s)
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


def _percentiles(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    arr = np.array(values)
    return {"p50": round(float(np.percentile(arr, 50)), 3), "p95": round(float(np.percentile(arr, 95)), 3),
            "max": round(float(arr.max()), 3)}


def replica_names(app: str = "fairness") -> list[str]:
    """Named Serve replica actors of application ``app`` (``SERVE_REPLICA::app#deployment#id``)."""
    import ray

    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["name"].startswith(f"SERVE_REPLICA::{app}#"))


def kill_one_replica(app: str = "fairness") -> str:
    """``ray.kill`` one replica of ``app`` (Serve's controller must replace it); returns its name."""
    import ray

    name = replica_names(app)[0]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name


def running_replicas(app: str = "fairness") -> int:
    from ray import serve

    status = serve.status().applications.get(app)
    if status is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in status.deployments.values())


def soak(base_url: str, *, seconds: float = 120, max_requests: int = 20000, concurrency: int = 32, n: int = 1,
         steps: int | None = None, timeout_s: float = 90, kill_at_s: float | None = None, replicas: int = 1,
         recover_within_s: float = 120, api_key: str | None = None) -> dict[str, Any]:
    """Offer ``concurrency`` closed-loop clients that ignore ``Retry-After`` (more than the server
    takes) for ``seconds`` or ``max_requests``; kill one replica at ``kill_at_s``; see the module doc."""
    url = base_url.rstrip("/") + "/v1/images/generations"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    lock = threading.Lock()
    issued = [0]
    # status (0: no answer), seconds, error code, Retry-After present, answered at (s since start)
    records: list[tuple[int, float, str | None, bool, float]] = []
    start = time.perf_counter()
    stop_at = start + seconds

    def worker() -> None:
        with requests.Session() as session:
            while time.perf_counter() < stop_at:
                with lock:
                    if issued[0] >= max_requests:
                        return
                    issued[0] += 1
                    i = issued[0]
                body: dict[str, Any] = {"prompt": DEMO_PROMPT, "n": n, "seed": i}
                if steps is not None:
                    body["steps"] = steps
                t0 = time.perf_counter()
                try:
                    resp = session.post(url, json=body, headers=headers, timeout=timeout_s)
                    status = resp.status_code
                    try:
                        code = resp.json().get("error", {}).get("code") if status != 200 else None
                    except ValueError:
                        code = "not_json"
                    record = (status, time.perf_counter() - t0, code, "retry-after" in resp.headers,
                              time.perf_counter() - start)
                except requests.RequestException:
                    record = (0, time.perf_counter() - t0, "no_answer", False, time.perf_counter() - start)
                with lock:
                    records.append(record)
                if record[0] != 200:
                    time.sleep(0.05)  # not Retry-After: keep offering more than the server takes

    killed, kill_time, before = None, None, set()
    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    if kill_at_s is not None:
        time.sleep(max(0.0, start + kill_at_s - time.perf_counter()))
        before = set(replica_names())
        killed, kill_time = kill_one_replica(), time.perf_counter() - start
    recovered_at = None

    def recovered() -> bool:  # a replacement replica exists and the deployment is back to full strength
        return bool(set(replica_names()) - before) and running_replicas() >= replicas

    while any(t.is_alive() for t in threads) or (killed and recovered_at is None):
        if killed and recovered_at is None and recovered():
            recovered_at = time.perf_counter() - start
        if killed and recovered_at is None and time.perf_counter() - start > kill_time + recover_within_s:
            break
        time.sleep(0.5)
    for thread in threads:
        thread.join(timeout_s)
    wall = time.perf_counter() - start
    after = requests.post(url, json={"prompt": DEMO_PROMPT, "n": 1, "seed": 0}, headers=headers, timeout=timeout_s)
    statuses: dict[str, int] = {}
    codes: dict[str, int] = {}
    for status, _, code, _, _ in records:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
        if code:
            codes[code] = codes.get(code, 0) + 1
    lost = statuses.get("0", 0)
    other_5xx = sum(c for s, c in statuses.items() if s.startswith("5") and s != "503")
    other_4xx = sum(c for s, c in statuses.items() if s.startswith("4"))
    refused = [r for r in records if r[0] == 503]
    late = sum(1 for r in records if r[1] > timeout_s)
    ok = (lost == 0 and other_5xx == 0 and other_4xx == 0 and late == 0 and statuses.get("200", 0) > 0
          and all(r[3] for r in refused) and after.status_code == 200 and (killed is None or recovered_at is not None))
    return {
        "soak": True, "ok": ok, "requests": len(records), "wall_s": round(wall, 3), "concurrency": concurrency,
        "n": n, "steps": steps, "client_timeout_s": timeout_s, "status_counts": statuses, "error_codes": codes,
        "lost": lost, "dropped_by_replica_kill": codes.get("replica_unavailable", 0), "other_5xx": other_5xx, "other_4xx": other_4xx, "past_timeout": late,
        "retry_after_on_every_503": all(r[3] for r in refused),
        "served_per_s": round(statuses.get("200", 0) / wall, 3),
        "latency_s": {"200": _percentiles([r[1] for r in records if r[0] == 200]),
                      "503": _percentiles([r[1] for r in refused])},
        "replica_kill": None if killed is None else {
            "replica": killed, "at_s": round(kill_time, 3),
            "recovered_at_s": None if recovered_at is None else round(recovered_at, 3),
            "recovery_s": None if recovered_at is None else round(recovered_at - kill_time, 3),
            "served_while_down": sum(1 for r in records if r[0] == 200 and kill_time < r[4] < (recovered_at or wall)),
            "served_after_recovery": sum(1 for r in records if r[0] == 200 and recovered_at and r[4] > recovered_at),
            "replicas": replicas},
        "after_soak_status": after.status_code,
    }


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
    parser.add_argument("--api-key", default=os.environ.get("FAIRNESS_API_KEY"),
                        help="key for --url servers that require one (default: $FAIRNESS_API_KEY)")
    soak_group = parser.add_argument_group("soak (demo server, loopback only)")
    soak_group.add_argument("--soak", action="store_true", help="overload the demo server and kill a replica")
    soak_group.add_argument("--soak-seconds", type=float, default=120)
    soak_group.add_argument("--soak-requests", type=int, default=20000, help="cap on requests sent")
    soak_group.add_argument("--soak-concurrency", type=int, default=32, help="closed-loop clients")
    soak_group.add_argument("--soak-replicas", type=int, default=2)
    soak_group.add_argument("--soak-max-ongoing", type=int, default=4, help="demo server's max_ongoing_requests")
    soak_group.add_argument("--soak-max-queued", type=int, default=8, help="demo server's max_queued_requests")
    soak_group.add_argument("--soak-timeout-s", type=float, default=90, help="client timeout per request")
    soak_group.add_argument("--no-kill", action="store_true", help="do not kill a replica")
    args = parser.parse_args(argv)
    if args.soak:
        if args.url:
            parser.error("--soak starts its own loopback demo server; drop --url")
        results = _soak_demo_server(args)
        results["command"] = " ".join(["python -m pipelines.bench_serve", *(sys.argv[1:] if argv is None else argv)])
        path = write_results(results, args.out)
        print(json.dumps({k: results[k] for k in ("ok", "requests", "status_counts", "lost", "other_5xx",
                                                  "replica_kill")}), f"-> {path}")
        return 0 if results["ok"] else 1
    settings = {"requests_total": args.requests, "concurrency": args.concurrency, "n": args.n, "model": args.model,
                "steps": args.steps}
    if args.url:
        results = load_test(args.url, api_key=args.api_key, **settings)
    else:
        with demo_server(max_batch_size=args.max_batch_size, max_n=min(4, args.max_batch_size)) as (url, config):
            results = load_test(url, **settings)
        results["server"] = {"demo": True, "max_batch_size": args.max_batch_size, "default_steps": config.steps,
                             "size": "32x32", "replicas": config.num_replicas}
    path = write_results(results, args.out)
    print(json.dumps({k: results[k] for k in ("errors", "images_per_s", "latency_s")}), f"-> {path}")
    return 0 if results["errors"] == 0 else 1


@contextlib.contextmanager
def demo_server(**overrides: Any) -> Iterator[tuple[str, Any]]:
    """A tiny demo server on a free loopback port (``overrides``: :class:`ServeConfig` fields);
    yields ``(url, config)`` and shuts Serve down (and Ray, when it started it)."""
    # A throwaway local cluster: Ray's own ports on loopback too, no usage report, no auth token
    # file (read when Ray is imported, so set first; an explicit environment wins).
    for key, value in (("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"), ("RAY_USAGE_STATS_ENABLED", "0"),
                       ("RAY_AUTH_MODE", "disabled")):
        os.environ.setdefault(key, value)
    import ray
    from ray import serve

    from pipelines.serve import ServeConfig, run_server

    started = not ray.is_initialized()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        model, adapters = build_demo_assets(tmp)
        config = ServeConfig(model=str(model), adapters={k: str(v) for k, v in adapters.items()},
                             **{"steps": 4, **overrides})
        try:
            yield run_server(config, port=free_port(), blocking=False), config
        finally:
            serve.shutdown()
            if started:
                ray.shutdown()


def _soak_demo_server(args: argparse.Namespace) -> dict[str, Any]:
    server = {"replicas": args.soak_replicas, "max_ongoing_requests": args.soak_max_ongoing,
              "max_queued_requests": args.soak_max_queued, "request_timeout_s": args.soak_timeout_s - 10,
              "num_cpus_per_replica": 2 / (args.soak_replicas + 1)}
    with demo_server(num_replicas=server["replicas"], max_ongoing_requests=server["max_ongoing_requests"],
                     max_queued_requests=server["max_queued_requests"], request_timeout_s=server["request_timeout_s"],
                     num_cpus_per_replica=server["num_cpus_per_replica"], retry_after_s=1) as (url, config):
        results = soak(url, seconds=args.soak_seconds, max_requests=args.soak_requests,
                       concurrency=args.soak_concurrency, n=args.n, steps=args.steps, timeout_s=args.soak_timeout_s,
                       kill_at_s=None if args.no_kill else args.soak_seconds / 3, replicas=args.soak_replicas)
    return {**results, "server": {"demo": True, "default_steps": config.steps, "size": "32x32", **server}}


if __name__ == "__main__":
    raise SystemExit(main())
