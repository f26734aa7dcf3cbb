"""End-to-end machinery: real Kafka + embedwatch + Prometheus + Alertmanager + a notification receiver.

One session-scoped run (:func:`e2e`) serves every e2e test:

1. topics on the test broker, an HTTP receiver recording Slack webhook and PagerDuty Events v2
   POSTs, Alertmanager (``alerts/render.py render_alertmanager``: both receivers point at the
   recorder, 1s group timings) and embedwatch (``ServiceProcess``, small reference and windows,
   no state backend);
2. a warm-up burst builds the baselines of five streams: ``model-0`` (control), ``model-1``
   (drift), ``model-2`` (dimension change) from :class:`EventGenerator` with 30% query events,
   and ``embed-x`` versions ``v1`` and ``v2`` embedding the same ids (version comparison);
3. Prometheus starts only once every stream has its baseline (``BaselineMissing`` has a 5s
   ``for:`` in the rendered rules, and a stream collecting its reference must not fire it), and
   scrapes embedwatch every second, evaluates ``render_rules(for_scale=0, min_for="5s")`` every
   second and alerts to the Alertmanager;
4. a background producer sends steady traffic on the three generator streams; after
   :data:`CLEAN_SECONDS` of clean traffic, stream 1 shifts its mean and stream 2 switches to
   :data:`NEW_DIM` dimensions (``Fault`` schedule by event index). ``run.t_inject`` is the
   monotonic time the first faulty event was sent.

Prometheus and Alertmanager binaries are required: without them the tests FAIL (never skip).
Every process is killed on teardown.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import yaml
from alerts.render import dump_rules, render_alertmanager, render_rules

from embedwatch.produce import EventGenerator, Fault, GeneratorConfig, split_topics
from kafka_broker import create_topics
from service_proc import ServiceProcess, free_port, metric_sum

REPO_ROOT = Path(__file__).resolve().parents[2]

# --- scenario ---------------------------------------------------------------------------------
DIM = 64
NEW_DIM = 96                 # dimension of stream 2 after the "model swap"
SHIFT = 0.25                 # mean shift of stream 1: detected in seconds, centroid distance ~0.03
                             # (well below EmbeddingDriftSevere's 0.1, which would inhibit the warning)
REFERENCE_SIZE = 300
QUERY_RATIO = 0.3
WARMUP_PER_STREAM = 1200     # ~840 embeddings + ~360 queries: both references complete
RATE_PER_STREAM = 100.0      # events/s per generator stream after the warm-up
TICK_PER_STREAM = 10         # events per stream per producer tick (fault index stays tick-aligned)
CLEAN_SECONDS = 10.0         # clean traffic scraped by Prometheus before the faults
VERSION_IDS = 400            # ids embedded by both embed-x/v1 and embed-x/v2
PRODUCER_MAX_SECONDS = 420.0  # the producer stops by itself after this (safety net)
FOR = "5s"                   # every non-zero `for:` of the rendered rules
GRAFANA_URL = "http://grafana.e2e.test"

CONTROL = {"model": "model-0", "model_version": "v1", "segment": "default"}
DRIFT = {"model": "model-1", "model_version": "v1", "segment": "default"}
DIMENSION = {"model": "model-2", "model_version": "v1", "segment": "default"}
VERSION_MODEL = "embed-x"
ALL_STREAMS = [("model-0", "v1"), ("model-1", "v1"), ("model-2", "v1"), (VERSION_MODEL, "v1"),
               (VERSION_MODEL, "v2")]

INJECT_AT = WARMUP_PER_STREAM + int(CLEAN_SECONDS * RATE_PER_STREAM) // TICK_PER_STREAM * TICK_PER_STREAM


# --- binaries ---------------------------------------------------------------------------------
def require_binary(*names: str) -> str:
    """Absolute path of the first of ``names`` on PATH; FAIL (not skip) when none is installed."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"{' / '.join(names)} not found on PATH: the e2e tests need real Prometheus and "
                "Alertmanager (Debian/Ubuntu: `apt-get install prometheus prometheus-alertmanager`). "
                "They fail instead of skipping without them.", pytrace=False)


def require_binaries() -> dict[str, str]:
    return {"prometheus": require_binary("prometheus"), "promtool": require_binary("promtool"),
            "alertmanager": require_binary("prometheus-alertmanager", "alertmanager"),
            "amtool": require_binary("amtool")}


