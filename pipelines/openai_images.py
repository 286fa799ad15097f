"""The OpenAI Images API wire format: request schema, error bodies, response bodies, PNG encoding.

No Ray and no torch here, so the format is testable and reusable on its own. Errors follow
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` so that OpenAI clients
raise their usual exceptions (``BadRequestError``, ``NotFoundError``) with a readable message.

Extensions beyond OpenAI's fields: ``seed`` (same seed, prompt and model -> the same images) and
``steps`` (sampler steps). ``quality``, ``style`` and ``user`` are accepted and ignored, as a
local server has nothing to do with them; any other unknown field is rejected so that a typo
does not silently fall back to a default.

The HTTP edge lives here too, as it runs inside Serve's proxy and must import fast (no torch):
API-key digests and their check, and :class:`EdgeGuard`, the ASGI middleware that refuses
strangers and large bodies and turns the proxy's own refusals into these error bodies.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_SEED = 2**63 - 1
KEYS_ENV = "FAIRNESS_API_KEYS"
KEY_FILE_ENV = "FAIRNESS_API_KEY_FILE"
EDGE_ENV = "FAIRNESS_EDGE_GUARD"
OPEN_PATHS = frozenset({"/healthz"})  # answered without a key (load balancers, probes)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass(eq=False)  # exceptions stay hashable (identity), as the async machinery expects
class ApiError(Exception):
    """A request the server refuses; ``status`` is the HTTP code."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str = "invalid_request_error"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class ImageGenerationRequest(BaseModel):
    """``POST /v1/images/generations``; strict types: ``"n": "2"`` is an error, not a 2."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    model: str | None = None
    n: int | None = None
    size: str | None = None
    response_format: str | None = None
    output_format: str | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    steps: int | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None


def parse_generation_request(body: bytes) -> ImageGenerationRequest:
    """Parse and type-check a request body, or raise a 400 :class:`ApiError` naming the field."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"We could not parse the JSON body of your request: {exc}", code="invalid_json") from exc
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return ImageGenerationRequest.model_validate(data)
    except ValidationError as exc:
        raise _api_error(exc) from exc


def _api_error(exc: ValidationError) -> ApiError:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    kind = first["type"]
    if kind == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if kind == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    return ApiError(400, f"Invalid value for '{param}': {first['msg']} (got {first['input']!r}).", param,
                    "invalid_type" if kind.endswith("_type") else "invalid_value")


def parse_size(size: str) -> tuple[int, int]:
    """``"WIDTHxHEIGHT"`` -> ``(width, height)``, or a 400 :class:`ApiError`."""
    parts = size.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ApiError(400, f"Invalid size {size!r}: expected WIDTHxHEIGHT, e.g. '512x512'.", "size", "invalid_size")
    return int(parts[0]), int(parts[1])


def png_base64(image: np.ndarray) -> str:
    """An ``(H, W, 3)`` uint8 image as base64 PNG text (the ``b64_json`` field)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def images_response(images_b64: list[str], size: str, seed: int) -> dict[str, Any]:
    """The ``ImagesResponse`` body; ``seed`` (an extension) lets a client reproduce the images."""
    return {"created": int(time.time()), "data": [{"b64_json": b} for b in images_b64], "size": size,
            "output_format": "png", "seed": seed}


def model_list(models: dict[str, dict[str, Any]], created: int, owner: str = "fairness") -> dict[str, Any]:
    """``GET /v1/models``: OpenAI's list shape; each entry may carry extension fields."""
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": created, "owned_by": owner, **extra}
        for name, extra in models.items()]}


# -- API keys ---------------------------------------------------------------------------------
def key_digest(key: str) -> str:
    """SHA-256 hex of ``key``: what the server keeps and compares (never the key itself)."""
    return hashlib.sha256(key.encode()).hexdigest()


def load_api_keys(key_file: str | Path | None = None, env: dict[str, str] | None = None) -> list[str]:
    """Digests of the keys in ``key_file`` (one a line; blank lines and ``#`` comments skipped), in
    ``$FAIRNESS_API_KEYS`` (comma-separated) and in the file ``$FAIRNESS_API_KEY_FILE`` names."""
    env = os.environ if env is None else env
    keys = [k.strip() for k in env.get(KEYS_ENV, "").split(",")]
    for path in (key_file, env.get(KEY_FILE_ENV)):
        if path:
            lines = Path(path).read_text().splitlines()
            keys += [line.strip() for line in lines if not line.strip().startswith("#")]
    return sorted({key_digest(k) for k in keys if k})


def authorized(header: bytes | str | None, digests: Iterable[str]) -> bool:
    """Whether ``Authorization: Bearer <key>`` names one of ``digests`` (constant-time per digest)."""
    if header is None:
        return False
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    given = key_digest(token.strip()).encode()
    found = False
    for digest in digests:  # no early exit: the time does not say which digest matched
        found |= hmac.compare_digest(given, digest.encode())
    return found


def too_large(limit: int) -> ApiError:
    """413 for a body over ``limit`` bytes (the edge guard and the replica say the same)."""
    return ApiError(413, f"The request body exceeds {limit} bytes.", code="request_too_large")


