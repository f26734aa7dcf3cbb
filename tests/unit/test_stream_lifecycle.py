"""A stream's and the service's lifecycle: streams gone idle are forgotten (loop tick and restore),
``embedwatch_up`` follows the loop's liveness, and the stop keeps to ``shutdown_timeout_s``.
Fakes of the clock, source and sink: pure loop logic."""

from __future__ import annotations

import logging
import math
import threading
import time as real_time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from embedwatch import app
from embedwatch.app import IDLE_CHECK_S, STALL_S, Service
from embedwatch.baseline_store import MemoryBaselineStore
from embedwatch.config import Settings
from embedwatch.events import Message, StreamKey
from embedwatch.router import is_idle, last_activity
from embedwatch.sources.base import Committed, PartitionId
from embedwatch.state import (
    Checkpoint,
    DurableBaselineStore,
    FileStateBackend,
    StreamCheckpoint,
    checkpoints_in,
    decode_checkpoint,
    encode_checkpoint,
)

P = PartitionId("embeddings", 0)
T0 = 1_800_000_000.0
HOUR = 3600.0
DAY = 86400.0
A = StreamKey("m", "a", "default")
B = StreamKey("m", "b", "default")
C = StreamKey("m", "c", "default")
D = StreamKey("m", "d", "default")


