"""``embedwatch produce``: a load generator of embedding and query events, with scheduled faults.

The generator (:class:`EventGenerator`) is pure and seeded: the same arguments give the same
events, which the demo, the tests and the benchmarks rely on. :func:`produce` writes them to
Kafka at a target rate or flat out, keyed by stream so one stream stays on one partition.

Each stream draws unit-norm vectors around its own random centre (a cone whose spread resembles
sentence embeddings: pairwise cosine ~0.2-0.5). Faults, scheduled by per-stream event index:

========== ============================================================================
kind        effect from ``at`` (until ``until``, if given)
========== ============================================================================
shift       centre moves by ``magnitude`` along a random direction (distribution shift)
rotation    vectors rotated by ``angle`` radians in every pair of the first ``planes*2`` dims
scale       vectors multiplied by ``factor`` (a normalisation bug)
dimension   vectors of ``dim`` dims (model swapped under the consumers)
nan         ``count`` events carry NaN components
latency     latency_ms multiplied by ``factor``
segment     events go to segment ``name`` (a new client)
========== ============================================================================
"""

from __future__ import annotations

import base64
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

FAULT_KINDS = ("shift", "rotation", "scale", "dimension", "nan", "latency", "segment")


@dataclass(frozen=True)
class Fault:
    kind: str
    at: int
    stream: int = 0
    until: int | None = None
    magnitude: float = 0.5
    angle: float = 0.6
    planes: int = 64
    factor: float = 3.0
    dim: int = 768
    count: int = 50
    name: str = "new-segment"

    @classmethod
    def parse(cls, text: str) -> Fault:
        """``kind@at[:until][,key=value...]``, e.g. ``shift@5000,stream=1,magnitude=0.4``.

        Raises ValueError naming the fault and what is wrong with it.
        """
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts or "@" not in parts[0]:
            raise ValueError(f"fault {text!r}: expected kind@index[:until][,key=value...]")
        head, *opts = parts
        kind, when = head.split("@", 1)
        if kind not in FAULT_KINDS:
            raise ValueError(f"fault {text!r}: kind must be one of {', '.join(FAULT_KINDS)}")
        at_s, _, until_s = when.partition(":")
        kw: dict[str, Any] = {"kind": kind, "at": _parse_number(text, "index", at_s, int)}
        if until_s:
            kw["until"] = _parse_number(text, "until", until_s, int)
        types: dict[str, Callable[[str], Any]] = {
            f: type(getattr(cls, f)) for f in ("stream", "magnitude", "angle", "planes", "factor", "dim", "count",
                                               "name")
        }
        for o in opts:
            k, eq, v = o.partition("=")
            if k not in types:
                raise ValueError(f"fault {text!r}: unknown option {k!r} (options: {', '.join(types)})")
            if not eq or not v:
                raise ValueError(f"fault {text!r}: option {k!r} needs a value ({k}=...)")
            kw[k] = v if types[k] is str else _parse_number(text, k, v, types[k])
        fault = cls(**kw)
        fault.check(text)
        return fault

    def check(self, text: str | None = None) -> None:
        """ValueError if a number is out of range (a zero dim would divide by zero later)."""
        where = f"fault {text if text is not None else self.kind + '@' + str(self.at)!r}"
        if self.at < 0:
            raise ValueError(f"{where}: index must be >= 0 (got {self.at})")
        if self.until is not None and self.until <= self.at:
            raise ValueError(f"{where}: until ({self.until}) must be after the index ({self.at})")
        if self.stream < 0:
            raise ValueError(f"{where}: stream must be >= 0 (got {self.stream})")
        for name, low in (("dim", 1), ("planes", 1), ("count", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{where}: {name} must be >= {low} (got {getattr(self, name)})")
        for name in ("magnitude", "angle", "factor"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{where}: {name} must be a finite number (got {getattr(self, name)})")

    def active(self, idx: np.ndarray) -> np.ndarray:
        m = idx >= self.at
        if self.until is not None:
            m &= idx < self.until
        return m


def _parse_number(text: str, what: str, value: str, kind: Callable[[str], Any]) -> Any:
    try:
        return kind(value)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ValueError(f"fault {text!r}: {what} {value!r} is not {noun}") from None


@dataclass
class StreamSpec:
    model: str
    model_version: str
    segment: str = "default"


@dataclass
class GeneratorConfig:
    streams: int = 3
    dim: int = 384
    encoding: str = "json"  # json | b64
    query_ratio: float = 0.0
    seed: int = 0
    model_prefix: str = "model"
    faults: list[Fault] = field(default_factory=list)
    base_latency_ms: float = 15.0
    spread: float = 1.2


class EventGenerator:
    """Seeded synthetic events; :meth:`chunk` yields per-stream batches as encoded messages.

    >>> g = EventGenerator(GeneratorConfig(streams=2, dim=8))
    >>> msgs = g.messages(10)
    >>> len(msgs), sorted({orjson.loads(v)["model"] for _, v in msgs})
    (10, ['model-0', 'model-1'])
    """

    def __init__(self, cfg: GeneratorConfig) -> None:
        if cfg.streams < 1:
            raise ValueError(f"streams must be >= 1 (got {cfg.streams})")
        if cfg.dim < 1:
            raise ValueError(f"dim must be >= 1 (got {cfg.dim})")
        for f in cfg.faults:
            f.check()
            if f.stream >= cfg.streams:
                raise ValueError(f"fault {f.kind}@{f.at}: stream={f.stream} but there are only {cfg.streams} "
                                 f"streams (0-{cfg.streams - 1})")
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)
        self.streams = [StreamSpec(f"{cfg.model_prefix}-{i}", "v1") for i in range(cfg.streams)]
        self._centres: dict[tuple[int, int], np.ndarray] = {}
        self._directions: dict[tuple[int, int], np.ndarray] = {}
        self.index = np.zeros(cfg.streams, dtype=np.int64)
        self._nan_left = {id(f): f.count for f in cfg.faults if f.kind == "nan"}
        # Stream that gets the first of the leftover events of the next call: rotated so that at
        # low rates (fewer events per call than streams) every stream gets its share.
        self._next_extra = 0

    def _centre(self, s: int, dim: int) -> np.ndarray:
        key = (s, dim)
        if key not in self._centres:
            r = np.random.default_rng([self.cfg.seed, s, dim])
            c = r.standard_normal(dim)
            self._centres[key] = c / np.linalg.norm(c)
            d = r.standard_normal(dim)
            d -= d @ self._centres[key] * self._centres[key]
            self._directions[key] = d / np.linalg.norm(d)
        return self._centres[key]

    def vectors(self, s: int, idx: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """Vectors of stream ``s`` for per-stream indices ``idx`` with faults applied."""
        n = idx.size
        cfg = self.cfg
        dim = cfg.dim
        info: dict[str, Any] = {"latency_factor": np.ones(n), "segment": None}
        faults = [f for f in cfg.faults if f.stream == s]
        for f in faults:
            if f.kind == "dimension" and f.active(idx).all():
                dim = f.dim
        c = self._centre(s, dim)
        noise = self.rng.standard_normal((n, dim)) * (cfg.spread / math.sqrt(dim))
        x = c + noise
        for f in faults:
            m = f.active(idx)
            if not m.any():
                continue
            if f.kind == "shift":
                x[m] += f.magnitude * self._directions[(s, dim)]
            elif f.kind == "rotation":
                k = min(f.planes * 2, dim - dim % 2)
                a, b = x[m, 0:k:2].copy(), x[m, 1:k:2].copy()
                ca, sa = math.cos(f.angle), math.sin(f.angle)
                x[np.ix_(m, np.arange(0, k, 2))] = ca * a - sa * b
                x[np.ix_(m, np.arange(1, k, 2))] = sa * a + ca * b
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        for f in faults:
            m = f.active(idx)
            if not m.any():
                continue
            if f.kind == "scale":
                x[m] *= f.factor
            elif f.kind == "nan":
                left = self._nan_left[id(f)]
                rows = np.flatnonzero(m)[:left]
                x[rows, 0] = np.nan
                self._nan_left[id(f)] = left - rows.size
            elif f.kind == "latency":
                info["latency_factor"][m] *= f.factor
            elif f.kind == "segment":
                info["segment"] = (m, f.name)
        return x.astype(np.float32), info

    def messages(self, n: int, ts: float | None = None) -> list[tuple[bytes, bytes]]:
        """``n`` events round-robin over the streams, as (key, value) pairs."""
        cfg = self.cfg
        out: list[tuple[bytes, bytes]] = []
        now = time.time() if ts is None else ts
        per = np.full(cfg.streams, n // cfg.streams)
        extra = n % cfg.streams
        per[(self._next_extra + np.arange(extra)) % cfg.streams] += 1
        self._next_extra = (self._next_extra + extra) % cfg.streams
        chunks: list[list[tuple[bytes, bytes]]] = []
        for s, spec in enumerate(self.streams):
            k = int(per[s])
            if k == 0:
                chunks.append([])
                continue
            idx = self.index[s] + np.arange(k)
            self.index[s] += k
            x, info = self.vectors(s, idx)
            lat = self.rng.gamma(4.0, cfg.base_latency_ms / 4.0, size=k) * info["latency_factor"]
            is_query = self.rng.random(k) < cfg.query_ratio
            seg_mask, seg_name = info["segment"] if info["segment"] else (np.zeros(k, bool), "")
            rows: list[tuple[bytes, bytes]] = []
            for i in range(k):
                segment = seg_name if seg_mask[i] else spec.segment
                ev: dict[str, Any] = {"model": spec.model, "model_version": spec.model_version,
                                      "segment": segment, "ts": now, "id": f"{spec.model}-{int(idx[i])}",
                                      "latency_ms": round(float(lat[i]), 3)}
                if cfg.encoding == "b64":
                    ev["embedding_b64"] = base64.b64encode(x[i].astype("<f4").tobytes()).decode()
                else:
                    ev["embedding"] = x[i]
                if is_query[i]:
                    ev.pop("id")
                    ev["query_id"] = f"q-{spec.model}-{int(idx[i])}"
                    ev["results"] = _results(self.rng, 10)
                    ev["relevant_ids"] = [ev["results"][0]["id"]] if self.rng.random() < 0.7 else []
                key = f"{spec.model}/{spec.model_version}/{segment}".encode()
                rows.append((key, _dumps(ev)))
            chunks.append(rows)
        # Interleave streams so each batch of the consumer sees all of them.
        longest = max(len(c) for c in chunks)
        for i in range(longest):
            for c in chunks:
                if i < len(c):
                    out.append(c[i])
        return out


def _results(rng: np.random.Generator, k: int) -> list[dict[str, Any]]:
    scores = np.sort(rng.beta(6, 3, size=k))[::-1]
    ids = rng.integers(0, 100_000, size=k)
    return [{"id": f"doc-{int(i)}", "score": round(float(s), 4)} for i, s in zip(ids, scores, strict=True)]


def _dumps(ev: dict[str, Any]) -> bytes:
    # NaN must survive as a JSON token (as many producers emit it) so the service sees non_finite.
    emb = ev.get("embedding")
    if isinstance(emb, np.ndarray) and not np.isfinite(emb).all():
        ev = dict(ev)
        ev["embedding"] = [None if not math.isfinite(v) else float(v) for v in emb.tolist()]
        return orjson.dumps(ev).replace(b"null", b"NaN")
    return orjson.dumps(ev, option=orjson.OPT_SERIALIZE_NUMPY)


def split_topics(pairs: list[tuple[bytes, bytes]], embeddings_topic: str,
                 queries_topic: str | None) -> Iterator[tuple[str, bytes, bytes]]:
    for key, value in pairs:
        topic = queries_topic if (queries_topic and b'"results"' in value) else embeddings_topic
        yield topic, key, value


#: Seconds to wait for the broker's metadata at start, and for the last events at the end.
CONNECT_TIMEOUT_S = 10.0
FLUSH_TIMEOUT_S = 60.0


class ProduceError(Exception):
    """The broker cannot be reached, or events were not delivered (a one-line message)."""


@dataclass
class ProduceResult:
    sent: int = 0  # handed to the client
    failed: int = 0  # reported failed by the client's delivery reports
    last_error: str | None = None


def produce(
    bootstrap: str,
    gen: EventGenerator,
    total: int,
    rate: float | None,
    embeddings_topic: str = "embeddings",
    queries_topic: str | None = "queries",
    chunk: int = 1000,
    on_progress: Callable[[ProduceResult], None] | None = None,
    producer_config: dict[str, Any] | None = None,
) -> ProduceResult:
    """Write ``total`` events (0: until interrupted) at ``rate`` events/s (None: flat out).

    Raises ProduceError if the broker gives no metadata within ``CONNECT_TIMEOUT_S`` (before
    anything is sent), or if events are still undelivered ``FLUSH_TIMEOUT_S`` after the last one.
    """
    result = ProduceResult()

    def failed(err: object) -> None:
        result.failed += 1
        result.last_error = str(err)

    send, flush = _producer(bootstrap, producer_config or {}, failed)
    t0 = time.monotonic()
    try:
        while total == 0 or result.sent < total:
            n = chunk if total == 0 else min(chunk, total - result.sent)
            if rate:
                n = max(1, min(n, int(rate / 10) or 1))
            for topic, key, value in split_topics(gen.messages(n), embeddings_topic, queries_topic):
                send(topic, key, value)
            result.sent += n
            if on_progress is not None:
                on_progress(result)
            if rate:
                ahead = result.sent / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
    finally:
        flush()
    return result


def _producer(bootstrap: str, extra: dict[str, Any],
              on_failure: Callable[[object], None]) -> tuple[Callable[[str, bytes, bytes], None], Callable[[], None]]:
    """A fast producer: confluent-kafka when installed, else kafka-python; ``on_failure`` gets
    each delivery error. The broker is asked for metadata first: an unreachable one is an error
    at once, not a run that reports rates while nothing arrives."""
    unreachable = f"cannot reach the Kafka broker at {bootstrap}"
    try:
        from confluent_kafka import KafkaException, Producer
    except ImportError:
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        # The constructor waits for the broker: bootstrap_timeout_ms (kafka-python >= 3), else
        # api_version_auto_timeout_ms.
        wait = next(k for k in ("bootstrap_timeout_ms", "api_version_auto_timeout_ms", "request_timeout_ms")
                    if k in KafkaProducer.DEFAULT_CONFIG)
        try:
            kp = KafkaProducer(bootstrap_servers=bootstrap.split(","), linger_ms=20, batch_size=1 << 20,
                               acks="all", max_request_size=8 << 20,
                               **{wait: int(CONNECT_TIMEOUT_S * 1000), **extra})
        except KafkaError as e:
            raise ProduceError(f"{unreachable} ({e})") from None

        def send_kp(topic: str, key: bytes, value: bytes) -> None:
            kp.send(topic, key=key, value=value).add_errback(on_failure)

        def flush_kp() -> None:
            try:
                kp.flush(timeout=FLUSH_TIMEOUT_S)
            except KafkaError as e:
                raise ProduceError(f"events not delivered within {FLUSH_TIMEOUT_S:.0f}s to {bootstrap} "
                                   f"({type(e).__name__})") from None
            finally:
                kp.close(timeout=0)

        return send_kp, flush_kp

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            on_failure(err.str() if hasattr(err, "str") else err)

    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "acks": "all",
                  "queue.buffering.max.messages": 1_000_000, "message.max.bytes": 8 << 20,
                  "enable.idempotence": True, "on_delivery": on_delivery,
                  "delivery.report.only.error": True, "logger": _rdkafka_logger(), **extra})
    try:
        p.list_topics(timeout=CONNECT_TIMEOUT_S)
    except KafkaException as e:
        err = e.args[0] if e.args else e
        raise ProduceError(f"{unreachable} (no metadata within {CONNECT_TIMEOUT_S:.0f}s: "
                           f"{err.str() if hasattr(err, 'str') else err})") from None

    def send(topic: str, key: bytes, value: bytes) -> None:
        while True:
            try:
                p.produce(topic, value=value, key=key)
                p.poll(0)
                return
            except BufferError:
                p.poll(0.05)

    def flush() -> None:
        left = p.flush(FLUSH_TIMEOUT_S)
        if left:
            raise ProduceError(f"{left} events not delivered within {FLUSH_TIMEOUT_S:.0f}s to {bootstrap}")

    return send, flush


class _OncePerMessage(logging.Filter):
    """librdkafka repeats a connection failure every few hundred ms; each distinct message once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


def _rdkafka_logger() -> logging.Logger:
    log = logging.getLogger("embedwatch.produce.rdkafka")
    if not log.filters:
        log.addFilter(_OncePerMessage())
    return log
