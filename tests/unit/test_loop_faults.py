"""The service loop under faults: every event is accounted for (accepted, or dead-lettered with its
reason) and the loop survives broker errors. Fakes of the broker, source and sinks: pure loop logic."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from confluent_kafka import KafkaError as ConfluentError
from confluent_kafka import KafkaException
from kafka.errors import CommitFailedError, KafkaTimeoutError

from embedwatch.app import Service
from embedwatch.config import Settings
from embedwatch.events import Message, StreamKey
from embedwatch.monitor import StreamMonitor
from embedwatch.sources.base import TRUNCATED_HEADER, Committed, PartitionId, dead_letter_limit
from embedwatch.sources.confluent import ConfluentDeadLetterSink
from embedwatch.state import DurableBaselineStore, FileStateBackend, StateError

P = PartitionId("embeddings", 0)
KEY = StreamKey("m", "v1", "default")
BAD = b"{not json"
Letter = tuple[str, bytes, dict[str, bytes]]


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("embedwatch.app.time.sleep", lambda s: None)


class Broker:
    def __init__(self) -> None:
        self.logs: dict[PartitionId, list[Message]] = {}
        self.committed: dict[PartitionId, Committed] = {}
        self.dlq: list[Letter] = []

    def append(self, value: bytes, p: PartitionId = P) -> None:
        log = self.logs.setdefault(p, [])
        log.append(Message(value, p.topic, p.partition, len(log), 1_700_000_000_000))


class Source:
    """Assigns P at the first poll and reads from its committed position; commits apply at once;
    stops the service once drained. ``hooks`` run at each poll (``poll_no``)."""

    def __init__(self, svc: Service, broker: Broker, batch: int = 50) -> None:
        self.svc, self.broker, self.batch = svc, broker, batch
        self.pos: dict[PartitionId, int] = {}
        self.polls = 0
        self.hooks: list[Callable[[Source, int], None]] = []
        self.commit_error: Exception | None = None
        self.committed_error: Callable[[], Exception | None] = lambda: None

    def assign(self) -> None:
        c = self.broker.committed.get(P)
        self.pos[P] = c.offset if c is not None else 0
        self.svc.on_assigned([P])

    def revoke(self) -> None:
        self.svc.on_revoked([P])
        self.pos.pop(P, None)

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
        self.polls += 1
        if self.polls == 1:
            self.assign()
        for hook in list(self.hooks):
            hook(self, self.polls)
        out: list[Message] = []
        for p in list(self.pos):
            take = self.broker.logs.get(p, [])[self.pos[p]:self.pos[p] + self.batch]
            out += take
            self.pos[p] += len(take)
        if not out:
            self.svc.stop_requested.set()
        return out

    def commit(self, positions: dict[PartitionId, Committed], asynchronous: bool = False) -> None:
        if self.commit_error is not None:
            if asynchronous:
                return
            raise self.commit_error
        self.broker.committed.update(positions)

    def landed(self, positions: dict[PartitionId, Committed]) -> bool:
        return all((c := self.broker.committed.get(p)) is not None and c.offset >= want.offset
                   for p, want in positions.items())

    def committed(self, partitions: Sequence[PartitionId],
                  timeout_s: float | None = None) -> dict[PartitionId, Committed | None]:
        error = self.committed_error()
        if error is not None:
            raise error
        return {p: self.broker.committed.get(p) for p in partitions}

    def assignment(self) -> set[PartitionId]:
        return set(self.pos)

    def end_offsets(self, partitions: Sequence[PartitionId]) -> dict[PartitionId, int]:
        return {p: len(self.broker.logs.get(p, [])) for p in partitions}

    def position(self, partition: PartitionId) -> int | None:
        return self.pos.get(partition)

    def connected(self) -> bool:
        return True

    def close(self) -> None:
        pass


class Sink:
    """Delivers at flush; ``send_errors`` are raised by the next sends, one each."""

    def __init__(self, broker: Broker, limit: int | None = None) -> None:
        self.broker, self.limit = broker, limit
        self.pending: list[Letter] = []
        self.send_errors: list[Exception] = []

    def send(self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        if self.send_errors:
            raise self.send_errors.pop(0)
        if self.limit is not None and len(value) + sum(len(k) + len(v) for k, v in headers) > self.limit:
            raise KafkaException(ConfluentError(ConfluentError.MSG_SIZE_TOO_LARGE))  # as librdkafka
        self.pending.append((topic, value, dict(headers)))

    def flush(self, timeout_s: float) -> None:
        self.broker.dlq += self.pending
        self.pending = []

    def close(self) -> None:
        pass


def settings(**kw: Any) -> Settings:
    base: dict[str, Any] = {"kafka": {"poll_timeout_ms": 1, "max_poll_records": 50, "queries_topic": None},
                            "detection": {"reference_size": 50, "window_events": 100, "min_window_events": 91}}
    for k, v in kw.items():
        base.setdefault(k, {}).update(v)
    return Settings(**base)


_RNG = np.random.default_rng(0)


def good(model: str = "m") -> bytes:
    return orjson.dumps({"model": model, "model_version": "v1", "ts": 1.7e9,
                         "embedding": (_RNG.standard_normal(8) + 2).tolist()})


def ledger(svc: Service) -> tuple[int, int]:
    led = svc.ledgers[P]
    return led.accepted, led.dead_lettered


def reasons(broker: Broker) -> list[bytes]:
    return [h["embedwatch-error"] for _, _, h in broker.dlq]


# -- bug 1: a stream whose update raises ------------------------------------------------------


class _Boom(StreamMonitor):
    def update_embeddings(self, *a: Any, **k: Any) -> Any:
        raise RuntimeError("boom")


def test_a_block_dead_lettered_for_a_processing_error_is_not_counted_accepted_too() -> None:
    broker = Broker()
    for i in range(10):
        broker.append(good("bad" if i % 2 else "m"))
    svc = Service(settings())
    svc.router._factory = lambda key, det, bl: (_Boom if key.model == "bad" else StreamMonitor)(key, det, bl)
    svc.run(Source(svc, broker), Sink(broker))
    assert reasons(broker) == [b"processing_error"] * 5
    assert ledger(svc) == (5, 5)  # 10 events, each once
    assert broker.committed[P].offset == 10 and orjson.loads(broker.committed[P].metadata) == {"v": 1, "a": 5, "d": 5}
    assert svc.exporter.counters.series("embedwatch_consumed_events_total") == {
        ("embeddings", "0", "accepted"): 5.0, ("embeddings", "0", "dead_lettered"): 5.0}
    assert svc.exporter.counters.series("embedwatch_events_total") == {("m", "v1", "default", "embedding"): 5.0}


class _FlakyBaselineWrites(FileStateBackend):
    fail = True

    def write(self, records: Any) -> None:
        if self.fail and any(k.startswith("baseline") for k in records):
            raise KafkaTimeoutError("Timeout after waiting for 15 secs.")  # KafkaStateBackend._send's flush
        super().write(records)


def test_a_baseline_save_failing_with_a_kafka_error_keeps_the_block_and_the_baseline(tmp_path: Path) -> None:
    backend = _FlakyBaselineWrites(tmp_path)
    store = DurableBaselineStore(backend)
    broker = Broker()
    for _ in range(60):  # reference_size=50: the first batch builds the stream's baseline
        broker.append(good())
    svc = Service(settings(kafka={"max_poll_records": 60}), baselines=store)
    src = Source(svc, broker, batch=60)
    after_first: list[Any] = []

    def recover(source: Source, n: int) -> None:
        if n == 2:
            mon = svc.router.monitors[KEY]
            after_first.extend([mon.events, mon.baseline, store.list(KEY)])
            backend.fail = False
            for _ in range(5):
                broker.append(good())

    src.hooks.append(recover)
    svc.run(src, Sink(broker))
    events, baseline, stored = after_first
    assert events == 60 and baseline is not None
    assert stored == []  # not stored yet: retried with the stream's next batch
    assert broker.dlq == [] and ledger(svc) == (65, 0)
    assert [m["baseline_id"] for m in store.list(KEY)] == [baseline.baseline_id]
    assert svc.router.monitors[KEY].events == 65


# -- bugs 2 and 3: dead letters that fail -----------------------------------------------------


class _Producer:
    """librdkafka's Producer as the sink uses it; deliveries at flush, refused as ``refuse`` says
    (an error for a value, or None to deliver it)."""

    def __init__(self, broker: Broker, refuse: Callable[[bytes], ConfluentError | None]) -> None:
        self.broker, self.refuse = broker, refuse
        self.queue: list[tuple[str, bytes, list[tuple[str, bytes]], Any]] = []
        self.produced: list[bytes] = []

    def produce(self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]],
                on_delivery: Any) -> None:
        self.produced.append(value)
        self.queue.append((topic, value, headers, on_delivery))

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        queue, self.queue = self.queue, []
        for topic, value, headers, cb in queue:
            err = self.refuse(value)
            if err is None:
                self.broker.dlq.append((topic, value, dict(headers)))
            cb(err, None)
        return 0


def test_a_dead_letter_whose_delivery_failed_is_produced_again_before_the_commit() -> None:
    broker = Broker()
    broker.append(good())
    broker.append(BAD)
    failures = [ConfluentError(ConfluentError._TRANSPORT)] * 2  # twice, then delivered
    producer = _Producer(broker, lambda value: failures.pop() if failures else None)
    svc = Service(settings())
    svc.run(Source(svc, broker), ConfluentDeadLetterSink(svc.settings, producer=producer))
    assert producer.produced == [BAD] * 3
    assert [(v, h["embedwatch-source-offset"]) for _, v, h in broker.dlq] == [(BAD, b"1")]
    assert ledger(svc) == (1, 1) and broker.committed[P].offset == 2
    assert svc.exporter.counters.get("embedwatch_dead_letter_errors_total") == 2


def test_a_dead_letter_the_broker_refuses_as_too_large_lands_cut_and_marked() -> None:
    broker = Broker()
    big = b"{" + b"x" * 20_000  # invalid JSON: dead-lettered with its bytes
    broker.append(good())
    broker.append(big)
    broker.append(BAD)
    too_large = ConfluentError(ConfluentError.MSG_SIZE_TOO_LARGE)  # the DLQ topic takes less than the producer
    producer = _Producer(broker, lambda value: too_large if len(value) > 5_000 else None)
    svc = Service(settings())
    svc.run(Source(svc, broker), ConfluentDeadLetterSink(svc.settings, producer=producer))
    by_offset = {h["embedwatch-source-offset"]: (v, h) for _, v, h in broker.dlq}
    assert sorted(by_offset) == [b"1", b"2"]
    value, headers = by_offset[b"1"]
    assert big.startswith(value) and len(value) <= 5_000
    assert headers[TRUNCATED_HEADER] == b"20001" and headers["embedwatch-error"] == b"invalid_json"
    assert by_offset[b"2"][0] == BAD and TRUNCATED_HEADER not in by_offset[b"2"][1]
    assert ledger(svc) == (1, 2) and broker.committed[P].offset == 3


def test_a_dead_letter_send_that_raises_is_retried_and_the_loop_goes_on() -> None:
    broker = Broker()
    broker.append(good())
    broker.append(BAD)
    broker.append(BAD)
    sink = Sink(broker)
    # kafka-python's send while the broker is away (max_block_ms); the retry resumes after the
    # letters already queued, so none is sent twice
    sink.send_errors = [KafkaTimeoutError("Failed to update metadata after 5.0 secs.")] * 3
    svc = Service(settings())
    svc.run(Source(svc, broker), sink)
    assert [h["embedwatch-source-offset"] for _, _, h in broker.dlq] == [b"1", b"2"]
    assert ledger(svc) == (1, 2) and broker.committed[P].offset == 3
    assert svc.exporter.counters.get("embedwatch_dead_letter_errors_total") == 3


def test_a_payload_larger_than_the_dead_letter_producer_takes_is_cut_to_fit() -> None:
    s = settings(limits={"max_message_bytes": 1 << 20})
    limit = dead_letter_limit(s.limits.max_message_bytes)
    huge = b"x" * (2 << 20)  # refused as too_large; librdkafka refuses to produce it as it is
    broker = Broker()
    broker.append(good())
    broker.append(huge)
    svc = Service(s)
    svc.run(Source(svc, broker), Sink(broker, limit=limit))
    ((topic, value, headers),) = broker.dlq
    assert topic == "embeddings.dlq" and huge.startswith(value) and len(value) > limit // 2
    assert headers[TRUNCATED_HEADER] == str(len(huge)).encode()
    assert headers["embedwatch-error"] == b"too_large" and headers["embedwatch-source-offset"] == b"1"
    assert ledger(svc) == (1, 1) and broker.committed[P].offset == 2


# -- bug 4: broker errors around the poll ------------------------------------------------------


def test_a_poll_that_raises_is_retried_and_reported_as_disconnected() -> None:
    broker = Broker()
    for _ in range(5):
        broker.append(good())
    svc = Service(settings())
    src = Source(svc, broker, batch=2)
    seen: list[float] = []
    poll = src.poll

    def flaky(n: int, t: int) -> list[Message]:
        if src.polls in (1, 2):
            src.polls += 1
            seen.append(svc.exporter.gauges["embedwatch_kafka_connected"].get((), -1.0))
            raise KafkaException(ConfluentError(ConfluentError._TRANSPORT))
        return poll(n, t)

    src.poll = flaky  # type: ignore[method-assign]
    svc.run(src, Sink(broker))
    assert seen[1] == 0.0  # reported disconnected while the polls fail
    assert ledger(svc) == (5, 0) and broker.committed[P].offset == 5


def test_an_assignment_whose_committed_positions_cannot_be_read_is_completed_at_the_next_attempt() -> None:
    broker = Broker()
    for _ in range(5):
        broker.append(good())
    broker.committed[P] = Committed(2, '{"v":1,"a":2,"d":0}')  # a previous owner's
    svc = Service(settings())
    src = Source(svc, broker)
    errors = [KafkaException(ConfluentError(ConfluentError._TIMED_OUT))] * 2
    src.committed_error = lambda: errors.pop() if errors else None
    svc.run(src, Sink(broker))
    # the records of the first poll, fetched before the assignment was complete, are processed
    assert ledger(svc) == (5, 0) and broker.committed[P].offset == 5
    assert orjson.loads(broker.committed[P].metadata) == {"v": 1, "a": 5, "d": 0}


class _CutShort(FileStateBackend):
    """Its first read at an assignment consumes every record, then times out (as
    KafkaStateBackend._drain does after 60 s): what it had read is lost to later read_new calls."""

    failures = 1

    def read_new(self, take: Any = None) -> dict[str, bytes]:
        out = super().read_new(take)
        if self.failures:
            self.failures -= 1
            raise StateError("timed out reading state topic embedwatch-state")
        return out


def test_an_assignment_whose_state_read_failed_restores_the_checkpoint_the_read_consumed(tmp_path: Path) -> None:
    s = settings(state={"backend": "file", "directory": str(tmp_path)})
    broker = Broker()
    for _ in range(60):
        broker.append(good())
    first = Service(s, baselines=DurableBaselineStore(FileStateBackend(tmp_path)),
                    state_backend=FileStateBackend(tmp_path))
    first.run(Source(first, broker, batch=60), Sink(broker))  # checkpointed at 60 by its graceful stop
    for _ in range(5):
        broker.append(good())
    backend = _CutShort(tmp_path)
    second = Service(s, baselines=DurableBaselineStore(backend), state_backend=backend)
    second.run(Source(second, broker), Sink(broker))
    assert ledger(second) == (65, 0) and broker.committed[P].offset == 65
    mon = second.router.monitors[KEY]
    assert mon.events == 65 and mon.baseline is not None  # its state restored, not started afresh


# -- bug 5: a batch abandoned because the group moved on -----------------------------------------


def _durable(tmp_path: Path) -> tuple[Settings, Callable[[], Service]]:
    s = settings(state={"backend": "file", "directory": str(tmp_path), "checkpoint_interval_s": 1e-9})

    def make() -> Service:
        recs = FileStateBackend(tmp_path).read_all()
        return Service(s, baselines=DurableBaselineStore(FileStateBackend(tmp_path), recs),
                       state_backend=FileStateBackend(tmp_path), state_records=recs)

    return s, make


def _abandoned_second_batch(broker: Broker, src: Source, then: Callable[[Source], None] | None = None) -> None:
    for _ in range(99):
        broker.append(good())
    broker.append(BAD)  # the second batch has a dead letter: its marker is committed synchronously

    def group_moves_on(source: Source, n: int) -> None:
        if n == 2:
            source.commit_error = CommitFailedError("the group has already rebalanced")
        elif n == 3 and then is not None:
            then(source)

    src.hooks.append(group_moves_on)


def test_a_batch_abandoned_when_the_group_moved_on_is_not_checkpointed(tmp_path: Path) -> None:
    _, make = _durable(tmp_path)
    broker = Broker()
    first = make()
    src = Source(first, broker)
    _abandoned_second_batch(broker, src)
    first.run(src, Sink(broker))
    assert broker.committed[P].offset == 50 and broker.dlq == []
    second = make()  # the next owner
    second.run(Source(second, broker), Sink(broker))
    assert ledger(second) == (99, 1)
    assert second.router.monitors[KEY].events == 99  # each event applied once
    assert second.exporter.counters.series("embedwatch_events_total") == {("m", "v1", "default", "embedding"): 99.0}


def test_a_partition_given_back_after_an_abandoned_batch_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    _, make = _durable(tmp_path)
    broker = Broker()
    svc = make()
    src = Source(svc, broker)

    def rebalance(source: Source) -> None:  # the rejoin: revoked, then given back to the same replica
        source.commit_error = None
        source.revoke()
        source.assign()

    _abandoned_second_batch(broker, src, then=rebalance)
    svc.run(src, Sink(broker))
    assert ledger(svc) == (99, 1) and broker.committed[P].offset == 100
    assert svc.router.monitors[KEY].events == 99  # the batch read again is applied once
    assert [h["embedwatch-source-offset"] for _, _, h in broker.dlq] == [b"99"]


def test_the_ledger_resumes_from_the_commit_and_the_process_counter_starts_at_zero() -> None:
    """After a restart the ledger goes on from the committed metadata (it reconciles with the
    offsets), while embedwatch_processed_events_total counts only what this process read: the
    counter rate() is taken of, since a ledger that resumes below its last scrape is a reset."""
    broker = Broker()
    for i in range(12):
        broker.append(BAD if i % 4 == 0 else good())
    first = Service(settings())
    first.run(Source(first, broker), Sink(broker))
    for i in range(8):
        broker.append(BAD if i % 4 == 0 else good())
    second = Service(settings())
    second.run(Source(second, broker), Sink(broker))
    assert ledger(first) == (9, 3) and ledger(second) == (15, 5)
    assert second.exporter.counters.series("embedwatch_consumed_events_total") == {
        ("embeddings", "0", "accepted"): 15.0, ("embeddings", "0", "dead_lettered"): 5.0}
    assert first.exporter.counters.series("embedwatch_processed_events_total") == {
        ("embeddings", "accepted"): 9.0, ("embeddings", "dead_lettered"): 3.0}
    assert second.exporter.counters.series("embedwatch_processed_events_total") == {
        ("embeddings", "accepted"): 6.0, ("embeddings", "dead_lettered"): 2.0}