# --- HTTP helpers -----------------------------------------------------------------------------
def http_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    """GET ``url``: (status, parsed JSON body or text); HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            status, body = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5,
               diagnostics: Callable[[], str] | None = None) -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, ValueError, KeyError) as e:
            last_error = e
        if time.monotonic() >= deadline:
            extra = f"\nlast error: {last_error!r}" if last_error else ""
            pytest.fail(f"{what}: not reached within {timeout:.0f}s{extra}\n"
                        f"{diagnostics() if diagnostics else ''}", pytrace=False)
        time.sleep(interval)


# --- notification receiver --------------------------------------------------------------------
@dataclass
class Notification:
    path: str
    body: Any
    at: float        # time.monotonic() when received
    headers: dict[str, str]


class Receiver:
    """Records every POST (Slack webhook at ``/slack``, PagerDuty Events v2 at ``/pagerduty``)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[Notification] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body: Any = json.loads(raw)
                except ValueError:
                    body = raw.decode(errors="replace")
                with receiver.lock:
                    receiver.received.append(Notification(self.path, body, time.monotonic(), dict(self.headers)))
                if self.path.startswith("/pagerduty"):
                    key = body.get("dedup_key", "") if isinstance(body, dict) else ""
                    reply, status = json.dumps({"status": "success", "message": "Event processed",
                                                "dedup_key": key}).encode(), 202
                else:
                    reply, status = b"ok", 200
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="e2e-receiver", daemon=True)
        self.thread.start()

    def notifications(self, path: str | None = None) -> list[Notification]:
        with self.lock:
            return [n for n in self.received if path is None or n.path.startswith(path)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- daemons ----------------------------------------------------------------------------------
class Daemon:
    """A child process with a log file and a readiness URL; killed by pid on :meth:`close`."""

    def __init__(self, name: str, argv: list[str], workdir: Path, ready_url: str) -> None:
        self.name, self.argv, self.ready_url = name, argv, ready_url
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> Daemon:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"{self.name} exited with {self.proc.returncode}: {' '.join(self.argv)}\n"
                            f"{self.tail()}", pytrace=False)
            with contextlib.suppress(OSError):
                if http_json(self.ready_url, timeout=2)[0] == 200:
                    return self
            time.sleep(0.2)
        pytest.fail(f"{self.name} not ready within {timeout:.0f}s\n{self.tail()}", pytrace=False)

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


