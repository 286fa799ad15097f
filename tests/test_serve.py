"""The Ray Serve image server over plain HTTP and the real OpenAI client (one app for the module)."""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from pipelines import bench_serve
from pipelines.bench_serve import DEMO_PROMPT, build_demo_assets, free_port

pytestmark = pytest.mark.timeout(300)

STEPS = 4
KEY = "sk-fairness-test-key-7f3a"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 64 * 1024
MAX_ONGOING, MAX_QUEUED = 16, 48  # 64 held at once: the 50-request burst fits, a 120-request one does not


def test_cli_arguments_make_the_serve_config():
    from pipelines.serve import ServeConfig, add_serve_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--model", "m", "--adapter", "fair=/a", "--adapter", "tok=/b", "--port", "9000",
                              "--max-n", "2", "--allowed-size", "64x32", "--gpus-per-replica", "1"])
    config = config_from_args(args)
    assert (config.adapters, config.max_n, config.allowed_sizes) == ({"fair": "/a", "tok": "/b"}, 2, ["64x32"])
    assert (args.host, args.port, config.num_gpus_per_replica) == ("127.0.0.1", 9000, 1)
    with pytest.raises(ValueError, match="NAME=DIR"):
        config_from_args(parser.parse_args(["--adapter", "no-folder"]))
    with pytest.raises(ValueError, match="must fit one batch"):
        ServeConfig(model="m", max_n=9, max_batch_size=8)
    with pytest.raises(ValueError, match="adapter name 'base'"):
        ServeConfig(model="m", adapters={"base": "/a"})


@dataclass
class Server:
    url: str
    model: Path
    adapters: dict[str, Path]
    guidance: float


@pytest.fixture(scope="module")
def server(tmp_path_factory, ray_session):
    from ray import serve

    from pipelines.serve import ServeConfig, key_digest, run_server

    model, adapters = build_demo_assets(tmp_path_factory.mktemp("serve"))
    config = ServeConfig(model=str(model), adapters={k: str(v) for k, v in adapters.items()}, default_model="base",
                         steps=STEPS, guidance_scale=7.5, max_n=4, max_batch_size=8, allowed_sizes=["48x32"],
                         api_key_sha256=[key_digest(KEY)], max_body_bytes=MAX_BODY, max_ongoing_requests=MAX_ONGOING,
                         max_queued_requests=MAX_QUEUED, retry_after_s=2, request_timeout_s=120)
    try:
        yield Server(run_server(config, port=free_port(), blocking=False), model, adapters, 7.5)
    finally:
        serve.shutdown()


def _generate(server: Server, **body) -> requests.Response:
    return requests.post(f"{server.url}/v1/images/generations", json=body, headers=AUTH, timeout=120)


def _images(resp: requests.Response) -> list[np.ndarray]:
    assert resp.status_code == 200, resp.text
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in resp.json()["data"]]


@pytest.mark.ray
def test_health_and_model_list(server):
    health = requests.get(f"{server.url}/healthz", timeout=30)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    models = requests.get(f"{server.url}/v1/models", headers=AUTH, timeout=30).json()
    assert models["object"] == "list"
    assert {m["id"]: m["kind"] for m in models["data"]} == {
        "base": "base", "fair-lora": "text_lora", "fair-tokens": "soft_tokens"}
    assert all(m["object"] == "model" and isinstance(m["created"], int) for m in models["data"])


@pytest.mark.ray
def test_generation_returns_n_pngs_of_the_requested_size(server):
    resp = _generate(server, prompt=DEMO_PROMPT, model="fair-lora", n=3, size="32x32", seed=11,
                     response_format="b64_json")
    images = _images(resp)
    assert len(images) == 3 and all(img.shape == (32, 32, 3) and img.dtype == np.uint8 for img in images)
    assert resp.json()["seed"] == 11 and resp.json()["size"] == "32x32"
    (wide,) = _images(_generate(server, prompt=DEMO_PROMPT, size="48x32", seed=11))
    assert wide.shape == (32, 48, 3)  # WIDTHxHEIGHT


@pytest.mark.ray
def test_seed_determinism_and_adapters_change_images(server):
    def first(model: str) -> np.ndarray:
        return _images(_generate(server, prompt=DEMO_PROMPT, model=model, n=2, seed=7))[0]

    base = first("base")
    assert np.array_equal(base, first("base"))
    for adapter in ("fair-lora", "fair-tokens"):
        assert (first(adapter) != base).mean() > 0.1, adapter
    unseeded = [_generate(server, prompt=DEMO_PROMPT).json()["seed"] for _ in range(2)]
    assert unseeded[0] != unseeded[1]