class FakeClock:
    """Stands for the ``time`` module in embedwatch.app: wall and monotonic clocks move together,
    only when told (``advance``, or a ``sleep``)."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def advance(self, s: float) -> None:
        self.now += s

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s

    def __getattr__(self, name: str) -> Any:  # strftime, gmtime, ...
        return getattr(real_time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    c = FakeClock()
    monkeypatch.setattr(app, "time", c)
    return c


def settings(**kw: Any) -> Settings:
    base: dict[str, Any] = {
        "kafka": {"poll_timeout_ms": 1, "max_poll_records": 100, "queries_topic": None},
        "detection": {"reference_size": 50, "window_events": 100, "min_window_events": 50},
        "limits": {"stream_idle_s": HOUR},
        "state": {"backend": "none"},
    }
    for k, v in kw.items():
        base.setdefault(k, {}).update(v)
    return Settings(**base)


_RNG = np.random.default_rng(0)
_offsets: dict[PartitionId, int] = {}


@pytest.fixture(autouse=True)
def _fresh_offsets() -> None:
    _offsets.clear()


def events(key: StreamKey, n: int, ts: float, p: PartitionId = P) -> list[Message]:
    out = []
    for i in range(n):
        off = _offsets.get(p, 0)
        _offsets[p] = off + 1
        doc = {"model": key.model, "model_version": key.model_version, "segment": key.segment,
               "embedding": (_RNG.standard_normal(8) + 2).round(4).tolist(), "ts": ts + i * 0.01}
        out.append(Message(orjson.dumps(doc), p.topic, p.partition, off, int(ts * 1000)))
    return out


def stream_lines(svc: Service, key: StreamKey) -> list[str]:
    return [line for line in svc.exporter.text().splitlines() if f'model_version="{key.model_version}"' in line]


class Source:
    """Assigns P at the first poll; each poll hands the next of ``script`` (a batch, or a callable
    run then, e.g. to move the clock); the service is stopped once the script is done."""

    def __init__(self, svc: Service, script: list[list[Message] | Callable[[], None]]) -> None:
        self.svc, self.script = svc, list(script)
        self.committed_at: dict[PartitionId, Committed] = {}
        self.polls = 0
        self.closed = False
        self.commits_after_close = 0

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
        self.polls += 1
        if self.polls == 1:
            self.svc.on_assigned([P])
        while self.script:
            step = self.script.pop(0)
            if callable(step):
                step()
                continue
            return step
        self.svc.stop_requested.set()
        return []

    def commit(self, positions: dict[PartitionId, Committed], asynchronous: bool = False) -> None:
        if self.closed:
            self.commits_after_close += 1
        self.committed_at.update(positions)

    def landed(self, positions: dict[PartitionId, Committed]) -> bool:
        return True

    def committed(self, partitions: Sequence[PartitionId],
                  timeout_s: float | None = None) -> dict[PartitionId, Committed | None]:
        return {p: self.committed_at.get(p) for p in partitions}

    def assignment(self) -> set[PartitionId]:
        return {P}

    def end_offsets(self, partitions: Sequence[PartitionId]) -> dict[PartitionId, int]:
        return dict.fromkeys(partitions, 0)

    def position(self, partition: PartitionId) -> int | None:
        return None

    def connected(self) -> bool:
        return True

    def close(self) -> None:
        self.closed = True


class Sink:
    def send(self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        pass

    def flush(self, timeout_s: float) -> None:
        pass

    def close(self) -> None:
        pass


# -- streams gone idle ----------------------------------------------------------------------------


def test_activity_is_the_later_of_the_newest_event_and_its_arrival() -> None:
    assert last_activity(100.0, None) == 100.0
    assert last_activity(100.0, 500.0) == 500.0  # old events caught up now: active now
    assert last_activity(-np.inf, None) == -np.inf
    assert is_idle(100.0, now=100.0 + HOUR + 1, idle_s=HOUR)
    assert not is_idle(100.0, now=100.0 + HOUR - 1, idle_s=HOUR)
    assert not is_idle(-np.inf, now=T0, idle_s=0.0)  # 0: every stream is kept


def test_the_tick_forgets_an_idle_stream_and_frees_its_slot_and_series(
        clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    svc = Service(settings(limits={"max_streams": 2}))
    svc.process(events(A, 60, clock.now - 10))
    clock.advance(HOUR / 2)
    svc.process(events(B, 60, clock.now - 10))
    _, rejected = svc.process(events(C, 5, clock.now))
    assert {r.reason.value for r in rejected} == {"stream_limit"}  # both slots held
    assert stream_lines(svc, A)

    clock.advance(HOUR / 2 - 20)
    assert svc._minute_tick()[0] == []  # nothing idle yet
    clock.advance(IDLE_CHECK_S / 2)
    assert svc._minute_tick()[0] == []  # A is, but the last look was half a minute ago
    clock.advance(IDLE_CHECK_S / 2)  # A: an hour and 40 s without events, B: half an hour
    with caplog.at_level(logging.INFO, logger="embedwatch"):
        assert svc._minute_tick()[0] == [A]

    assert set(svc.router.monitors) == {B}
    assert stream_lines(svc, A) == []
    assert "embedwatch_streams 1.0" in svc.exporter.text().splitlines()
    assert any("stream m/a/default forgotten" in r.getMessage() and r.levelno == logging.INFO
               for r in caplog.records)
    _, rejected = svc.process(events(C, 5, clock.now))
    assert rejected == [] and set(svc.router.monitors) == {B, C}  # the slot is free again
    assert "embedwatch_streams_forgotten_total 1.0" in svc.exporter.text().splitlines()


def test_a_forgotten_stream_that_comes_back_starts_afresh_from_its_stored_baseline(clock: FakeClock) -> None:
    store = MemoryBaselineStore()
    svc = Service(settings(), baselines=store)
    svc.process(events(A, 80, clock.now))
    first = svc.router.monitors[A]
    assert first.baseline is not None and first.events == 80
    built = first.baseline.baseline_id

    clock.advance(HOUR + IDLE_CHECK_S + 1)
    assert svc._minute_tick()[0] == [A]
    svc.process(events(A, 3, clock.now))
    back = svc.router.monitors[A]
    assert back is not first and back.events == 3
    assert back.baseline is not None and back.baseline.baseline_id == built


def test_a_backlog_of_old_events_keeps_its_stream_until_it_stops(clock: FakeClock) -> None:
    svc = Service(settings())
    svc.process(events(A, 60, clock.now - 30 * DAY))  # a consumer catching up on a month-old topic
    clock.advance(IDLE_CHECK_S + 1)
    assert svc._minute_tick()[0] == []
    assert A in svc.router.monitors
    clock.advance(HOUR)
    assert svc._minute_tick()[0] == [A]


def test_stream_idle_s_zero_keeps_every_stream(clock: FakeClock) -> None:
    svc = Service(settings(limits={"stream_idle_s": 0}))  # (and the restore: see is_idle)
    svc.process(events(A, 10, clock.now - 365 * DAY))
    clock.advance(365 * DAY)
    assert svc._minute_tick()[0] == []
    assert A in svc.router.monitors


def test_the_loop_forgets_idle_streams_as_it_goes(clock: FakeClock) -> None:
    svc = Service(settings())

    def idle_for_a_while() -> None:
        clock.advance(HOUR + IDLE_CHECK_S)

    src = Source(svc, [events(A, 60, clock.now), idle_for_a_while, events(B, 5, clock.now + HOUR + IDLE_CHECK_S)])
    svc.run(src, Sink())
    assert set(svc.router.monitors) == {B}


def test_a_restart_does_not_restore_a_stream_idle_since_its_last_checkpoint(
        clock: FakeClock, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = settings(state={"backend": "file", "directory": str(tmp_path), "checkpoint_interval_s": 10 * DAY})

    def later() -> None:
        clock.advance(1.2 * HOUR)

    # Written by a service that keeps every stream (stream_idle_s 0), restored by one that does not.
    first = Service(s.model_copy(update={"limits": s.limits.model_copy(update={"stream_idle_s": 0.0})}),
                    baselines=DurableBaselineStore(FileStateBackend(tmp_path)),
                    state_backend=FileStateBackend(tmp_path))
    # D: a backlog of month-old events, caught up just before the stop. The stop's checkpoint
    # is written with A 1.2 h without events.
    first.run(Source(first, [events(A, 80, clock.now), later, events(B, 80, clock.now + 1.2 * HOUR),
                             events(D, 10, clock.now - 30 * DAY)]), Sink())
    assert set(first.router.monitors) == {A, B, D}
    built = first.router.monitors[A].baseline
    assert built is not None

    clock.advance(0.4 * HOUR)  # A: 1.6 h without events, B: 0.4 h
    backend = FileStateBackend(tmp_path)
    records = backend.read_all()
    again = Service(s, baselines=DurableBaselineStore(backend, records), state_backend=backend,
                    state_records=records)
    with caplog.at_level(logging.INFO, logger="embedwatch"):
        again.run(Source(again, []), Sink())
    assert set(again.router.monitors) == {B, D}
    assert stream_lines(again, A) == []
    assert any("stream m/a/default forgotten at restore" in r.getMessage() for r in caplog.records)
    # Its checkpoint entry is gone (the stop's checkpoint rewrote the partition without it) ...
    (blob,) = checkpoints_in(FileStateBackend(tmp_path).read_all(), s.kafka.group_id).values()
    assert sorted(sc.key for sc in decode_checkpoint(blob).streams) == [B, D]
    # ... its stored baseline is not: back, it starts from it.
    again.process(events(A, 3, clock.now))
    back = again.router.monitors[A]
    assert back.events == 3 and back.baseline is not None and back.baseline.baseline_id == built.baseline_id


def test_a_restart_after_a_long_downtime_keeps_streams_whose_events_wait_in_the_topic(
        clock: FakeClock, tmp_path: Path) -> None:
    """Down for longer than stream_idle_s: every stream is idle by the clock, but its events may be
    waiting in the topic. The restore judges idleness when the checkpoint was written, and the
    tick spares streams whose partition still has unread events."""
    s = settings(state={"backend": "file", "directory": str(tmp_path), "checkpoint_interval_s": 10 * DAY},
                 detection={"reference_size": 200, "window_events": 100, "min_window_events": 50})
    first = Service(s, baselines=DurableBaselineStore(FileStateBackend(tmp_path)),
                    state_backend=FileStateBackend(tmp_path))
    first.run(Source(first, [events(A, 150, clock.now)]), Sink())
    assert first.router.monitors[A].events == 150  # collecting its reference (150 of 200)

    clock.advance(2 * HOUR)  # the downtime, while A's producer went on
    backend = FileStateBackend(tmp_path)
    records = backend.read_all()
    again = Service(s, baselines=DurableBaselineStore(backend, records), state_backend=backend,
                    state_records=records)

    class Behind(Source):
        def end_offsets(self, partitions: Sequence[PartitionId]) -> dict[PartitionId, int]:
            return dict.fromkeys(partitions, 250)  # 100 unread events

        def position(self, partition: PartitionId) -> int | None:
            return 150

    checked: list[bool] = []

    def check() -> None:
        assert set(again.router.monitors) == {A}  # restored, not forgotten
        again._last_lag_probe = -math.inf
        again._probe(src)
        clock.advance(IDLE_CHECK_S + 1)
        assert again._minute_tick()[0] == []  # its partition has unread events
        checked.append(True)

    src = Behind(again, [[], check, events(A, 100, clock.now + 2 * IDLE_CHECK_S)])
    again.run(src, Sink())
    assert checked and again.router.monitors[A].events == 250
    assert again.router.monitors[A].baseline is not None


def test_a_checkpoint_keeps_when_each_stream_was_last_received() -> None:
    arrays = {"x": np.arange(3.0)}
    c = Checkpoint("t", 0, 5, {"a": 5, "d": 0}, [StreamCheckpoint(A, {"n": 1}, arrays, seen_at=T0 + 0.5),
                                                  StreamCheckpoint(B, {"n": 2}, arrays)])
    got = decode_checkpoint(bytes(encode_checkpoint(c))).streams
    assert [(sc.key, sc.seen_at) for sc in got] == [(A, T0 + 0.5), (B, None)]


# -- embedwatch_up ---------------------------------------------------------------------------------


def up_values(svc: Service) -> list[str]:
    return [line for line in svc.exporter.text().splitlines() if line.startswith("embedwatch_up")]


def test_embedwatch_up_is_0_while_the_loop_is_stuck_and_after_it_stopped(clock: FakeClock) -> None:
    svc = Service(settings())
    entered, release = threading.Event(), threading.Event()

    class Stuck(Source):
        def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
            if self.polls == 0:
                self.polls = 1
                entered.set()
                release.wait(30)  # a client wedged in a call
            self.svc.stop_requested.set()
            return []

    worker = threading.Thread(target=svc.run, args=(Stuck(svc, []), Sink()), daemon=True)
    worker.start()
    assert entered.wait(10)
    assert up_values(svc) == ["embedwatch_up 1.0"]
    clock.advance(STALL_S + 1)
    assert not svc.healthy()
    assert up_values(svc) == ["embedwatch_up 0.0"]  # as /healthz: 503
    release.set()
    worker.join(10)
    assert not worker.is_alive()
    assert up_values(svc) == ["embedwatch_up 0.0"]


# -- shutdown_timeout_s ----------------------------------------------------------------------------


def _budget_settings(tmp_path: Path, budget: float) -> Settings:
    s = settings(state={"backend": "file", "directory": str(tmp_path), "checkpoint_interval_s": 3600})
    return s.model_copy(update={"shutdown_timeout_s": budget})


def _stop_timed(svc: Service, src: Source) -> float:
    """Run until the source has nothing more; seconds from the stop to run()'s return."""
    stopped: list[float] = []
    set_stop = svc.stop_requested.set

    def stop() -> None:
        stopped.append(real_time.monotonic())
        set_stop()

    svc.stop_requested.set = stop  # type: ignore[method-assign]
    svc.run(src, Sink())
    return real_time.monotonic() - stopped[0]


