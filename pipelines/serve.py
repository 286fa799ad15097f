"""Ray Serve: the debiased model behind an OpenAI-compatible Images API.

Routes (FastAPI ingress): ``POST /v1/images/generations``, ``GET /v1/models``, ``GET /healthz``.
Any OpenAI client works with ``base_url=http://HOST:PORT/v1``; ``model`` names an adapter or
``base``. Every refusal is a 4xx with OpenAI's error body and the server keeps serving.

Dynamic batching: each request is one item of ``@serve.batch`` whose size counts images
(``batch_size_fn``), so ``max_batch_size`` bounds the images of one sampler call. Within a batch
:meth:`ImageService.run` groups jobs by (model, size, steps) and runs one sampler call per
group (``serve.batch`` itself has no grouping key). The sampler runs in a worker thread so the
replica keeps accepting requests, and the next batch fills, while a batch computes.

Entry points: :func:`app_builder` (``import_path: pipelines.serve:app_builder`` for ``serve run``
and KubeRay RayService), :func:`run_server` (Python) and ``fairness serve`` (:func:`main`).
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route methods' annotations
# (``request: Request``) at runtime, and under Serve's class ingress string annotations are not
# resolved, which turns ``request`` into a required query parameter (measured: every POST a 422).
import argparse
import asyncio
import os
import signal
import time
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field, model_validator
from ray import serve
from ray.serve import Application
from starlette.exceptions import HTTPException

from pipelines.image_service import GenerationJob, ImageService, ServiceConfig
from pipelines.openai_images import ApiError, images_response, model_list, parse_generation_request

APP_NAME = "fairness"


class ServeConfig(ServiceConfig):
    """:class:`ServiceConfig` plus how Ray runs it (replicas, resources, batching)."""

    num_replicas: int = Field(1, ge=1)
    num_cpus_per_replica: float = Field(1, ge=0)
    num_gpus_per_replica: float = Field(0, ge=0)
    max_batch_size: int = Field(8, ge=1, description="most images in one sampler call")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="how long a batch waits to fill")
    max_ongoing_requests: int = Field(64, ge=1, description="requests one replica holds (more wait in the proxy)")

    @model_validator(mode="after")
    def _fits_a_batch(self) -> "ServeConfig":
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
        self.service = ImageService(cfg)
        self.generate_batch.set_max_batch_size(cfg.max_batch_size)
        self.generate_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "models": list(self.service.kinds)}

    @api.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        return model_list(self.service.models(), self.service.created)

    @api.post("/v1/images/generations")
    async def generations(self, request: Request) -> dict[str, Any]:
        # The body is parsed here, not by FastAPI, so malformed JSON is a 400 in OpenAI's shape.
        job = self.service.prepare(parse_generation_request(await request.body()))
        return images_response(await self.generate_batch(job), job.size, job.seed)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05, batch_size_fn=_images_in)
    async def generate_batch(self, jobs: list[GenerationJob]) -> list[list[str]]:
        return await asyncio.to_thread(self.service.run, jobs)


def build_app(config: ServeConfig) -> Application:
    """The Serve application for ``config`` (nothing is loaded until a replica starts)."""
    return ImageServer.options(
        num_replicas=config.num_replicas,
        ray_actor_options={"num_cpus": config.num_cpus_per_replica, "num_gpus": config.num_gpus_per_replica},
        max_ongoing_requests=config.max_ongoing_requests,
    ).bind(config.model_dump())


def app_builder(args: dict[str, Any]) -> Application:
    """Serve's application-builder hook: ``args`` are :class:`ServeConfig` fields (RayService ``args:``)."""
    return build_app(ServeConfig.model_validate(args))


def run_server(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True) -> str:
    """Start Serve on ``host:port`` and deploy; returns the base URL.

    ``blocking``: serve until SIGINT or SIGTERM, then shut Serve down (and Ray, when this call
    started it), so that no replica or Ray daemon outlives the command.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        # The dashboard costs ~1 GB; an existing cluster (RAY_ADDRESS) keeps its own settings.
        ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"include_dashboard": False}))
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    if not blocking:
        return url
    for sig in (signal.SIGINT, signal.SIGTERM):  # also when started in the background (SIGINT ignored)
        signal.signal(sig, _interrupt)
    print(f"serving {', '.join(['base', *config.adapters])} at {url}/v1 (OpenAI Images API); Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        if started:
            ray.shutdown()
    return url


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    """The ``fairness serve`` flags; :func:`config_from_args` turns them into a :class:`ServeConfig`."""
    p.add_argument("--model", default="toyworld", help="hub id, diffusers folder, or 'toyworld' (default)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve an exported adapter as model NAME (repeatable)")
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


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    adapters = {}
    for item in args.adapter:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--adapter expects NAME=DIR, got {item!r}")
        adapters[name] = folder
    return ServeConfig(
        model=args.model, adapters=adapters, default_model=args.default_model, num_replicas=args.replicas,
        num_cpus_per_replica=args.cpus_per_replica, num_gpus_per_replica=args.gpus_per_replica,
        max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_s, max_n=args.max_n,
        steps=args.steps, guidance_scale=args.guidance, allowed_sizes=args.allowed_size, dtype=args.dtype,
        device=args.device,
    )


def serve_from_args(args: argparse.Namespace) -> int:
    run_server(config_from_args(args), host=args.host, port=args.port, blocking=True)
    return 0


def main(argv: Sequence[str] | None = None, prog: str = "fairness serve") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="Serve the debiased model (OpenAI Images API), Ray Serve.")
    add_serve_arguments(parser)
    return serve_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
