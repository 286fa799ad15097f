"""The OpenAI Images API wire format: request schema, error bodies, response bodies, PNG encoding.

No Ray and no torch here, so the format is testable and reusable on its own. Errors follow
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` so that OpenAI clients
raise their usual exceptions (``BadRequestError``, ``NotFoundError``) with a readable message.

Extensions beyond OpenAI's fields: ``seed`` (same seed, prompt and model -> the same images) and
``steps`` (sampler steps). ``quality``, ``style`` and ``user`` are accepted and ignored, as a
local server has nothing to do with them; any other unknown field is rejected so that a typo
does not silently fall back to a default.
"""

from __future__ import annotations

import base64
import io
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_SEED = 2**63 - 1


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
