"""The image server's edge without a server: API keys, body limit, proxy errors as JSON, metrics,
deployment limits; and a tiny soak (slow: it starts its own two-replica server and kills one)."""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest

from pipelines.serve import (
    EdgeGuard,
    RequestMetrics,
    ServeConfig,
    add_serve_arguments,
    authorized,
    bind_host,
    build_app,
    config_from_args,
    edge_env,
    http_options,
    key_digest,
    load_api_keys,
    proxy_middlewares,
)

pytestmark = pytest.mark.timeout(300)

KEY = "sk-test-0123456789"


def test_keys_come_from_a_file_and_the_environment_as_digests_only(tmp_path, monkeypatch):
    monkeypatch.delenv("FAIRNESS_API_KEYS", raising=False)
    monkeypatch.delenv("FAIRNESS_API_KEY_FILE", raising=False)
    keys = tmp_path / "keys"
    keys.write_text(f"# comment\n{KEY}\n\n  other-key  \n")
    digests = load_api_keys(keys, env={"FAIRNESS_API_KEYS": "env-a, env-b,"})
    assert digests == sorted(key_digest(k) for k in (KEY, "other-key", "env-a", "env-b"))
    assert KEY not in json.dumps(digests)
    assert load_api_keys(None, env={}) == []
    assert authorized(f"Bearer {KEY}", digests) and authorized(b"bearer env-b", digests)
    for header in (None, "", "Bearer", f"Basic {KEY}", "Bearer wrong", KEY):
        assert not authorized(header, digests), header

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    config = config_from_args(parser.parse_args(["--api-key-file", str(keys), "--max-queued-requests", "5"]))
    assert config.api_key_sha256 == sorted(key_digest(k) for k in (KEY, "other-key"))
    assert config.max_queued_requests == 5 and KEY not in repr(config)


def test_app_builder_reads_keys_from_the_environment(monkeypatch):
    from pipelines.serve import app_builder

    monkeypatch.setenv("FAIRNESS_API_KEYS", KEY)
    (config,) = app_builder({"model": "m"})._bound_deployment.init_args
    assert config["api_key_sha256"] == [key_digest(KEY)] and KEY not in json.dumps(config)


def test_without_keys_the_server_binds_to_loopback_only(capsys, monkeypatch):
    from pipelines.serve import main

    monkeypatch.delenv("FAIRNESS_API_KEYS", raising=False)
    monkeypatch.delenv("FAIRNESS_API_KEY_FILE", raising=False)
    assert main(["--host", "0.0.0.0"]) == 2 and "without API keys" in capsys.readouterr().err
    open_config = ServeConfig(model="m")
    assert bind_host(open_config, "127.0.0.1") == "127.0.0.1" and bind_host(open_config, "::1") == "::1"
    for host in ("0.0.0.0", "10.1.2.3", "::"):
        with pytest.raises(ValueError, match="without API keys"):
            bind_host(open_config, host)
    assert bind_host(ServeConfig(model="m", api_key_sha256=[key_digest(KEY)]), "0.0.0.0") == "0.0.0.0"
    with pytest.raises(ValueError, match="max_queued_requests"):
        ServeConfig(model="m", max_queued_requests=0)


def test_deployment_and_proxy_carry_the_limits():
    config = ServeConfig(model="m", max_ongoing_requests=3, max_queued_requests=7, request_timeout_s=9,
                         retry_after_s=4, graceful_shutdown_timeout_s=11, max_body_bytes=100,
                         api_key_sha256=[key_digest(KEY)])
    deployment = build_app(config)._bound_deployment
    assert (deployment.max_ongoing_requests, deployment.max_queued_requests) == (3, 7)
    assert deployment._deployment_config.graceful_shutdown_timeout_s == 11
    assert deployment._deployment_config.backpressure_config.status_code == 503
    assert http_options(config, "127.0.0.1", 8000)["request_timeout_s"] == 9
    env = edge_env(config)
    assert KEY not in json.dumps(env)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        (guard,) = proxy_middlewares()
    assert guard.cls is EdgeGuard and guard.kwargs == {"key_digests": [key_digest(KEY)], "max_body_bytes": 100,
                                                       "retry_after_s": 4}