def unauthorized() -> ApiError:
    """The 401 for a missing or wrong key; it never repeats what was sent."""
    return ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")


# -- the edge: in front of Serve's proxy --------------------------------------------------------
class EdgeGuard:
    """ASGI middleware around Serve's HTTP proxy (installed by :func:`proxy_middlewares`).

    Runs before a request is routed, so a refused request never takes a queue slot:

    * a key is required (when ``key_digests`` is not empty) except on :data:`OPEN_PATHS`: 401;
    * ``Content-Length`` over ``max_body_bytes``: 413 without reading the body; a body without
      one (chunked) is read until it passes the limit, then 413;
    * what the proxy answers itself in plain text becomes OpenAI's JSON error: 503 back-pressure
      (``Retry-After`` kept, or ``retry_after_s``), 408 request timeout -> 504, and a request the
      proxy drops unanswered (its replica died) -> 503 ``replica_unavailable`` with ``Retry-After``.
    """

    def __init__(self, app: Callable, key_digests: Sequence[str] = (), max_body_bytes: int = 1 << 20,
                 retry_after_s: float = 1) -> None:
        self.app = app
        self.key_digests = tuple(key_digests)
        self.max_body_bytes = max_body_bytes
        self.retry_after = str(max(1, int(retry_after_s + 0.999)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        needs_key = self.key_digests and scope.get("path") not in OPEN_PATHS
        if needs_key and not authorized(headers.get(b"authorization"), self.key_digests):
            await send_error(send, unauthorized(), {"www-authenticate": "Bearer"})
            return
        length = headers.get(b"content-length")
        if length is not None:
            if not length.strip().isdigit():
                await send_error(send, ApiError(400, "Invalid Content-Length header.", code="invalid_request"))
                return
            if int(length) > self.max_body_bytes:
                await send_error(send, too_large(self.max_body_bytes))
                return
        elif scope.get("method") in ("POST", "PUT", "PATCH"):
            buffered = await self._read_bounded(receive)
            if buffered is None:
                await send_error(send, too_large(self.max_body_bytes))
                return
            receive = _replay(buffered, receive)
        await self._forward(scope, receive, send)

    async def _read_bounded(self, receive: Receive) -> list[dict[str, Any]] | None:
        messages, total = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                return messages
            total += len(message.get("body", b""))
            if total > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                return messages

    async def _forward(self, scope: Scope, receive: Receive, send: Send) -> None:
        state: dict[str, Any] = {"started": False, "held": None}

        async def guarded_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["started"] = True
                content_type = dict(message.get("headers", [])).get(b"content-type", b"")
                if message["status"] in (408, 429, 503) and not content_type.startswith(b"application/json"):
                    state["held"] = message  # the proxy's plain-text refusal: rewritten below
                    return
            elif message["type"] == "http.response.body" and state["held"] is not None:
                held, state["held"] = state["held"], None
                await send_error(send, self._proxy_error(held, message.get("body", b"")))
                return
            await send(message)

        try:
            await self.app(scope, receive, guarded_send)
        except Exception as exc:  # the proxy failed before answering: say so, in JSON
            if state["started"]:
                raise
            await send_error(send, ApiError(503, f"The request was not served ({type(exc).__name__}); retry.",
                                            code="replica_unavailable", type="server_error"),
                             {"retry-after": self.retry_after})
            return
        if not state["started"]:  # the proxy gave up on the request (e.g. its replica died)
            await send_error(send, ApiError(503, "The request was not served: no replica answered; retry.",
                                            code="replica_unavailable", type="server_error"),
                             {"retry-after": self.retry_after})

    def _proxy_error(self, start: dict[str, Any], body: bytes) -> tuple[ApiError, dict[str, str]]:
        text = body.decode("utf-8", "replace").strip()
        status = start["status"]
        headers = {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}
        retry = {"retry-after": headers.get("retry-after", self.retry_after)}
        if status == 408:
            return ApiError(504, f"The request timed out: {text}", code="timeout", type="server_error"), {}
        if status == 429:
            return ApiError(429, f"Too many requests: {text}", code="rate_limit_exceeded",
                            type="requests"), retry
        return ApiError(503, f"The server is overloaded or not ready; retry later. ({text})",
                        code="overloaded", type="server_error"), retry


async def send_error(send: Send, error: ApiError | tuple[ApiError, dict[str, str]],
                     headers: dict[str, str] | None = None) -> None:
    """Send ``error`` as a complete JSON response (OpenAI's error body)."""
    if isinstance(error, tuple):
        error, headers = error
    body = json.dumps(error.body()).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": error.status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _replay(messages: list[dict[str, Any]], receive: Receive) -> Receive:
    pending = list(messages)

    async def replay() -> dict[str, Any]:
        return pending.pop(0) if pending else await receive()

    return replay


def proxy_middlewares() -> list[Any]:
    """Serve's proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``): :class:`EdgeGuard`
    configured from ``$FAIRNESS_EDGE_GUARD``."""
    from starlette.middleware import Middleware

    return [Middleware(EdgeGuard, **json.loads(os.environ.get(EDGE_ENV, "{}")))]
