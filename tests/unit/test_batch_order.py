"""The order of a batch's side effects (what a crash at any point leaves behind).

The loop's Kafka path is tested end to end against the real broker (tests/integration); a kill at
the exact moment between two effects cannot be placed there, so the order itself is checked here
with a recording source and sink (plain fakes of the two protocols, no Kafka involved).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import orjson
import pytest

from embedwatch.app import Ledger, Service
from embedwatch.config import Settings
from embedwatch.events import Message
from embedwatch.sources.base import Committed, PartitionId
from embedwatch.state import FileStateBackend, checkpoint_key, decode_checkpoint

TOPIC = "embeddings"
P0 = PartitionId(TOPIC, 0)


def _event(i: int, bad: bool = False) -> bytes:
    vec = [0.0] * 8 if bad else [1.0 + (i % 5) * 0.1] + [0.5] * 7
    return orjson.dumps({"model": "m", "model_version": "v1", "embedding": vec, "event_id": f"e{i}"})


def _messages(lo: int, n: int, bad_every: int = 0) -> list[Message]:
    return [Message(_event(i, bad=bool(bad_every) and i % bad_every == bad_every - 1), TOPIC, 0, i)
            for i in range(lo, lo + n)]


class RecordingSource:
    """Hands out prepared batches and records every commit in one log shared with the sink.

    It also models the broker's side of commits: ``applied`` is what a successor would read after a
    kill at this moment, and :meth:`committed` reads it back. Asynchronous commits are applied in
    order by the next poll or read-back (a broker applies one within a round trip; the next poll is
    where real clients serve their completions, and :meth:`landed` learns of them) or, with
    ``slow``, only when a later synchronous commit pushes them through (commits to one coordinator
    apply in order). With ``late_acks`` their completions are not seen (librdkafka queues them
    behind the prefetched records); with ``unreadable`` reading them back fails too. With
    ``fail_commits`` the broker is unreachable: every commit fails, asynchronous ones silently."""

    def __init__(self, log: list[tuple[str, object]], batches: list[list[Message]], svc: Service) -> None:
        self.log, self.batches, self.svc = log, batches, svc
        self.fail_commits = False
        self.slow = False
        self.late_acks = False
        self.unreadable = False
        self.reads = -1  # committed() calls after the assignment's
        self.first_poll = True
        self.polled = 0
        self.on_batch: dict[int, Callable[[], None]] = {}  # run before handing out batch i
        self.queued: list[tuple[int, int | None, Committed]] = []  # async commits sent, not applied yet
        self.applied: tuple[int, int | None] = (-1, None)  # (offset, in-flight end) on the broker
        self.held = Committed(0, Ledger().encode())  # the same, as committed() reads it back
        self.acked = -1  # highest offset whose commit completion the client has seen

    def _apply_queued(self) -> None:
        for offset, f, c in self.queued:
            self.applied, self.held = (offset, f), c
        self.queued.clear()

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
        if not self.slow and self.queued:
            self._apply_queued()
            if not self.late_acks:
                self.acked = max(self.acked, self.applied[0])
        if self.first_poll:
            self.first_poll = False
            self.svc.on_assigned([P0])
        if not self.batches:
            self.svc.stop_requested.set()
            return []
        hook = self.on_batch.get(self.polled)
        if hook is not None:
            hook()
        self.polled += 1
        return self.batches.pop(0)

    def commit(self, positions: dict[PartitionId, Committed], asynchronous: bool = False) -> None:
        if self.fail_commits:
            self.log.append(("commit-failed", None))
            if asynchronous:
                return  # its completion reports the error; nothing reaches the broker
            raise ConnectionError("broker unreachable")
        for p, c in positions.items():
            f = orjson.loads(c.metadata).get("f")
            self.log.append(("commit-async" if asynchronous else "commit", (p, c.offset, f)))
            if asynchronous:
                self.queued.append((c.offset, f, c))
            else:
                self._apply_queued()
                self.applied, self.held = (c.offset, f), c
                self.acked = max(self.acked, c.offset)

    def landed(self, positions: dict[PartitionId, Committed]) -> bool:
        return all(self.acked >= c.offset for c in positions.values())

    def committed(self, partitions: Sequence[PartitionId],
                  timeout_s: float | None = None) -> dict[PartitionId, Committed | None]:
        # Before any commit: a group that committed before, offset 0 with an empty ledger.
        self.reads += 1
        if self.reads and self.unreadable:
            raise ConnectionError("broker unreachable")
        if not self.slow:
            self._apply_queued()
        return dict.fromkeys(partitions, self.held)

    def assignment(self) -> set[PartitionId]:
        return {P0}

    def end_offsets(self, partitions: Sequence[PartitionId]) -> dict[PartitionId, int]:
        return dict.fromkeys(partitions, 0)

    def position(self, partition: PartitionId) -> int | None:
        return None

    def connected(self) -> bool:
        return True

    def close(self) -> None:
        self.log.append(("close", None))


class RecordingSink:
    def __init__(self, log: list[tuple[str, object]], source: RecordingSource | None = None) -> None:
        self.log = log
        self.source = source
        self.fail_flush = False
        self.broker_at_send: list[tuple[int, tuple[int, int | None]]] = []
        self.ledger_at_send: list[Ledger] = []

    def send(self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        offset = dict(headers)["embedwatch-source-offset"].decode()
        self.log.append(("send", offset))
        if self.source is not None:
            self.broker_at_send.append((int(offset), self.source.applied))
            self.ledger_at_send.append(Ledger.decode(self.source.held.metadata))

    def flush(self, timeout_s: float) -> None:
        if self.fail_flush:
            raise ConnectionError("broker unreachable")
        self.log.append(("flush", None))

    def close(self) -> None:
        pass


def _service(tmp_path: Path | None = None, checkpoint_interval_s: float = 3600.0) -> Service:
    settings = Settings(kafka={"poll_timeout_ms": 1},  # type: ignore[arg-type]
                        state={"checkpoint_interval_s": checkpoint_interval_s})
    backend = FileStateBackend(tmp_path) if tmp_path is not None else None
    return Service(settings, state_backend=backend)


@pytest.mark.parametrize("acks", ["prompt", "late", "unreadable", "slow"])
def test_the_in_flight_marker_reaches_the_broker_before_any_dead_letter(acks: str) -> None:
    log: list[tuple[str, object]] = []
    svc = _service()
    # Two clean batches, then one with a zero vector every 10 events (dead-lettered).
    source = RecordingSource(log, [_messages(0, 50), _messages(50, 50), _messages(100, 50, bad_every=10)], svc)
    source.slow = acks == "slow"
    source.late_acks = acks in ("late", "unreadable")
    source.unreadable = acks == "unreadable"
    sink = RecordingSink(log, source)
    svc.run(source, sink)
    sent = [arg for what, arg in log if what == "send"]
    assert sent == [str(o) for o in range(109, 150, 10)]
    # A kill at any send: the successor resumes from what the broker holds then, and the letter
    # lies in the replay range it was told about (so it counts the re-sent letter), which spans
    # one batch only.
    for offset, (committed, inflight_end) in sink.broker_at_send:
        assert inflight_end is not None and committed <= offset < inflight_end
        assert inflight_end - committed <= 50
    # The marker carries the counts of everything below its offset (the two clean batches), which
    # a successor restores as its ledger.
    assert sink.ledger_at_send and all(led == Ledger(100, 0, 150) for led in sink.ledger_at_send)
    # Every batch marks itself in flight before it is processed, and clean batches commit without
    # waiting for the broker.
    assert ("commit-async", (P0, 0, 50)) in log and ("commit-async", (P0, 50, None)) in log
    first_send = next(i for i, (what, _) in enumerate(log) if what == "send")
    assert ("commit-async", (P0, 100, 150)) in log[:first_send]
    # The batch with dead letters: its marker was read back before any send, and committed
    # synchronously only when the broker did not hold it (it could not be read, or it waits behind
    # a synchronous commit); so was the previous batch's commit when its completion was not seen.
    assert (("commit", (P0, 100, 150)) in log[:first_send]) == (acks in ("unreadable", "slow"))
    assert (("commit", (P0, 100, None)) in log[:first_send]) == (acks in ("unreadable", "slow"))
    assert source.reads > 0
    # Each of the four commits that must land (three batches' and the marker before the dead
    # letters) was confirmed once, whichever way: a read-back that found it is not followed by a
    # second commit.
    assert svc.exporter.counters.get("embedwatch_commits_total", ("success",)) == 4
    # A graceful stop leaves the broker at the end, nothing in flight.
    assert source.applied == (150, None)


def test_no_dead_letter_is_sent_when_the_marker_cannot_be_committed() -> None:
    log: list[tuple[str, object]] = []
    svc = _service()
    source = RecordingSource(log, [_messages(0, 50, bad_every=10)], svc)
    source.fail_commits = True
    sink = RecordingSink(log)
    svc._retry = lambda fn, what, still_relevant=lambda: True, max_delay_s=10.0: (  # type: ignore[method-assign]
        _try_once(fn))
    svc.run(source, sink)
    assert not [e for e in log if e[0] == "send"]
    assert ("commit-failed", None) in log


def _try_once(fn: object) -> bool:
    try:
        fn()  # type: ignore[operator]
    except ConnectionError:
        return False
    return True


@pytest.mark.parametrize("fail", ["flush", "marker"])
def test_a_batch_abandoned_at_stop_is_not_checkpointed(tmp_path: Path, fail: str) -> None:
    """Its effects are in memory but in no position: a checkpoint would make the next owner count
    it twice. The checkpoint written after the previous batch must stay the one on disk."""
    log: list[tuple[str, object]] = []
    svc = _service(tmp_path, checkpoint_interval_s=1e-9)  # a checkpoint after every batch
    source = RecordingSource(log, [_messages(0, 40), _messages(40, 40, bad_every=10)], svc)
    sink = RecordingSink(log)
    source.on_batch = {1: lambda: setattr(sink if fail == "flush" else source,
                                          "fail_flush" if fail == "flush" else "fail_commits", True)}
    real_retry = svc._retry

    def retry(fn, what, still_relevant=lambda: True, max_delay_s=10.0):  # type: ignore[no-untyped-def]
        if sink.fail_flush or source.fail_commits:
            svc.stop_requested.set()  # a SIGTERM during the outage: the retry gives up
            return _try_once(fn)
        return real_retry(fn, what, still_relevant, max_delay_s)

    svc._retry = retry  # type: ignore[method-assign]
    svc.run(source, sink)
    assert ("send" in {e[0] for e in log}) == (fail == "flush")
    records = FileStateBackend(tmp_path).read_new()
    ckpt = decode_checkpoint(records[checkpoint_key(svc.settings.kafka.group_id, TOPIC, 0)])
    assert ckpt.offset == 40
    assert ckpt.ledger == {"a": 40, "d": 0}
    (stream,) = ckpt.streams
    assert stream.meta["events"] == 40


def test_a_ledger_written_by_either_backend_reads_back() -> None:
    """confluent-kafka stores commit metadata with a trailing NUL, which kafka-python returns."""
    text = Ledger(12, 3).encode(inflight_end=40)
    for stored in (text, text + "\x00"):
        assert Ledger.decode(stored) == Ledger(12, 3, 40)
    assert Ledger.decode("") == Ledger() and Ledger.decode("not json") == Ledger()


def test_acked_commits_confirm_only_acknowledged_offsets_of_owned_partitions() -> None:
    from embedwatch.sources.base import AckedCommits

    acked = AckedCommits()
    p1 = PartitionId(TOPIC, 1)
    want = {P0: Committed(100), p1: Committed(40)}
    assert not acked.landed(want)
    acked.record(TOPIC, 0, 100)
    assert not acked.landed(want)  # partition 1 not acknowledged yet
    acked.record(TOPIC, 1, 60)
    acked.record(TOPIC, 1, 50)  # a late completion of an older commit does not move it back
    assert acked.landed(want) and acked.landed({p1: Committed(60)}) and not acked.landed({p1: Committed(61)})
    acked.forget([P0])
    assert not acked.landed(want) and acked.landed({p1: Committed(40)})


def test_a_commit_is_taken_as_landed_only_when_the_broker_holds_exactly_it() -> None:
    svc = _service()
    p1 = PartitionId(TOPIC, 1)
    svc.on_assigned([P0, p1])
    svc._load_assignment(_HeldSource({}))
    want = {P0: Committed(100, Ledger(90, 10).encode()), p1: Committed(40, Ledger(40, 0).encode())}
    held = dict(want)
    src = _HeldSource(held)
    assert svc._held_by_broker(src, want)
    assert src.timeout_s == Service.READ_BACK_TIMEOUT_S  # never the client's own, possibly unbounded, wait
    # confluent-kafka reads the metadata back with the NUL it stored.
    nul = {p: Committed(c.offset, c.metadata + "\x00") for p, c in want.items()}
    assert svc._held_by_broker(_HeldSource(nul), want)
    # Another offset, another ledger at the same offset, a partition with nothing committed.
    for other in (Committed(99, want[P0].metadata), Committed(100, Ledger(91, 9).encode()), None):
        assert not svc._held_by_broker(_HeldSource({**held, P0: other}), want)
    assert not svc._held_by_broker(_HeldSource(held, fail=True), want)  # unreachable: commit instead
    # The next batch's in-flight marker at the same position holds it too (it was sent after it),
    # but not a marker at another position or with other counts; and a marker read back exactly
    # needs its own in-flight end.
    marked = {p: Committed(c.offset, Ledger.decode(c.metadata).encode(inflight_end=c.offset + 50))
              for p, c in want.items()}
    assert svc._held_by_broker(_HeldSource(marked), want)
    assert not svc._held_by_broker(_HeldSource({**marked, P0: Committed(99, marked[P0].metadata)}), want)
    assert not svc._held_by_broker(
        _HeldSource({**marked, P0: Committed(100, Ledger(91, 9).encode(inflight_end=150))}), want)
    assert svc._held_by_broker(_HeldSource(marked), marked, exact=True)
    assert svc._held_by_broker(_HeldSource({p: Committed(c.offset, c.metadata + "\x00") for p, c in marked.items()}),
                               marked, exact=True)
    assert not svc._held_by_broker(_HeldSource(held), marked, exact=True)
    other_end = {**marked, P0: Committed(100, Ledger(90, 10).encode(inflight_end=120))}
    assert not svc._held_by_broker(_HeldSource(other_end), marked, exact=True)
    svc.on_revoked([p1])
    assert not svc._held_by_broker(_HeldSource(held), want)  # not ours any more: the commit path decides


class _HeldSource:
    """Only what reading committed positions back needs."""

    def __init__(self, held: dict[PartitionId, Committed | None], fail: bool = False) -> None:
        self.held, self.fail = held, fail
        self.timeout_s: float | None = None

    def committed(self, partitions: Sequence[PartitionId],
                  timeout_s: float | None = None) -> dict[PartitionId, Committed | None]:
        self.timeout_s = timeout_s
        if self.fail:
            raise ConnectionError("broker unreachable")
        return {p: self.held.get(p) for p in partitions}