@pytest.mark.ray
@pytest.mark.parametrize("name", ["fair-lora", "fair-tokens"])
def test_served_images_equal_stock_diffusers(server, name):
    """Served pixels = a stock ``StableDiffusionPipeline`` call with the adapter and the same latents."""
    from diffusers import StableDiffusionPipeline

    from fairness.adapters import load_adapter_into
    from fairness.seeding import image_noise

    served = np.stack(_images(_generate(server, prompt=DEMO_PROMPT, model=name, n=2, seed=3)))
    pipe = StableDiffusionPipeline.from_pretrained(server.model, safety_checker=None, requires_safety_checker=False)
    prefix = load_adapter_into(pipe, server.adapters[name])
    latents = image_noise(3, DEMO_PROMPT, range(2), (4, 8, 8))
    stock = pipe(prefix + DEMO_PROMPT, num_images_per_prompt=2, latents=latents, num_inference_steps=STEPS,
                 guidance_scale=server.guidance, output_type="np").images
    assert np.abs((stock * 255).round().astype(int) - served.astype(int)).max() <= 1


ERROR_CASES = [
    # (raw body or JSON, status, code, param)
    (b"{not json", 400, "invalid_json", None),
    (b"[1, 2]", 400, "invalid_json", None),
    ({}, 400, "missing_required_parameter", "prompt"),
    ({"prompt": 5}, 400, "invalid_type", "prompt"),
    ({"prompt": "a photo", "n": "2"}, 400, "invalid_type", "n"),
    ({"prompt": "a photo", "n": 0}, 400, "invalid_value", "n"),
    ({"prompt": "a photo", "n": 5}, 400, "invalid_value", "n"),
    ({"prompt": "   "}, 400, "empty_prompt", "prompt"),
    ({"prompt": " ".join(["photo"] * 30)}, 400, "prompt_too_long", "prompt"),
    ({"prompt": "x" * 5000}, 400, "prompt_too_long", "prompt"),
    ({"prompt": "a photo", "size": "64x64"}, 400, "invalid_size", "size"),
    ({"prompt": "a photo", "size": "large"}, 400, "invalid_size", "size"),
    ({"prompt": "a photo", "response_format": "url"}, 400, "unsupported_response_format", "response_format"),
    ({"prompt": "a photo", "response_format": "jpeg"}, 400, "invalid_value", "response_format"),
    ({"prompt": "a photo", "model": "dall-e-3"}, 404, "model_not_found", "model"),
    ({"prompt": "a photo", "colour": "red"}, 400, "unknown_parameter", "colour"),
    ({"prompt": "a photo", "steps": 0}, 400, "invalid_value", "steps"),
    ({"prompt": "a photo", "seed": -1}, 400, "invalid_value", "seed"),
]


@pytest.mark.ray
def test_every_invalid_request_gets_an_openai_error_and_the_server_keeps_serving(server):
    for body, status, code, param in ERROR_CASES:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        resp = requests.post(f"{server.url}/v1/images/generations", data=data,
                             headers={"Content-Type": "application/json", **AUTH}, timeout=30)
        assert resp.status_code == status, (body, resp.text)
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], body
        assert (error["code"], error["param"], error["type"]) == (code, param, "invalid_request_error"), body
    for method, path, status in (("GET", "/v1/nowhere", 404), ("GET", "/v1/images/generations", 405)):
        resp = requests.request(method, server.url + path, headers=AUTH, timeout=30)
        assert resp.status_code == status and resp.json()["error"]["message"]
    assert requests.get(f"{server.url}/healthz", timeout=30).status_code == 200
    assert len(_images(_generate(server, prompt=DEMO_PROMPT, n=1, seed=1))) == 1


