"""Durable state: the checkpoint codec, the file backend and the write-through baseline store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embedwatch.config import DetectionSettings
from embedwatch.events import StreamKey
from embedwatch.monitor import StreamMonitor
from embedwatch.state import (
    Checkpoint,
    DurableBaselineStore,
    FileStateBackend,
    StateError,
    StreamCheckpoint,
    checkpoint_key,
    checkpoints_in,
    decode_checkpoint,
    encode_checkpoint,
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
