"""The service loop: poll a batch, decode, route to the monitors, dead-letter, commit. Nothing lost.

Accounting (the invariant the integration tests check): every event read from a partition is
either accepted by a monitor or written to the dead-letter topic, and the offsets of a batch are
committed only after its dead letters are acknowledged. Each commit carries, in the offset
metadata, the partition's cumulative counts of accepted and dead-lettered events up to that
offset, so the ledger ``embedwatch_consumed_events_total{topic,partition,outcome}`` is restored
exactly by whichever replica owns the partition next, after a crash, a restart or a rebalance.

Before processing a batch the loop also records, in the same metadata, how far the batch reaches
("in flight"). A replica that takes over after a crash therefore knows which events it processes
a second time (at-least-once) and counts them in ``embedwatch_events_replayed_total``.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any, TypeVar

import numpy as np
import orjson

from embedwatch import heap
from embedwatch.baseline import Baseline
from embedwatch.baseline_store import (
    BaselineNotFoundError,
    BaselineRepository,
    MemoryBaselineStore,
    decode_baseline,
)
from embedwatch.config import Settings
from embedwatch.events import DecodedBatch, DecodeLimits, Decoder, Kind, Message, Rejection, StreamKey
from embedwatch.exporter import Exporter, LabelValues
from embedwatch.metrics_catalog import METRICS
from embedwatch.monitor import Alarm, StreamMonitor, trial
from embedwatch.router import RouteResult, StreamRouter, is_idle, last_activity
from embedwatch.sources.base import (
    Committed,
    DeadLetter,
    DeadLetterSink,
    PartitionId,
    Source,
    UnknownTopicError,
    dead_letter_limit,
    fit_dead_letter,
    poll_records,
)
from embedwatch.state import (
    Checkpoint,
    DurableBaselineStore,
    NullStateBackend,
    StateBackend,
    StateError,
    StreamCheckpoint,
    Take,
    build_checkpoint,
    checkpoint_key,
    checkpoints_in,
    decode_checkpoint,
    seal_checkpoint,
)
from embedwatch.window import ts_max

log = logging.getLogger("embedwatch")
_T = TypeVar("_T")

LEDGER_VERSION = 1
#: Seconds without a loop round after which the service is not alive (/healthz 503, embedwatch_up 0).
STALL_S = 120.0
#: Seconds between two looks for streams gone idle (limits.stream_idle_s is days: a minute late is nothing).
IDLE_CHECK_S = 60.0
#: Share of shutdown_timeout_s kept for leaving the group and closing the dead-letter producer: a
#: final checkpoint that stalls must not keep the partitions from their next owner until the
#: session times out.
CLOSE_SHARE = 0.25
_MEASURE_METRICS = [(m.name, m.measure) for m in METRICS if m.measure is not None]


@dataclass(slots=True)
class Ledger:
    """Cumulative per-partition counts up to the committed offset, stored in commit metadata."""

    accepted: int = 0
    dead_lettered: int = 0
    # Offset up to which a previous owner may already have processed (exclusive): replays below it.
    inflight_end: int = -1

    def copy(self) -> Ledger:
        return Ledger(self.accepted, self.dead_lettered)

    def encode(self, inflight_end: int | None = None) -> str:
        doc: dict[str, int] = {"v": LEDGER_VERSION, "a": self.accepted, "d": self.dead_lettered}
        if inflight_end is not None:
            doc["f"] = inflight_end
        return orjson.dumps(doc).decode()

    @classmethod
    def decode(cls, metadata: str) -> Ledger:
        # confluent-kafka stores the metadata with its C string's terminating NUL, which other
        # clients (kafka-python) return: without the strip, a group that changes backend (or runs
        # replicas of both) would restart its ledgers at zero.
        metadata = metadata.rstrip("\x00") if metadata else metadata
        try:
            doc = orjson.loads(metadata) if metadata else {}
        except orjson.JSONDecodeError:
            doc = {}
        if not isinstance(doc, dict) or doc.get("v") != LEDGER_VERSION:
            return cls()
        return cls(int(doc.get("a", 0)), int(doc.get("d", 0)), int(doc.get("f", -1)))


def dlq_headers(msg: Message, r: Rejection) -> list[tuple[str, bytes]]:
    """The original headers, then embedwatch's: reason code, detail and where the event came from."""
    return [
        *msg.headers,
        ("embedwatch-error", r.reason.value.encode()),
        ("embedwatch-error-detail", r.detail.encode("utf-8", "replace")[:1024]),
        ("embedwatch-source-topic", msg.topic.encode()),
        ("embedwatch-source-partition", str(msg.partition).encode()),
        ("embedwatch-source-offset", str(msg.offset).encode()),
    ]


def _stored(change: Callable[[], _T]) -> _T:
    """A change of the baseline store asked for through the API: a mistake of the request (an
    unknown version, no history: LookupError, ValueError) as it is, a store that did not take it
    (the state topic or volume unavailable) a 503 saying that nothing changed and to retry."""
    from embedwatch.api import ApiError

    try:
        return change()
    except (LookupError, ValueError):
        raise
    except Exception as e:
        raise ApiError(503, f"the baseline store did not take the change ({type(e).__name__}: {e}); "
                            "nothing changed, retry") from e


#: The most an uploaded baseline's arrays may unpack to (an upload's body is at most 64 MiB).
MAX_UPLOAD_UNPACKED = 256 << 20

_REBALANCE_ERRORS = ("CommitFailed", "IllegalGeneration", "UnknownMemberId", "RebalanceInProgress",
                     "ILLEGAL_GENERATION", "UNKNOWN_MEMBER_ID", "REBALANCE_IN_PROGRESS", "FencedInstanceId")


def _when(t: float) -> str:
    """An epoch time for a log line (UTC, to the second); "never" for -inf."""
    if not math.isfinite(t):
        return "never"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _lost_assignment(e: BaseException) -> bool:
    """The consumer was removed from the group (e.g. its session expired during an outage): retrying
    the commit cannot succeed before the next poll rejoins."""
    text = f"{type(e).__name__} {e}"
    return any(name in text for name in _REBALANCE_ERRORS)


class StreamNotHere(LookupError):
    """The API named a stream this replica does not monitor (API 404)."""

    def __init__(self, key: StreamKey, why: str = "") -> None:
        super().__init__(f"stream {key} is not monitored by this replica{f' and {why}' if why else ''} (with "
                         "several replicas, send it to the one whose /api/streams lists the stream)")

    def __str__(self) -> str:
        return str(self.args[0])


def starting_metrics(exporter: Exporter) -> None:
    """The series a process exports from its start, before it consumes anything: it runs
    (``embedwatch_up`` 1), is neither connected nor ready, and its counters exist at 0, so rate()
    and alerts see 0 rather than no series."""
    exporter.set_gauge("embedwatch_up", (), 1.0)
    for name in ("embedwatch_dead_letter_errors_total", "embedwatch_rebalances_total",
                 "embedwatch_batches_total", "embedwatch_checkpoints_total",
                 "embedwatch_checkpoint_bytes_total", "embedwatch_streams_forgotten_total",
                 "embedwatch_stream_partition_conflicts_total", "embedwatch_state_storage_lost_total"):
        exporter.counters.inc(name, (), 0)
    exporter.set_gauge("embedwatch_kafka_connected", (), 0.0)
    exporter.set_gauge("embedwatch_ready", (), 0.0)


