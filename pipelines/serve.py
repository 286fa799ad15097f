"""Ray Serve: the debiased model behind an OpenAI-compatible Images API.

Routes (FastAPI ingress): ``POST /v1/images/generations``, ``GET /v1/models``, ``GET /healthz``.
Any OpenAI client works with ``base_url=http://HOST:PORT/v1``; ``model`` names an adapter, a peer
(``--baseline``, docs/baselines.md) or ``base``. Every refusal is a 4xx with OpenAI's error body
and the server keeps serving.

Dynamic batching: each request is one item of ``@serve.batch`` whose size counts images
(``batch_size_fn``), so ``max_batch_size`` bounds the images of one sampler call. Within a batch
:meth:`ImageService.run` groups jobs by (model, size, steps) and runs one sampler call per
group (``serve.batch`` itself has no grouping key). The sampler runs in a worker thread so the
replica keeps accepting requests, and the next batch fills, while a batch computes.

Under load, faults and strangers (see ``docs/serving.md``):

* API keys (``--api-key-file``, ``FAIRNESS_API_KEYS``): ``Authorization: Bearer <key>`` or a 401;
  only SHA-256 digests of the keys travel to Ray, and no key is ever logged or echoed. Without
  keys the server binds to loopback only.
* In front of Serve's proxy, :class:`EdgeGuard` refuses a body over ``max_body_bytes`` with a 413
  before reading it, checks keys before a request takes a queue slot, and turns the proxy's
  plain-text refusals into OpenAI's JSON shape: back-pressure (``max_queued_requests`` exceeded)
  is a 503 with ``Retry-After``, a request past ``request_timeout_s`` a 504, a request whose
  replica died a 503 ``replica_unavailable``.
* Request counts and latencies by route, status and model go to Ray's Prometheus metrics.
* Replicas drain in-flight requests before they stop (``graceful_shutdown_timeout_s``), and
  SIGINT/SIGTERM of ``fairness serve`` deletes the application (draining) before shutting Serve down.

Entry points: :func:`app_builder` (``import_path: pipelines.serve:app_builder`` for ``serve run``
and KubeRay RayService), :func:`run_server` (Python) and ``fairness serve`` (:func:`main`).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route methods' annotations
# (``request: Request``) at runtime, and under Serve's class ingress string annotations are not
# resolved, which turns ``request`` into a required query parameter (measured: every POST a 422).
import argparse
import asyncio
import ipaddress
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field, model_validator
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException

from pipelines.image_service import GenerationJob, ImageService, ServiceConfig
from pipelines.openai_images import (  # noqa: F401
    EDGE_ENV,
    KEYS_ENV,
    ApiError,
    EdgeGuard,
    authorized,
    images_response,
    key_digest,
    load_api_keys,
    model_list,
    parse_generation_request,
    proxy_middlewares,
    too_large,
    unauthorized,
)

APP_NAME = "fairness"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- metrics ------------------------------------------------------------------------------------
LATENCY_BUCKETS_S = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


class RequestMetrics:
    """``fairness_requests_total`` and ``fairness_request_latency_s`` by route, status and model,
    through Ray Serve's metrics (Serve adds deployment/replica/application tags inside a replica);
    ``counts`` keeps the same tally in the process (tests read it)."""

    TAGS = ("route", "status", "model")

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.requests = Counter("fairness_requests", description="image server requests", tag_keys=self.TAGS)
        self.latency = Histogram("fairness_request_latency_s", description="image server request latency (s)",
                                 boundaries=LATENCY_BUCKETS_S, tag_keys=self.TAGS)
        self.counts: dict[str, int] = {}

    def observe(self, route: str, status: int, model: str, seconds: float) -> None:
        tags = {"route": route, "status": str(status), "model": model}
        self.requests.inc(1, tags=tags)
        self.latency.observe(seconds, tags=tags)
        key = f"{route} {status} {model}"
        self.counts[key] = self.counts.get(key, 0) + 1


class ServeConfig(ServiceConfig):
    """:class:`ServiceConfig` plus how Ray runs it (replicas, resources, batching)."""

    num_replicas: int = Field(1, ge=1)
    num_cpus_per_replica: float = Field(1, ge=0)
    num_gpus_per_replica: float = Field(0, ge=0)
    max_batch_size: int = Field(8, ge=1, description="most images in one sampler call")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="how long a batch waits to fill")
    max_ongoing_requests: int = Field(16, ge=1, description="requests one replica holds (more wait in the proxy)")
    max_queued_requests: int = Field(32, ge=-1, description="requests waiting for a replica before a 503 "
                                                            "(-1: unbounded)")
    retry_after_s: float = Field(2, ge=0, description="Retry-After of a 503")
    request_timeout_s: float | None = Field(120, gt=0, description="end to end, queue included; then a 504")
    max_body_bytes: int = Field(1 << 20, ge=1, description="larger bodies get a 413 unread")
    api_key_sha256: list[str] = Field(default_factory=list, repr=False,
                                      description="SHA-256 hex digests of the accepted keys (empty: no auth)")
    graceful_shutdown_timeout_s: float = Field(30, ge=0, description="how long a stopping replica drains")
    graceful_shutdown_wait_loop_s: float = Field(1, ge=0)

    @model_validator(mode="after")
    def _fits_a_batch(self) -> "ServeConfig":
        if self.max_queued_requests == 0:
            raise ValueError("max_queued_requests must be -1 (no bound) or at least 1")
        if self.max_n > self.max_batch_size:
            raise ValueError(f"max_n={self.max_n} exceeds max_batch_size={self.max_batch_size}: "
                             "a request must fit one batch")
        return self


api = FastAPI(title="fairness image server", docs_url=None, redoc_url=None)


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown routes and wrong methods in OpenAI's error shape too."""
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(ApiError(exc.status_code, message, code=str(exc.detail).lower().replace(" ", "_")).body(),
                        status_code=exc.status_code)


