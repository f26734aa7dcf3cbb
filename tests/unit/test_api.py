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
        forget=lambda k: calls.append(("forget", k)) or {"status": "forgotten", "stream": str(k)},
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


def test_forget_needs_the_token_and_takes_either_side_of_a_stream(server: tuple[HttpServer, list[Any]]) -> None:
    srv, calls = server
    path = "/api/baselines/m/1/default/forget"
    assert req(srv, "POST", path)[0] == 401
    assert req(srv, "POST", path, token="wrong")[0] == 403
    assert calls == []
    assert req(srv, "POST", path, token=TOKEN) == (200, {"status": "forgotten", "stream": "m/1/default"})
    assert req(srv, "POST", "/api/baselines/m/1/default/query/forget", token=TOKEN)[0] == 200
    key = StreamKey("m", "1", "default")
    assert calls == [("forget", key), ("forget", key.query_side())]


def test_forget_and_upload_are_not_found_without_a_backend_for_them() -> None:
    backend = Backend(registry=make_registry(Exporter(), process_metrics=False), healthy=lambda: True,
                      ready=lambda: True, streams=dict, baselines=lambda s: [], promote=lambda k, b, n: {},
                      rollback=lambda k: {}, admin_token=TOKEN)
    srv = HttpServer(backend, "127.0.0.1", 0)
    srv.start()
    try:
        assert req(srv, "POST", "/api/baselines/m/1/default/forget", token=TOKEN)[0] == 404
        # Not read as JSON either (a 400): a baseline's bytes are no JSON object.
        assert req(srv, "POST", "/api/baselines/m/1/default/upload", token=TOKEN, body=b"\x93NUMPY")[0] == 404
    finally:
        srv.stop()


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


def _raw(srv: HttpServer, request: bytes, wait: float = 5.0) -> bytes:
    """One request as bytes on a socket; the whole answer (the server closes or times out)."""
    import socket

    with socket.create_connection(("127.0.0.1", srv.port), timeout=wait) as s:
        s.sendall(request)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
                if b"\r\n\r\n" in out and out.split(b"\r\n\r\n", 1)[1] and b"Content-Length" in out:
                    break
        except TimeoutError:
            pass
        return out


def test_an_unknown_version_or_stream_is_404_not_500() -> None:
    """BaselineNotFoundError is a LookupError, not a KeyError: it fell through to a 500 (and a
    logged traceback) for a mistyped baseline id."""
    from embedwatch.baseline_store import BaselineNotFoundError

    def promote(k: StreamKey, b: str | None, n: int | None) -> dict[str, Any]:
        raise BaselineNotFoundError(f"stream {k} has no baseline {b!r}")

    backend = Backend(registry=make_registry(Exporter(), process_metrics=False), healthy=lambda: True,
                      ready=lambda: True, streams=lambda: {"m/1/default": {}}, baselines=lambda s: [],
                      promote=promote, rollback=lambda k: promote(k, None, None), admin_token=TOKEN)
    srv = HttpServer(backend, "127.0.0.1", 0)
    srv.start()
    try:
        status, doc = req(srv, "POST", "/api/baselines/m/1/default/promote", TOKEN, b'{"baseline_id": "nope"}')
        assert status == 404 and "has no baseline 'nope'" in doc["error"]
        assert req(srv, "POST", "/api/baselines/m/1/default/rollback", TOKEN)[0] == 404
        assert req(srv, "GET", "/api/baselines/m/1/default") == (200, {"baselines": []})  # a live stream
        assert req(srv, "GET", "/api/baselines/other/1/default")[0] == 404  # neither live nor stored
    finally:
        srv.stop()


def test_bodies_the_server_cannot_read_are_refused(server: tuple[HttpServer, list[Any]]) -> None:
    """A chunked body was read as none (a re-activation became a new promotion), a negative
    Content-Length waited for the client to close."""
    srv, calls = server
    head = (f"POST /api/baselines/m/1/default/promote HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {TOKEN}\r\n").encode()
    body = b'{"baseline_id": "b1"}'
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n" + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
    assert _raw(srv, chunked).startswith(b"HTTP/1.0 411")
    assert _raw(srv, head + b"Content-Length: -1\r\n\r\n", wait=3.0).startswith(b"HTTP/1.0 400")
    assert calls == []