class Service:
    """Everything between the source and the exporter; the loop is :meth:`run`.

    :meth:`process` is the I/O-free part (decode + route + metrics) and is what tests and the
    benchmark drive directly.
    """

    #: Bound on reading a batch's commit back (well under a millisecond when the broker answers).
    READ_BACK_TIMEOUT_S = 2.0

    def __init__(
        self,
        settings: Settings,
        exporter: Exporter | None = None,
        baselines: BaselineRepository | None = None,
        state_backend: StateBackend | None = None,
        state_records: dict[str, bytes] | None = None,
    ) -> None:
        self.settings = settings
        k = settings.kafka
        lim = settings.limits
        self.decoder = Decoder(
            DecodeLimits(
                max_message_bytes=lim.max_message_bytes,
                max_dim=lim.max_dim,
                max_events_per_message=lim.max_events_per_message,
                max_label_length=lim.max_label_length,
                precision_k=settings.detection.precision_k,
                max_future_skew_s=lim.max_future_skew_s,
            ),
            query_topics=frozenset([k.queries_topic] if k.queries_topic else []),
        )
        self.baselines = baselines if baselines is not None else MemoryBaselineStore()
        self.router = StreamRouter(settings, self.baselines)
        self.exporter = exporter or Exporter()
        self.exporter.gauge_sources.append(self._stream_gauges)
        self.exporter.gauge_sources.append(self._store_gauges)
        self.ledgers: dict[PartitionId, Ledger] = {}
        self.replay_until: dict[PartitionId, int] = {}
        self.alarms: list[Alarm] = []
        self.stop_requested = threading.Event()
        self.ready = False
        self.connected = False
        self._assigned: set[PartitionId] = set()
        self._source: Source | None = None
        self._sink: DeadLetterSink | None = None
        self._positions: dict[PartitionId, int] = {}
        self._last_lag_probe = 0.0
        self._last_heap_trim = time.monotonic()
        self._last_tick = time.monotonic()  # of _minute_tick
        self._behind: set[PartitionId] = set()  # partitions with unread events at the last probe
        self._split_streams: set[StreamKey] = set()  # streams reported in more than one partition
        self._heartbeat = time.monotonic()
        # When (wall clock) the loop last received an event of each live stream (see _expire_idle_streams).
        self._seen: dict[StreamKey, float] = {}
        # The stop: when it was asked for (a signal), its deadline (shutdown_timeout_s later), and
        # whether one of its steps was abandoned (its thread must then not use the consumer).
        self._stop_at: float | None = None
        self._stop_deadline: float | None = None
        self._stop_abandoned = threading.Event()
        self._loop_done = False
        self._pending_assignment: list[PartitionId] = []
        # Streams of revoked partitions, forgotten unless the next assignment returns them.
        self._orphans: set[StreamKey] = set()
        self._awaiting_assignment = False
        # Last durable point per partition: (next offset, ledger) as a restart would restore it.
        self.durable: dict[PartitionId, tuple[int, Ledger]] = {}
        # What each partition's last checkpoint (written and committed) held: its offset, ledger
        # and every stream's monitor with its change count (see _state_signature).
        self._checkpointed: dict[PartitionId, tuple[Any, ...]] = {}
        # Offsets below which a restored checkpoint already holds the events' effects.
        self.floor: dict[PartitionId, int] = {}
        # The partition whose checkpoint carries a stream's state (where its first event came from).
        self.stream_home: dict[StreamKey, PartitionId] = {}
        self.state_backend: StateBackend = state_backend if state_backend is not None else NullStateBackend()
        self.persistent = not isinstance(self.state_backend, NullStateBackend)
        # The backend's epoch at the last checkpoint pass: once it moves (a state topic deleted and
        # created again), no partition's checkpoint is held by the backend any more.
        self._state_epoch = self.state_backend.epoch
        # Only this group's checkpoints, until their partitions are restored and checkpointed
        # again: the rest (baselines, other groups) was read once, and keeping it held every
        # stored baseline (2.6 MB a 768-d stream) for the life of the process.
        self._state_records: dict[tuple[str, int], bytes] = checkpoints_in(state_records or {}, k.group_id)
        self._last_checkpoint = time.monotonic()
        # A batch was processed in memory but abandoned before its commit (stop requested while the
        # broker was unreachable): the in-memory state is ahead of every position, so it must not be
        # checkpointed; the next owner replays the batch from the last durable point.
        self._state_ahead = False
        # Partitions whose checkpoint would hold a batch that was processed but not committed, the
        # group having moved on (see _abandon): not checkpointed until they are revoked.
        self._ahead: set[PartitionId] = set()
        # Streams of such partitions once revoked: forgotten whether or not the partitions come back.
        self._stale: set[StreamKey] = set()
        # A read of the state topic at an assignment failed after consuming part of it: the next
        # one reads it whole, or the checkpoints it had consumed would be missed.
        self._reread_state = False
        # Streams without a monitor for which the state was read (_read_stored_baselines), and when.
        self._looked_up: set[StreamKey] = set()
        self._last_lookup = -math.inf
        # Without durable state: the last batch's commit, sent asynchronously, until its landing is
        # confirmed (positions, and the ledgers they carry).
        self._unconfirmed: tuple[dict[PartitionId, Committed], dict[PartitionId, Ledger]] | None = None
        # Records the next poll asks for at most (poll_records: raised after a batch of many streams).
        self.poll_max_records = settings.kafka.max_poll_records
        starting_metrics(self.exporter)
        self.exporter.set_gauge("embedwatch_poll_max_records", (), float(self.poll_max_records))
        # From now on embedwatch_up is read at each scrape (_liveness): the constant 1 of a starting
        # process stayed 1 while a stuck loop turned /healthz 503.
        self.exporter.gauges["embedwatch_up"].pop((), None)
        self.exporter.gauge_sources.append(self._liveness)

    # -- the pure part ----------------------------------------------------------------------

    def process(self, messages: Sequence[Message], now: float | None = None) -> tuple[DecodedBatch, list[Rejection]]:
        """Decode and route ``messages``; update metrics. Returns the batch and its rejections."""
        batch, result = self._route(messages, now)
        return batch, result.rejections

    def _route(self, messages: Sequence[Message], now: float | None = None) -> tuple[DecodedBatch, RouteResult]:
        """:meth:`process`, returning what the router did."""
        now = time.time() if now is None else now
        batch = self.decoder.decode(messages, now=now)
        self._read_stored_baselines(batch)
        # The lock per stream, not around the batch: a scrape must not wait for every baseline
        # the batch builds (see StreamRouter.route).
        result = self.router.route(batch, guard=self.exporter.lock)
        with self.exporter.lock:
            self._observe(batch, result, messages, now)
            self._record_alarms(result.alarms)
        return batch, result

    def _size_next_poll(self, batch: DecodedBatch, messages: Sequence[Message]) -> None:
        """Raise (or lower back) the next poll's bound from this batch's streams and message size
        (:func:`embedwatch.sources.base.poll_records`)."""
        k = self.settings.kafka
        streams = len({b.stream for b in batch.blocks})
        n = k.max_poll_records
        if streams * k.poll_events_per_stream > n:  # the bound may rise: only then are the bytes summed
            mean_bytes = sum(len(m.value) for m in messages) / max(1, len(messages))
            n = poll_records(n, k.poll_events_per_stream, k.max_poll_bytes, streams, mean_bytes)
        if n != self.poll_max_records:
            self.poll_max_records = n
            with self.exporter.lock:
                self.exporter.set_gauge("embedwatch_poll_max_records", (), float(n))

    def _read_stored_baselines(self, batch: DecodedBatch) -> None:
        """Before streams new to this replica get their monitors, read what the other replicas
        stored since this one last read the state: a baseline uploaded through another replica
        for a stream with no events yet is then this stream's from its first event. Without it,
        the replica read the state only at an assignment or a restart, and a stream that started
        in between built its baseline from its first events (and its index, written then, dropped
        the upload). Once per stream not seen before, and at most once a second."""
        if not isinstance(self.baselines, DurableBaselineStore):
            return
        monitors = self.router.monitors
        new = {b.stream for b in batch.blocks if b.stream not in monitors and b.stream not in self._looked_up}
        now = time.monotonic()
        if not new or now - self._last_lookup < 1.0:
            return
        self._last_lookup = now
        group = self.settings.kafka.group_id
        # This replica's own checkpoints, read back: dropped as they come (their state is in
        # memory, and a 768-d stream's record is about 0.5 MB). Were such a partition to come
        # back after a revocation, its newest checkpoint is read again by the next assignment,
        # which then reads the state whole.
        own = {checkpoint_key(group, p.topic, p.partition) for p in self._assigned}
        dropped = False

        def read(take: Take | None) -> dict[str, bytes]:
            def take_or_drop(key: str, value: bytes) -> bool:
                nonlocal dropped
                if take is not None and take(key, value):
                    return True
                if key in own:
                    dropped = True
                    return True
                return False

            return self.state_backend.read_new(take_or_drop)

        try:
            fresh = self.baselines.read(read)
        except Exception as e:
            log.warning("cannot read the state before monitoring new streams %s (%s): those without a "
                        "baseline in this replica's store build one from their first events",
                        ", ".join(sorted(map(str, new))[:5]), e)
            self._reread_state = True  # part of it may be consumed: the next assignment reads it whole
            return
        self._reread_state |= dropped
        # Streams that got their monitors need no entry: the set holds those refused one (the
        # stream cap), so that they do not read the state at every batch.
        self._looked_up = {k for k in self._looked_up if k not in monitors} | new
        self._state_records.update(checkpoints_in(fresh, group))  # other replicas': for an assignment to come

    def _record_alarms(self, alarms: Iterable[Alarm], why: str = "") -> None:
        """Keep the latest 1000 alarms (the API's view) and log each one (under the lock)."""
        for a in alarms:
            self.alarms.append(a)
            log.warning("drift alarm %s: stream=%s index=%d detector=%s score=%.4g p=%s%s",
                        a.kind, a.stream, a.index, a.detector, a.score, a.p_value, why)
        del self.alarms[:-1000]

    def _observe(self, batch: DecodedBatch, result: RouteResult, messages: Sequence[Message], now: float) -> None:
        ex = self.exporter
        c = ex.counters
        h = ex.histograms
        rejected_rows: dict[int, int] = {}
        for r in result.rejections:
            msg = messages[r.message_index]
            c.inc("embedwatch_events_rejected_total", (msg.topic, r.reason.value))
            if r.stream is not None and r.stream in self.router.monitors:
                c.inc("embedwatch_stream_rejected_total", (*r.stream, r.reason.value))
            rejected_rows[r.message_index] = rejected_rows.get(r.message_index, 0) + 1
        seen = self._seen
        for b in batch.blocks:
            mon = self.router.monitors.get(b.stream)
            if mon is not None:
                seen[b.stream] = now  # its events arrive, whether taken or refused: not idle
            if mon is None or (b.stream, b.kind) in result.failed:
                continue  # (failed: dead-lettered by StreamRouter._failed, not taken)
            # Rows of this block that the router rejected (dimension, stream limit) are not counted.
            rows = b
            expected = self.router.expected_dim(b.stream)
            if b.dim and expected is not None and b.dim != expected:
                continue
            s: LabelValues = tuple(b.stream)
            c.inc("embedwatch_events_total", (*s, b.kind.value), rows.n)
            newest = ts_max(rows.ts) if rows.n else math.nan
            prev = ex.gauges["embedwatch_last_event_timestamp_seconds"].get(s, 0.0)
            ex.set_gauge("embedwatch_last_event_timestamp_seconds", s, max(prev, newest))
            h.observe("embedwatch_event_lag_seconds", s, now - rows.ts)
            if b.kind is Kind.EMBEDDING:
                h.observe("embedwatch_inference_latency_seconds", s, rows.latency_s)
                if rows.dim:
                    base = mon.baseline
                    unit = base.centroid_unit if base is not None else None
                    # The monitor's own figures when it took this block whole (the usual case): the
                    # float64 norms cost more than the histograms themselves.
                    summary = result.summaries.get(b.stream)
                    if summary is not None and summary.norms.shape[0] == rows.n:
                        norms, sims = summary.norms, summary.sims
                    else:
                        norms = np.sqrt(np.einsum("ij,ij->i", rows.vectors, rows.vectors, dtype=np.float64))
                        sims = None
                        if unit is not None and unit.shape[0] == rows.dim:
                            sims = (rows.vectors @ unit) / np.maximum(norms, 1e-30)
                    h.observe("embedwatch_embedding_norm", s, norms)
                    if unit is not None and sims is not None:
                        h.observe("embedwatch_similarity_to_baseline", s, sims)
            else:
                h.observe("embedwatch_query_latency_seconds", s, rows.latency_s)
                if rows.top1 is not None:
                    h.observe("embedwatch_query_top1_score", s, rows.top1)
        ex.set_gauge("embedwatch_streams", (), float(len(self.router.monitors)))

    def _liveness(self) -> Iterable[tuple[str, LabelValues, float]]:
        """``embedwatch_up`` at scrape time: 1 while the loop goes round (as /healthz), 0 once it
        is stuck for STALL_S or has stopped."""
        yield "embedwatch_up", (), float(not self._loop_done and self.healthy())

    def _store_gauges(self) -> Iterable[tuple[str, LabelValues, float]]:
        """What the baseline store holds in memory, at scrape time: it grows with every stream the
        group ever stored a baseline for, until retired streams are forgotten."""
        if isinstance(self.baselines, MemoryBaselineStore):
            versions, nbytes = self.baselines.held()
            yield "embedwatch_stored_baselines", (), float(versions)
            yield "embedwatch_stored_baseline_bytes", (), float(nbytes)

    def _stream_gauges(self) -> Iterable[tuple[str, LabelValues, float]]:
        for key, mon in self.router.monitors.items():
            s: LabelValues = tuple(key)
            measures = mon.measures()
            for name, measure in _MEASURE_METRICS:
                v = measures.get(measure)  # type: ignore[arg-type]
                if v is not None:
                    yield name, s, float(v)
            counters = mon.counters()
            yield "embedwatch_drift_alarms_total", s, float(counters.get("drift_alarms", 0))
            yield "embedwatch_changepoints_total", s, float(counters.get("changepoints", 0))
            yield "embedwatch_duplicate_ids_total", s, float(counters.get("duplicate_ids", 0))
            if mon.baseline is not None:
                md = mon.baseline.metadata
                yield ("embedwatch_baseline_info", (*s, str(md["baseline_id"]), str(md.get("source", ""))), 1.0)
        for r in self.router.version_results():
            lab: LabelValues = (str(r["model"]), str(r["model_version"]), str(r["reference_version"]))
            yield "embedwatch_version_paired_cosine", lab, float(r["paired_cosine"])
            yield "embedwatch_version_knn_overlap", lab, float(r["knn_overlap"])
            yield "embedwatch_version_shared_ids", lab, float(r["shared_ids"])
            yield "embedwatch_version_dimension_changed", lab, float(bool(r["dimension_changed"]))

    # -- rebalance listener -------------------------------------------------------------------

    def on_assigned(self, partitions: Sequence[PartitionId]) -> None:
        # Called from the client's IO machinery, where blocking calls are not allowed (kafka-python
        # 3 runs listeners on its IO thread): only note the partitions; the loop restores their
        # state right after the poll returns, before it processes any of their messages.
        self.exporter.counters.inc("embedwatch_rebalances_total")
        self._pending_assignment.extend(partitions)
        self._awaiting_assignment = False
        log.info("assigned %s", sorted(partitions))

    def _load_assignment(self, source: Source) -> None:
        partitions, self._pending_assignment = self._pending_assignment, []
        if self._stale:
            # Before any restore: a partition that comes back gets its streams from its checkpoint.
            with self.exporter.lock:
                for key in self._stale:
                    self._forget_stream(key)
                self._stale.clear()
        if self._orphans and not self._awaiting_assignment:
            with self.exporter.lock:
                owned = self._assigned | set(partitions)
                for key in self._orphans:
                    home = self.stream_home.get(key)
                    if home is None or home not in owned:
                        self._forget_stream(key)
                self._orphans.clear()
        if not partitions:
            return
        try:
            committed = source.committed(partitions)
            if self.persistent:
                backend = self.state_backend
                read = backend.read_all if self._reread_state else backend.read_new
                self._reread_state = True  # until this read completes
                fresh = self.baselines.read(read) if isinstance(self.baselines, DurableBaselineStore) else read(None)
                self._reread_state = False
                self._state_records.update(checkpoints_in(fresh, self.settings.kafka.group_id))
        except Exception:
            # The broker or the state topic did not answer: the partitions go back, and the loop
            # completes their assignment at its next attempt (a revocation meanwhile takes them
            # out of the list again: on_revoked).
            self._pending_assignment[:0] = partitions
            raise
        for p in partitions:
            # Decoded and rebuilt outside the lock, installed under it: a scrape waited 13.6 s for
            # a restore under it (5-6 s a partition of 67 streams of 768-d while each refitted its
            # scan; 0.4 s with the fits stored, still seconds for baselines stored without them).
            # One partition at a time, as before: one partition's decoded arrays are held at once.
            restored = self._restore_checkpoint(p, self._state_records.get((p.topic, p.partition)))
            with self.exporter.lock:
                c = committed.get(p)
                marker = Ledger.decode(c.metadata) if c is not None else Ledger()
                ckpt = self._install(p, restored)
                if ckpt is not None:
                    # The checkpoint is authoritative: its streams' state and ledger hold exactly
                    # the events below its offset. Messages below it (a crash between checkpoint
                    # and commit) are skipped; the ones above it are (re)processed.
                    ledger = Ledger(ckpt.ledger.get("a", 0), ckpt.ledger.get("d", 0))
                    self.floor[p] = ckpt.offset
                    self.durable[p] = (ckpt.offset, ledger.copy())
                    resume = ckpt.offset
                else:
                    ledger = Ledger(marker.accepted, marker.dead_lettered)
                    if c is not None:
                        self.durable[p] = (c.offset, ledger.copy())
                    resume = c.offset if c is not None else -1
                self.ledgers[p] = ledger
                if c is not None and marker.inflight_end > max(resume, 0):
                    self.replay_until[p] = marker.inflight_end
                    log.info("partition %s:%d resumes at %d; events up to %d were processed before: replaying",
                             p.topic, p.partition, resume, marker.inflight_end)
                self._publish_ledger(p)
                self.exporter.counters.inc("embedwatch_events_replayed_total", (p.topic,), 0)
            del restored
        with self.exporter.lock:
            self._assigned |= set(partitions)
            self.exporter.set_gauge("embedwatch_assigned_partitions", (), float(len(self._assigned)))
            self._check_copartitioned()
        if self.persistent:
            # What the restore read and decoded is freed now: a replica restarted at 200 x 768-d held
            # 684 MiB until its first checkpoint's trim, 463 MiB trimmed here (342 once that
            # checkpoint replaces the restored records it keeps).
            self._trim_heap(now_due=True)

    def _restore_checkpoint(self, p: PartitionId, blob: bytes | None
                            ) -> tuple[Checkpoint, list[StreamMonitor]] | None:
        """Decode the checkpoint of ``p`` and rebuild its streams' monitors (None without a usable
        one); :meth:`_install` makes them live. Runs outside the exporter lock: it reads nothing
        the service shares but the baseline store, which locks itself."""
        if blob is None:
            return None
        try:
            ckpt = decode_checkpoint(blob)
        except (StateError, ValueError, KeyError) as e:
            log.error("checkpoint of %s:%d is unusable (%s): its streams start afresh", p.topic, p.partition, e)
            return None
        det = self.settings.detection
        idle_s = self.settings.limits.stream_idle_s
        # Judged when the checkpoint was written, not now: after a downtime longer than
        # stream_idle_s a stream's events may be waiting in the topic (the tick judges it later).
        at = ckpt.created_at if ckpt.created_at > 0 else time.time()
        monitors: list[StreamMonitor] = []
        for sc in ckpt.streams:
            newest = float(sc.meta.get("newest_ts", -math.inf))
            if is_idle(last_activity(newest, sc.seen_at), at, idle_s):
                # Not restored: its slot, series and checkpoint entry (the partition's next
                # checkpoint leaves it out) are freed; back, it starts from its stored baseline.
                log.info("stream %s forgotten at restore: idle for more than limits.stream_idle_s=%gs "
                         "(last active %s)", sc.key, idle_s, _when(last_activity(newest, sc.seen_at)))
                self.exporter.counters.inc("embedwatch_streams_forgotten_total")
                self._forget_idle_baselines([sc.key])
                continue
            meta = sc.meta
            baseline = self._checkpointed_baseline(sc.key, meta.get("baseline_id"))
            qmeta = meta.get("qvec")
            query_baseline = None
            if isinstance(qmeta, dict) and qmeta.get("baseline_id"):
                query_baseline = self._checkpointed_baseline(sc.key.query_side(), qmeta["baseline_id"])
                if query_baseline is None:
                    # Only the query embeddings' part starts afresh: the rest of the stream is whole.
                    log.error("stream %s: its query embeddings start afresh", sc.key)
                    meta = {k: v for k, v in meta.items() if k != "qvec"}
            try:
                monitors.append(StreamMonitor.restore(sc.key, det, meta, sc.arrays, baseline, query_baseline))
            except (ValueError, KeyError) as e:
                log.error("state of %s is unusable (%s): it starts afresh", sc.key, e)
        return ckpt, monitors

    def _checkpointed_baseline(self, key: StreamKey, bid: Any) -> Baseline | None:
        """Version ``bid`` of ``key``'s baselines, named by a checkpoint (None without one, or when
        the store has lost it: logged)."""
        if not bid:
            return None
        try:
            return self.baselines.get(key, str(bid))  # the store has its own lock
        except LookupError:
            log.error("baseline %s of %s is missing from the store", bid, key)
            return None

    def _install(self, p: PartitionId, restored: tuple[Checkpoint, list[StreamMonitor]] | None) -> Checkpoint | None:
        """Make the monitors restored from the checkpoint of ``p`` live (under the lock)."""
        if restored is None:
            return None
        ckpt, monitors = restored
        seen_at = {sc.key: sc.seen_at for sc in ckpt.streams}
        for mon in monitors:
            home = self.stream_home.get(mon.key)
            if mon.key in self.router.monitors and home is not None and home != p:
                # In two partitions' checkpoints: its events were not co-partitioned, and the part
                # monitored from the other partition is replaced by this one.
                self._split(mon.key, home, p)
            self.router.adopt(mon)
            self.stream_home[mon.key] = p
            when = seen_at.get(mon.key)
            if when is not None:
                self._seen[mon.key] = when
            s: LabelValues = tuple(mon.key)
            if math.isfinite(mon.newest_ts):
                # As before the restart: StreamSilent measures the age of this time, and without it
                # a stream silent across a rollout or a rebalance stopped alerting.
                self.exporter.set_gauge("embedwatch_last_event_timestamp_seconds", s, mon.newest_ts)
            self.exporter.counters.set("embedwatch_events_total", (*s, "embedding"), float(mon.events))
            if mon.query_events:
                self.exporter.counters.set("embedwatch_events_total", (*s, "query"), float(mon.query_events))
        log.info("restored %s:%d at offset %d with %d streams", p.topic, p.partition, ckpt.offset,
                 len(ckpt.streams))
        return ckpt

    def on_revoked(self, partitions: Sequence[PartitionId]) -> None:
        # With durable state, checkpoint the partitions first so their next owner resumes exactly
        # here; the checkpoint's offset is authoritative, so no commit is needed (and none is
        # possible from kafka-python's IO thread). Then forget their streams and series.
        self.exporter.counters.inc("embedwatch_rebalances_total")
        if self.persistent and not self._stop_abandoned.is_set():
            # Bounded: a rebalance must not wait for a broker that is down; the next owner then
            # resumes from the previous checkpoint. Leaving the group at a stop, within the stop's
            # budget; not at all once a step of the stop was abandoned (its thread may still run).
            deadline = time.monotonic() + 10.0
            if self._stop_deadline is not None:
                deadline = min(deadline, self._stop_deadline)
            self._checkpoint([p for p in partitions if p in self._assigned], commit=None, deadline=deadline)
        if self._unconfirmed is not None:
            # The next owner resumes from whatever landed; a late confirmation must not commit
            # over its positions.
            positions, ledgers = self._unconfirmed
            revoked = set(partitions)
            kept = {p: c for p, c in positions.items() if p not in revoked}
            self._unconfirmed = (kept, ledgers) if kept else None
        with self.exporter.lock:
            for p in partitions:
                if p in self._pending_assignment:
                    self._pending_assignment.remove(p)
                self._assigned.discard(p)
                for attr in (self.ledgers, self.replay_until, self._positions, self.floor, self.durable,
                             self._checkpointed):
                    attr.pop(p, None)  # type: ignore[attr-defined]
                key = (p.topic, str(p.partition))
                self.exporter.counters.drop("embedwatch_consumed_events_total",
                                            lambda lv, key=key: lv[:2] == key)  # type: ignore[misc]
                self.exporter.gauges["embedwatch_consumer_lag_messages"].pop(key, None)
            self.exporter.set_gauge("embedwatch_assigned_partitions", (), float(len(self._assigned)))
            # Their streams are forgotten only if the partitions go to another replica: the
            # assignment that follows (eager rebalance) often gives them straight back.
            revoked = set(partitions)
            stale = revoked & self._ahead
            self._ahead -= stale
            self._stale |= {k for k, home in self.stream_home.items() if home in stale}
            self._orphans |= {k for k, home in self.stream_home.items() if home in revoked} - self._stale
            self._awaiting_assignment = bool(revoked)
        log.info("revoked %s", sorted(partitions))

    def _split(self, key: StreamKey, home: PartitionId, other: Message | PartitionId) -> None:
        """Report a stream whose events come from more than one partition number, once per
        stream: with several replicas each may monitor part of it (its own window, baseline and
        alarms), and a rebalance keeps only one part (docs/deploy.md, partitioning)."""
        if len(self._split_streams) >= 10_000:  # bounded: only the log line and the counter depend on it
            self._split_streams.clear()
        self._split_streams.add(key)
        self.exporter.counters.inc("embedwatch_stream_partition_conflicts_total")
        where = f"{other.topic}:{other.partition}"
        log.warning("stream %s has events in %s and in %s:%d: key every event of a stream by the stream, "
                    "in topics of equal partition counts, or replicas each monitor part of it "
                    "(docs/deploy.md)", key, where, home.topic, home.partition)

    def _check_copartitioned(self) -> None:
        """The embeddings and queries partitions this replica owns must have the same numbers, or a
        stream's query events are monitored by another replica than its embeddings."""
        k = self.settings.kafka
        if not k.queries_topic:
            return
        emb = {p.partition for p in self._assigned if p.topic == k.embeddings_topic}
        qry = {p.partition for p in self._assigned if p.topic == k.queries_topic}
        if emb != qry and (emb or qry):
            self.exporter.counters.inc("embedwatch_stream_partition_conflicts_total")
            log.warning("assigned partitions %s of %s but %s of %s: a stream's query events may be monitored "
                        "by another replica than its embeddings; give both topics the same number of "
                        "partitions and key both by stream with the same partitioner (docs/deploy.md)",
                        sorted(emb), k.embeddings_topic, sorted(qry), k.queries_topic)

    def _forget_stream(self, key: StreamKey) -> None:
        self.router.remove(key)
        self.stream_home.pop(key, None)
        self._seen.pop(key, None)
        self._looked_up.discard(key)  # coming back, it is a new stream again
        s = tuple(key)
        n = len(s)
        ex = self.exporter
        for name in ("embedwatch_events_total", "embedwatch_stream_rejected_total"):
            ex.counters.drop(name, lambda lv: lv[:n] == s)
        ex.histograms.drop(lambda lv: lv[:n] == s)
        ex.gauges["embedwatch_last_event_timestamp_seconds"].pop(s, None)
        ex.set_gauge("embedwatch_streams", (), float(len(self.router.monitors)))

    def _checkpoint(self, partitions: Iterable[PartitionId], commit: Source | None,
                    deadline: float | None = None) -> bool:
        """Persist the state of ``partitions``, then commit their offsets through ``commit``;
        True when it built a record (whose buffers are freed by now).

        Each partition's record is built under the exporter lock (a consistent cut between
        batches: batches run on this thread, and the API's threads change a monitor only under
        the lock) and sealed (hashed) and written outside it, so /metrics keeps answering while
        the record is hashed and while the backend is slow or down. One partition at a time: a
        partition's record holds the state of every stream whose home it is (about 0.47 MB per
        768-d stream, 3 MB while it collects its reference), and building them all first held
        every partition's state in memory in several copies at once. A
        partition whose state its last checkpoint already holds is not written again.
        """
        if self._state_ahead:
            log.warning("a batch was abandoned after it was processed: no checkpoint, the next owner "
                        "resumes from the last durable point")
            return False
        # Storage started again (a state topic created again, a state directory emptied) that this
        # replica's own requests did not run into: its writes by name succeed.
        self.state_backend.refresh()
        epoch = self.state_backend.epoch
        if epoch != self._state_epoch:
            with self.exporter.lock:
                self.exporter.counters.inc("embedwatch_state_storage_lost_total", (),
                                           float(epoch - self._state_epoch))
            self._state_epoch = epoch
            self._checkpointed.clear()  # written to storage that is gone: written again
        positions: dict[PartitionId, Committed] = {}
        ledgers: dict[PartitionId, Ledger] = {}
        signatures: dict[PartitionId, tuple[Any, ...]] = {}
        built = unchanged = False
        for part in partitions:
            if part in self._ahead:
                continue  # its streams hold a batch that was not committed (_abandon)
            with self.exporter.lock:
                signature = self._state_signature(part)
                if self._checkpointed.get(part) == signature:
                    # Its last checkpoint holds this state already: an idle partition was rewritten
                    # every checkpoint_interval_s before (75 MB a pass for 200 idle 768-d streams).
                    unchanged = True
                    continue
                records, pos, led = self._checkpoint_records([part])
            if not records:
                continue
            built = True
            for record in records.values():
                seal_checkpoint(record)  # a copy, built above: nothing else writes to it

            def relevant(part: PartitionId = part) -> bool:
                if deadline is not None and time.monotonic() > deadline:
                    return False
                return commit is None or part in self._assigned

            if not self._retry(functools.partial(self.state_backend.write, records), "checkpoint", relevant):
                return built
            with self.exporter.lock:
                # The topic holds it now and an assignment reads what was written since the last
                # read (read_new), this included: keeping a copy held the whole state twice.
                self._state_records.pop((part.topic, part.partition), None)
                self.exporter.counters.inc("embedwatch_checkpoint_bytes_total", (),
                                           float(sum(len(v) for v in records.values())))
            positions.update(pos)
            ledgers.update(led)
            signatures[part] = signature
            del records  # not held while the next partition's record is built
        if not positions and not unchanged:
            return built
        with self.exporter.lock:
            self.exporter.counters.inc("embedwatch_checkpoints_total")
            self.exporter.set_gauge("embedwatch_last_checkpoint_timestamp_seconds", (), time.time())
        if not positions:
            return built
        if commit is not None and (self._stop_abandoned.is_set() or not self._commit(commit, positions)):
            return built  # (abandoned: the stop went on without it, the consumer may be closed)
        with self.exporter.lock:
            for p, c in positions.items():
                self.durable[p] = (c.offset, ledgers[p])
            if commit is not None:  # durable now: written, and its offset committed
                self._checkpointed.update(signatures)
            # The floor stays: a commit does not move the consumer, which may still be reading
            # below it (resumed from a commit older than the checkpoint); _handle_batch drops it
            # once the partition's records reach it.
        return built

    def _state_signature(self, p: PartitionId) -> tuple[Any, ...]:
        """What a checkpoint of ``p`` depends on: its offset, its ledger, and which monitors its
        streams have (by identity) with their change counts. Only events (of any partition: a
        query event may update a stream whose home is another), promotions and activations change
        a monitor, and each counts itself."""
        offset = self._positions.get(p, self.durable.get(p, (-1, Ledger()))[0])
        led = self.ledgers.get(p, Ledger())
        streams = frozenset((key, id(mon), mon.changes) for key, home in self.stream_home.items()
                            if home == p and (mon := self.router.monitors.get(key)) is not None)
        return offset, led.accepted, led.dead_lettered, streams

    def _checkpoint_records(
        self, partitions: Iterable[PartitionId],
    ) -> tuple[dict[str, bytearray], dict[PartitionId, Committed], dict[PartitionId, Ledger]]:
        """The records of ``partitions``, built but not sealed (:func:`seal_checkpoint`)."""
        group = self.settings.kafka.group_id
        records: dict[str, bytearray] = {}
        positions: dict[PartitionId, Committed] = {}
        ledgers: dict[PartitionId, Ledger] = {}
        now = time.time()
        for p in partitions:
            offset = self._positions.get(p, self.durable.get(p, (-1, Ledger()))[0])
            if offset < 0:
                continue
            ledger = self.ledgers.get(p, Ledger()).copy()
            streams = []
            for key, home in self.stream_home.items():
                mon = self.router.monitors.get(key)
                if home == p and mon is not None:
                    meta, arrays = mon.checkpoint()
                    streams.append(StreamCheckpoint(key, meta, arrays, self._seen.get(key)))
            records[checkpoint_key(group, *p)] = build_checkpoint(
                Checkpoint(p.topic, p.partition, offset, {"a": ledger.accepted, "d": ledger.dead_lettered},
                           streams, now))
            positions[p] = Committed(offset, ledger.encode())
            ledgers[p] = ledger
        return records, positions, ledgers

    def _confirm_commit(self, source: Source, wait: bool = True) -> bool:
        """Make the last batch's asynchronous commit the durable point once it has landed; with
        ``wait``, read the committed positions back if its completion has not been seen yet, and
        commit it synchronously if they are not there. False when it could not be confirmed (its
        partitions were revoked, or a stop came first)."""
        pending = self._unconfirmed
        if pending is None:
            return True
        positions, ledgers = pending
        if source.landed(positions):
            self.exporter.counters.inc("embedwatch_commits_total", ("success",))
        elif not wait:
            return False
        else:
            self._unconfirmed = None
            if not self._make_held(source, positions):
                return False
        self._unconfirmed = None
        for p, c in positions.items():
            if p in self._assigned:
                self.durable[p] = (c.offset, ledgers[p])
        return True

    def _inflight_marker(self, parts: dict[PartitionId, tuple[int, int]]) -> dict[PartitionId, Committed]:
        """Each partition's last committed position (offset and ledger), marked in flight up to the
        batch's end: the durable point (the last checkpoint's, or the last confirmed commit), or
        the previous batch's commit when it is not confirmed yet (it went out before this marker,
        so whenever the marker is applied, it is too)."""
        pending = self._unconfirmed
        out: dict[PartitionId, Committed] = {}
        for p, (lo, hi) in parts.items():
            if pending is not None and p in pending[0]:
                offset, ledger = pending[0][p].offset, pending[1][p]
            else:
                offset, ledger = self.durable.get(p, (lo, self.ledgers[p]))
            out[p] = Committed(offset, ledger.encode(inflight_end=hi + 1))
        return out

    def _held_by_broker(self, source: Source, positions: dict[PartitionId, Committed],
                        exact: bool = False) -> bool:
        """Whether the group coordinator already holds these positions: their offsets and ledgers,
        and with ``exact`` their in-flight marks too. Without it, a later batch's marker at the same
        position holds them as well (it was sent after them: :meth:`_inflight_marker`).

        librdkafka hands an asynchronous commit's completion to the consumer queue behind the
        records prefetched before it, so the loop rarely sees it by the next batch, although the
        commit landed long before. Committing again cost a commit round trip per batch, which on a
        Kafka 4 broker includes the coordinator's append linger (5 ms by default): 5.6-6.0 ms,
        measured, a sixth of a 2,000-event b64 batch. Reading the positions back is an offset
        fetch, 0.3-0.9 ms, and the coordinator only answers what it has written. Anything else
        (a partition gone, an error, other positions) leaves the decision to the synchronous commit.
        """
        if not all(p in self._assigned for p in positions):
            return False
        try:
            # Bounded: with the broker unreachable the commit path below retries and reports it.
            held = source.committed(list(positions), timeout_s=self.READ_BACK_TIMEOUT_S)
        except Exception as e:  # unreachable broker, timeout: the commit path retries and reports
            log.debug("reading committed positions back failed: %s", e)
            return False
        for p, c in positions.items():
            h = held.get(p)
            if h is None or h.offset != c.offset:
                return False
            # Compared as ledgers: confluent-kafka stores the metadata with a trailing NUL.
            have, want = Ledger.decode(h.metadata), Ledger.decode(c.metadata)
            if have.copy() != want.copy() or (exact and have.inflight_end != want.inflight_end):
                return False
        return True

    def _make_held(self, source: Source, positions: dict[PartitionId, Committed], exact: bool = False) -> bool:
        """Make sure the broker holds ``positions`` (see :meth:`_held_by_broker`): read them back,
        and commit them synchronously only when they are not there. Either way counts one
        successful commit; False as :meth:`_commit`."""
        if self._held_by_broker(source, positions, exact):
            self.exporter.counters.inc("embedwatch_commits_total", ("success",))
            return True
        return self._commit(source, positions)  # counts itself

    def _commit(self, source: Source, positions: dict[PartitionId, Committed]) -> bool:
        """Commit, retrying through broker outages; False if the partitions were taken away."""
        if self._stop_abandoned.is_set():
            return False  # the stop went on without this commit and may have closed the consumer

        def attempt() -> None:
            try:
                source.commit({p: c for p, c in positions.items() if p in self._assigned})
                self.exporter.counters.inc("embedwatch_commits_total", ("success",))
            except Exception:
                self.exporter.counters.inc("embedwatch_commits_total", ("failure",))
                raise

        return self._retry(attempt, "commit", lambda: any(p in self._assigned for p in positions))

    def _retry(self, fn: Callable[[], None], what: str, still_relevant: Callable[[], bool] = lambda: True,
               max_delay_s: float = 10.0) -> bool:
        """Run ``fn`` until it succeeds, backing off (with jitter) while the broker is unreachable.

        Nothing is skipped: a batch whose dead letters or commit cannot be written waits here, the
        service stays up and reports itself not ready. Gives up (False) when ``still_relevant``
        turns false (the partitions were revoked meanwhile) or a stop is requested.
        """
        delay = 0.2
        while True:
            try:
                fn()
                if not self.connected:
                    self._set_connected(True)
                return True
            except Exception as e:
                if _lost_assignment(e):
                    log.warning("%s: the group moved on (%s); the next assignment resumes from the last "
                                "durable point", what, e)
                    return False
                self._set_connected(False)
                if self.stop_requested.is_set() or not still_relevant():
                    log.error("%s abandoned (%s): the events are replayed by the partitions' next owner", what, e)
                    return False
                log.warning("%s failed (%s); retrying in %.1fs", what, e, delay)
                # Waiting for the broker is not a stuck loop: /healthz stays 200 and embedwatch_up 1
                # (a restart would not bring the broker back), while /readyz and
                # embedwatch_kafka_connected say what is wrong.
                self._heartbeat = time.monotonic()
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, max_delay_s)

    def _set_connected(self, up: bool) -> None:
        self.connected = up
        self.ready = up and bool(self._assigned)
        self.exporter.set_gauge("embedwatch_kafka_connected", (), float(up))
        self.exporter.set_gauge("embedwatch_ready", (), float(self.ready))

    def _publish_ledger(self, p: PartitionId) -> None:
        led = self.ledgers[p]
        c = self.exporter.counters
        c.set("embedwatch_consumed_events_total", (p.topic, str(p.partition), "accepted"), float(led.accepted))
        c.set("embedwatch_consumed_events_total", (p.topic, str(p.partition), "dead_lettered"),
              float(led.dead_lettered))

    # -- the loop ------------------------------------------------------------------------------

    def handle_signals(self) -> None:
        def _stop(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: finishing the batch, committing, leaving the group", signum)
            if self._stop_at is None:
                self._stop_at = time.monotonic()  # shutdown_timeout_s counts from here
            self.stop_requested.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)

    def run(self, source: Source, sink: DeadLetterSink) -> None:
        """Consume until :attr:`stop_requested` is set; commit; leave the group."""
        self._source, self._sink = source, sink
        k = self.settings.kafka
        poll_delay = 0.2
        try:
            while not self.stop_requested.is_set():
                self._heartbeat = time.monotonic()
                try:
                    messages = source.poll(self.poll_max_records, k.poll_timeout_ms)
                except Exception as e:
                    # A client's error (confluent-kafka raises its transport errors from consume):
                    # the service stays up, not ready, and polls again after a backoff.
                    self._set_connected(False)
                    log.warning("poll failed (%s); retrying in %.1fs", e, poll_delay)
                    self.stop_requested.wait(poll_delay * (0.5 + random.random()))
                    poll_delay = min(poll_delay * 2, 10.0)
                    continue
                poll_delay = 0.2
                try:
                    self._load_assignment(source)
                except Exception as e:
                    # Retried here, not at the next poll: the batch may hold records of these
                    # partitions, which the consumer does not fetch again.
                    log.warning("partition assignment failed (%s); retrying", e)
                    self._set_connected(False)
                    if (not self._retry(functools.partial(self._load_assignment, source), "partition assignment",
                                        lambda: bool(self._pending_assignment))
                            and self.stop_requested.is_set()):
                        break  # the batch is left unprocessed and uncommitted: its next owner reads it
                    # Otherwise done, or given up because the partitions were revoked meanwhile
                    # (their records are dropped below) or the group moved on (tried again after
                    # the next poll, whose rejoin restores their positions).
                if messages:
                    self._handle_batch(messages, source, sink)
                elif self._unconfirmed is not None:
                    self._confirm_commit(source, wait=False)
                due = time.monotonic() - self._last_checkpoint >= self.settings.state.checkpoint_interval_s
                if self.persistent and due:
                    built = self._checkpoint(sorted(self._assigned), commit=source)
                    self._last_checkpoint = time.monotonic()
                    if built:
                        # The records it built and wrote are freed now: trimmed at once, they do
                        # not keep the RSS 120-300 MB higher (200 x 768-d) until the next periodic
                        # trim. A checkpoint that found nothing changed freed nothing.
                        self._trim_heap(now_due=True)
                self._probe(source)
                self._trim_heap()
                self._minute_tick()
            deadline = self._begin_stop()
            # Some of the budget is kept for leaving the group (CLOSE_SHARE).
            keep = CLOSE_SHARE * self.settings.shutdown_timeout_s
            if self.persistent:
                # Graceful stop: everything processed is checkpointed and committed, so the next
                # owner replays nothing.
                self._within(functools.partial(self._checkpoint, sorted(self._assigned), commit=source,
                                               deadline=deadline - keep),
                             "the final checkpoint and commit", deadline - keep)
            else:
                # The last batch's commit, before the group is left.
                self._within(functools.partial(self._confirm_commit, source), "the last batch's commit",
                             deadline - keep)
        finally:
            # Leaving the group takes milliseconds and spares the next owner session_timeout_ms of
            # waiting: it always gets CLOSE_SHARE of the budget, even after a batch in progress
            # overran the rest (terminationGracePeriodSeconds is above shutdown_timeout_s).
            deadline = max(self._begin_stop(), time.monotonic() + CLOSE_SHARE * self.settings.shutdown_timeout_s)
            self.ready = False
            self.exporter.set_gauge("embedwatch_ready", (), 0.0)
            try:
                self._within(source.close, "leaving the consumer group", deadline)
            finally:
                self._within(sink.close, "the dead-letter producer's flush and close", deadline)
            self._loop_done = True  # embedwatch_up 0 (_liveness)
            log.info("stopped")

    def _begin_stop(self) -> float:
        """The stop's deadline: ``shutdown_timeout_s`` after the signal (or, without one, now)."""
        if self._stop_deadline is None:
            start = self._stop_at if self._stop_at is not None else time.monotonic()
            self._stop_deadline = start + self.settings.shutdown_timeout_s
        return self._stop_deadline

    def _within(self, step: Callable[[], object], what: str, deadline: float) -> bool:
        """Run one step of the stop, waiting for it until ``deadline``; False when it did not
        finish in time. A step still running then is abandoned (its thread is a daemon, it ends
        with the process) and nothing after it uses the consumer from that thread: the group
        must be left before Kubernetes kills the pod (terminationGracePeriodSeconds), and what
        was not committed is processed again by the partitions' next owner (at-least-once). The
        step's exception, if it finished with one, is raised here."""
        left = deadline - time.monotonic()
        if left <= 0:
            self._stop_abandoned.set()
            log.warning("stop: %s skipped: shutdown_timeout_s=%gs is spent; uncommitted events are "
                        "processed again by the partitions' next owner", what, self.settings.shutdown_timeout_s)
            return False
        failed: list[BaseException] = []

        def run_step() -> None:
            try:
                step()
            except BaseException as e:  # handed to the stopping thread
                failed.append(e)

        worker = threading.Thread(target=run_step, name="embedwatch-stop", daemon=True)
        worker.start()
        worker.join(left)
        if worker.is_alive():
            self._stop_abandoned.set()
            log.warning("stop: %s abandoned after %.1fs: shutdown_timeout_s=%gs is spent; uncommitted events "
                        "are processed again by the partitions' next owner", what, left,
                        self.settings.shutdown_timeout_s)
            return False
        if failed:
            raise failed[0]
        return True

    def _handle_batch(self, messages: list[Message], source: Source, sink: DeadLetterSink) -> None:
        t0 = time.perf_counter()
        owned = self._assigned
        # Per-message work here is plain tuples: a (topic, partition) tuple equals and hashes like
        # the PartitionId NamedTuple, and building one PartitionId per record cost more than the
        # rest of this method's bookkeeping.
        keys = [(m.topic, m.partition) for m in messages]
        present = set(keys)
        if not present <= owned:
            # Records fetched before a rebalance took their partition away: the new owner reads
            # them from its restored position, so processing them here would count them twice.
            n = len(messages)
            messages = [m for m, k in zip(messages, keys, strict=True) if k in owned]
            keys = [(m.topic, m.partition) for m in messages]
            present = set(keys)
            log.info("dropped %d records of partitions revoked during the poll", n - len(messages))
            if not messages:
                return
        floor = self.floor
        if floor and not floor.keys().isdisjoint(present):
            # Already reflected in the restored checkpoint (a crash between checkpoint and commit).
            # A floor may stay a long time (its partition idle), so batches of other partitions
            # skip this filter.
            by_tuple: dict[tuple[str, int], int] = floor  # type: ignore[assignment]  # equal keys
            kept = [(m, k) for m, k in zip(messages, keys, strict=True) if m.offset >= by_tuple.get(k, -1)]
            messages, keys = [m for m, _ in kept], [k for _, k in kept]
            for k in set(keys) & by_tuple.keys():
                del by_tuple[k]
            if not messages:
                return
        # Partition index of every message (in order of first appearance) and each partition's
        # lowest and highest offset in the batch.
        first_seen: dict[tuple[str, int], int] = {}
        msg_part = np.fromiter((first_seen.setdefault(k, len(first_seen)) for k in keys), dtype=np.int64,
                               count=len(keys))
        offsets = np.fromiter((m.offset for m in messages), dtype=np.int64, count=len(messages))
        lo_off = np.full(len(first_seen), np.iinfo(np.int64).max, dtype=np.int64)
        hi_off = np.full(len(first_seen), -1, dtype=np.int64)
        np.minimum.at(lo_off, msg_part, offsets)
        np.maximum.at(hi_off, msg_part, offsets)
        parts: dict[PartitionId, tuple[int, int]] = {
            PartitionId(*k): (int(lo_off[i]), int(hi_off[i])) for k, i in first_seen.items()}
        for p in parts:
            self.ledgers.setdefault(p, Ledger())
        # Mark the batch in flight before processing it, so that a successor after a crash knows
        # what it processes a second time. Asynchronous: commits to one coordinator are applied in
        # order, so the batch's final commit below still wins, and the batch's processing gives it
        # time to land before the dead letters need it (below).
        inflight = self._inflight_marker(parts)
        source.commit(inflight, asynchronous=True)
        batch, result = self._route(messages)
        self._size_next_poll(batch, messages)
        rejections = result.rejections
        if not self._confirm_commit(source) and self.stop_requested.is_set():
            return  # nothing of this batch but its marker left the process: the next owner processes it
        # A crash after the dead letters are flushed must find the marker on the broker, or the
        # successor writes them again without counting a replay.
        if rejections and not self._make_held(source, inflight, exact=True):
            self._abandon(batch)  # the partitions moved on or a stop came first
            return
        limit = dead_letter_limit(self.settings.limits.max_message_bytes)
        letters = [self._dead_letter(messages[r.message_index], r, limit) for r in rejections]
        queued = 0

        def deliver() -> None:
            # Sent inside the retry (a send raises while the broker is away: kafka-python's
            # max_block_ms), each letter once: a retry resumes after the last one queued, and the
            # flush of the sinks produces the failed ones again.
            nonlocal queued
            try:
                while queued < len(letters):
                    d = letters[queued]
                    sink.send(d.topic, d.value, d.key, d.headers)
                    queued += 1
                sink.flush(timeout_s=10.0)
            except Exception:
                self.exporter.counters.inc("embedwatch_dead_letter_errors_total")
                raise

        dlq = ", ".join(sorted({d.topic for d in letters}))
        if not self._retry(deliver, f"dead-letter write to {dlq} (the topic must exist when the brokers do not "
                                    "create topics: docs/deploy.md)"):
            # Nothing committed: the batch is replayed from the last durable point.
            self._abandon(batch)
            return
        # Per-partition outcome counts, vectorised over the batch's events.
        pidx = {p: i for i, p in enumerate(parts)}  # the order of msg_part's indices
        # Per partition, the events the monitors took: every decoded event, less the ones the
        # router refused (stream limit, dimension, a stream's failed update), which follow the
        # decoder's rejections in result.rejections. So the ledger counts each event once.
        acc = np.zeros(len(parts), dtype=np.int64)
        if batch.blocks:
            acc += np.bincount(msg_part[np.concatenate([b.message_index for b in batch.blocks])],
                               minlength=len(parts))
        refused = rejections[len(batch.rejections):]
        if refused:
            acc -= np.bincount(msg_part[[r.message_index for r in refused]], minlength=len(parts))
        rej = np.zeros(len(parts), dtype=np.int64)
        if rejections:
            rej += np.bincount(msg_part[[r.message_index for r in rejections]], minlength=len(parts))
        replayed = 0
        counters = self.exporter.counters
        with self.exporter.lock:
            for p, i in pidx.items():
                led = self.ledgers[p]
                led.accepted += int(acc[i])
                led.dead_lettered += int(rej[i])
                # The same counts in a counter of this process alone: the ledger resumes from the
                # commit, so after a restart it can read lower than its last scrape (a counter reset
                # to Prometheus, whose rate() then counts the whole ledger again).
                counters.inc("embedwatch_processed_events_total", (p.topic, "accepted"), int(acc[i]))
                counters.inc("embedwatch_processed_events_total", (p.topic, "dead_lettered"), int(rej[i]))
                self._positions[p] = parts[p][1] + 1
                until = self.replay_until.get(p)
                if until is not None:
                    hi = parts[p][1]
                    n = sum(1 for m in messages if m.topic == p.topic and m.partition == p.partition
                            and m.offset < until)
                    if n:
                        replayed += n
                        self.exporter.counters.inc("embedwatch_events_replayed_total", (p.topic,), n)
                    if hi + 1 >= until:
                        del self.replay_until[p]
                self._publish_ledger(p)
            for b in batch.blocks:
                if b.stream not in self.router.monitors:
                    continue
                m0 = messages[int(b.message_index[0])]
                home = self.stream_home.get(b.stream)
                if home is None:
                    self.stream_home[b.stream] = home = PartitionId(m0.topic, m0.partition)
                # A stream's events must all come from one partition number (its key, in topics of
                # equal partition counts): else two replicas may each monitor part of it. The first
                # and last event of each block are looked at (a per-event check costs the hot path).
                m1 = messages[int(b.message_index[-1])]
                if ((m0.partition != home.partition or m1.partition != home.partition)
                        and b.stream not in self._split_streams):
                    self._split(b.stream, home, m0 if m0.partition != home.partition else m1)
        if not self.persistent:
            # No durable state: the batch's effects live in memory only, so the batch is the unit.
            # Its commit goes out asynchronously and is confirmed before the next batch has any
            # effect outside this process (_confirm_commit), so a kill still replays at most one
            # batch. Waiting for it here held the loop for a broker round trip per batch: end to
            # end 24k -> 30k JSON events/s on confluent without the wait.
            positions = {p: Committed(self._positions[p], self.ledgers[p].encode()) for p in parts}
            source.commit(positions, asynchronous=True)
            self._unconfirmed = (positions, {p: self.ledgers[p].copy() for p in positions})
        self.exporter.counters.inc("embedwatch_batches_total")
        self.exporter.histograms.observe("embedwatch_processing_seconds", (),
                                         np.array([time.perf_counter() - t0]))
        if replayed:
            log.info("replayed %d events already processed before a restart", replayed)

    def _dead_letter(self, msg: Message, r: Rejection, limit: int) -> DeadLetter:
        """The dead letter of ``r``, cut to the dead-letter producer's ``limit`` (see
        :func:`fit_dead_letter`): an event refused as too large may be larger than the producer
        takes, and refused at every send it stopped the loop, again after every restart."""
        d = DeadLetter(self.settings.kafka.dlq_topic(msg.topic), r.payload, msg.key, dlq_headers(msg, r))
        fitted = fit_dead_letter(d, limit)
        if fitted is not d:
            log.warning("dead letter of %s:%d@%d (%s) cut from %d to %d bytes to fit the dead-letter producer",
                        msg.topic, msg.partition, msg.offset, r.reason.value, len(d.value), len(fitted.value))
        return fitted

    def _abandon(self, batch: DecodedBatch) -> None:
        """The batch was processed in memory but is not committed (the group moved on, or a stop
        came first): its partitions' next owner processes it again from their last durable point,
        so no checkpoint may hold its effects, or they are applied twice.

        Stopping, nothing more is checkpointed (``_state_ahead``). Otherwise the loop goes on, and
        the state of the partitions whose checkpoint would carry the batch (the homes of the
        streams it touched) is ahead of every position: they are not checkpointed, and their
        streams are forgotten once they are revoked, which a lost assignment brings at the next
        poll, even if the assignment that follows returns them; they are then restored from
        their last checkpoint, as a partition that moved between replicas is. Their state is not
        reset here instead: the last checkpoint is only read again at an assignment, and the
        consumer reads the batch again only from the position that assignment restores. A stream
        the batch created has no home and no checkpoint yet: it is forgotten now."""
        if self.stop_requested.is_set():
            self._state_ahead = True
            return
        with self.exporter.lock:
            for key in {b.stream for b in batch.blocks}:
                home = self.stream_home.get(key)
                if home is not None and home in self._assigned:
                    self._ahead.add(home)
                else:
                    self._forget_stream(key)
        log.warning("a batch was abandoned after it was processed: partitions %s are not checkpointed "
                    "until they are revoked", sorted(self._ahead))

    def _minute_tick(self) -> tuple[list[StreamKey], list[Alarm]]:
        """Every IDLE_CHECK_S: forget the idle streams, then expire the silent streams' windows
        (what each did, for tests)."""
        mono = time.monotonic()
        if mono - self._last_tick < IDLE_CHECK_S:
            return [], []
        self._last_tick = mono
        now = time.time()
        return self._expire_idle_streams(now), self._expire_windows(now)

    def _expire_idle_streams(self, now: float) -> list[StreamKey]:
        """Forget the streams idle for ``limits.stream_idle_s`` at wall-clock ``now``: no
        event newer than that, and none received for as long (a backlog of old events being caught
        up keeps its streams). Their max_streams slot, series and checkpoint entry are freed (the
        home partition's next checkpoint leaves them out); their stored baselines stay, and a
        stream that comes back starts from its active one, as a new stream does, unless
        ``limits.forget_idle_baselines`` removes them too."""
        idle_s = self.settings.limits.stream_idle_s
        if idle_s <= 0:
            return []
        with self.exporter.lock:
            # A stream whose partition still has unread events is not idle: they may be its own
            # (a restart after a long downtime, a consumer catching up).
            gone = [k for k in self.router.idle(now, idle_s, self._seen) if self.stream_home.get(k) not in self._behind]
            for key in gone:
                mon = self.router.monitors[key]
                log.info("stream %s forgotten: idle for more than limits.stream_idle_s=%gs (last active %s)",
                         key, idle_s, _when(last_activity(mon.newest_ts, self._seen.get(key))))
                self._forget_stream(key)
                self.exporter.counters.inc("embedwatch_streams_forgotten_total")
        self._forget_idle_baselines(gone)
        return gone

    def _forget_idle_baselines(self, keys: Sequence[StreamKey]) -> None:
        """With ``limits.forget_idle_baselines``: remove the stored baselines of streams forgotten
        as idle (theirs and their query embeddings'). Outside the exporter lock: a state backend
        that does not answer holds a write for seconds, and /metrics must keep answering."""
        if not self.settings.limits.forget_idle_baselines:
            return
        for key in keys:
            with self.exporter.lock:
                if key in self.router.monitors:  # back meanwhile: it uses its stored baseline again
                    continue
            for k in (key, key.query_side()):
                try:
                    ids = self.baselines.forget(k)
                except BaselineNotFoundError:
                    continue
                except Exception as e:  # the backend: the versions stay stored, as without the setting
                    log.error("stream %s: cannot forget its stored baselines (%s); they stay stored", k, e)
                    continue
                log.info("stream %s: stored baselines %s forgotten with the idle stream (limits.forget_idle_baselines)",
                         k, ", ".join(ids))

    def _expire_windows(self, now: float) -> list[Alarm]:
        """Evict, against wall-clock ``now``, the windows of streams that received nothing since
        the previous check: a silent stream's window measures go NaN once too few events are
        left, and an alarm whose window has emptied ends, instead of the last evaluation's gauges
        (and their alert) staying frozen for as long as the silence lasts."""
        with self.exporter.lock:
            ended = [a for mon in list(self.router.monitors.values()) for a in mon.expire(now)]
            self._record_alarms(ended, " (window expired)")
        return ended

    def _trim_heap(self, now_due: bool = False) -> None:
        """Collect garbage cycles and return freed heap memory to the OS now and then (see
        :mod:`embedwatch.heap`); with ``now_due``, right away (unless trimming is off)."""
        every = self.settings.limits.heap_trim_interval_s
        now = time.monotonic()
        if every <= 0 or (not now_due and now - self._last_heap_trim < every):
            return
        self._last_heap_trim = now
        heap.collect()  # first: what the cycles held is then freed, and trimmed with the rest
        heap.trim()

    def _probe(self, source: Source, every_s: float = 2.0) -> None:
        """Refresh connectivity, readiness and consumer lag every few seconds."""
        now = time.monotonic()
        if now - self._last_lag_probe < every_s:
            return
        self._last_lag_probe = now
        assigned = sorted(source.assignment())
        try:
            ends = source.end_offsets(assigned) if assigned else {}
            self.connected = True if assigned else source.connected()
        except UnknownTopicError as e:
            # The broker answered: the topic (or partition) is not there, e.g. deleted; the group
            # drops its partitions at its next rebalance (within a metadata refresh, 10 s).
            log.warning("kafka: %s", e)
            self.connected = True
            ends = {}
        except Exception as e:
            log.warning("broker did not answer: %s", e)
            self.connected = False
            ends = {}
        with self.exporter.lock:
            behind: set[PartitionId] = set()
            for p, end in ends.items():
                pos = self._positions.get(p)
                if pos is None:
                    pos = source.position(p)
                if pos is not None:
                    self.exporter.set_gauge("embedwatch_consumer_lag_messages", (p.topic, str(p.partition)),
                                            float(max(0, end - pos)))
                if pos is None or end > pos:
                    behind.add(p)
            if ends or not assigned:
                self._behind = behind
            self.ready = bool(assigned) and self.connected
            self.exporter.set_gauge("embedwatch_assigned_partitions", (), float(len(assigned)))
            self.exporter.set_gauge("embedwatch_kafka_connected", (), float(self.connected))
            self.exporter.set_gauge("embedwatch_ready", (), float(self.ready))

    # -- views for the API ----------------------------------------------------------------------

    def healthy(self, stall_s: float = STALL_S) -> bool:
        """Alive: the loop went round recently (a poll returns at least every poll_timeout_ms)."""
        return time.monotonic() - self._heartbeat < stall_s

    def streams_state(self) -> dict[str, Any]:
        with self.exporter.lock:
            return {str(k): m.state() for k, m in self.router.monitors.items()}

    def monitors_stream(self, key: StreamKey) -> bool:
        with self.exporter.lock:
            return key in self.router.monitors

    def list_baselines(self, stream: str | None) -> list[dict[str, Any]]:
        """The store's versions, each with ``monitored_here``: whether this replica monitors its
        stream (with one replica, a stream stored but not monitored is a candidate to forget)."""
        with self.exporter.lock:
            versions = self.baselines.list(StreamKey.parse(stream) if stream else None)
            for v in versions:
                v["monitored_here"] = StreamKey.parse(v["stream"]).document_side() in self.router.monitors
            return versions

    def promote_baseline(self, key: StreamKey, baseline_id: str | None, events: int | None = None) -> dict[str, Any]:
        """Activate version ``baseline_id`` of the stream, or (None) promote the stream: its next
        ``events`` events become its baseline (see :meth:`StreamMonitor.promote`). The answer is
        the active baseline's metadata with ``"status": "active"``, or ``"status": "collecting"``
        with the promotion's progress. A query-side key (:meth:`StreamKey.query_side`) does the
        same for the stream's query embeddings alone."""
        with self.exporter.lock:
            mon = self.router.monitors.get(key.document_side())
            if mon is None:
                raise StreamNotHere(key)
            if baseline_id is None:
                if key.is_query_side:
                    built = mon.promote_query(events)
                    progress = mon.query_monitor.promotion if mon.query_monitor is not None else None
                else:
                    built, progress = mon.promote(events), mon.promotion
                if built is None and progress is not None:
                    log.info("stream %s promoted: collecting %d events for its new baseline", key,
                             progress["needed"])
                    return {"status": "collecting", "stream": str(key), **progress}
                assert built is not None
                baseline = built
                _stored(lambda: self.baselines.save(baseline, activate=True))
            else:
                _stored(lambda: self.baselines.promote(key, baseline_id))
                baseline = self.baselines.get(key)
                self._activate(mon, key, baseline)
            self.router.mark_saved(key, str(baseline.metadata["baseline_id"]))
            log.info("baseline of %s is now %s", key, baseline.metadata["baseline_id"])
            return {"status": "active", **baseline.metadata}

    def upload_baseline(self, key: StreamKey, data: bytes, activate: bool) -> dict[str, Any]:
        """Store a baseline built elsewhere (``embedwatch baseline build``: a record as
        :func:`encode_baseline` writes it) as a version of ``key`` (a stream's, or its query
        embeddings'), and with ``activate`` make it the active one: at once for a stream this
        replica monitors, from its first event for a stream not live yet. A stream not monitored
        here that has stored versions is refused (404), as a promotion is: with several replicas
        another one may monitor it, and a second writer of its index would lose versions."""
        from embedwatch.api import ApiError

        # Decoded (hashes, shapes, finite values) and tried before any lock is taken: a scrape does
        # not wait for the scan fit.
        baseline = decode_baseline(data, origin="the uploaded baseline", max_unpacked=MAX_UPLOAD_UNPACKED)
        if baseline.key != key:
            raise ApiError(400, f"the uploaded baseline is of stream {baseline.key}, not {key}: upload it to "
                                f"/api/baselines/{baseline.key}/upload")
        try:
            trial(baseline, self.settings.detection)
        except Exception as e:
            raise ApiError(400, f"the uploaded baseline fails in a monitor with this service's detection settings "
                                f"({type(e).__name__}: {e})") from e
        with self.exporter.lock:
            mon = self.router.monitors.get(key.document_side())
            if mon is None and self.baselines.list(key):
                raise StreamNotHere(key, "has stored baselines: a stream let go as idle takes an upload once its "
                                         "events come back, a retired one once its baselines are forgotten")
            expected = self.router.expected_dim(key.document_side())
            if expected is not None and baseline.dim != expected:
                raise ApiError(400, f"the uploaded baseline is {baseline.dim}-d; stream {key.document_side()} "
                                    f"has {expected}-d vectors")
            stored = _stored(lambda: self.baselines.save(baseline, activate=activate))
            bid = baseline.baseline_id
            # Stored (or, without durable state, never to be): held without its sample, which only
            # the scan fit reads, made by the trial run and carried over (1.5 MiB at 768-d).
            self.baselines.hold(baseline.without_sample(self.settings.detection))
            if activate and mon is not None:
                self._activate(mon, key, self.baselines.get(key))
                self.router.mark_saved(key, bid)
            status = "active" if stored["active"] else "stored"
            log.info("baseline %s of %s uploaded (%s)", bid, key, status)
            return {"status": status, "monitored_here": mon is not None, **stored}

    def _activate(self, mon: StreamMonitor, key: StreamKey, baseline: Baseline) -> None:
        """Make the stored ``baseline`` of ``key`` (the stream's, or its query embeddings') active."""
        self._record_end(mon.activate_query(baseline) if key.is_query_side else mon.activate(baseline))

    def _record_end(self, end: Alarm | None) -> None:
        """The end of an alarm an activation closed: recorded and logged as the loop's are."""
        if end is not None:
            self._record_alarms([end], " (baseline changed)")

    def forget_baselines(self, key: StreamKey) -> dict[str, Any]:
        """Remove the stored baselines of a retired stream (a query-side key: of its query
        embeddings alone; a stream's key: its own and its query embeddings'). Refused (409) while
        this replica monitors the stream: a stream still receiving events would lose the baseline
        its checkpoint names and start again from its next events."""
        from embedwatch.api import ApiError

        with self.exporter.lock:
            if key.document_side() in self.router.monitors:
                raise ApiError(409, f"stream {key.document_side()} is monitored by this replica: forget only "
                                    "retired streams (a stream without events is let go after limits.stream_idle_s)")
            forgotten: list[dict[str, str]] = []
            for k in (key,) if key.is_query_side else (key, key.query_side()):
                try:
                    ids = _stored(functools.partial(self.baselines.forget, k))
                except BaselineNotFoundError:  # a stream with query-side baselines alone
                    continue
                forgotten += [{"stream": str(k), "baseline_id": bid} for bid in ids]
            if not forgotten:
                raise BaselineNotFoundError(f"no baselines for stream {key}")
            log.warning("baselines of %s forgotten through the API: %s", key,
                        ", ".join(f"{f['stream']} {f['baseline_id']}" for f in forgotten))
            return {"status": "forgotten", "stream": str(key), "forgotten": forgotten}

    def rollback_baseline(self, key: StreamKey) -> dict[str, Any]:
        with self.exporter.lock:
            mon = self.router.monitors.get(key.document_side())
            if mon is None:
                raise StreamNotHere(key)
            _stored(lambda: self.baselines.rollback(key))
            baseline = self.baselines.get(key)
            self._activate(mon, key, baseline)
            self.router.mark_saved(key, str(baseline.metadata["baseline_id"]))
            log.info("baseline of %s rolled back to %s", key, baseline.metadata["baseline_id"])
            return dict(baseline.metadata)
