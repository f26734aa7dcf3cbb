"""HTTP API: routes, auth on mutations (401 / 403 / 200), no secret in any response."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from embedwatch.api import Backend, HttpServer
from embedwatch.events import StreamKey
from embedwatch.exporter import Exporter, make_registry

TOKEN = "s3cret-admin-token"


@pytest.fixture
def server() -> Iterator[tuple[HttpServer, list[Any]]]:
    calls: list[Any] = []
    ex = Exporter()
    backend = Backend(
        registry=make_registry(ex, process_metrics=False),
        healthy=lambda: True,
        ready=lambda: False,
        streams=lambda: {"m/1/default": {"events": 3}},
        baselines=lambda s: [{"baseline_id": "abc", "stream": s}],
        promote=lambda k, b, n: calls.append(("promote", k, b, n)) or (
            {"baseline_id": b} if b else {"status": "collecting", "needed": n}),
        rollback=lambda k: calls.append(("rollback", k)) or {"baseline_id": "old"},
        admin_token=TOKEN,
    )
    srv = HttpServer(backend, "127.0.0.1", 0)
    srv.start()
    yield srv, calls
    srv.stop()


def req(srv: HttpServer, method: str, path: str, token: str | None = None, body: bytes | None = None
        ) -> tuple[int, Any]:
    r = urllib.request.Request(f"http://127.0.0.1:{srv.port}{path}", method=method, data=body)
    if token is not None:
        r.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(r, timeout=5) as resp:
            raw = resp.read()
            status = resp.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def test_read_endpoints(server: tuple[HttpServer, list[Any]]) -> None:
    srv, _ = server
    assert req(srv, "GET", "/healthz") == (200, {"status": "ok"})
    assert req(srv, "GET", "/readyz") == (503, {"ready": False})
    assert req(srv, "GET", "/api/streams") == (200, {"streams": {"m/1/default": {"events": 3}}})
    assert req(srv, "GET", "/api/baselines")[1]["baselines"][0]["baseline_id"] == "abc"
    assert req(srv, "GET", "/api/baselines/m/1/default")[1]["baselines"][0]["stream"] == "m/1/default"
    assert req(srv, "GET", "/api/baselines/not-a-stream")[0] == 400
    status, text = req(srv, "GET", "/metrics")
    assert status == 200 and "embedwatch_build_info" in text
    assert req(srv, "GET", "/nope")[0] == 404


def test_mutations_need_the_token(server: tuple[HttpServer, list[Any]]) -> None:
    srv, calls = server
    path = "/api/baselines/m/1/default/promote"
    assert req(srv, "POST", path)[0] == 401
    assert req(srv, "POST", path, token="wrong")[0] == 403
    assert req(srv, "POST", path, token=TOKEN[:-1])[0] == 403
    assert calls == []
    assert req(srv, "POST", path, token=TOKEN, body=b'{"baseline_id": "b1"}') == (200, {"baseline_id": "b1"})
    assert req(srv, "POST", "/api/baselines/m/1/default/rollback", token=TOKEN) == (200, {"baseline_id": "old"})
    assert req(srv, "POST", path, token=TOKEN, body=b'{"events": 300}') == (202, {"status": "collecting",
                                                                                "needed": 300})
    key = StreamKey("m", "1", "default")
    assert calls == [("promote", key, "b1", None), ("rollback", key), ("promote", key, None, 300)]
    for bad in (b'{"events": "300"}', b'{"events": 3.5}', b'{"events": 300, "baseline_id": "b1"}'):
        assert req(srv, "POST", path, token=TOKEN, body=bad)[0] == 400
    assert len(calls) == 3
    assert req(srv, "POST", "/api/baselines/m/1/default/explode", token=TOKEN)[0] == 404
    assert req(srv, "POST", path, token=TOKEN, body=b"[1]")[0] == 400


def test_no_token_configured_refuses_mutations() -> None:
    backend = Backend(make_registry(Exporter(), process_metrics=False), lambda: True, lambda: True, dict,
                      lambda s: [], lambda k, b, n: {}, lambda k: {}, admin_token=None)
    srv = HttpServer(backend, "127.0.0.1", 0)
    srv.start()
    try:
        assert req(srv, "POST", "/api/baselines/m/1/default/promote", token="anything")[0] == 403
    finally:
        srv.stop()


def test_token_never_in_responses(server: tuple[HttpServer, list[Any]]) -> None:
    srv, _ = server
    for path in ("/metrics", "/api/streams", "/api/baselines", "/healthz", "/readyz"):
        assert TOKEN not in str(req(srv, "GET", path)[1])
    assert TOKEN not in str(req(srv, "POST", "/api/baselines/m/1/default/promote", token="bad")[1])
