"""HTTP on one port: /metrics, /healthz, /readyz, /api/streams, /api/baselines.

A stdlib threading server: the endpoints are few and cheap, and it keeps the image small. Every
mutation needs ``Authorization: Bearer <http.admin_token>``: 401 without a token, 403 with a
wrong one (constant-time comparison); with no token configured, mutations are refused (403).
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from embedwatch.events import StreamKey
from embedwatch.exporter import ExporterRegistry

log = logging.getLogger(__name__)

#: Seconds a connection may stay silent while a request is read (or between keep-alive requests).
REQUEST_TIMEOUT_S = 10.0
#: Connections served at once.
MAX_CONNECTIONS = 64
#: The largest JSON body of a mutation (promote, rollback, forget).
MAX_JSON_BODY = 64 << 10
#: The largest uploaded baseline: a state record's own limit (a 768-d baseline of the default
#: 1,000-vector sample is 2.4 MB; 8,192-d about 25 MB, 41 MB with a float32 sample).
MAX_UPLOAD_BODY = 64 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Backend:
    """What the HTTP layer needs from the service; :class:`embedwatch.app.Service` adapts to it."""

    def __init__(
        self,
        registry: CollectorRegistry,
        healthy: Callable[[], bool],
        ready: Callable[[], bool],
        streams: Callable[[], dict[str, Any]],
        baselines: Callable[[str | None], list[dict[str, Any]]],
        promote: Callable[[StreamKey, str | None, int | None], dict[str, Any]],
        rollback: Callable[[StreamKey], dict[str, Any]],
        admin_token: str | None,
        forget: Callable[[StreamKey], dict[str, Any]] | None = None,
        monitors: Callable[[StreamKey], bool] | None = None,
        upload: Callable[[StreamKey, bytes, bool], dict[str, Any]] | None = None,
    ) -> None:
        self.registry = registry
        self.healthy = healthy
        self.ready = ready
        self.streams = streams
        self.baselines = baselines
        self.promote = promote
        self.rollback = rollback
        self.admin_token = admin_token
        self.forget = forget
        self.upload = upload
        # Whether this replica monitors a stream, without building every stream's state (which
        # /api/streams does) for it; None: from streams().
        self.monitors = monitors or (lambda key: str(key) in streams())


def _handler(backend: Backend) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "embedwatch"
        sys_version = ""
        # A connection that sends nothing more for this long is closed: without it, idle
        # half-requests held a server thread each, for ever.
        timeout = REQUEST_TIMEOUT_S

        def log_message(self, format: str, *args: Any) -> None:
            # Request lines can carry tokens in odd clients; keep access logs at debug level only.
            log.debug("http %s", self.address_string())

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not getattr(self, "_head", False):
                self.wfile.write(body)

        def _json(self, status: int, doc: Any) -> None:
            self._send(status, orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS))

        def do_HEAD(self) -> None:
            self._head = True  # what GET answers, without its body (e.g. a HEAD health check)
            self.do_GET()

        def _refuse_method(self) -> None:
            self.send_response(405)
            self.send_header("Allow", "GET, HEAD" if not urlsplit(self.path).path.startswith("/api/baselines/")
                             else "GET, HEAD, POST")
            body = orjson.dumps({"error": f"method {self.command} not allowed"})
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method

        def do_GET(self) -> None:
            path = urlsplit(self.path).path.rstrip("/") or "/"
            try:
                if path == "/metrics":
                    reg = backend.registry
                    body = reg.exposition() if isinstance(reg, ExporterRegistry) else generate_latest(reg)
                    self._send(200, body, CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = backend.healthy()
                    self._json(200 if ok else 503, {"status": "ok" if ok else "unhealthy"})
                elif path == "/readyz":
                    ok = backend.ready()
                    self._json(200 if ok else 503, {"ready": ok})
                elif path == "/api/streams":
                    self._json(200, {"streams": backend.streams()})
                elif path == "/api/baselines":
                    self._json(200, {"baselines": backend.baselines(None)})
                elif path.startswith("/api/baselines/"):
                    key = StreamKey.parse(unquote(path.removeprefix("/api/baselines/")))
                    versions = backend.baselines(str(key))
                    if not versions and not backend.monitors(key.document_side()):
                        raise ApiError(404, f"unknown stream {key}")
                    self._json(200, {"baselines": versions})
                else:
                    self._json(404, {"error": "not found"})
            except ApiError as e:
                self._json(e.status, {"error": e.message})
            except (BrokenPipeError, ConnectionResetError):
                return  # the client went away mid-response (e.g. a scrape timeout): nothing to answer
            except ValueError as e:
                self._json(400, {"error": str(e)})
            except Exception:
                log.exception("GET %s failed", path)
                self._json(500, {"error": "internal error"})

        def do_POST(self) -> None:
            url = urlsplit(self.path)
            path = url.path.rstrip("/")
            try:
                self._authorize()
                if self.headers.get("Transfer-Encoding"):
                    # Not decoded by this server: read as no body, a chunked {"baseline_id": ...}
                    # started a new promotion instead of re-activating that version.
                    raise ApiError(411, "send the body with a Content-Length, not chunked")
                length = int(self.headers.get("Content-Length") or 0)
                if length < 0:
                    raise ApiError(400, "negative Content-Length")  # read(-1) waited for the client to close
                # /api/baselines/<model>/<version>/<segment>[/query]/(promote|rollback|forget|upload)
                rest = path.removeprefix("/api/baselines/")
                if rest == path or "/" not in rest:
                    raise ApiError(404, "not found")
                stream_text, action = unquote(rest).rsplit("/", 1)
                upload = action == "upload"
                if upload and backend.upload is None:
                    raise ApiError(404, "not found")
                limit = MAX_UPLOAD_BODY if upload else MAX_JSON_BODY
                if length > limit:
                    raise ApiError(413, f"body too large (at most {limit} bytes)")
                body = self.rfile.read(length) if length else b""
                key = StreamKey.parse(stream_text)
                if upload:
                    assert backend.upload is not None
                    if not body:
                        raise ApiError(400, "no baseline in the body (the bytes `embedwatch baseline upload` sends)")
                    self._json(200, backend.upload(key, body, _flag(url.query, "activate")))
                    return
                doc = orjson.loads(body) if body else {}
                if not isinstance(doc, dict):
                    raise ApiError(400, "body must be a JSON object")
                if action == "promote":
                    bid = doc.get("baseline_id")
                    if bid is not None and not isinstance(bid, str):
                        raise ApiError(400, "baseline_id must be a string")
                    events = doc.get("events")
                    if events is not None and (type(events) is not int or bid is not None):
                        raise ApiError(400, "events must be an integer, and only without baseline_id")
                    out = backend.promote(key, bid, events)
                    # 202: the promotion is collecting the events of the new baseline.
                    self._json(202 if out.get("status") == "collecting" else 200, out)
                elif action == "rollback":
                    self._json(200, backend.rollback(key))
                elif action == "forget" and backend.forget is not None:
                    self._json(200, backend.forget(key))
                else:
                    raise ApiError(404, "not found")
            except ApiError as e:
                self._json(e.status, {"error": e.message})
            except LookupError as e:  # KeyError, BaselineNotFoundError
                self._json(404, {"error": f"not found: {e}"})
            except (ValueError, orjson.JSONDecodeError) as e:
                self._json(400, {"error": str(e)})
            except Exception:
                log.exception("POST %s failed", path)
                self._json(500, {"error": "internal error"})

        def _authorize(self) -> None:
            header = self.headers.get("Authorization")
            if not header or not header.startswith("Bearer "):
                raise ApiError(401, "missing bearer token")
            token = backend.admin_token
            given = header.removeprefix("Bearer ").strip().encode()
            # Stripped as the client's is: a Secret made --from-file ends with a newline.
            if token is None or not hmac.compare_digest(given, token.strip().encode()):
                raise ApiError(403, "invalid token")

    return Handler


def _flag(query: str, name: str) -> bool:
    """A boolean query parameter (``true``/``false``, ``1``/``0``; absent: false)."""
    values = parse_qs(query, keep_blank_values=True).get(name, [])
    if not values:
        return False
    text = values[-1].lower()
    if text not in ("true", "false", "1", "0"):
        raise ApiError(400, f"{name} must be true or false, not {values[-1]!r}")
    return text in ("true", "1")


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most :data:`MAX_CONNECTIONS` at once: a connection beyond them
    is closed at once (a scraper retries), so many slow or idle clients cannot exhaust threads."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class HttpServer:
    """The HTTP server in a daemon thread."""

    def __init__(self, backend: Backend, host: str, port: int) -> None:
        self.httpd = _BoundedServer((host, port), _handler(backend))
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