def test_other_methods_get_json_and_head_gets_the_get_headers(server: tuple[HttpServer, list[Any]]) -> None:
    srv, _ = server
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        status, doc = req(srv, method, "/api/baselines/m/1/default/promote", TOKEN)
        assert status == 405 and doc == {"error": f"method {method} not allowed"}
    answer = _raw(srv, b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n", wait=3.0)
    assert answer.startswith(b"HTTP/1.0 200") and b"Content-Length: 15" in answer  # {"status":"ok"}
    assert answer.endswith(b"\r\n\r\n")  # no body


def test_idle_connections_are_closed_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle half-requests each held a server thread for ever; past the bound a connection is
    closed at once, and a request still gets through once idle ones time out."""
    import socket
    import time

    from embedwatch import api

    monkeypatch.setattr(api, "REQUEST_TIMEOUT_S", 0.5)
    monkeypatch.setattr(api, "MAX_CONNECTIONS", 4)
    backend = Backend(registry=make_registry(Exporter(), process_metrics=False), healthy=lambda: True,
                      ready=lambda: True, streams=dict, baselines=lambda s: [],
                      promote=lambda k, b, n: {}, rollback=lambda k: {}, admin_token=TOKEN)
    srv = HttpServer(backend, "127.0.0.1", 0)
    srv.start()
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(4)]
    try:
        for s in idle:
            s.sendall(b"GET /healthz HTTP/1.1\r\n")  # never finished
        time.sleep(0.2)
        assert _raw(srv, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", wait=2.0) == b""  # closed: no slot
        time.sleep(1.0)  # the idle ones time out
        assert req(srv, "GET", "/healthz") == (200, {"status": "ok"})
        assert [s.recv(100) for s in idle] == [b""] * 4  # closed by the server
    finally:
        for s in idle:
            s.close()
        srv.stop()


def test_the_query_embeddings_baselines_are_addressed_under_the_query_side_key() -> None:
    """``<model>/<version>/<segment>/query`` names a stream's query embeddings: their versions are
    listed, promoted and rolled back there; a stream known to the replica answers an empty list
    for it, an unknown one 404."""
    calls: list[Any] = []
    backend = Backend(
        registry=make_registry(Exporter(), process_metrics=False), healthy=lambda: True, ready=lambda: True,
        streams=lambda: {"m/1/default": {"events": 3}},
        baselines=lambda s: [],
        promote=lambda k, b, n: calls.append(("promote", k, b, n)) or {"baseline_id": b},
        rollback=lambda k: calls.append(("rollback", k)) or {"baseline_id": "old"},
        admin_token=TOKEN,
    )
    srv = HttpServer(backend, "127.0.0.1", 0)
    srv.start()
    try:
        assert req(srv, "GET", "/api/baselines/m/1/default/query") == (200, {"baselines": []})
        assert req(srv, "GET", "/api/baselines/m/2/default/query")[0] == 404
        assert req(srv, "GET", "/api/baselines/m/1/default/other")[0] == 400
        assert req(srv, "POST", "/api/baselines/m/1/default/query/promote", token=TOKEN,
                   body=b'{"baseline_id": "q1"}') == (200, {"baseline_id": "q1"})
        assert req(srv, "POST", "/api/baselines/m/1/default/query/rollback", token=TOKEN)[0] == 200
    finally:
        srv.stop()
    q = StreamKey("m", "1", "default").query_side()
    assert calls == [("promote", q, "q1", None), ("rollback", q)]


def test_a_stream_without_versions_is_told_from_an_unknown_one_without_every_stream_s_state() -> None:
    """``GET /api/baselines/<stream>`` with no versions asked whether the replica monitors the
    stream by building /api/streams' state of every stream (under the exporter's lock)."""
    def streams() -> dict[str, Any]:
        raise AssertionError("every stream's state built")

    backend = Backend(registry=make_registry(Exporter(), process_metrics=False), healthy=lambda: True,
                      ready=lambda: True, streams=streams, baselines=lambda s: [], promote=lambda k, b, n: {},
                      rollback=lambda k: {}, admin_token=TOKEN, monitors=lambda k: k == StreamKey("m", "1", "default"))
    srv = HttpServer(backend, "127.0.0.1", 0)
    srv.start()
    try:
        assert req(srv, "GET", "/api/baselines/m/1/default") == (200, {"baselines": []})
        assert req(srv, "GET", "/api/baselines/m/1/default/query") == (200, {"baselines": []})
        assert req(srv, "GET", "/api/baselines/m/2/default")[0] == 404
    finally:
        srv.stop()