def test_a_stalled_final_checkpoint_is_abandoned_within_shutdown_timeout_s(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()

    class StalledWrites(FileStateBackend):
        def write(self, records: Any) -> None:
            release.wait(3.0)  # a volume or state topic that stalls
            super().write(records)

    svc = Service(_budget_settings(tmp_path, 0.5), state_backend=StalledWrites(tmp_path))
    src = Source(svc, [events(A, 60, real_time.time())])
    with caplog.at_level(logging.WARNING, logger="embedwatch"):
        took = _stop_timed(svc, src)
    assert took < 0.5 + 0.3, f"the stop took {took:.2f}s for a budget of 0.5s"
    assert src.closed  # the group is left all the same
    assert any("the final checkpoint and commit abandoned" in r.getMessage() for r in caplog.records)
    # The abandoned write may still land (the checkpoint's offset is authoritative), but nothing
    # commits through the closed consumer.
    release.set()
    for t in threading.enumerate():
        if t.name == "embedwatch-stop":
            t.join(5)
    assert src.commits_after_close == 0


def test_a_stalled_consumer_close_is_abandoned_within_shutdown_timeout_s(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()

    class StalledClose(Source):
        def close(self) -> None:
            release.wait(3.0)  # a coordinator that does not answer the leave
            super().close()

    svc = Service(_budget_settings(tmp_path, 0.5), state_backend=FileStateBackend(tmp_path))
    src = StalledClose(svc, [events(A, 60, real_time.time())])
    with caplog.at_level(logging.WARNING, logger="embedwatch"):
        took = _stop_timed(svc, src)
    release.set()
    assert took < 0.5 + 0.3, f"the stop took {took:.2f}s for a budget of 0.5s"
    assert any("leaving the consumer group abandoned" in r.getMessage() for r in caplog.records)
    # The checkpoint, well within the budget, was made and committed.
    (blob,) = checkpoints_in(FileStateBackend(tmp_path).read_all(), svc.settings.kafka.group_id).values()
    assert decode_checkpoint(blob).offset == 60 and src.committed_at[P].offset == 60


def test_the_group_is_left_even_when_a_batch_overran_the_budget(tmp_path: Path) -> None:
    """SIGTERM during a batch that takes longer than shutdown_timeout_s: the final checkpoint is
    skipped, but the consumer still leaves the group (milliseconds), or the next owner would wait
    session_timeout_ms for the partitions."""
    svc = Service(_budget_settings(tmp_path, 0.4))

    def slow_batch() -> None:
        svc._stop_at = real_time.monotonic()  # the signal, as the handler records it
        real_time.sleep(0.6)

    src = Source(svc, [events(A, 10, real_time.time()), slow_batch, events(A, 10, real_time.time())])
    t0 = real_time.monotonic()
    svc.run(src, Sink())
    assert src.closed
    assert real_time.monotonic() - t0 < 0.6 + 0.4 * 0.25 + 0.5


def test_an_error_of_a_step_of_the_stop_is_raised_after_the_other_steps(tmp_path: Path) -> None:
    class FailingClose(Source):
        def close(self) -> None:
            raise RuntimeError("close failed")

    class ClosedSink(Sink):
        closed = False

        def close(self) -> None:
            self.closed = True

    svc = Service(_budget_settings(tmp_path, 5.0), state_backend=FileStateBackend(tmp_path))
    sink = ClosedSink()
    with pytest.raises(RuntimeError, match="close failed"):
        svc.run(FailingClose(svc, [events(A, 10, real_time.time())]), sink)
    assert sink.closed


def _shifted(key: StreamKey, n: int, ts: float, shift: float) -> list[Message]:
    out = []
    for i in range(n):
        off = _offsets.get(P, 0)
        _offsets[P] = off + 1
        doc = {"model": key.model, "model_version": key.model_version, "segment": key.segment,
               "embedding": (_RNG.standard_normal(8) + 2 + shift).round(4).tolist(), "ts": ts + i * 0.01}
        out.append(Message(orjson.dumps(doc), P.topic, P.partition, off, int(ts * 1000)))
    return out


def test_the_tick_ends_the_alarm_of_a_stream_silent_past_its_window(clock: FakeClock) -> None:
    """A stream that stops sending while drifting: its window empties against the wall clock, its
    alarm ends and its gauges stop saying "drifting"; before, they stayed frozen at the last
    evaluation for as long as the silence lasted."""
    svc = Service(settings(detection={"window_seconds": HOUR}, limits={"stream_idle_s": 0}))
    svc.process(_shifted(A, 150, clock.now, 0.0))
    svc.process(_shifted(A, 200, clock.now + 2, 3.0))
    mon = svc.router.monitors[A]
    assert mon.drifting

    def drift_gauge() -> list[str]:
        return [ln for ln in stream_lines(svc, A) if ln.startswith("embedwatch_drift_detected{")]

    assert [ln.rsplit(" ", 1)[1] for ln in drift_gauge()] == ["1.0"]
    assert svc._minute_tick()[1] == []  # paced: the last look is not a minute old
    clock.advance(2 * HOUR)
    assert svc._minute_tick()[1] == []  # the first look after new events only notes them
    clock.advance(IDLE_CHECK_S)
    ended = svc._minute_tick()[1]
    assert [(a.stream, a.kind) for a in ended] == [(str(A), "end")] and svc.alarms[-1] == ended[0]
    assert not mon.drifting
    assert [ln.rsplit(" ", 1)[1] for ln in drift_gauge()] == ["0.0"]
    assert not any(ln.startswith("embedwatch_drift_score{") for ln in stream_lines(svc, A))


def test_the_service_stays_alive_while_it_waits_for_the_broker(clock: FakeClock) -> None:
    """A write retried through a broker outage longer than STALL_S: the loop is waiting, not stuck,
    so /healthz (and embedwatch_up) must not ask for a restart that cannot bring the broker back."""
    svc = Service(settings())
    seen: list[tuple[float, bool]] = []
    outage_until = clock.now + 3 * STALL_S

    def write() -> None:
        seen.append((clock.now, svc.healthy()))
        if clock.now < outage_until:
            raise ConnectionError("broker unreachable")

    assert svc._retry(write, "checkpoint")
    assert seen[-1][0] >= outage_until and len(seen) > 10
    assert all(alive for _, alive in seen), [t - T0 for t, alive in seen if not alive][:3]
    assert "embedwatch_up 1.0" in svc.exporter.text().splitlines()
    assert "embedwatch_kafka_connected 1.0" in svc.exporter.text().splitlines()  # back once it landed


def test_a_missing_topic_is_not_reported_as_a_broker_that_does_not_answer(
        caplog: pytest.LogCaptureFixture) -> None:
    """The broker answered that the topic is gone: EmbedwatchKafkaDisconnected must not fire, and
    the log must name the topic rather than blame the broker."""
    from embedwatch.sources import UnknownTopicError

    svc = Service(settings())

    class Deleted(Source):
        def end_offsets(self, partitions: Sequence[PartitionId]) -> dict[PartitionId, int]:
            raise UnknownTopicError(topics=["embeddings"])

    with caplog.at_level(logging.WARNING, logger="embedwatch"):
        svc._probe(Deleted(svc, []))
    assert svc.connected
    assert "embedwatch_kafka_connected 1.0" in svc.exporter.text().splitlines()
    assert any("does not exist" in r.getMessage() for r in caplog.records)
    assert not any("did not answer" in r.getMessage() for r in caplog.records)


# -- partitioning ----------------------------------------------------------------------------------


def _conflicts(svc: Service) -> float:
    line = next(ln for ln in svc.exporter.text().splitlines()
                if ln.startswith("embedwatch_stream_partition_conflicts_total "))
    return float(line.rsplit(" ", 1)[1])


def test_a_stream_whose_events_come_from_two_partitions_is_reported_once(
        clock: FakeClock, caplog: pytest.LogCaptureFixture) -> None:
    """Unkeyed events of a stream spread over partitions (or a queries topic with another
    partition count): with several replicas each monitors part of the stream."""
    other = PartitionId("embeddings", 1)

    class Two(Source):
        def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
            if self.polls == 0:
                self.svc.on_assigned([other])
            return super().poll(max_records, timeout_ms)

        def assignment(self) -> set[PartitionId]:
            return {P, other}

    svc = Service(settings())
    seen: list[float] = []
    script: list[list[Message] | Callable[[], None]] = [
        events(A, 5, T0), events(B, 5, T0), lambda: seen.append(_conflicts(svc)),
        events(A, 5, T0 + 1, p=other), events(A, 5, T0 + 2, p=other),  # reported once per stream
        events(B, 5, T0 + 3), lambda: seen.append(_conflicts(svc))]  # B stays on its partition
    with caplog.at_level(logging.WARNING, logger="embedwatch"):
        svc.run(Two(svc, script), Sink())
    assert seen == [0.0, 1.0]
    lines = [r.getMessage() for r in caplog.records if "has events in" in r.getMessage()]
    assert len(lines) == 1 and "m/a/default" in lines[0] and "embeddings:1" in lines[0], lines


def test_an_assignment_whose_embeddings_and_queries_partitions_differ_is_reported(
        caplog: pytest.LogCaptureFixture) -> None:
    s = settings(kafka={"queries_topic": "queries"})
    svc = Service(s)
    svc._assigned = {PartitionId("embeddings", 0), PartitionId("embeddings", 1), PartitionId("queries", 0),
                     PartitionId("queries", 1)}
    svc._check_copartitioned()
    assert _conflicts(svc) == 0.0
    svc._assigned = {PartitionId("embeddings", 0), PartitionId("embeddings", 1), PartitionId("queries", 0)}
    with caplog.at_level(logging.WARNING, logger="embedwatch"):
        svc._check_copartitioned()
    assert _conflicts(svc) == 1.0
    assert any("assigned partitions [0, 1] of embeddings but [0] of queries" in r.getMessage()
               for r in caplog.records)


def test_the_api_says_a_stream_is_not_monitored_by_this_replica() -> None:
    from embedwatch.app import StreamNotHere

    svc = Service(settings())
    with pytest.raises(StreamNotHere, match=r"stream m/a/default is not monitored by this replica .*/api/streams"):
        svc.rollback_baseline(A)
    assert isinstance(StreamNotHere(A), LookupError)  # the API's 404


def test_forget_idle_baselines_removes_an_idle_stream_s_stored_baselines_too(clock: FakeClock) -> None:
    """Opt-in: with durable state every replica held every stored version of every stream ever
    seen; a deployment whose model versions come and go lets the idle ones' baselines go too."""
    for setting, kept in ((False, True), (True, False)):
        svc = Service(settings(limits={"forget_idle_baselines": setting}))
        svc.process(events(A, 60, clock.now))
        svc.process(events(B, 60, clock.now))
        assert {m["stream"] for m in svc.baselines.list()} == {str(A), str(B)}
        clock.advance(HOUR / 2)
        svc.process(events(B, 5, clock.now))
        clock.advance(HOUR / 2 + IDLE_CHECK_S)
        assert svc._minute_tick()[0] == [A]
        assert {m["stream"] for m in svc.baselines.list()} == ({str(A), str(B)} if kept else {str(B)})
        svc.process(events(A, 3, clock.now))
        assert (svc.router.monitors[A].baseline is not None) == kept  # back: from its stored one, or anew


def test_forget_idle_baselines_at_a_restore(clock: FakeClock, tmp_path: Path) -> None:
    s = settings(state={"backend": "file", "directory": str(tmp_path), "checkpoint_interval_s": 10 * DAY},
                 limits={"forget_idle_baselines": True})

    def later() -> None:
        clock.advance(1.2 * HOUR)

    # Written by a service that keeps every stream (stream_idle_s 0): its stop's checkpoint has A
    # 1.2 h without events.
    first = Service(s.model_copy(update={"limits": s.limits.model_copy(update={"stream_idle_s": 0.0})}),
                    baselines=DurableBaselineStore(FileStateBackend(tmp_path)),
                    state_backend=FileStateBackend(tmp_path))
    first.run(Source(first, [events(A, 80, clock.now), later, events(B, 80, clock.now + 1.2 * HOUR)]), Sink())
    assert {m["stream"] for m in first.baselines.list()} == {str(A), str(B)}
    backend = FileStateBackend(tmp_path)
    records = backend.read_all()
    again = Service(s, baselines=DurableBaselineStore(backend, records), state_backend=backend, state_records=records)
    again.run(Source(again, []), Sink())
    assert set(again.router.monitors) == {B}
    stored = FileStateBackend(tmp_path)
    assert {m["stream"] for m in DurableBaselineStore(stored, stored.read_all()).list()} == {str(B)}