@api.exception_handler(Exception)
async def _server_error(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(ApiError(500, f"The server failed: {type(exc).__name__}: {exc}", code="server_error",
                                 type="server_error").body(), status_code=500)


def _images_in(jobs: list[GenerationJob]) -> int:
    return sum(job.n for job in jobs)


@serve.deployment
@serve.ingress(api)
class ImageServer:
    """One replica: the pipeline and adapters loaded once, requests checked, images batched."""

    def __init__(self, config: dict[str, Any]) -> None:
        cfg = ServeConfig.model_validate(config)
        self.config = cfg
        self.service = ImageService(cfg)
        self.metrics = RequestMetrics()
        self.generate_batch.set_max_batch_size(cfg.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def _check(self, request: Request) -> None:
        """Keys and body size again here: :class:`EdgeGuard` is absent under ``serve run`` / RayService."""
        if self.config.api_key_sha256 and not authorized(request.headers.get("authorization"),
                                                         self.config.api_key_sha256):
            raise unauthorized()
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.config.max_body_bytes:
            raise too_large(self.config.max_body_bytes)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "models": list(self.service.kinds)}

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict[str, Any]:
        start, status = time.perf_counter(), 200
        try:
            self._check(request)
            return model_list(self.service.models(), self.service.created)
        except ApiError as exc:
            status = exc.status
            raise
        finally:
            self.metrics.observe("/v1/models", status, "-", time.perf_counter() - start)

    @api.post("/v1/images/generations")
    async def generations(self, request: Request) -> dict[str, Any]:
        start, status, model = time.perf_counter(), 500, "-"
        try:
            self._check(request)
            # The body is parsed here, not by FastAPI, so malformed JSON is a 400 in OpenAI's shape.
            job = self.service.prepare(parse_generation_request(await request.body()))
            model = job.model
            response = images_response(await self.generate_batch(job), job.size, job.seed)
            status = 200
            return response
        except ApiError as exc:
            status = exc.status
            raise
        finally:
            self.metrics.observe("/v1/images/generations", status, model, time.perf_counter() - start)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05, batch_size_fn=_images_in)
    async def generate_batch(self, jobs: list[GenerationJob]) -> list[list[str]]:
        return await asyncio.to_thread(self.service.run, jobs)