class Prometheus(Daemon):
    def __init__(self, binary: str, workdir: Path, config: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        super().__init__("prometheus", [
            binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=info",
        ], workdir, f"{self.url}/-/ready")

    def query(self, expr: str, at: float | None = None) -> tuple[int, dict[str, Any]]:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        status, body = http_json(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}")
        return status, body if isinstance(body, dict) else {"status": "error", "error": str(body)}

    def vector(self, expr: str) -> list[dict[str, Any]]:
        status, body = self.query(expr)
        if status != 200 or body.get("status") != "success":
            raise AssertionError(f"query failed ({status}): {expr}\n{body}")
        result = body["data"]["result"]
        return result if isinstance(result, list) else [{"metric": {}, "value": result}]

    def alerts(self) -> list[dict[str, Any]]:
        status, body = http_json(f"{self.url}/api/v1/alerts")
        return list(body["data"]["alerts"]) if status == 200 else []

    def targets_up(self) -> bool:
        status, body = http_json(f"{self.url}/api/v1/targets")
        active = body["data"]["activeTargets"] if status == 200 else []
        return bool(active) and all(t["health"] == "up" for t in active)


class Alertmanager(Daemon):
    def __init__(self, binary: str, workdir: Path, config: Path, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        super().__init__("alertmanager", [
            binary, f"--config.file={config}", f"--storage.path={workdir / 'alertmanager-data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=", "--log.level=info",
        ], workdir, f"{self.url}/-/ready")

    def alerts(self) -> list[dict[str, Any]]:
        status, body = http_json(f"{self.url}/api/v2/alerts")
        return list(body) if status == 200 and isinstance(body, list) else []


# --- traffic ----------------------------------------------------------------------------------
def version_messages(n: int, dim: int, seed: int = 99) -> list[tuple[bytes, bytes]]:
    """``n`` ids embedded by embed-x/v1 and (a slightly perturbed copy) by embed-x/v2."""
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal(dim)
    centre /= np.linalg.norm(centre)
    v1 = centre + rng.standard_normal((n, dim)) * (1.2 / math.sqrt(dim))
    v1 /= np.linalg.norm(v1, axis=1, keepdims=True)
    v2 = v1 + rng.standard_normal((n, dim)) * (0.15 / math.sqrt(dim))
    v2 /= np.linalg.norm(v2, axis=1, keepdims=True)
    now = time.time()
    out: list[tuple[bytes, bytes]] = []
    for i in range(n):
        for version, vecs in (("v1", v1), ("v2", v2)):
            ev = {"model": VERSION_MODEL, "model_version": version, "segment": "default", "ts": now,
                  "id": f"{VERSION_MODEL}-{i}", "latency_ms": 12.0,
                  "embedding": vecs[i].astype(np.float32)}
            out.append((f"{VERSION_MODEL}/{version}/default".encode(),
                        orjson.dumps(ev, option=orjson.OPT_SERIALIZE_NUMPY)))
    return out


class TrafficProducer(threading.Thread):
    """Steady traffic from ``gen`` at :data:`RATE_PER_STREAM`; notes when the faults begin."""

    def __init__(self, bootstrap: str, gen: EventGenerator, embeddings_topic: str, queries_topic: str) -> None:
        super().__init__(name="e2e-producer", daemon=True)
        from kafka import KafkaProducer

        self.producer = KafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=5)
        self.gen = gen
        self.topics = (embeddings_topic, queries_topic)
        self.stop_event = threading.Event()
        self.injected = threading.Event()
        self.t_inject: float | None = None
        self.t_inject_wall: float | None = None
        self.sent = 0
        self.error: BaseException | None = None

    def send(self, messages: list[tuple[bytes, bytes]]) -> None:
        for topic, key, value in split_topics(messages, *self.topics):
            self.producer.send(topic, key=key, value=value)
        self.producer.flush(timeout=30)
        self.sent += len(messages)

    def run(self) -> None:
        streams = self.gen.cfg.streams
        tick_s = TICK_PER_STREAM / RATE_PER_STREAM
        t0 = time.monotonic()
        ticks = 0
        try:
            while not self.stop_event.is_set() and time.monotonic() - t0 < PRODUCER_MAX_SECONDS:
                if self.t_inject is None and self.gen.index.min() >= INJECT_AT:
                    self.t_inject, self.t_inject_wall = time.monotonic(), time.time()
                    self.injected.set()
                self.send(self.gen.messages(TICK_PER_STREAM * streams))
                ticks += 1
                ahead = t0 + ticks * tick_s - time.monotonic()
                if ahead > 0:
                    self.stop_event.wait(ahead)
        except BaseException as e:  # reported by diagnostics and the tests
            self.error = e
            self.injected.set()

    def close(self) -> None:
        self.stop_event.set()
        self.join(timeout=30)
        with contextlib.suppress(Exception):
            self.producer.close(timeout=10)


# --- the run ----------------------------------------------------------------------------------
@dataclass
class E2ERun:
    workdir: Path
    svc: ServiceProcess
    prometheus: Prometheus
    alertmanager: Alertmanager
    receiver: Receiver
    producer: TrafficProducer
    topics: dict[str, str]
    t_prometheus: float
    timeline: dict[str, float] = field(default_factory=dict)

    @property
    def t_inject(self) -> float:
        """Monotonic time of the first faulty event (waits for it, bounded)."""
        if not self.producer.injected.wait(CLEAN_SECONDS + 60):
            pytest.fail(f"faults not injected in time\n{self.diagnostics()}", pytrace=False)
        if self.producer.error is not None or self.producer.t_inject is None:
            pytest.fail(f"producer failed: {self.producer.error!r}\n{self.diagnostics()}", pytrace=False)
        return self.producer.t_inject

    def since_inject(self, t: float) -> float:
        return t - self.t_inject

    def diagnostics(self) -> str:
        """Everything useful when an e2e assertion fails."""
        out = ["", "=" * 30 + " e2e diagnostics " + "=" * 30]
        t_inj = self.producer.t_inject
        now = time.monotonic()
        out.append(f"producer: sent={self.producer.sent} index={self.producer.gen.index.tolist()} "
                   f"inject_at={INJECT_AT} injected={'%.1fs ago' % (now - t_inj) if t_inj else 'no'} "
                   f"error={self.producer.error!r}")
        out.append(f"timeline: {self.timeline}")
        try:
            alerts = self.prometheus.alerts()
            out.append(f"prometheus alerts ({len(alerts)}):")
            out += [f"  {a['state']:8} {a['labels'].get('alertname')} "
                    f"{ {k: v for k, v in a['labels'].items() if k != 'alertname'} } active_at={a.get('activeAt')}"
                    for a in alerts]
            out.append(f"prometheus targets up: {self.prometheus.targets_up()}")
        except Exception as e:
            out.append(f"prometheus alerts unavailable: {e!r}")
        try:
            am = self.alertmanager.alerts()
            out.append(f"alertmanager alerts ({len(am)}):")
            out += [f"  {a['status']['state']:11} {a['labels'].get('alertname')} "
                    f"receivers={[r['name'] for r in a.get('receivers', [])]} "
                    f"{ {k: v for k, v in a['labels'].items() if k != 'alertname'} }" for a in am]
        except Exception as e:
            out.append(f"alertmanager alerts unavailable: {e!r}")
        notes = self.receiver.notifications()
        out.append(f"receiver notifications ({len(notes)}):")
        for n in notes:
            rel = f"{n.at - t_inj:+.1f}s" if t_inj else "?"
            out.append(f"  {n.path} {rel}: {summarize_notification(n)}")
        try:
            m = self.svc.metrics()
            for name in ("embedwatch_drift_detected", "embedwatch_drift_score", "embedwatch_drift_threshold",
                         "embedwatch_centroid_cosine_distance", "embedwatch_baseline_ready",
                         "embedwatch_stream_rejected_total"):
                series = {"/".join(v for lk, v in k if lk in ("model", "model_version", "reason")): val
                          for k, val in m.get(name, {}).items()}
                out.append(f"{name}: {series}")
        except Exception as e:
            out.append(f"service metrics unavailable: {e!r}")
        out.append("--- service log tail ---\n" + self.svc.tail(40))
        out.append("--- prometheus log tail ---\n" + self.prometheus.tail(15))
        out.append("--- alertmanager log tail ---\n" + self.alertmanager.tail(25))
        return "\n".join(out)


def summarize_notification(n: Notification) -> str:
    b = n.body
    if not isinstance(b, dict):
        return repr(b)[:300]
    if n.path.startswith("/pagerduty"):
        p = b.get("payload", {})
        d = p.get("custom_details", {})
        return (f"{b.get('event_action')} severity={p.get('severity')} summary={p.get('summary')!r} "
                f"model={d.get('model')!r} model_version={d.get('model_version')!r}")
    att = (b.get("attachments") or [{}])[0]
    return f"color={att.get('color')} title={att.get('title')!r}"


def _config(bootstrap: str, prefix: str) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": f"{prefix}-group",
                  "embeddings_topic": f"{prefix}-embeddings", "queries_topic": f"{prefix}-queries",
                  "max_poll_records": 500, "session_timeout_ms": 6000},
        "detection": {"reference_size": REFERENCE_SIZE, "window_events": 300, "evaluate_every": 25,
                      "min_window_events": 100, "baseline_sample": 300},
        "state": {"backend": "none"},
    }