@pytest.mark.ray
def test_openai_client(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    result = client.images.generate(prompt=DEMO_PROMPT, model="fair-lora", n=2, size="32x32",
                                    response_format="b64_json", extra_body={"seed": 5})
    assert len(result.data) == 2
    img = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    assert img.size == (32, 32)
    assert {m.id for m in client.models.list()} == {"base", "fair-lora", "fair-tokens"}
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.images.generate(prompt=DEMO_PROMPT, model="dall-e-3")
    with pytest.raises(openai.BadRequestError, match="does not host files"):
        client.images.generate(prompt=DEMO_PROMPT, model="base", response_format="url")


@pytest.mark.ray
def test_fifty_concurrent_requests_without_errors(server, tmp_path):
    out = tmp_path / "serve.json"
    assert bench_serve.main(["--url", server.url, "--requests", "50", "--concurrency", "50", "--model", "fair-lora",
                             "--steps", str(STEPS), "--out", str(out), "--api-key", KEY]) == 0
    result = json.loads(out.read_text())
    assert result["errors"] == 0 and result["images"] == 50 and result["status_counts"] == {"200": 50}
    assert {"p50", "p95"} <= set(result["latency_s"]) and result["images_per_s"] > 0


# -- strangers, large bodies, overload, shutdown -------------------------------------------------
@pytest.mark.ray
def test_a_missing_or_wrong_key_is_a_401_and_no_key_reaches_the_logs(server):
    import openai
    import ray

    for headers in ({}, {"Authorization": "Bearer sk-stranger-key"}, {"Authorization": KEY}):
        for method, path in (("POST", "/v1/images/generations"), ("GET", "/v1/models")):
            resp = requests.request(method, server.url + path, json={"prompt": "a photo"}, headers=headers, timeout=30)
            assert resp.status_code == 401, (headers, path, resp.text)
            assert resp.json()["error"]["code"] == "invalid_api_key" and "sk-stranger-key" not in resp.text
    assert requests.get(f"{server.url}/healthz", timeout=30).status_code == 200  # probes need no key
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-stranger-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        client.models.list()
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    for path in logs.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            text = path.read_bytes()
            assert KEY.encode() not in text and b"sk-stranger-key" not in text, path


def _raw_response(server: Server, head: bytes, body_parts: list[bytes]) -> tuple[int, bytes]:
    """Send ``head`` and what of ``body_parts`` the server takes; the status line and the reply."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        for part in body_parts:
            try:
                sock.sendall(part)
            except OSError:  # the server answered and closed: it stopped reading
                break
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return int(reply.split(b" ", 2)[1]), reply


@pytest.mark.ray
def test_a_body_over_the_limit_is_a_413_before_it_is_read(server):
    auth = f"Authorization: Bearer {KEY}\r\n".encode()
    # 20 MB announced, a few bytes sent: a 413 that does not wait for the rest.
    head = (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth
            + b"Content-Length: 20000000\r\nConnection: close\r\n\r\n")
    status, reply = _raw_response(server, head, [b'{"prompt": "'])
    assert status == 413 and b"request_too_large" in reply
    # Chunked, no length: refused once past the limit; the closing chunk is never sent.
    head = (b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth
            + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (16 * 1024, b"x" * 16 * 1024)
    status, reply = _raw_response(server, head, [chunk] * (MAX_BODY // (16 * 1024) + 2))
    assert status == 413 and b"request_too_large" in reply
    resp = requests.post(f"{server.url}/v1/images/generations", data=b"x" * (MAX_BODY + 1), headers=AUTH, timeout=30)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"
    assert len(_images(_generate(server, prompt=DEMO_PROMPT, n=1, seed=2))) == 1


@pytest.mark.ray
def test_beyond_the_queue_the_server_answers_503_with_retry_after(server):
    burst = MAX_ONGOING + MAX_QUEUED + 56

    def one(i: int) -> tuple[int, str | None, float, str]:
        start = time.perf_counter()
        resp = requests.post(f"{server.url}/v1/images/generations", headers=AUTH, timeout=120,
                             json={"prompt": DEMO_PROMPT, "n": 1, "seed": i, "steps": STEPS})
        return resp.status_code, resp.headers.get("retry-after"), time.perf_counter() - start, resp.text

    with ThreadPoolExecutor(burst) as pool:
        results = list(pool.map(one, range(burst)))
    statuses = [r[0] for r in results]
    assert set(statuses) <= {200, 503}, {s: t for s, _, _, t in results if s not in (200, 503)}
    refused = [r for r in results if r[0] == 503]
    assert refused and statuses.count(200) >= MAX_ONGOING
    for _, retry_after, _, text in refused:
        assert retry_after == "2" and json.loads(text)["error"]["code"] == "overloaded"
    # refusals are immediate: each came back before the slowest request served
    assert max(r[2] for r in refused) < max(r[2] for r in results if r[0] == 200)
    assert len(_images(_generate(server, prompt=DEMO_PROMPT, n=1, seed=3))) == 1


@pytest.mark.ray
def test_zz_stopping_drains_in_flight_requests(server):
    """Last in the module: it deletes the application (the fixture then shuts Serve down)."""
    from pipelines.serve import stop_server

    results: list[requests.Response] = []
    threads = [threading.Thread(target=lambda i=i: results.append(
        _generate(server, prompt=DEMO_PROMPT, n=4, seed=i, steps=40))) for i in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)  # the requests are in the replica
    stop_server()
    for thread in threads:
        thread.join(60)
    assert [r.status_code for r in results] == [200, 200, 200], [r.text for r in results]