def build_app(config: ServeConfig) -> Application:
    """The Serve application for ``config`` (nothing is loaded until a replica starts)."""
    return ImageServer.options(
        num_replicas=config.num_replicas,
        ray_actor_options={"num_cpus": config.num_cpus_per_replica, "num_gpus": config.num_gpus_per_replica},
        max_ongoing_requests=config.max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": config.retry_after_s},
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=config.graceful_shutdown_wait_loop_s,
    ).bind(config.model_dump())


def app_builder(args: dict[str, Any]) -> Application:
    """Serve's application-builder hook: ``args`` are :class:`ServeConfig` fields (RayService ``args:``).

    Keys not given as ``api_key_sha256`` are read from ``$FAIRNESS_API_KEYS`` / ``$FAIRNESS_API_KEY_FILE``.
    """
    args = dict(args)
    if not args.get("api_key_sha256"):
        args["api_key_sha256"] = load_api_keys()
    return build_app(ServeConfig.model_validate(args))


def http_options(config: ServeConfig, host: str, port: int) -> dict[str, Any]:
    """Serve's proxy options for ``config`` (the end-to-end timeout)."""
    return {"host": host, "port": port, "request_timeout_s": config.request_timeout_s}


def edge_env(config: ServeConfig) -> dict[str, str]:
    """Environment of Serve's controller, inherited by its proxies, that puts :class:`EdgeGuard` in
    front of them (Ray 2.60 dropped ``http_options.middlewares``; Serve's proxy callback remains).
    Only key digests travel. The guard lives in the light
    :mod:`pipelines.openai_images` (no torch): a proxy must start within its 5 s readiness check."""
    guard = {"key_digests": config.api_key_sha256, "max_body_bytes": config.max_body_bytes,
             "retry_after_s": config.retry_after_s}
    return {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "pipelines.openai_images:proxy_middlewares",
            EDGE_ENV: json.dumps(guard)}


def bind_host(config: ServeConfig, host: str) -> str:
    """``host``, or a ValueError when it is not loopback and no API key is set."""
    if not config.api_key_sha256 and not is_loopback(host):
        raise ValueError(f"refusing to serve on {host} without API keys: give --api-key-file or ${KEYS_ENV}, "
                         "or bind to 127.0.0.1")
    return host


