"""The ``embedwatch`` command: run, produce, replay, baseline, watch, config."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from embedwatch import __version__
from embedwatch.config import ConfigError, Settings, load_settings, settings_reference_markdown

if TYPE_CHECKING:
    from embedwatch.app import Service
    from embedwatch.events import StreamKey
    from embedwatch.state import DurableBaselineStore

log = logging.getLogger("embedwatch")


def _settings(path: str | None) -> Settings:
    """The command's settings; their ``blas_threads`` applies from here on (the file's value wins
    over the EMBEDWATCH_BLAS_THREADS default :func:`main` set; main's limit restores on exit)."""
    from threadpoolctl import threadpool_limits

    try:
        s = load_settings(path)
    except ConfigError as e:
        print(f"embedwatch: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    threadpool_limits(limits=s.blas_threads, user_api="blas")
    return s


def _fail(message: str, status: int) -> int:
    """Report a problem with what the command was given on one line; the exit status."""
    print(f"embedwatch: {message}", file=sys.stderr)
    return status


class _RemoteError(Exception):
    """A call to a running service failed; ``status`` 1, or 2 for a bad ``--url``."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


BLAS_THREADS_ENV = "EMBEDWATCH_BLAS_THREADS"


def _blas_threads() -> int:
    """``EMBEDWATCH_BLAS_THREADS`` (default 1), checked as the setting ``blas_threads`` is: read
    here, before any command loads its settings, so a bad value must not crash the parse."""
    raw = os.environ.get(BLAS_THREADS_ENV)
    if raw is None:
        return 1
    from pydantic import TypeAdapter, ValidationError

    try:
        return int(TypeAdapter(Annotated[int, Settings.model_fields["blas_threads"]]).validate_python(raw))
    except ValidationError as e:
        msg = e.errors()[0]["msg"] if e.errors() else str(e)
        raise ConfigError(f"invalid configuration (environment): {BLAS_THREADS_ENV}: {msg} (got {raw!r})") from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The Kafka clients are chatty at INFO during rebalances and reconnects.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, getattr(logging, level)))


def _open_state(settings: Settings, beat: Callable[[], None] = lambda: None,
                ) -> tuple[Any, DurableBaselineStore | None, dict[str, bytes]]:
    """The state backend, the baseline store restored from it (None without durable state) and
    the other records read; retried with backoff while the backend is unreachable. ``beat`` is
    called at each attempt and each record read: the process is alive while it is called."""
    import random

    from embedwatch.state import DurableBaselineStore, open_state_backend

    delay = 0.5
    while True:
        beat()
        try:
            backend = open_state_backend(settings)
            store = (DurableBaselineStore(backend, None, settings.detection)
                     if settings.state.backend != "none" else None)
            # The store takes its records as the read comes to them, so they are not all held.
            records = store.read(backend.read_all, beat) if store is not None else backend.read_all()
            break
        except Exception as e:  # the broker may be down at start: keep trying, never crash-loop
            log.error("state backend %s unavailable (%s); retrying in %.1fs", settings.state.backend, e, delay)
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 30.0)
    # Informational only, so outside the retry loop: a store that fails to list its versions is
    # not an unreachable backend, and the state already read must not be read again forever.
    try:
        versions = len(store.list()) if store is not None else 0
    except Exception as e:
        log.warning("state: cannot count the restored baseline versions (%s)", e)
        versions = 0
    if records or versions:
        log.info("state: %d baseline versions and %d other records restored from the %s backend",
                 versions, len(records), settings.state.backend)
    return backend, store, records


class _Views:
    """What the HTTP server shows, from the process's start: the service's views once it exists;
    before, while the durable state is read (seconds on a large state topic, and for as long as
    the backend is unreachable), a starting process. /metrics answers then (``embedwatch_up`` 1,
    ``embedwatch_ready`` 0, ``embedwatch_kafka_connected`` 0: an unreachable broker at start is
    EmbedwatchKafkaDisconnected, not a target that never answers), /readyz is 503, /healthz is
    200 while the read makes progress or retries, and the baseline API is 503."""

    def __init__(self, stall_s: float = 120.0) -> None:
        self.service: Service | None = None
        self._stall_s = stall_s
        self._beat = time.monotonic()

    def beat(self) -> None:
        self._beat = time.monotonic()

    def _started(self) -> Service:
        from embedwatch.api import ApiError

        if self.service is None:
            raise ApiError(503, "starting: the durable state is being read")
        return self.service

    def healthy(self) -> bool:
        if self.service is None:
            return time.monotonic() - self._beat < self._stall_s
        return self.service.healthy(self._stall_s)

    def ready(self) -> bool:
        return self.service is not None and self.service.ready

    def streams(self) -> dict[str, Any]:
        return self.service.streams_state() if self.service is not None else {}

    def baselines(self, stream: str | None) -> list[dict[str, Any]]:
        return self._started().list_baselines(stream)

    def promote(self, key: StreamKey, baseline_id: str | None, events: int | None) -> dict[str, Any]:
        return self._started().promote_baseline(key, baseline_id, events)

    def rollback(self, key: StreamKey) -> dict[str, Any]:
        return self._started().rollback_baseline(key)

    def forget(self, key: StreamKey) -> dict[str, Any]:
        return self._started().forget_baselines(key)

    def upload(self, key: StreamKey, data: bytes, activate: bool) -> dict[str, Any]:
        return self._started().upload_baseline(key, data, activate)

    def monitors(self, key: StreamKey) -> bool:
        return self.service is not None and self.service.monitors_stream(key)


def cmd_run(args: argparse.Namespace) -> int:
    from embedwatch import heap
    from embedwatch.api import Backend, HttpServer
    from embedwatch.app import Service, starting_metrics
    from embedwatch.exporter import Exporter, make_registry
    from embedwatch.sources import open_dead_letter_sink, open_kafka_source

    settings = _settings(args.config)
    _setup_logging(settings.log_level)
    exporter = Exporter()
    starting_metrics(exporter)
    views = _Views()
    token = settings.http.admin_token.get_secret_value() if settings.http.admin_token else None
    http = HttpServer(Backend(registry=make_registry(exporter), healthy=views.healthy, ready=views.ready,
                              streams=views.streams, baselines=views.baselines, promote=views.promote,
                              rollback=views.rollback, admin_token=token, forget=views.forget,
                              monitors=views.monitors, upload=views.upload),
                      settings.http.host, settings.http.port)
    http.start()
    log.info("embedwatch %s listening on %s:%d", __version__, settings.http.host, http.port)
    try:
        backend, baselines, records = _open_state(settings, views.beat)
        service = Service(settings, exporter=exporter, baselines=baselines, state_backend=backend,
                          state_records=records)
        # Each took what it needs (decoded baselines, this group's checkpoints); held here for the
        # life of the process, the records kept every stored baseline and checkpoint in memory.
        del records
        views.service = service
        service.handle_signals()
        source = open_kafka_source(settings, listener=service)
        sink = open_dead_letter_sink(settings)
        heap.settle_collector(settings.kafka.max_poll_records)
        service.run(source, sink)
    finally:
        http.stop()
    return 0


def cmd_produce(args: argparse.Namespace) -> int:
    from embedwatch.produce import EventGenerator, Fault, GeneratorConfig, ProduceError, ProduceResult, produce

    try:
        faults = [Fault.parse(f) for f in args.fault]
        gen = EventGenerator(GeneratorConfig(streams=args.streams, dim=args.dim, encoding=args.encoding,
                                             query_ratio=args.query_ratio, seed=args.seed,
                                             model_prefix=args.model_prefix, faults=faults))
    except ValueError as e:
        return _fail(str(e), 2)
    t0 = time.monotonic()
    last = [t0]

    def failures(r: ProduceResult) -> str:
        return f", {r.failed} failed to deliver (last: {r.last_error})" if r.failed else ""

    def progress(r: ProduceResult) -> None:
        now = time.monotonic()
        if not args.quiet and now - last[0] >= 2:
            last[0] = now
            print(f"produced {r.sent} events ({r.sent / (now - t0):,.0f}/s){failures(r)}", file=sys.stderr)

    try:
        result = produce(args.bootstrap, gen, args.total, args.rate, args.topic, args.queries_topic or None,
                         on_progress=progress)
    except KeyboardInterrupt:
        return 0
    except ProduceError as e:
        return _fail(str(e), 1)
    dt = time.monotonic() - t0
    print(f"produced {result.sent} events in {dt:.1f}s ({result.sent / max(dt, 1e-9):,.0f}/s){failures(result)}",
          file=sys.stderr)
    return 1 if result.failed else 0


def cmd_replay(args: argparse.Namespace) -> int:
    from embedwatch.replay import ReplayError, load_baselines, run_replay

    settings = _settings(args.config)
    _setup_logging("WARNING")
    try:
        baselines = load_baselines(args.baseline) if args.baseline else None
        run_replay(Path(args.events), Path(args.report), settings, reference_size=args.reference_size,
                   progress=not args.quiet, baselines=baselines)
    except ConfigError as e:  # --reference-size out of the configuration's range
        return _fail(str(e), 2)
    except ReplayError as e:
        return _fail(str(e), e.status)
    return 0


def cmd_baseline_build(args: argparse.Namespace) -> int:
    from embedwatch.replay import ReplayError, build_baseline

    settings = _settings(args.config)
    try:
        metas = build_baseline(Path(args.events), Path(args.output), settings, stream=args.stream,
                               reference_size=args.reference_size)
    except ConfigError as e:
        return _fail(str(e), 2)
    except ReplayError as e:
        return _fail(str(e), e.status)
    for m in metas:
        print(f"{m['model']}/{m['model_version']}/{m['segment']}  baseline {m['baseline_id']}  "
              f"dim={m['dim']} count={m['count']}")
    return 0


def _http(method: str, url: str, token: str | None = None, body: dict[str, Any] | bytes | None = None,
          timeout: float = 10.0) -> Any:
    """The JSON answer of the service (``body``: a JSON object, or bytes sent as they are);
    :class:`_RemoteError` naming the status and the body."""
    import http.client
    import urllib.error
    import urllib.request

    import orjson

    data = body if isinstance(body, bytes) else orjson.dumps(body or {}) if method == "POST" else None
    try:
        req = urllib.request.Request(url, method=method, data=data)
    except ValueError as e:  # e.g. no http:// scheme
        raise _RemoteError(f"bad --url {url}: {e}", 2) from None
    if isinstance(body, bytes):
        req.add_header("Content-Type", "application/octet-stream")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            data = r.read()
    except urllib.error.HTTPError as e:  # before URLError, its base class
        text = " ".join(e.read().decode("utf-8", "replace").split())[:500]
        raise _RemoteError(f"{method} {url}: HTTP {e.code} {e.reason}" + (f": {text}" if text else "")) from None
    except urllib.error.URLError as e:
        raise _RemoteError(f"{method} {url}: cannot reach the service: {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:  # timeout or connection reset mid-answer
        raise _RemoteError(f"{method} {url}: {str(e) or type(e).__name__}") from None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        raise _RemoteError(f"{method} {url}: the answer is not JSON: {data[:200]!r}") from None


def _service_url(text: str) -> str:
    """``--url`` without its trailing slash; :class:`_RemoteError` (status 2) unless it is
    ``http(s)://host[:port]``."""
    import urllib.parse

    base = text.rstrip("/")
    url = urllib.parse.urlsplit(base)
    if url.scheme not in ("http", "https") or not url.netloc:
        raise _RemoteError(f"bad --url {text}: expected http://host:port", 2)
    return base


def _admin_token() -> str | None:
    # The same variable the service reads its token from, so one Secret serves both; stripped as
    # the service strips it (a Secret file ends with a newline).
    return os.environ.get("EMBEDWATCH_HTTP__ADMIN_TOKEN", "").strip() or None


def _print_answer(call: Callable[[], Any]) -> int:
    """Print the service's JSON answer to ``call``, or fail with its error; the exit status."""
    import orjson

    try:
        doc = call()
    except _RemoteError as e:
        return _fail(str(e), e.status)
    print(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())
    return 0


def cmd_baseline_remote(args: argparse.Namespace) -> int:
    def call() -> Any:
        base = _service_url(args.url)
        if args.action == "list":
            return _http("GET", f"{base}/api/baselines")
        events = getattr(args, "events", None)
        return _http("POST", f"{base}/api/baselines/{args.stream}/{args.action}", _admin_token(),
                     {"events": events} if events is not None else None)

    return _print_answer(call)


def cmd_baseline_upload(args: argparse.Namespace) -> int:
    """Send a baseline file of ``baseline build`` to a running service, which stores it as a
    version of its stream (and with ``--activate`` makes it the active one)."""
    import urllib.parse

    from embedwatch.baseline_store import encode_baseline, load_file

    try:
        base = _service_url(args.url)
    except _RemoteError as e:
        return _fail(str(e), e.status)
    try:
        # Checked here first (hashes, shapes): a file changed since it was built is not sent.
        baseline = load_file(args.file)
    except (OSError, LookupError, ValueError) as e:  # missing, unreadable, changed or unusable
        return _fail(f"cannot read baseline {args.file}: {e}", 2)
    stream = urllib.parse.quote(str(baseline.key), safe="/")
    path = f"{base}/api/baselines/{stream}/upload" + ("?activate=true" if args.activate else "")
    # The service tries the baseline in a monitor before storing it: 0.1-0.2 s at 384-1,536-d,
    # longer at larger dims or on a busy service.
    return _print_answer(lambda: _http("POST", path, _admin_token(), encode_baseline(baseline), timeout=120.0))


def cmd_watch(args: argparse.Namespace) -> int:
    from embedwatch.watch import watch

    return watch(args.url, interval=args.interval, once=args.once)


def cmd_config(args: argparse.Namespace) -> int:
    if args.action in ("docs", "metrics-docs"):
        if args.action == "docs":
            text = settings_reference_markdown()
        else:
            from embedwatch.metrics_catalog import reference_markdown

            text = reference_markdown()
        if args.output:
            Path(args.output).write_text(text, encoding="utf-8")
        else:
            sys.stdout.write(text)
        return 0
    s = _settings(args.config)
    print(s.model_dump_json(indent=2))
    return 0


def _number(kind: type[int] | type[float], low: float, *, strict: bool = False, high: float | None = None
            ) -> Callable[[str], float]:
    """An argparse type: a ``kind`` >= ``low`` (> if ``strict``), <= ``high``; argparse turns the
    ValueError into a one-line usage error, exit 2."""
    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}"
                                             ) from None
        if not math.isfinite(v) or v < low or (strict and v == low) or (high is not None and v > high):
            bound = f"> {low:g}" if strict else f">= {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound}{f' and <= {high:g}' if high is not None else ''}"
                                             f" (got {text})")
        return v

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="embedwatch", description="Watch production embedding streams for "
                                "drift, bad data and latency.")
    p.add_argument("--version", action="version", version=f"embedwatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="consume Kafka and serve /metrics and the API")
    r.add_argument("--config", help="YAML settings file (env EMBEDWATCH_* overrides)")
    r.set_defaults(func=cmd_run)

    pr = sub.add_parser("produce", help="write synthetic embedding/query events to Kafka")
    pr.add_argument("--bootstrap", default="127.0.0.1:9092")
    pr.add_argument("--topic", default="embeddings")
    pr.add_argument("--queries-topic", default="queries")
    pr.add_argument("--streams", type=_number(int, 1), default=3)
    pr.add_argument("--dim", type=_number(int, 1), default=384)
    pr.add_argument("--encoding", choices=["json", "b64"], default="json")
    pr.add_argument("--rate", type=_number(float, 0, strict=True), default=None,
                    help="events/s (default: flat out)")
    pr.add_argument("--total", type=_number(int, 0), default=10_000, help="events to write (0: until Ctrl-C)")
    pr.add_argument("--query-ratio", type=_number(float, 0, high=1), default=0.0)
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--model-prefix", default="model")
    pr.add_argument("--fault", action="append", default=[],
                    help="kind@index[:until][,key=value], kinds: shift rotation scale dimension nan latency "
                         "segment; e.g. shift@3000,stream=1,magnitude=0.4")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=cmd_produce)

    rp = sub.add_parser("replay", help="run the detectors offline over a JSONL file of events")
    rp.add_argument("events")
    rp.add_argument("--report", required=True)
    rp.add_argument("--config")
    rp.add_argument("--reference-size", type=int, default=None)
    rp.add_argument("--baseline", action="append", default=[], metavar="FILE",
                    help="a baseline file written by `baseline build` (X.npz, X.json or X); its stream "
                    "is monitored against it from its first event (repeat for several streams)")
    rp.add_argument("--quiet", action="store_true")
    rp.set_defaults(func=cmd_replay)

    b = sub.add_parser("baseline", help="build baselines from a file; list/promote/rollback/forget/upload on a "
                       "service")
    bsub = b.add_subparsers(dest="action", required=True)
    bb = bsub.add_parser("build", help="build a baseline from the first events of each stream of a file")
    bb.add_argument("events")
    bb.add_argument("-o", "--output", required=True)
    bb.add_argument("--config")
    bb.add_argument("--stream", default=None, help="model/model_version/segment (default: every stream); "
                    "model/model_version/segment/query: the baseline of that stream's query embeddings")
    bb.add_argument("--reference-size", type=int, default=None)
    bb.set_defaults(func=cmd_baseline_build)
    helps = {"list": "list the baselines of a running service",
             "promote": "promote a stream's baseline on a running service",
             "rollback": "roll a stream's baseline back on a running service",
             "forget": "remove the stored baselines of a retired stream (and of its query embeddings) from a "
                       "running service's baseline store"}
    for action, text in helps.items():
        # Reads are open; only mutations send the token.
        token_note = "" if action == "list" else " (token from EMBEDWATCH_HTTP__ADMIN_TOKEN)"
        ba = bsub.add_parser(action, help=text + token_note)
        ba.add_argument("--url", default="http://127.0.0.1:9108")
        if action != "list":
            ba.add_argument("stream", help="model/model_version/segment, or model/model_version/segment/query "
                            "for the stream's query embeddings alone")
        if action == "promote":
            ba.add_argument("--events", type=int, default=None,
                            help="events of the new baseline (default: detection.reference_size)")
        ba.set_defaults(func=cmd_baseline_remote)
    bu = bsub.add_parser("upload", help="store a baseline file of `baseline build` as a version of its stream on a "
                         "running service (token from EMBEDWATCH_HTTP__ADMIN_TOKEN)")
    bu.add_argument("--url", default="http://127.0.0.1:9108")
    bu.add_argument("file", help="X.npz, X.json or X (the pair X.npz + X.json `baseline build` wrote)")
    bu.add_argument("--activate", action="store_true",
                    help="make it the stream's active baseline: at once if the stream is live, from its first "
                    "event if not yet")
    bu.set_defaults(func=cmd_baseline_upload)

    w = sub.add_parser("watch", help="live terminal summary of a running service")
    w.add_argument("--url", default="http://127.0.0.1:9108")
    w.add_argument("--interval", type=_number(float, 0, strict=True), default=2.0, help="seconds between frames")
    w.add_argument("--once", action="store_true")
    w.set_defaults(func=cmd_watch)

    c = sub.add_parser("config", help="check a config file, or print the configuration reference")
    c.add_argument("action", choices=["check", "docs", "metrics-docs"])
    c.add_argument("--config")
    c.add_argument("-o", "--output")
    c.set_defaults(func=cmd_config)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # The detectors' matrix products are small: with several BLAS threads, the threads spin-wait
    # on each other and on other processes (measured 3-7x slower on 2 cores). One thread per
    # process; scale out with replicas. `blas_threads` (EMBEDWATCH_BLAS_THREADS) overrides.
    from threadpoolctl import threadpool_limits

    try:
        threads = _blas_threads()
    except ConfigError as e:
        return _fail(str(e), 2)
    with threadpool_limits(limits=threads, user_api="blas"):
        return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