def _generator() -> EventGenerator:
    return EventGenerator(GeneratorConfig(
        streams=3, dim=DIM, seed=2024, query_ratio=QUERY_RATIO,
        faults=[Fault.parse(f"shift@{INJECT_AT},stream=1,magnitude={SHIFT}"),
                Fault.parse(f"dimension@{INJECT_AT},stream=2,dim={NEW_DIM}")]))


def _prometheus_config(svc_port: int, am_port: int, rules: Path) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
        "scrape_configs": [{"job_name": "embedwatch",
                            "static_configs": [{"targets": [f"127.0.0.1:{svc_port}"]}]}],
    }


def _check(argv: list[str]) -> None:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if r.returncode != 0:
        pytest.fail(f"{' '.join(argv)} failed:\n{r.stdout}\n{r.stderr}", pytrace=False)


@contextlib.contextmanager
def start_run(kafka_bootstrap: str, kafka_admin: Any, workdir: Path,
              binaries: dict[str, str] | None = None) -> Iterator[E2ERun]:
    """Set up the whole stack (see the module docstring), yield it, tear everything down."""
    binaries = binaries or require_binaries()
    prometheus_bin, promtool_bin = binaries["prometheus"], binaries["promtool"]
    alertmanager_bin, amtool_bin = binaries["alertmanager"], binaries["amtool"]

    prefix = f"e2e-{uuid.uuid4().hex[:8]}"
    names = {s: f"{prefix}-{s}" for s in ("embeddings", "queries", "embeddings.dlq", "queries.dlq")}
    create_topics(kafka_admin, list(names.values()), partitions=3)
    timeline: dict[str, float] = {}
    t_start = time.monotonic()

    with contextlib.ExitStack() as stack:
        def delete_topics() -> None:
            with contextlib.suppress(Exception):  # best effort: the broker is throw-away
                kafka_admin.delete_topics(list(names.values()))

        stack.callback(delete_topics)

        receiver = Receiver()
        stack.callback(receiver.close)

        am_config = workdir / "alertmanager.yml"
        am_config.write_text(render_alertmanager(slack_url=f"{receiver.url}/slack",
                                                 pagerduty_url=f"{receiver.url}/pagerduty",
                                                 group_wait="1s", group_interval="1s"), encoding="utf-8")
        _check([amtool_bin, "check-config", str(am_config)])
        alertmanager = Alertmanager(alertmanager_bin, workdir, am_config, free_port())
        stack.callback(alertmanager.close)
        alertmanager.start()

        svc = ServiceProcess(workdir, _config(kafka_bootstrap, prefix), "embedwatch")
        stack.callback(svc.close)
        svc.start(timeout=90)
        timeline["service_ready"] = time.monotonic() - t_start

        # Warm-up: every stream collects its reference (embeddings and queries) before Prometheus looks.
        gen = _generator()
        producer = TrafficProducer(kafka_bootstrap, gen, names["embeddings"], names["queries"])
        stack.callback(producer.close)
        producer.send(gen.messages(WARMUP_PER_STREAM * gen.cfg.streams) + version_messages(VERSION_IDS, DIM))

        def baselines_ready(m: dict[str, Any]) -> bool:
            return all(metric_sum(m, "embedwatch_baseline_ready", model=mo, model_version=v) == 1
                       for mo, v in ALL_STREAMS)

        svc.wait_for(baselines_ready, timeout=120, what="baselines of all streams")
        timeline["baselines_ready"] = time.monotonic() - t_start

        rules = workdir / "rules.yml"
        rules.write_text(dump_rules(render_rules(for_scale=0.0, min_for=FOR, grafana_url=GRAFANA_URL)),
                         encoding="utf-8")
        prom_config = workdir / "prometheus.yml"
        prom_config.write_text(yaml.safe_dump(_prometheus_config(svc.port, int(alertmanager.url.rsplit(":", 1)[1]),
                                                                 rules)), encoding="utf-8")
        _check([promtool_bin, "check", "config", str(prom_config)])
        prometheus = Prometheus(prometheus_bin, workdir, prom_config, free_port())
        stack.callback(prometheus.close)
        prometheus.start()
        t_prometheus = time.monotonic()
        timeline["prometheus_ready"] = t_prometheus - t_start

        producer.start()
        run = E2ERun(workdir, svc, prometheus, alertmanager, receiver, producer, names, t_prometheus, timeline)
        wait_until(prometheus.targets_up, 30, "Prometheus scrapes embedwatch", diagnostics=run.diagnostics)
        yield run
        timeline["teardown"] = time.monotonic() - t_start
        with contextlib.suppress(Exception):
            span = math.ceil(time.monotonic() - t_prometheus)
            timeline["max_scrape_duration"] = max(float(r["value"][1]) for r in prometheus.vector(
                f"max_over_time(scrape_duration_seconds[{span}s])"))
            timeline["min_up"] = min(float(r["value"][1]) for r in prometheus.vector(f"min_over_time(up[{span}s])"))
        if producer.t_inject is not None:
            timeline["faults_injected"] = producer.t_inject - t_start
        print(f"\ne2e timeline (s): {json.dumps({k: round(v, 1) for k, v in timeline.items()})}")
        # ExitStack closes: producer, Prometheus, service, Alertmanager, receiver, topics.
