"""Durable state: the checkpoint codec, the file backend and the write-through baseline store."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from embedwatch.config import DetectionSettings
from embedwatch.events import Message, StreamKey
from embedwatch.monitor import StreamMonitor
from embedwatch.sources.base import PartitionId
from embedwatch.state import (
    Checkpoint,
    DurableBaselineStore,
    FileStateBackend,
    StateError,
    StreamCheckpoint,
    build_checkpoint,
    checkpoint_key,
    checkpoints_in,
    decode_checkpoint,
    encode_checkpoint,
    seal_checkpoint,
)

KEY = StreamKey("m", "v1", "default")
SETTINGS = DetectionSettings(reference_size=200, window_events=200, baseline_sample=100)


def _fed_monitor(n: int, seed: int = 0, shift: float = 0.0) -> tuple[StreamMonitor, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 16)).astype(np.float32) + 3.0
    x[n // 2:] += shift
    mon = StreamMonitor(KEY, SETTINGS)
    mon.update_embeddings(x, np.arange(n, dtype=np.float64), np.full(n, np.nan), [None] * n)
    return mon, x


def test_checkpoint_roundtrip_restores_an_equivalent_monitor() -> None:
    mon, _ = _fed_monitor(600)
    meta, arrays = mon.checkpoint()
    blob = encode_checkpoint(Checkpoint("t", 2, 600, {"a": 600, "d": 3}, [StreamCheckpoint(KEY, meta, arrays)]))
    ck = decode_checkpoint(blob)
    assert (ck.topic, ck.partition, ck.offset, ck.ledger) == ("t", 2, 600, {"a": 600, "d": 3})
    (sc,) = ck.streams
    assert sc.key == KEY
    assert sorted(sc.arrays) == sorted(arrays)
    for name, a in arrays.items():
        np.testing.assert_array_equal(sc.arrays[name], a)
    restored = StreamMonitor.restore(KEY, SETTINGS, sc.meta, sc.arrays, mon.baseline)
    assert restored.events == mon.events
    # Same future: both see the same drifted events and decide identically.
    rng = np.random.default_rng(5)
    y = (rng.standard_normal((400, 16)) + 4.0).astype(np.float32)
    ts = np.arange(600, 1000, dtype=np.float64)
    a1 = mon.update_embeddings(y, ts, np.full(400, np.nan), [None] * 400)
    a2 = restored.update_embeddings(y, ts, np.full(400, np.nan), [None] * 400)
    assert [(a.index, a.kind) for a in a1] == [(a.index, a.kind) for a in a2]
    assert a1, "a shift of one standard deviation in every dimension must alarm"
    m1, m2 = mon.measures(), restored.measures()
    for k in ("drift_score", "centroid_cosine_distance", "window_events"):
        assert m1[k] == pytest.approx(m2[k], rel=1e-9, abs=1e-12)


def test_damaged_checkpoint_is_refused() -> None:
    blob = bytearray(encode_checkpoint(Checkpoint("t", 0, 10, {"a": 10, "d": 0})))
    blob[-5] ^= 0xFF
    with pytest.raises(StateError):
        decode_checkpoint(bytes(blob))
    with pytest.raises(StateError):
        decode_checkpoint(b"something else")


def test_file_backend(tmp_path: Path) -> None:
    b = FileStateBackend(tmp_path / "state")
    assert b.read_all() == {}
    b.write({"ckpt/g/topic/0": b"one", "baseline/x/1": b"two"})
    assert b.read_all() == {"ckpt/g/topic/0": b"one", "baseline/x/1": b"two"}
    assert b.read_new() == {}
    other = FileStateBackend(tmp_path / "state")  # another process on the same volume
    other.write({"ckpt/g/topic/0": b"three!"})
    assert b.read_new() == {"ckpt/g/topic/0": b"three!"}
    assert checkpoints_in(b.read_all(), "g") == {("topic", 0): b"three!"}
    assert checkpoint_key("g", "topic", 0) == "ckpt/g/topic/0"


def test_durable_baseline_store_survives_a_restart(tmp_path: Path) -> None:
    backend = FileStateBackend(tmp_path / "state")
    store = DurableBaselineStore(backend)
    first, _ = _fed_monitor(250, seed=1)
    second, _ = _fed_monitor(250, seed=2)
    assert first.baseline is not None and second.baseline is not None
    store.save(first.baseline, activate=True)
    store.save(second.baseline, activate=True)
    store.rollback(KEY)
    again = DurableBaselineStore(FileStateBackend(tmp_path / "state"), FileStateBackend(tmp_path / "state").read_all())
    assert [m["baseline_id"] for m in again.list(KEY)] == [m["baseline_id"] for m in store.list(KEY)]
    assert again.get(KEY).metadata["baseline_id"] == first.baseline.metadata["baseline_id"]
    assert again.get(KEY).content_hash == first.baseline.content_hash


class _Source:
    """One partition, the given batches, then a stop (a plain fake of the Source protocol)."""

    def __init__(self, svc: Any, batches: list[list[Message]]) -> None:
        self.svc, self.batches, self.first = svc, batches, True

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
        if self.first:
            self.first = False
            self.svc.on_assigned([PartitionId("embeddings", 0)])
        if not self.batches:
            self.svc.stop_requested.set()
            return []
        return self.batches.pop(0)

    def commit(self, positions: Any, asynchronous: bool = False) -> None:
        pass

    def landed(self, positions: Any) -> bool:
        return True

    def committed(self, partitions: Any) -> dict[Any, None]:
        return dict.fromkeys(partitions)

    def assignment(self) -> set[PartitionId]:
        return {PartitionId("embeddings", 0)}

    def end_offsets(self, partitions: Any) -> dict[Any, int]:
        return dict.fromkeys(partitions, 0)

    def position(self, partition: Any) -> None:
        return None

    def connected(self) -> bool:
        return True

    def close(self) -> None:
        pass


class _NoSink:
    def send(self, topic: str, value: bytes, key: bytes | None, headers: Any) -> None:
        raise AssertionError("no event of this test is dead-lettered")

    def flush(self, timeout_s: float) -> None:
        pass

    def close(self) -> None:
        pass


def _service_that_ran(tmp_path: Path, seed: int) -> tuple[Any, Any]:
    """Settings with file state in ``tmp_path``, and a service that has run 300 events of one
    stream through it (its baseline built and saved, a checkpoint written)."""
    from embedwatch.app import Service
    from embedwatch.config import Settings

    settings = Settings(kafka={"poll_timeout_ms": 1},  # type: ignore[arg-type]
                        state={"backend": "file", "directory": str(tmp_path)},  # type: ignore[arg-type]
                        detection=SETTINGS.model_dump())  # type: ignore[arg-type]
    vectors = np.random.default_rng(seed).standard_normal((300, 16)).astype(np.float32)
    batch = [Message(orjson.dumps({"model": KEY.model, "model_version": KEY.model_version,
                                   "embedding": v.tolist()}), "embeddings", 0, i) for i, v in enumerate(vectors)]
    first = Service(settings, baselines=DurableBaselineStore(FileStateBackend(tmp_path)),
                    state_backend=FileStateBackend(tmp_path))
    first.run(_Source(first, [batch]), _NoSink())
    return settings, first


def test_a_restarted_service_keeps_its_checkpoints_only_and_releases_restored_samples(tmp_path: Path) -> None:
    """What a restart reads back is held only as long as needed: the service keeps its own group's
    checkpoints (not the stored baselines, not other groups' checkpoints), and a stream restored
    from a checkpoint holds its baseline without the reference sample, as the stream that built
    it did. Before, a restarted replica at 200 x 768-d held 1.2 GiB against 0.4 GiB."""
    from embedwatch.app import Service

    settings, first = _service_that_ran(tmp_path, seed=7)
    assert first.router.monitors[KEY].baseline is not None
    FileStateBackend(tmp_path).write({checkpoint_key("another-group", "embeddings", 0): b"theirs"})

    backend = FileStateBackend(tmp_path)
    records = backend.read_all()
    assert any(k.startswith("baseline/") for k in records)
    store = DurableBaselineStore(backend, records)
    assert not any(k.startswith("baseline") for k in records)  # taken, so freed as they are decoded
    again = Service(settings, baselines=store, state_backend=backend, state_records=records)
    assert set(again._state_records) == {("embeddings", 0)}
    again.run(_Source(again, []), _NoSink())  # nothing new: released when restored, not at a next batch
    mon = again.router.monitors[KEY]
    assert mon.events == 300
    assert mon.baseline is not None and mon.baseline.released_sample_rows == SETTINGS.baseline_sample
    assert store.get(KEY) is mon.baseline  # the store holds the same copy, not the full one


def test_a_restore_rebuilds_its_monitors_outside_the_exporter_lock(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Rebuilding a partition's monitors took 5-6 s at 67 streams of 768-d (each refitted its
    scan); under the lock a /metrics scrape waited 13.6 s for it. They are rebuilt without it and
    made live under it."""
    from embedwatch.app import Service

    settings, _ = _service_that_ran(tmp_path, seed=8)

    backend = FileStateBackend(tmp_path)
    records = backend.read_all()
    again = Service(settings, baselines=DurableBaselineStore(backend, records), state_backend=backend,
                    state_records=records)
    held: dict[str, list[bool]] = {"restore": [], "adopt": []}
    restore, adopt = StreamMonitor.restore, again.router.adopt

    def recording_restore(*args: Any, **kwargs: Any) -> StreamMonitor:
        held["restore"].append(again.exporter.lock.owned())
        return restore(*args, **kwargs)

    def recording_adopt(mon: StreamMonitor) -> None:
        held["adopt"].append(again.exporter.lock.owned())
        adopt(mon)

    monkeypatch.setattr(StreamMonitor, "restore", staticmethod(recording_restore))
    monkeypatch.setattr(again.router, "adopt", recording_adopt)
    again.run(_Source(again, []), _NoSink())
    assert held == {"restore": [False], "adopt": [True]}
    assert again.router.monitors[KEY].events == 300


def test_a_restart_takes_the_scan_fitted_before_it_instead_of_fitting_it_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A stream's baseline is stored with the mean-shift scan fitted on it: refitting it was 92% of
    a restore (4.7 s for 67 streams of 768-d). The restored scan is the one the stream had, to the
    bit; a damaged copy is refitted, never a failed start."""
    from embedwatch.app import Service
    from embedwatch.baseline import mean_shift_key
    from embedwatch.detectors.mean_shift import MeanShiftTest

    settings, first = _service_that_ran(tmp_path, seed=9)
    before = first.router.monitors[KEY].baseline
    assert before is not None
    fitted = before.mean_shift(SETTINGS)
    fits = [k for k in FileStateBackend(tmp_path).read_all() if k.startswith("baseline-fit/")]
    assert len(fits) == 1

    def no_fit(*args: Any, **kwargs: Any) -> MeanShiftTest:
        raise AssertionError("refitted")

    monkeypatch.setattr(MeanShiftTest, "fit", no_fit)
    backend = FileStateBackend(tmp_path)
    records = backend.read_all()
    again = Service(settings, baselines=DurableBaselineStore(backend, records), state_backend=backend,
                    state_records=records)
    again.run(_Source(again, []), _NoSink())
    restored = again.router.monitors[KEY].baseline
    assert restored is not None and list(restored.mean_shift_fits()) == [mean_shift_key(SETTINGS)]
    for name, a in fitted.to_arrays().items():
        np.testing.assert_array_equal(restored.mean_shift(SETTINGS).to_arrays()[name], a)

    # The same record damaged: the start goes on, and the scan is fitted again when needed.
    records = backend.read_all()
    records[fits[0]] = records[fits[0]][:-40]
    monkeypatch.undo()
    store = DurableBaselineStore(backend, records)
    assert "skipping damaged fitted tests" in caplog.text
    full = store.get(KEY)
    assert full.mean_shift_fits() == {}
    np.testing.assert_array_equal(full.mean_shift(SETTINGS).basis, fitted.basis)


def test_the_loop_returns_a_checkpoint_s_buffers_right_after_writing_it(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint's records (hundreds of MB at 200 x 768-d) are freed once written; the loop
    hands them back to the OS then, not at the next periodic trim up to a minute later."""
    import time

    from embedwatch import heap
    from embedwatch.app import Service
    from embedwatch.config import Settings

    calls: list[int] = []
    monkeypatch.setattr(heap, "trim", lambda: calls.append(1) or True)
    settings = Settings(kafka={"poll_timeout_ms": 1},  # type: ignore[arg-type]
                        state={"backend": "file", "directory": str(tmp_path),  # type: ignore[arg-type]
                               "checkpoint_interval_s": 1e-9},
                        limits={"heap_trim_interval_s": 3600.0})  # type: ignore[arg-type]
    rng = np.random.default_rng(8)
    batches = [[Message(orjson.dumps({"model": "m", "model_version": "v1", "embedding": v.tolist()}),
                        "embeddings", 0, b * 50 + i)
                for i, v in enumerate(rng.standard_normal((50, 8)).astype(np.float32))] for b in range(2)]
    svc = Service(settings, state_backend=FileStateBackend(tmp_path))
    svc._last_heap_trim = time.monotonic()  # the periodic trim is an hour away
    svc.run(_Source(svc, batches), _NoSink())
    assert svc.exporter.counters.get("embedwatch_checkpoints_total", ()) >= 3
    # One after the assignment's restore, one after each batch's checkpoint, none after the
    # checkpoint that found nothing changed (it freed nothing).
    assert len(calls) == 3


class _Recording(FileStateBackend):
    """The file backend, noting the keys of every write."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.writes: list[list[str]] = []

    def write(self, records: Any) -> None:
        self.writes.append(sorted(records))
        super().write(records)


def _checkpointing_service(tmp_path: Path, *topics: str) -> tuple[Any, _Recording, Any, Callable[[], list[str]]]:
    """A service on a recording file backend, assigned partition 0 of each of ``topics``, and a
    checkpoint pass over them that returns the keys it wrote."""
    from embedwatch.app import Service
    from embedwatch.config import Settings

    parts = [PartitionId(t, 0) for t in topics]
    settings = Settings(state={"backend": "file", "directory": str(tmp_path)},  # type: ignore[arg-type]
                        detection=SETTINGS.model_dump())  # type: ignore[arg-type]
    backend = _Recording(tmp_path)
    svc = Service(settings, state_backend=backend)
    source = _Source(svc, [])
    source.assignment = lambda: set(parts)  # type: ignore[method-assign]
    svc.on_assigned(parts)
    svc._load_assignment(source)

    def checkpoint() -> list[str]:
        before = len(backend.writes)
        svc._checkpoint(sorted(svc._assigned), commit=source)
        return sorted(k for w in backend.writes[before:] for k in w)

    return svc, backend, source, checkpoint


def test_a_checkpoint_rewrites_only_the_partitions_whose_state_changed(tmp_path: Path) -> None:
    """An idle partition is not written again at every checkpoint (200 idle 768-d streams were 75
    MB every 30 s), while any change reaches the next one: events of the partition, a promotion
    through the API, and a query event from another partition updating a stream homed here."""
    svc, backend, source, checkpoint = _checkpointing_service(tmp_path, "embeddings", "queries")
    ckpt = checkpoint_key(svc.settings.kafka.group_id, "embeddings", 0)
    qckpt = checkpoint_key(svc.settings.kafka.group_id, "queries", 0)
    counters = svc.exporter.counters

    rng = np.random.default_rng(3)
    batch = [Message(orjson.dumps({"model": KEY.model, "model_version": KEY.model_version,
                                   "embedding": v.tolist()}), "embeddings", 0, i)
             for i, v in enumerate(rng.standard_normal((300, 16)).astype(np.float32))]
    svc._handle_batch(batch, source, _NoSink())
    assert checkpoint() == [ckpt]  # the queries partition has consumed nothing: nothing to write
    written = counters.get("embedwatch_checkpoint_bytes_total")
    assert written == len(backend.read_all()[ckpt])

    assert checkpoint() == [] and checkpoint() == []
    assert counters.get("embedwatch_checkpoints_total") == 3  # each one made, the state durable
    assert counters.get("embedwatch_checkpoint_bytes_total") == written

    assert svc.promote_baseline(KEY, None, events=100)["status"] == "collecting"
    assert checkpoint() == [ckpt]
    assert decode_checkpoint(backend.read_all()[ckpt]).streams[0].meta["promotion"] == 100
    assert checkpoint() == []

    query = {"model": KEY.model, "model_version": KEY.model_version,
             "results": [{"id": "a", "score": 0.9}], "latency_ms": 12}
    svc._handle_batch([Message(orjson.dumps(query), "queries", 0, 0)], source, _NoSink())
    assert checkpoint() == [ckpt, qckpt]  # the stream's home holds what the query changed
    assert decode_checkpoint(backend.read_all()[ckpt]).streams[0].meta["query_events"] == 1
    assert checkpoint() == []


def test_every_partition_is_written_again_once_the_backend_starts_over(tmp_path: Path) -> None:
    """A state topic deleted while the service runs is created again empty (the backend's epoch
    moves): a partition whose state did not change since its last checkpoint is not held by the
    backend any more, so the next checkpoint writes it again, and only that one."""
    svc, backend, source, checkpoint = _checkpointing_service(tmp_path, "embeddings")
    ckpt = checkpoint_key(svc.settings.kafka.group_id, "embeddings", 0)

    rng = np.random.default_rng(4)
    batch = [Message(orjson.dumps({"model": KEY.model, "model_version": KEY.model_version,
                                   "embedding": v.tolist()}), "embeddings", 0, i)
             for i, v in enumerate(rng.standard_normal((300, 16)).astype(np.float32))]
    svc._handle_batch(batch, source, _NoSink())
    assert checkpoint() == [ckpt]
    assert checkpoint() == []
    for p in tmp_path.iterdir():  # the storage is gone, and started again empty
        p.unlink()
    lost = "embedwatch_state_storage_lost_total"
    assert svc.exporter.counters.get(lost) == 0
    started_again = [True]

    def refresh() -> None:  # what an idle replica learns from its metadata at a checkpoint pass
        if started_again:
            started_again.pop()
            backend.epoch += 1

    backend.refresh = refresh  # type: ignore[method-assign]
    assert checkpoint() == [ckpt]
    assert decode_checkpoint(backend.read_all()[ckpt]).streams[0].meta["events"] == 300
    assert checkpoint() == []
    assert svc.exporter.counters.get(lost) == 1


@pytest.mark.parametrize(("config", "kept"), [
    ({"cleanup.policy": "compact", "retention.ms": "604800000", "retention.bytes": "-1"}, True),
    ({"cleanup.policy": "compact,delete", "retention.ms": "-1", "retention.bytes": "-1"}, True),
    ({"cleanup.policy": "delete, compact", "retention.ms": "-1", "retention.bytes": "-1"}, True),
    ({"cleanup.policy": "delete", "retention.ms": "604800000", "retention.bytes": "-1"}, False),
    ({"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}, False),  # never compacted
    ({"cleanup.policy": "compact,delete", "retention.ms": "86400000", "retention.bytes": "-1"}, False),
    ({"cleanup.policy": "compact,delete", "retention.ms": "-1", "retention.bytes": "1073741824"}, False),
    ({"cleanup.policy": "delete"}, False),  # its retention not described: never compacted either way
])
def test_a_state_topic_must_keep_each_keys_newest_value(config: dict[str, str], kept: bool) -> None:
    from embedwatch.state import retention_problem

    problem = retention_problem(config)
    assert (problem is None) == kept
    if problem is not None:
        assert f"cleanup.policy={config.get('cleanup.policy', 'delete')}" in problem


def test_the_check_for_a_deleted_state_topic_waits_after_finding_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each failed read or write looks for a deleted topic, which costs an admin client (up to 5 s
    with the broker down): after a look that found none (an outage, most often) the next waits
    PROBE_INTERVAL_S; after one that found the topic created again, none waits."""
    import threading

    from embedwatch import state as state_mod
    from embedwatch.state import KafkaStateBackend

    backend = object.__new__(KafkaStateBackend)
    backend.topic, backend._tid, backend.epoch, backend._probe_after = "t", "id-1", 0, 0.0
    backend._lock, backend._reread = threading.Lock(), False
    backend._check_new_topic = lambda: None  # type: ignore[method-assign]
    answers: list[Any] = [OSError("broker down"), ("id-1", False), ("id-2", True), ("id-3", False), (None, True)]
    calls: list[bool] = []

    def ensure(check: bool) -> tuple[str | None, bool]:
        calls.append(check)
        a = answers.pop(0)
        if isinstance(a, Exception):
            raise a
        return a  # type: ignore[no-any-return]

    backend._ensure_topic = ensure  # type: ignore[method-assign]
    now = [1000.0]
    monkeypatch.setattr(state_mod.time, "monotonic", lambda: now[0])
    backend._start_again_if_gone()  # the broker is down: found nothing
    backend._start_again_if_gone()
    assert calls == [False] and backend.epoch == 0
    now[0] += KafkaStateBackend.PROBE_INTERVAL_S
    backend._start_again_if_gone()  # the topic is there, the same one
    assert len(calls) == 2 and backend.epoch == 0
    now[0] += KafkaStateBackend.PROBE_INTERVAL_S
    backend._start_again_if_gone()  # created again, by this replica
    backend._start_again_if_gone()  # and again at once, by another one
    assert len(calls) == 4 and backend.epoch == 2 and backend._reread
    backend._start_again_if_gone()  # created by this replica, on a broker that gives no id
    assert len(calls) == 5 and backend.epoch == 3


def test_a_state_directory_emptied_or_deleted_while_running_moves_the_epoch(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The file backend's twin of a deleted state topic: a write into a deleted directory created
    it again silently (the previous checkpoints and baselines gone, nothing rewritten). Its storage
    id tells it, to the replica that writes and to another one sharing the volume."""
    import shutil

    d = tmp_path / "state"
    a, b = FileStateBackend(d), FileStateBackend(d)
    a.write({"k": b"1"})
    b.refresh()
    assert a.epoch == b.epoch == 0
    shutil.rmtree(d)
    a.write({"k": b"2"})  # makes the directory again, as the write of a checkpoint did
    with caplog.at_level("ERROR", logger="embedwatch.state"):
        a.refresh()  # the checkpoint pass
    assert a.epoch == 1 and "was emptied or deleted" in caplog.text
    assert a.read_all() == {"k": b"2"}
    b.refresh()
    assert b.epoch == 1
    b.refresh()
    assert b.epoch == 1
    for p in d.iterdir():  # emptied, the directory kept
        p.unlink()
    a.refresh()
    assert a.epoch == 2
    assert FileStateBackend(d).read_all() == {}


class _DescribingAdmin:
    """An admin client's describe_configs as kafka-python 3.0 answers it: a resource the broker
    refused (no DescribeConfigs permission) comes back with no entries, not as an error."""

    def __init__(self, topic: str, config: dict[str, str]) -> None:
        self.answer = {"topic": {topic: {k: {"value": v} for k, v in config.items()}}}

    def describe_configs(self, resources: Any, config_filter: str) -> dict[str, Any]:
        return self.answer


def test_a_state_topic_whose_policy_cannot_be_read_is_taken_with_a_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    """Refused only when the broker says it deletes: a principal without DescribeConfigs, whose
    topic may well be compacted, was refused at every start (an unknown policy read as the
    broker's default, delete)."""
    from embedwatch.state import KafkaStateBackend, StateError

    backend = object.__new__(KafkaStateBackend)
    backend.topic = "embedwatch-state"
    with caplog.at_level("WARNING", logger="embedwatch.state"):
        backend._check_retention(_DescribingAdmin(backend.topic, {}))
    assert "cannot read its cleanup.policy" in caplog.text
    backend._check_retention(_DescribingAdmin(backend.topic, {"cleanup.policy": "compact"}))
    with pytest.raises(StateError, match=r"cleanup\.policy=delete"):
        backend._check_retention(_DescribingAdmin(backend.topic, {"cleanup.policy": "delete",
                                                                  "retention.ms": "604800000"}))


def test_a_restored_baseline_is_held_without_its_sample_when_its_scan_came_with_it(tmp_path: Path) -> None:
    """Every replica restores every baseline of the group, most of them of streams it does not
    own. Their sample is stored, and only a scan fit reads it: with the fit for the running
    settings restored too, the store holds them without it (1.5 MiB a 768-d stream)."""
    from embedwatch.baseline import mean_shift_key

    _service_that_ran(tmp_path, seed=10)
    backend = FileStateBackend(tmp_path)

    store = DurableBaselineStore(backend, backend.read_all(), SETTINGS)
    slim = store.get(KEY)
    assert slim.released_sample_rows == SETTINGS.baseline_sample
    # A stream that starts from it (its replica owns it now) needs nothing more.
    mon = StreamMonitor(KEY, SETTINGS, slim)
    mon.update_embeddings(np.random.default_rng(1).standard_normal((50, 16)).astype(np.float32) + 3.0,
                          np.arange(50, dtype=np.float64))
    assert list(slim.mean_shift_fits()) == [mean_shift_key(SETTINGS)]

    # Other scan settings need the sample for a new fit: it is kept. So it is without settings.
    other = SETTINGS.model_copy(update={"scan_components": 4})
    assert DurableBaselineStore(backend, backend.read_all(), other).get(KEY).released_sample_rows is None
    assert DurableBaselineStore(backend, backend.read_all()).get(KEY).released_sample_rows is None
    # With the scan off, no fit is needed at all.
    off = SETTINGS.model_copy(update={"scan_windows": []})
    assert DurableBaselineStore(backend, backend.read_all(), off).get(KEY).released_sample_rows is not None


def test_a_baseline_stored_without_its_fits_gets_them_once_a_monitor_fitted_it(tmp_path: Path) -> None:
    """Baselines stored before fits were (or activated through the API before any monitor used
    them) would be refitted at every restart and keep their sample on every other replica: their
    fits are stored once a monitor has fitted them, and another replica reading them later
    releases the sample it held."""
    from embedwatch.app import Service

    settings, _ = _service_that_ran(tmp_path, seed=11)
    [fit_file] = [p for p in tmp_path.rglob("*") if p.is_file() and "baseline-fit" in p.name]
    fit_file.unlink()  # as an earlier version of embedwatch stored it

    other = FileStateBackend(tmp_path)  # another replica: restores the baseline with its sample
    other_store = DurableBaselineStore(other, other.read_all(), SETTINGS)
    assert other_store.get(KEY).released_sample_rows is None

    backend = FileStateBackend(tmp_path)
    records = backend.read_all()
    assert not any(k.startswith("baseline-fit/") for k in records)
    again = Service(settings, baselines=DurableBaselineStore(backend, records, SETTINGS), state_backend=backend,
                    state_records=records)
    again.run(_Source(again, []), _NoSink())  # restores the stream: its monitor fits the scan
    assert [k for k in FileStateBackend(tmp_path).read_all() if k.startswith("baseline-fit/")]

    other_store.restore(other.read_new())
    held = other_store.get(KEY)
    assert held.released_sample_rows == SETTINGS.baseline_sample
    for name, a in again.router.monitors[KEY].baseline.mean_shift(SETTINGS).to_arrays().items():  # type: ignore[union-attr]
        np.testing.assert_array_equal(held.mean_shift(SETTINGS).to_arrays()[name], a)


def _stored_baselines(backend: FileStateBackend, streams: int) -> list[StreamKey]:
    """``streams`` baselines written through a store, each with its scan for SETTINGS fitted."""
    from embedwatch.baseline import Baseline

    store = DurableBaselineStore(backend, None, SETTINGS)
    keys = [StreamKey("m", f"v{i}", "default") for i in range(streams)]
    for i, key in enumerate(keys):
        x = np.random.default_rng(i).standard_normal((300, 16)) + 3.0
        b = Baseline.from_vectors(key, x, ts=float(i), source="test", settings=SETTINGS)
        b.mean_shift(SETTINGS)
        store.save(b)
    return keys


def test_a_read_hands_baselines_to_the_store_one_at_a_time(tmp_path: Path) -> None:
    """A restart reads every stored baseline of the group (2.6 MB a 768-d stream) and holds each
    without its sample once its fit is read. Taken as the read comes to them, in write order (a
    baseline, then its fit) at most one baseline holds its sample at a time, and the read keeps only
    what is not the store's. Reading them all first, then decoding, peaked at 1,043 MiB for 200
    streams of 768-d."""
    backend = FileStateBackend(tmp_path)
    keys = _stored_baselines(backend, 5)
    backend.write({checkpoint_key("g", "embeddings", 0): b"a checkpoint"})
    records = FileStateBackend(tmp_path).read_all()

    def with_sample(store: DurableBaselineStore) -> int:
        return sum(b.released_sample_rows is None for b in store._baselines.values())

    store = DurableBaselineStore(backend, None, SETTINGS)
    held = []
    for key in sorted(records, key=lambda k: (k.split("/", 1)[1], k.startswith("baseline-fit/"))):
        store.take(key, records[key])
        held.append(with_sample(store))
    store.finish_restore()
    assert max(held) == 1 and held[-1] == 0

    read = DurableBaselineStore(backend, None, SETTINGS)
    taken: list[str] = []

    def take(key: str, value: bytes) -> bool:
        took = read.take(key, value)
        if took:
            taken.append(key)
        return took

    rest = FileStateBackend(tmp_path).read_all(take)
    read.finish_restore()
    assert rest == {checkpoint_key("g", "embeddings", 0): b"a checkpoint"}
    assert sorted(taken) == sorted(k for k in records if k.startswith("baseline"))
    # The store's own read (what a start and an assignment run): a sign of life per record read,
    # and the indexes applied at its end without being asked.
    via = DurableBaselineStore(backend, None, SETTINGS)
    beats: list[int] = []
    assert via.read(FileStateBackend(tmp_path).read_all, lambda: beats.append(1)) == rest
    assert len(beats) == len(records)
    # The same store a restore of all the records builds: every version active, its fit attached.
    whole = DurableBaselineStore(backend, dict(records), SETTINGS)
    for s in (store, read, via):
        assert with_sample(s) == 0
        for key in keys:
            assert s.active_id(key) == whole.active_id(key) is not None
            got, want = s.get(key), whole.get(key)
            np.testing.assert_array_equal(got.mean, want.mean)
            assert got.released_sample_rows == SETTINGS.baseline_sample
            np.testing.assert_array_equal(got.mean_shift(SETTINGS).to_arrays()["basis"],
                                          want.mean_shift(SETTINGS).to_arrays()["basis"])


def test_fits_read_before_their_baseline_are_attached_when_it_comes(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The file backend reads in directory order, so a fit may come first: it waits for its
    baseline; one whose baseline never comes is reported at the end of the read."""
    backend = FileStateBackend(tmp_path)
    [key] = _stored_baselines(backend, 1)
    records = FileStateBackend(tmp_path).read_all()
    [fit] = [k for k in records if k.startswith("baseline-fit/")]
    [base] = [k for k in records if k.startswith("baseline/")]

    store = DurableBaselineStore(backend, None, SETTINGS)
    assert store.take(fit, records[fit])
    assert store.take(fit.replace("+v0+", "+v9+"), records[fit])  # no such baseline
    assert store.take(base, records[base])
    for index in [k for k in records if k.startswith("baseline-index/")]:
        assert store.take(index, records[index])
    with caplog.at_level("WARNING", logger="embedwatch.state"):
        store.finish_restore()
    assert store.get(key).released_sample_rows == SETTINGS.baseline_sample  # fit attached, sample gone
    assert "belong to no stored baseline" in caplog.text and "+v9+" in caplog.text
    assert not store.take(checkpoint_key("g", "t", 0), b"x")


def _v1_record(c: Checkpoint) -> bytes:
    """A checkpoint as embedwatch wrote it before 2026-12-06: an npz in a zlib stream."""
    import hashlib
    import io
    import json
    import zlib

    arrays = {f"{i}/{name}": a for i, s in enumerate(c.streams) for name, a in s.arrays.items()}
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    header = json.dumps({"schema_version": 1, "topic": c.topic, "partition": c.partition, "offset": c.offset,
                         "ledger": c.ledger, "created_at": c.created_at,
                         "streams": [{"key": list(s.key), "meta": s.meta} for s in c.streams]}).encode()
    body = len(header).to_bytes(8, "little") + header + buf.getvalue()
    return b"EWCK1\n" + hashlib.sha256(body).digest() + zlib.compress(body, 0)


def _odd_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    m = rng.standard_normal((7, 5))
    return {"f64": m, "f32_fortran": np.asfortranarray(m.astype(np.float32)), "strided": m[::2, ::-1],
            "i64": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.array([True, False, True]),
            "empty": np.zeros((0, 5)), "scalar": np.array(2.5), "u8": np.frombuffer(b"\x00\xffab", dtype=np.uint8)}


def test_a_checkpoint_keeps_every_array_exactly_and_reads_the_previous_format() -> None:
    """Dtype, shape and bytes of each array survive (whatever its memory layout); a checkpoint
    written by the previous release (npz in a zlib stream) reads the same."""
    streams = [StreamCheckpoint(KEY, {"n": 1, "x": float("nan")}, _odd_arrays()),
               StreamCheckpoint(StreamKey("m", "v2", "s"), {}, {"f64": np.ones(3)})]
    c = Checkpoint("t", 4, 77, {"a": 70, "d": 7}, streams, 1_700_000_000.0)
    for blob in (encode_checkpoint(c), _v1_record(c)):
        got = decode_checkpoint(bytes(blob))
        assert (got.topic, got.partition, got.offset, got.ledger, got.created_at) == ("t", 4, 77, {"a": 70, "d": 7},
                                                                                     1_700_000_000.0)
        assert [s.key for s in got.streams] == [KEY, StreamKey("m", "v2", "s")]
        assert got.streams[0].meta["n"] == 1 and np.isnan(got.streams[0].meta["x"])
        for want, have in zip(streams, got.streams, strict=True):
            assert sorted(have.arrays) == sorted(want.arrays)
            for name, a in want.arrays.items():
                assert have.arrays[name].dtype == a.dtype and have.arrays[name].shape == a.shape
                np.testing.assert_array_equal(have.arrays[name], a)
                assert have.arrays[name].flags.writeable  # a restored monitor writes to some


def test_a_checkpoint_is_built_in_one_copy_of_its_arrays() -> None:
    """A partition's checkpoint is 80 MB at 67 streams of 768-d collecting their reference; it
    was built in three or four copies at once (npz, zlib stream, joined record)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    streams = [StreamCheckpoint(StreamKey("m", f"v{i}", "default"), {},
                                {"ref_vectors": rng.standard_normal((500, 768))}) for i in range(4)]
    size = sum(s.arrays["ref_vectors"].nbytes for s in streams)  # 12.3 MB
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        blob = encode_checkpoint(Checkpoint("t", 0, 1, {"a": 1, "d": 0}, streams))
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert size < len(blob) < size + 10_000
    assert peak < size * 1.05
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        decoded = decode_checkpoint(blob)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < size * 1.05  # the arrays, copied out of the record once
    assert len(decoded.streams) == 4


@pytest.mark.parametrize("damage", ["flip", "truncate", "header"])
def test_a_damaged_checkpoint_is_refused_with_a_clear_error(damage: str) -> None:
    blob = encode_checkpoint(Checkpoint("t", 0, 1, {"a": 1, "d": 0}, [StreamCheckpoint(KEY, {}, _odd_arrays())]))
    if damage == "flip":
        blob[len(blob) // 2] ^= 0x01
    elif damage == "truncate":
        del blob[-3:]
    else:  # a header that lies about an array, with a checksum that matches it
        import hashlib
        text = bytes(blob).replace(b'/f64", "<f8", [7, 5]', b'/f64", "<f8", [9, 5]')
        assert text != bytes(blob)
        blob = bytearray(text)
        blob[6:38] = hashlib.sha256(blob[38:]).digest()
    with pytest.raises(StateError, match="damaged checkpoint"):
        decode_checkpoint(bytes(blob))
    with pytest.raises(StateError, match="holds objects"):
        encode_checkpoint(Checkpoint("t", 0, 1, {}, [StreamCheckpoint(KEY, {}, {"o": np.array([None])})]))


def test_a_store_reading_back_its_own_writes_does_not_decode_them_again(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An assignment reads what was written since the last read, this replica's own baselines
    included (the 200 of a cold start at its first rebalance): an id is a content hash, so a
    version the store holds is the same version, and neither it nor its fit is decoded again."""
    import embedwatch.state as state

    backend = FileStateBackend(tmp_path)
    [key] = _stored_baselines(backend, 1)
    store = DurableBaselineStore(backend, FileStateBackend(tmp_path).read_all(), SETTINGS)
    held = store.get(key)
    assert held.released_sample_rows == SETTINGS.baseline_sample

    def refused(*_: Any, **__: Any) -> Any:
        raise AssertionError("decoded again")

    monkeypatch.setattr(state, "decode_baseline", refused)
    monkeypatch.setattr(state, "attach_fits", refused)
    again = backend.read_new()  # the backend's own writes: nothing marked as read yet
    assert any(k.startswith("baseline/") for k in again) and any(k.startswith("baseline-fit/") for k in again)
    store.restore(again)
    assert store.get(key) is held


def test_row_chunks_are_written_as_one_array_and_chunks_that_do_not_stack_are_refused() -> None:
    rng = np.random.default_rng(4)
    chunks = (rng.standard_normal((3, 5)).astype(np.float32), np.zeros((0, 5), np.float32),
              np.asfortranarray(rng.standard_normal((4, 5)).astype(np.float32)))
    ts = (np.arange(3.0), np.zeros(0), np.arange(4.0))
    c = Checkpoint("t", 0, 1, {"a": 1, "d": 0}, [StreamCheckpoint(KEY, {}, {"ref": chunks, "ts": ts,
                                                                           "one": (np.ones(2),)})])
    (got,) = decode_checkpoint(bytes(encode_checkpoint(c))).streams
    np.testing.assert_array_equal(got.arrays["ref"], np.concatenate(chunks))
    assert got.arrays["ref"].dtype == np.float32 and got.arrays["ref"].shape == (7, 5)
    np.testing.assert_array_equal(got.arrays["ts"], np.concatenate(ts))
    np.testing.assert_array_equal(got.arrays["one"], np.ones(2))
    for bad, why in (((np.ones((2, 5)), np.ones((2, 4))), "do not stack"),
                     ((np.ones((2, 5), np.float32), np.ones((2, 5))), "do not stack"),
                     ((np.ones(3), np.array(1.0)), "do not stack"), ((), "no chunks")):
        with pytest.raises(StateError, match=why):
            encode_checkpoint(Checkpoint("t", 0, 1, {}, [StreamCheckpoint(KEY, {}, {"x": bad})]))


def test_a_record_is_refused_until_it_is_sealed() -> None:
    """The service builds a record under the exporter lock and hashes it after releasing it: an
    unsealed record is never mistaken for a checkpoint, and sealing gives the encoder's bytes."""
    c = Checkpoint("t", 0, 1, {"a": 1, "d": 0}, [StreamCheckpoint(KEY, {"n": 2}, _odd_arrays())], 5.0)
    record = build_checkpoint(c)
    with pytest.raises(StateError, match="checksum"):
        decode_checkpoint(bytes(record))
    assert seal_checkpoint(record) is record
    assert record == encode_checkpoint(c)
    assert decode_checkpoint(bytes(record)).streams[0].meta == {"n": 2}


def test_a_reference_being_collected_is_not_joined_for_a_checkpoint() -> None:
    """A stream collecting its reference (3 MB at 768-d) holds it in the chunks its batches
    brought: its checkpoint copies them into the record one by one (joining them first was one
    more copy of every such stream's reference while a partition's record was built), and a
    monitor restored from it, or from the checkpoint itself, holds the same reference."""
    import tracemalloc

    settings = DetectionSettings(reference_size=1000, window_events=200, baseline_sample=100)
    mon = StreamMonitor(KEY, settings)
    x = np.random.default_rng(6).standard_normal((900, 768)).astype(np.float32)
    for lo in range(0, 900, 30):
        mon.update_embeddings(x[lo:lo + 30], np.arange(lo, lo + 30, dtype=np.float64), np.full(30, np.nan),
                              [None] * 30)
    assert mon.baseline is None
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        meta, arrays = mon.checkpoint()
        record = build_checkpoint(Checkpoint("t", 0, 900, {"a": 900, "d": 0}, [StreamCheckpoint(KEY, meta, arrays)]))
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert x.nbytes < len(record) < x.nbytes * 1.05
    assert peak < len(record) * 1.1  # joined first, it was 2x: the joined reference, then the record
    (sc,) = decode_checkpoint(bytes(seal_checkpoint(record))).streams
    np.testing.assert_array_equal(sc.arrays["ref_vectors"], x)
    for stored in (sc.arrays, arrays):
        r = StreamMonitor.restore(KEY, settings, meta, stored, None)
        np.testing.assert_array_equal(np.concatenate(r._ref_chunks), x)
        assert r._ref_n == 900
    # The monitor goes on collecting after a checkpoint: its next batch builds the baseline from
    # the same 1,000 events as a monitor restored from the record.
    rest = np.random.default_rng(7).standard_normal((100, 768)).astype(np.float32)
    r = StreamMonitor.restore(KEY, settings, sc.meta, sc.arrays, None)
    for m in (mon, r):
        m.update_embeddings(rest, np.arange(900, 1000, dtype=np.float64), np.full(100, np.nan), [None] * 100)
    assert mon.baseline is not None and r.baseline is not None
    assert mon.baseline.baseline_id == r.baseline.baseline_id


def test_a_checkpoint_is_hashed_and_written_outside_the_exporter_lock(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The record is built under the lock (a consistent cut) and hashed after it is released: a
    scrape waited for the hash as well (half of a 210 MB partition's 0.4 s under the lock)."""
    import embedwatch.app as app_module
    from embedwatch.app import Service
    from embedwatch.config import Settings

    settings = Settings(state={"backend": "file", "directory": str(tmp_path)},  # type: ignore[arg-type]
                        detection=SETTINGS.model_dump())  # type: ignore[arg-type]
    backend = _Recording(tmp_path)
    svc = Service(settings, state_backend=backend)
    source = _Source(svc, [])
    svc.on_assigned([PartitionId("embeddings", 0)])
    svc._load_assignment(source)
    held: list[tuple[str, bool]] = []
    build, seal, write = app_module.build_checkpoint, app_module.seal_checkpoint, backend.write

    def noting(name: str, fn: Any) -> Any:
        def call(*args: Any) -> Any:
            held.append((name, svc.exporter.lock.owned()))
            return fn(*args)
        return call

    monkeypatch.setattr(app_module, "build_checkpoint", noting("build", build))
    monkeypatch.setattr(app_module, "seal_checkpoint", noting("seal", seal))
    monkeypatch.setattr(backend, "write", noting("write", write))
    x = np.random.default_rng(3).standard_normal((150, 16)).astype(np.float32)
    batch = [Message(orjson.dumps({"model": KEY.model, "model_version": KEY.model_version, "embedding": v.tolist()}),
                     "embeddings", 0, i) for i, v in enumerate(x)]
    svc._handle_batch(batch, source, _NoSink())
    svc._checkpoint(sorted(svc._assigned), commit=source)
    assert held == [("build", True), ("seal", False), ("write", False)]
    ckpt = checkpoint_key(settings.kafka.group_id, "embeddings", 0)
    (sc,) = decode_checkpoint(backend.read_all()[ckpt]).streams
    np.testing.assert_array_equal(sc.arrays["ref_vectors"], x)  # 150 of the 200 reference events


def _stream_batch(seed: int, start: int, n: int = 300) -> list[Message]:
    """``n`` events of the stream KEY at offsets ``start``... of partition embeddings/0."""
    vectors = np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)
    return [Message(orjson.dumps({"model": KEY.model, "model_version": KEY.model_version, "embedding": v.tolist()}),
                    "embeddings", 0, start + i) for i, v in enumerate(vectors)]


def test_a_damaged_baseline_record_leaves_its_stream_to_build_a_new_baseline(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A baseline record that does not decode (a truncated file) is skipped at restore; its
    stream's index no longer names it, so list() and get() answer (a KeyError from them stopped
    the service loop), the other versions stay, and the stream builds a new baseline."""
    from embedwatch.app import Service
    from embedwatch.baseline_store import BaselineNotFoundError

    settings, first = _service_that_ran(tmp_path, seed=12)
    damaged = first.router.monitors[KEY].baseline.baseline_id
    older, _ = _fed_monitor(250, seed=13)  # an intact version, active before the damaged one
    assert older.baseline is not None
    kept = older.baseline.baseline_id
    writer = DurableBaselineStore(FileStateBackend(tmp_path), FileStateBackend(tmp_path).read_all())
    writer.save(older.baseline, activate=True)
    writer.promote(KEY, damaged)
    [record] = [p for p in tmp_path.iterdir() if p.name.endswith(damaged) and p.name.startswith("baseline%2F")]
    record.write_bytes(record.read_bytes()[:1000])

    backend = FileStateBackend(tmp_path)
    records = backend.read_all()
    store = DurableBaselineStore(backend, records)
    assert [m["baseline_id"] for m in store.list(KEY)] == [kept]
    assert store.active_id(KEY) is None
    with pytest.raises(BaselineNotFoundError):
        store.get(KEY)
    with pytest.raises(BaselineNotFoundError):
        store.get(KEY, damaged)
    assert store.get(KEY, kept).baseline_id == kept
    assert f"its active baseline {damaged} is not stored" in caplog.text and str(KEY) in caplog.text

    again = Service(settings, baselines=store, state_backend=backend, state_records=records)
    again.run(_Source(again, [_stream_batch(14, 300)]), _NoSink())
    built = again.router.monitors[KEY].baseline
    assert built is not None and built.baseline_id not in (damaged, kept)
    assert store.get(KEY).baseline_id == built.baseline_id
    assert [m["baseline_id"] for m in store.list(KEY)] == [kept, built.baseline_id]


def test_an_index_read_before_its_version_is_applied_again_when_the_version_comes(tmp_path: Path) -> None:
    """A read may see another replica's index but not the baseline written just before it (a
    directory listed while they were written): the version comes with the next read, and the
    index is then applied whole, its active version included."""
    backend = FileStateBackend(tmp_path)
    [key] = _stored_baselines(backend, 1)
    records = FileStateBackend(tmp_path).read_all()
    store = DurableBaselineStore(backend, None, SETTINGS)
    store.restore({k: v for k, v in records.items() if k.startswith("baseline-index/")})
    assert store.active_id(key) is None
    store.restore({k: v for k, v in records.items() if k.startswith(("baseline/", "baseline-fit/"))})
    assert store.active_id(key) is not None and store.get(key).released_sample_rows == SETTINGS.baseline_sample


def test_a_scan_fitted_for_new_settings_after_a_restart_is_stored(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """After a restart with other scan settings, the fit for them is stored beside the baseline
    (its fits record rewritten with every fit it holds): the next restart takes it instead of
    fitting again (70 ms a 768-d stream), and the replicas hold the baseline without its sample.
    The fit restored for the old settings kept it from being stored, at every restart."""
    from embedwatch.app import Service
    from embedwatch.baseline import mean_shift_key
    from embedwatch.baseline_store import _read_record
    from embedwatch.config import Settings
    from embedwatch.detectors.mean_shift import MeanShiftTest

    _service_that_ran(tmp_path, seed=15)
    new = SETTINGS.model_copy(update={"scan_components": 8})
    settings = Settings(kafka={"poll_timeout_ms": 1},  # type: ignore[arg-type]
                        state={"backend": "file", "directory": str(tmp_path)},  # type: ignore[arg-type]
                        detection=new.model_dump())  # type: ignore[arg-type]

    def stored_fits() -> list[list[list[float]]]:
        [fits] = [v for k, v in FileStateBackend(tmp_path).read_all().items() if k.startswith("baseline-fit/")]
        return sorted(_read_record(fits, "fits")[0]["settings"])

    assert stored_fits() == [list(mean_shift_key(SETTINGS))]
    replica = FileStateBackend(tmp_path)  # another replica, restarted with the new settings too
    replica_store = DurableBaselineStore(replica, replica.read_all(), new)
    assert replica_store.get(KEY).released_sample_rows is None  # kept for the new fit

    backend = FileStateBackend(tmp_path)
    records = backend.read_all()
    again = Service(settings, baselines=DurableBaselineStore(backend, records, new), state_backend=backend,
                    state_records=records)
    again.run(_Source(again, []), _NoSink())  # the restored stream fits its scan for the new settings
    assert stored_fits() == sorted([list(mean_shift_key(SETTINGS)), list(mean_shift_key(new))])
    replica_store.restore(replica.read_new())  # the replica reads the new fit: the sample goes
    assert replica_store.get(KEY).released_sample_rows == new.baseline_sample

    def no_fit(*args: Any, **kwargs: Any) -> MeanShiftTest:
        raise AssertionError("refitted")

    monkeypatch.setattr(MeanShiftTest, "fit", no_fit)
    backend = FileStateBackend(tmp_path)
    records = backend.read_all()
    store = DurableBaselineStore(backend, records, new)
    assert store.get(KEY).released_sample_rows == new.baseline_sample
    last = Service(settings, baselines=store, state_backend=backend, state_records=records)
    last.run(_Source(last, []), _NoSink())
    restored = last.router.monitors[KEY].baseline
    assert restored is not None and mean_shift_key(new) in restored.mean_shift_fits()


def test_file_backend_stores_keys_too_long_for_a_file_name(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Stream labels of up to 128 characters, non-ASCII ones included, make keys longer than a
    file name may be (255 bytes, and atomic_write's temporary file adds 14): every write failed
    with "File name too long" and the stream's state was lost at a restart. Such a key's file is
    named after its hash and holds the key; a key that fitted keeps the name it had."""
    import time
    from urllib.parse import quote

    from embedwatch.baseline_store import safe_name

    stream = StreamKey("模型" * 30, "版本" * 20, "東京" * 64)
    long_keys = [f"baseline/{safe_name(stream)}/0123abcd", "ckpt/g/" + "東京" * 70 + "/0"]
    assert all(len(k.encode()) > 400 for k in long_keys)
    fits, too_long = "x" * 241, "x" * 242  # 241 + 14 bytes is a file name's limit: it was written
    state = tmp_path / "state"
    b = FileStateBackend(state)
    b.write({long_keys[0]: b"one", long_keys[1]: b"two", "ckpt/g/t/0": b"short", fits: b"a", too_long: b"b"})
    expected = {long_keys[0]: b"one", long_keys[1]: b"two", "ckpt/g/t/0": b"short", fits: b"a", too_long: b"b"}
    assert b.read_all() == expected
    assert (state / quote("ckpt/g/t/0", safe="")).read_bytes() == b"short"
    assert (state / fits).read_bytes() == b"a"
    assert not (state / too_long).exists()
    assert all(len(p.name.encode()) <= 241 for p in state.iterdir())
    taken: dict[str, bytes] = {}
    assert FileStateBackend(state).read_all(lambda k, v: taken.update({k: v}) is None) == {}
    assert taken == expected

    other = FileStateBackend(state)  # another replica: sees the rewrite of a long key, in the same file
    assert other.read_all() == expected
    files = sorted(p.name for p in state.iterdir())
    time.sleep(0.02)  # a later modification time than the first write's
    b.write({long_keys[0]: b"one again"})
    assert other.read_new() == {long_keys[0]: b"one again"}
    assert other.read_new() == {}
    assert sorted(p.name for p in state.iterdir()) == files

    # A damaged file of a long key is skipped with an error, not taken for another key.
    [hashed] = [p for p in state.iterdir() if p.read_bytes().endswith(b"two")]
    hashed.write_bytes(hashed.read_bytes()[:10])
    assert long_keys[1] not in FileStateBackend(state).read_all()
    assert "damaged" in caplog.text and hashed.name in caplog.text


def test_file_backend_skips_directories_in_its_directory(tmp_path: Path) -> None:
    """The root of an ext4 volume holds lost+found: a read raised IsADirectoryError, and the
    service retried opening its state for ever."""
    b = FileStateBackend(tmp_path / "state")
    (tmp_path / "state" / "lost+found").mkdir()
    b.write({"ckpt/g/topic/0": b"one"})
    assert b.read_all() == {"ckpt/g/topic/0": b"one"}


class _Record:
    def __init__(self, key: str, value: bytes | bytearray | None) -> None:
        self.key = key.encode()
        self.value = None if value is None else bytes(value)


class _Replay:
    """Records in a chosen order, as a consumer of the state topic reads them (pure logic of the
    read: the broker's side is tests/integration/test_state_chunks.py)."""

    def __init__(self, records: list[_Record]) -> None:
        self.records, self.at = records, 0

    def end_offsets(self, parts: Any) -> dict[int, int]:
        return {0: len(self.records)}

    def position(self, tp: Any) -> int:
        return self.at

    def poll(self, timeout_ms: int) -> dict[int, list[_Record]]:
        batch, self.at = self.records[self.at:], len(self.records)
        return {0: batch}


def test_a_chunked_value_whose_manifest_comes_first_is_still_offered_to_the_reader() -> None:
    """A state topic of several partitions (or compaction) can hand over a chunked value's manifest
    before its chunks: it is assembled at the end of the read, and a stored baseline among such
    values was left out of the baseline store (returned as an "other" record)."""
    from embedwatch.state import KafkaStateBackend

    writer = object.__new__(KafkaStateBackend)
    sent: list[tuple[str, bytes | bytearray | None]] = []
    writer.chunk_bytes, writer._slot, writer._gen, writer._nchunks = 10, {}, {}, {}
    writer._send = lambda records: sent.extend(records)  # type: ignore[method-assign]
    big, small = bytes(range(35)), b"checkpoint"
    writer.write({"baseline/m/1": big, "ckpt/g/t/0": small})
    chunks = [_Record(k, v) for k, v in sent if k.startswith("chunk/")]
    heads = [_Record(k, v) for k, v in sent if not k.startswith("chunk/")]
    assert len(chunks) == 4 and len(heads) == 2
    for order in (chunks + heads, heads + chunks):
        reader = object.__new__(KafkaStateBackend)
        reader._parts, reader._slot, reader._gen, reader._nchunks, reader._chunks = [0], {}, {}, {}, {}
        reader._reread = False
        reader.refresh = lambda: None  # type: ignore[method-assign]
        reader._consumer = _Replay(order)
        taken: dict[str, bytes] = {}

        def take(key: str, value: bytes, into: dict[str, bytes] = taken) -> bool:
            if key.startswith("baseline/"):
                into[key] = value
                return True
            return False

        assert reader._drain(take) == {"ckpt/g/t/0": small}
        assert taken == {"baseline/m/1": big}


class _FitsUnwritable(FileStateBackend):
    """The file backend, whose writes of fits records fail as KafkaStateBackend's do when the
    broker does not acknowledge them in time (kafka-python's KafkaTimeoutError)."""

    def write(self, records: Any) -> None:
        from kafka.errors import KafkaTimeoutError

        if any(k.startswith("baseline-fit/") for k in records):
            raise KafkaTimeoutError("Timeout after waiting for 15 secs.")
        super().write(records)


def test_fits_the_backend_cannot_store_leave_the_restored_stream_running(tmp_path: Path) -> None:
    """Derived data: a restore whose fits record cannot be written goes on without it (the next
    restart fits the scan again) instead of failing the assignment."""
    from embedwatch.app import Service

    settings, first = _service_that_ran(tmp_path, seed=12)
    [fit_file] = [p for p in tmp_path.rglob("*") if p.is_file() and "baseline-fit" in p.name]
    fit_file.unlink()  # as an earlier version of embedwatch stored it: the restore fits the scan
    backend = _FitsUnwritable(tmp_path)
    records = backend.read_all()
    again = Service(settings, baselines=DurableBaselineStore(backend, records, SETTINGS), state_backend=backend,
                    state_records=records)
    again.run(_Source(again, []), _NoSink())
    assert not [k for k in FileStateBackend(tmp_path).read_all() if k.startswith("baseline-fit/")]
    mon = again.router.monitors[KEY]
    assert mon.events == first.router.monitors[KEY].events == 300
    assert mon.baseline is not None and mon.baseline.released_sample_rows == SETTINGS.baseline_sample


def test_a_restored_stream_exports_the_time_of_its_newest_event(tmp_path: Path) -> None:
    """StreamSilent alerts on the age of embedwatch_last_event_timestamp_seconds: a stream restored
    after a rollout or a rebalance had none until its next event, so a stream silent across the
    restart stopped alerting."""
    from embedwatch.app import Service
    from embedwatch.config import Settings

    settings = Settings(kafka={"poll_timeout_ms": 1},  # type: ignore[arg-type]
                        state={"backend": "file", "directory": str(tmp_path)},  # type: ignore[arg-type]
                        detection=SETTINGS.model_dump())  # type: ignore[arg-type]
    vectors = np.random.default_rng(3).standard_normal((300, 16)).astype(np.float32)
    batch = [Message(orjson.dumps({"model": KEY.model, "model_version": KEY.model_version, "ts": 1.7e9 + i,
                                   "embedding": v.tolist()}), "embeddings", 0, i) for i, v in enumerate(vectors)]
    first = Service(settings, baselines=DurableBaselineStore(FileStateBackend(tmp_path)),
                    state_backend=FileStateBackend(tmp_path))
    first.run(_Source(first, [batch]), _NoSink())
    gauge = "embedwatch_last_event_timestamp_seconds"
    assert first.exporter.gauges[gauge][tuple(KEY)] == 1.7e9 + 299
    backend = FileStateBackend(tmp_path)
    records = backend.read_all()
    again = Service(settings, baselines=DurableBaselineStore(backend, records), state_backend=backend,
                    state_records=records)
    again.run(_Source(again, []), _NoSink())  # no new event
    assert again.exporter.gauges[gauge][tuple(KEY)] == 1.7e9 + 299


class _FailsOnce(FileStateBackend):
    fail = False

    def write(self, records: Any) -> None:
        if self.fail:
            self.fail = False
            raise OSError("state topic unavailable")
        super().write(records)


def _promoted_three_times(tmp_path: Path) -> tuple[Any, _FailsOnce, list[str]]:
    """A service on durable state whose stream has baselines A (its first events), B and C
    (promotions of shifted events), C active."""
    from embedwatch.app import Service
    from embedwatch.config import Settings

    def msgs(rng: np.random.Generator, n: int, shift: float, t0: float) -> list[Message]:
        x = rng.normal(size=(n, 8)) + 1.0 + shift
        return [Message(orjson.dumps({"model": "m", "model_version": "1", "embedding": r.tolist(), "ts": t0 + i}),
                        "embeddings", timestamp_ms=1_700_000_000_000) for i, r in enumerate(x)]

    backend = _FailsOnce(tmp_path)
    settings = Settings(detection={"reference_size": 100, "window_events": 100,  # type: ignore[arg-type]
                                   "min_window_events": 91, "baseline_sample": 100})
    svc = Service(settings, baselines=DurableBaselineStore(backend, {}, settings.detection), state_backend=backend)
    rng = np.random.default_rng(0)
    svc.process(msgs(rng, 100, 0.0, 1.7e9), now=1.7e9 + 200)
    for k, shift in enumerate((1.0, 2.0)):
        svc.promote_baseline(StreamKey("m", "1"), None, 50)
        svc.process(msgs(rng, 50, shift, 1.7e9 + 100 + 50 * k), now=1.7e9 + 400)
    return svc, backend, [m["baseline_id"] for m in svc.list_baselines("m/1/default")]


def test_a_baseline_change_the_state_backend_refuses_changes_nothing(tmp_path: Path) -> None:
    """The durable store applied a new index before writing it: after one failed write the API
    said a version was active that neither the stream nor the stored state used, and the retried
    rollback went back two versions."""
    from embedwatch.api import ApiError

    key = StreamKey("m", "1")
    svc, backend, (a, b, c) = _promoted_three_times(tmp_path)
    mon = svc.router.monitors[key]
    for change in (lambda: svc.rollback_baseline(key), lambda: svc.promote_baseline(key, a)):
        backend.fail = True
        with pytest.raises(ApiError) as e:
            change()
        assert e.value.status == 503 and "nothing changed, retry" in e.value.message
        assert svc.baselines.active_id(key) == c and mon.baseline is not None and mon.baseline.baseline_id == c
    assert svc.rollback_baseline(key)["baseline_id"] == b
    stored = FileStateBackend(tmp_path)
    assert DurableBaselineStore(stored, stored.read_all()).active_id(key) == b


class _TwoTopics(_Source):
    """The embeddings and the queries partition, the given batches, then a stop."""

    PARTS = (PartitionId("embeddings", 0), PartitionId("queries", 0))

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
        if self.first:
            self.first = False
            self.svc.on_assigned(list(self.PARTS))
        if not self.batches:
            self.svc.stop_requested.set()
            return []
        return self.batches.pop(0)

    def assignment(self) -> set[PartitionId]:
        return set(self.PARTS)


def _queries(rng: np.random.Generator, n: int, shift: float, first: int) -> list[Message]:
    x = rng.standard_normal((n, 16)) + shift
    return [Message(orjson.dumps({"model": KEY.model, "model_version": KEY.model_version, "ts": 1.7e9 + first + i,
                                  "embedding": v.tolist(), "results": [{"id": "d", "score": 0.8}]}),
                    "queries", 0, first + i) for i, v in enumerate(x)]


def _query_drift_service(tmp_path: Path) -> tuple[Any, Any]:
    """A service on file state whose stream has documents and query embeddings, the queries
    drifting (an open mmd_query alarm) when it stops."""
    from embedwatch.app import Service
    from embedwatch.config import Settings

    settings = Settings(kafka={"poll_timeout_ms": 1},  # type: ignore[arg-type]
                        state={"backend": "file", "directory": str(tmp_path)},  # type: ignore[arg-type]
                        detection=SETTINGS.model_dump())  # type: ignore[arg-type]
    rng = np.random.default_rng(11)
    docs = [Message(orjson.dumps({"model": KEY.model, "model_version": KEY.model_version, "ts": 1.7e9 + i,
                                  "embedding": v.tolist()}), "embeddings", 0, i)
            for i, v in enumerate(rng.standard_normal((300, 16)))]
    first = Service(settings, baselines=DurableBaselineStore(FileStateBackend(tmp_path)),
                    state_backend=FileStateBackend(tmp_path))
    first.run(_TwoTopics(first, [docs, _queries(rng, 400, 0.0, 0), _queries(rng, 300, 3.0, 400)]), _NoSink())
    q = first.router.monitors[KEY].query_monitor
    assert q is not None and q.drifting and q.baseline is not None
    return settings, first


def test_a_restart_keeps_the_query_embeddings_baseline_and_their_open_alarm(tmp_path: Path) -> None:
    """Restarted empty before: after a restart the query embeddings' next 200 events (drifted
    ones here) became their baseline, and the open mmd_query alarm ended without its cause
    going away. Their monitor is now in the stream's checkpoint and their baseline in the store,
    under the query-side key, where the API lists, promotes and rolls it back."""
    from embedwatch.app import Service

    settings, first = _query_drift_service(tmp_path)
    qb = first.router.monitors[KEY].query_monitor.baseline.baseline_id
    backend = FileStateBackend(tmp_path)
    records = backend.read_all()
    again = Service(settings, baselines=DurableBaselineStore(backend, records), state_backend=backend,
                    state_records=records)
    rng = np.random.default_rng(12)
    again.run(_TwoTopics(again, [_queries(rng, 100, 3.0, 700)]), _NoSink())
    mon = again.router.monitors[KEY]
    q = mon.query_monitor
    assert q is not None and q.baseline is not None and q.baseline.baseline_id == qb
    assert q.drifting and q.events == 800 and mon.events == 300
    assert mon.measures()["query_drift_detected"] == 1.0
    # The API: the query side's versions, a promotion of its next events, a rollback.
    qside = str(KEY.query_side())
    assert [v["baseline_id"] for v in again.list_baselines(qside)] == [qb]
    assert again.promote_baseline(KEY.query_side(), None, 100)["status"] == "collecting"
    again.process(_queries(rng, 100, 3.0, 800))
    versions = again.list_baselines(qside)
    assert len(versions) == 2 and [v["active"] for v in versions].count(True) == 1
    assert not q.drifting and q.baseline.baseline_id != qb and q.baseline.source == "promoted"
    assert again.rollback_baseline(KEY.query_side())["baseline_id"] == qb
    assert q.baseline.baseline_id == qb and mon.baseline is not None  # the stream's own untouched
    assert len(again.list_baselines(str(KEY))) == 1


def test_a_lost_query_baseline_restarts_the_query_side_alone(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    from embedwatch.app import Service
    from embedwatch.baseline_store import safe_name

    settings, _first = _query_drift_service(tmp_path)
    backend = FileStateBackend(tmp_path)
    records = {k: v for k, v in backend.read_all().items()
               if safe_name(KEY.query_side()) not in k}  # the query side's baseline records lost
    again = Service(settings, baselines=DurableBaselineStore(backend, records), state_backend=backend,
                    state_records=records)
    with caplog.at_level("ERROR"):
        again.run(_TwoTopics(again, []), _NoSink())
    mon = again.router.monitors[KEY]
    assert mon.events == 300 and mon.baseline is not None and mon.query_events == 700
    assert mon.query_monitor is None
    assert "its query embeddings start afresh" in caplog.text


def _versions_of(store: DurableBaselineStore, key: StreamKey) -> set[str]:
    """Ids of the versions of ``key`` the store holds in memory."""
    return {bid for k, bid in store._baselines if k == key}


def test_a_forgotten_stream_leaves_the_backend_and_every_store_that_reads_it(tmp_path: Path) -> None:
    """A retired stream's baselines were held by every replica, and kept in the state backend, for
    ever. Forgetting it writes its index as forgotten and deletes its versions and fits; a store
    that reads the index drops what it holds, also from a read that still has the old records
    before it (a state topic not compacted yet)."""
    from embedwatch.baseline import Baseline
    from embedwatch.baseline_store import safe_name

    backend = FileStateBackend(tmp_path)
    keys = _stored_baselines(backend, 3)
    gone, kept = keys[0], keys[1:]
    store = DurableBaselineStore(backend, backend.read_all(), SETTINGS)
    second = Baseline.from_vectors(gone, np.random.default_rng(9).standard_normal((300, 16)), ts=9.0,
                                   source="test", settings=SETTINGS)
    store.save(second)
    ids = [m["baseline_id"] for m in store.list(gone)]
    assert len(ids) == 2
    before = backend.read_all()  # what a reader finds on a topic not compacted yet, but for the index
    other_backend = FileStateBackend(tmp_path)
    other = DurableBaselineStore(other_backend, other_backend.read_all(), SETTINGS)  # another replica
    assert _versions_of(other, gone) == set(ids)

    assert store.forget(gone) == ids
    left = FileStateBackend(tmp_path).read_all()
    name = safe_name(gone)
    assert not [k for k in left if k.startswith((f"baseline/{name}/", f"baseline-fit/{name}/"))]
    assert sum(1 for k in left if k.startswith("baseline/")) == len(kept)
    index_key = f"baseline-index/{name}"
    index = orjson.loads(left[index_key])
    assert index["versions"] == [] and index["active"] is None and index["forgotten_at"] > 0
    assert _versions_of(store, gone) == set()

    other.read(other_backend.read_new)  # the other replica's next read
    assert other.list(gone) == [] and _versions_of(other, gone) == set()
    assert [m["stream"] for m in other.list()] == [str(k) for k in kept]
    restarted = DurableBaselineStore(backend, {**before, index_key: left[index_key]}, SETTINGS)
    assert restarted.list(gone) == [] and _versions_of(restarted, gone) == set()
    assert [m["stream"] for m in restarted.list()] == [str(k) for k in kept]
    fresh = DurableBaselineStore(backend, FileStateBackend(tmp_path).read_all(), SETTINGS)
    assert fresh.list(gone) == [] and fresh.held()[0] == len(kept)


def test_the_api_forgets_a_retired_stream_with_its_query_embeddings_and_only_once_it_is_let_go(
        tmp_path: Path) -> None:
    """Retired model versions kept their stored baselines in every replica and in the state for
    ever (a 768-d version about 0.4 MiB in memory, up to 5 a stream, its query embeddings' apart).
    Refused while this replica monitors the stream: its checkpoint names the baseline."""
    from embedwatch.api import ApiError
    from embedwatch.app import Service
    from embedwatch.baseline_store import BaselineNotFoundError

    settings, first = _query_drift_service(tmp_path)
    mon = first.router.monitors[KEY]
    assert mon.baseline is not None and mon.query_monitor is not None and mon.query_monitor.baseline is not None
    doc_id, query_id = mon.baseline.baseline_id, mon.query_monitor.baseline.baseline_id
    gauges = dict(((name, value) for name, _labels, value in first._store_gauges()))
    assert gauges["embedwatch_stored_baselines"] == 2 and gauges["embedwatch_stored_baseline_bytes"] > 0
    with pytest.raises(ApiError) as e:
        first.forget_baselines(KEY)
    assert e.value.status == 409 and "monitored by this replica" in e.value.message
    listed = first.list_baselines(None)
    assert [(v["stream"], v["monitored_here"]) for v in listed] == [(str(KEY), True), (str(KEY.query_side()), True)]

    first._forget_stream(KEY)  # let go (idle for limits.stream_idle_s)
    assert [v["monitored_here"] for v in first.list_baselines(None)] == [False, False]  # a candidate to forget
    done = first.forget_baselines(KEY)
    assert done["forgotten"] == [{"stream": str(KEY), "baseline_id": doc_id},
                                 {"stream": str(KEY.query_side()), "baseline_id": query_id}]
    assert first.list_baselines(str(KEY)) == first.list_baselines(str(KEY.query_side())) == []
    assert dict(((n, v) for n, _l, v in first._store_gauges())) == {
        "embedwatch_stored_baselines": 0, "embedwatch_stored_baseline_bytes": 0}
    with pytest.raises(BaselineNotFoundError):
        first.forget_baselines(KEY)

    # A restart on that state: nothing stored for the stream; it builds a new baseline if it comes back.
    backend = FileStateBackend(tmp_path)
    again = Service(settings, baselines=DurableBaselineStore(backend, backend.read_all()), state_backend=backend)
    assert again.baselines.list() == []


class _DeletesFail(_FailsOnce):
    def delete(self, keys: Any) -> None:
        raise OSError("state topic unavailable")


def test_a_forget_the_backend_refuses_changes_nothing_and_one_whose_deletes_fail_still_holds(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The forgotten index is what every replica reads: refused, nothing changed (503, retry); once
    written, versions whose records could not be deleted are dropped by every reader all the same."""
    from embedwatch.api import ApiError
    from embedwatch.app import Service
    from embedwatch.baseline_store import safe_name

    key = StreamKey("m", "1")
    svc, backend, ids = _promoted_three_times(tmp_path)
    svc._forget_stream(key)  # let go
    backend.fail = True
    with pytest.raises(ApiError) as e:
        svc.forget_baselines(key)
    assert e.value.status == 503 and "nothing changed, retry" in e.value.message
    assert [v["baseline_id"] for v in svc.list_baselines(str(key))] == ids

    failing = _DeletesFail(tmp_path)
    svc.baselines.backend = failing  # type: ignore[attr-defined]
    with caplog.at_level(logging.WARNING, logger="embedwatch.state"):
        assert [f["baseline_id"] for f in svc.forget_baselines(key)["forgotten"]] == ids
    assert any("cannot delete the records of" in r.getMessage() for r in caplog.records)
    left = FileStateBackend(tmp_path).read_all()
    assert sum(1 for k in left if k.startswith(f"baseline/{safe_name(key)}/")) == len(ids)  # still there ...
    again = Service(svc.settings, baselines=DurableBaselineStore(FileStateBackend(tmp_path), left))
    assert again.baselines.list() == [] and again.baselines.held()[0] == 0  # ... and dropped by every reader