def run_server(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True) -> str:
    """Start Serve on ``host:port`` and deploy; returns the base URL.

    ``blocking``: serve until SIGINT or SIGTERM, then shut Serve down (and Ray, when this call
    started it), so that no replica or Ray daemon outlives the command.
    """
    import ray

    host = bind_host(config, host)
    started = not ray.is_initialized()
    if started:
        # The dashboard costs ~1 GB; an existing cluster (RAY_ADDRESS) keeps its own settings.
        ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"include_dashboard": False}))
    serve.start(http_options=http_options(config, host, port),
                controller_options={"runtime_env": {"env_vars": edge_env(config)}})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    if not blocking:
        return url
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background (SIGINT ignored)
        signal.signal(sig, _interrupt)
    auth = (f"{len(config.api_key_sha256)} API key(s) required" if config.api_key_sha256
            else "no API keys: loopback only")
    print(f"serving {', '.join(['base', *config.adapters, *config.baselines])} at {url}/v1 (OpenAI Images API; {auth}); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping: draining in-flight requests", flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the drain short
            signal.signal(sig, signal.SIG_IGN)
        stop_server()
        if started:
            ray.shutdown()
    return url


def stop_server() -> None:
    """Delete the application first (each replica finishes its in-flight requests, up to
    ``graceful_shutdown_timeout_s``, while the proxy still delivers their responses), then Serve."""
    try:
        serve.delete(APP_NAME)
    except Exception as exc:  # noqa: BLE001 - nothing deployed, or Serve already down: shut down anyway
        print(f"no application to drain ({type(exc).__name__}); shutting Serve down", flush=True)
    finally:
        serve.shutdown()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The ``fairness serve`` flags; :func:`config_from_args` turns them into a :class:`ServeConfig`."""
    p.add_argument("--model", default="toyworld", help="hub id, diffusers folder, or 'toyworld' (default)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve an exported adapter as model NAME (repeatable)")
    p.add_argument("--baseline", action="append", default=[], metavar="NAME=SPEC",
                   help="serve a peer as model NAME: SPEC is a method spec with its target 'law', as JSON text or a "
                        "JSON/YAML file (docs/baselines.md), e.g. fair-diffusion='{\"method\": \"fair-diffusion\", "
                        "...}' (repeatable)")
    p.add_argument("--perception", default=None,
                   help="perception bundle (or 'toyworld') whose classifier names the classes of --baseline specs")
    p.add_argument("--default-model", default=None, help="model for requests naming none (default: first adapter)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--cpus-per-replica", type=float, default=1)
    p.add_argument("--gpus-per-replica", type=float, default=0)
    p.add_argument("--max-batch-size", type=int, default=8, help="most images per sampler call")
    p.add_argument("--batch-wait-s", type=float, default=0.05, help="how long a batch waits to fill")
    p.add_argument("--max-n", type=int, default=4, help="most images per request")
    p.add_argument("--steps", type=int, default=None, help="default sampler steps (default: the model's, else 20)")
    p.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the model's, else 7.5)")
    p.add_argument("--allowed-size", action="append", default=[], metavar="WxH", help="extra size (repeatable)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--api-key-file", default=None,
                   help=f"accepted API keys, one a line (also ${KEYS_ENV}, comma-separated); without keys "
                        "the server binds to loopback only")
    p.add_argument("--max-ongoing-requests", type=int, default=16, help="requests one replica holds")
    p.add_argument("--max-queued-requests", type=int, default=32, help="requests waiting before a 503 (-1: no bound)")
    p.add_argument("--request-timeout-s", type=float, default=120, help="end-to-end limit, then a 504")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger bodies get a 413")
    p.add_argument("--graceful-shutdown-s", type=float, default=30, help="how long stopping replicas drain")


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    adapters = {}
    for item in args.adapter:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--adapter expects NAME=DIR, got {item!r}")
        adapters[name] = folder
    baselines = {}
    for item in args.baseline:
        name, sep, text = item.partition("=")
        if not sep or not name or not text:
            raise ValueError(f"--baseline expects NAME=SPEC, got {item!r}")
        baselines[name] = yaml.safe_load(text if text.lstrip().startswith("{") else Path(text).read_text())
    return ServeConfig(
        model=args.model, adapters=adapters, baselines=baselines, perception=args.perception,
        default_model=args.default_model, num_replicas=args.replicas,
        num_cpus_per_replica=args.cpus_per_replica, num_gpus_per_replica=args.gpus_per_replica,
        max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_s, max_n=args.max_n,
        steps=args.steps, guidance_scale=args.guidance, allowed_sizes=args.allowed_size, dtype=args.dtype,
        device=args.device, api_key_sha256=load_api_keys(args.api_key_file),
        max_ongoing_requests=args.max_ongoing_requests, max_queued_requests=args.max_queued_requests,
        request_timeout_s=args.request_timeout_s, max_body_bytes=args.max_body_bytes,
        graceful_shutdown_timeout_s=args.graceful_shutdown_s,
    )


def serve_from_args(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    try:
        bind_host(config, args.host)
    except ValueError as exc:
        print(f"fairness serve: {exc}", file=sys.stderr)
        return 2
    run_server(config, host=args.host, port=args.port, blocking=True)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "fairness serve") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Serve the debiased model (OpenAI Images API), Ray Serve.")
    add_serve_arguments(parser)
    return serve_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