# -- EdgeGuard against a fake proxy ---------------------------------------------------------------
def _call(guard_kwargs: dict, *, path="/v1/images/generations", headers=(), chunks=(b"{}",), app=None):
    """Run :class:`EdgeGuard` once; returns (status, headers, body, chunks read, whether the app ran)."""
    sent: list[dict] = []
    read = [0]
    ran = [False]
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]

    async def receive():
        read[0] += 1
        return messages[read[0] - 1] if read[0] <= len(messages) else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def ok_app(scope, receive, send):
        ran[0] = True
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})

    async def wrapped(scope, receive, send):
        ran[0] = True
        await app(scope, receive, send)

    guard = EdgeGuard(wrapped if app else ok_app, **guard_kwargs)
    scope = {"type": "http", "method": "POST", "path": path,
             "headers": [(k.encode(), v.encode()) for k, v in headers]}
    asyncio.run(guard(scope, receive, send))
    start = sent[0]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body, read[0], ran[0]


def _error(body: bytes) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def test_guard_requires_a_key_except_on_healthz_and_never_echoes_it():
    keys = {"key_digests": [key_digest(KEY)]}
    for headers in ((), (("authorization", "Bearer sk-wrong-key"),)):
        status, head, body, _, ran = _call(keys, headers=headers)
        assert (status, _error(body)["code"], ran) == (401, "invalid_api_key", False)
        assert head["content-type"] == "application/json" and b"sk-wrong-key" not in body and KEY.encode() not in body
    assert _call(keys, headers=(("authorization", f"Bearer {KEY}"),))[0] == 200
    assert _call(keys, path="/healthz")[0] == 200
    assert _call({}, headers=())[0] == 200  # no keys configured: open (loopback only)


def test_guard_refuses_a_large_body_before_reading_it():
    limit = {"max_body_bytes": 1000}
    status, _, body, read, ran = _call(limit, headers=(("content-length", str(20_000_000)),))
    assert (status, _error(body)["code"], read, ran) == (413, "request_too_large", 0, False)
    chunked = [b"x" * 400] * 50  # 20 kB without a Content-Length
    status, _, body, read, ran = _call(limit, headers=(("transfer-encoding", "chunked"),), chunks=chunked)
    assert (status, _error(body)["code"], ran) == (413, "request_too_large", False) and read == 3
    status, _, _, read, ran = _call(limit, headers=(("transfer-encoding", "chunked"),), chunks=[b"x" * 400] * 2)
    assert (status, ran) == (200, True)  # under the limit: the buffered chunks reach the app
    assert _call(limit, headers=(("content-length", "abc"),))[0] == 400


def _plain(status: int, text: bytes, headers=()):
    async def proxy(scope, receive, send):
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain; charset=utf-8"), *headers]})
        await send({"type": "http.response.body", "body": text})

    return proxy


def test_guard_turns_proxy_refusals_into_json():
    status, head, body, _, _ = _call({}, app=_plain(503, b"Request dropped due to backpressure",
                                                    [(b"retry-after", b"3")]))
    assert (status, head["retry-after"], _error(body)["code"]) == (503, "3", "overloaded")
    status, head, body, _, _ = _call({}, app=_plain(408, b"Request abc timed out after 1.0s."))
    assert (status, _error(body)["code"], head["content-type"]) == (504, "timeout", "application/json")

    async def vanished(scope, receive, send):  # the proxy gives up without answering (replica died)
        return None

    async def failed(scope, receive, send):
        raise RuntimeError("actor died")

    for app in (vanished, failed):
        status, head, body, _, _ = _call({"retry_after_s": 2}, app=app)
        assert (status, head["retry-after"], _error(body)["code"]) == (503, "2", "replica_unavailable")
    status, _, body, _, _ = _call({}, app=_plain(500, b"boom"))
    assert (status, body) == (500, b"boom")  # anything else passes through untouched


def test_request_metrics_record(ray_session):
    metrics = RequestMetrics()
    metrics.observe("/v1/images/generations", 200, "base", 0.5)
    metrics.observe("/v1/images/generations", 200, "base", 1.5)
    metrics.observe("/v1/images/generations", 400, "-", 0.01)
    assert metrics.counts == {"/v1/images/generations 200 base": 2, "/v1/images/generations 400 -": 1}


@pytest.mark.slow
@pytest.mark.ray
def test_tiny_soak_answers_200_or_503_and_recovers_from_a_killed_replica(ray_session, tmp_path):
    from pipelines import bench_serve

    out = tmp_path / "soak.json"
    code = bench_serve.main(["--soak", "--soak-seconds", "12", "--soak-requests", "300", "--soak-concurrency", "12",
                             "--soak-max-ongoing", "2", "--soak-max-queued", "2", "--out", str(out)])
    result = json.loads(out.read_text())
    assert code == 0 and result["ok"], result
    assert result["lost"] == 0 and result["other_5xx"] == 0 and result["status_counts"].get("200", 0) > 0
    assert result["replica_kill"]["recovery_s"] is not None
