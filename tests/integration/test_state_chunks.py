"""The kafka state backend against the real broker: values larger than a record are written as
chunks behind a manifest, alternate between two slots, and survive a write that dies halfway."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from kafka import KafkaConsumer, TopicPartition

from embedwatch.config import Settings
from embedwatch.state import KafkaStateBackend

pytestmark = pytest.mark.integration

CHUNK = 1000


def _backend(bootstrap: str, topic: str) -> KafkaStateBackend:
    s = Settings(kafka={"bootstrap_servers": bootstrap}, state={"backend": "kafka", "topic": topic})  # type: ignore[arg-type]
    return KafkaStateBackend(s, chunk_bytes=CHUNK)


def _raw(bootstrap: str, topic: str) -> dict[str, bytes | None]:
    """The topic's newest value per key, as written (chunks and manifests included)."""
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    c.assign([tp])
    c.seek_to_beginning(tp)
    end = c.end_offsets([tp])[tp]
    out: dict[str, bytes | None] = {}
    while c.position(tp) < end:
        for recs in c.poll(timeout_ms=1000).values():
            for r in recs:
                out[r.key.decode()] = r.value
    c.close()
    return out


def test_large_values_round_trip_through_chunks(kafka_bootstrap: str, fresh_topic_prefix: str) -> None:
    topic = f"{fresh_topic_prefix}-state"
    w = _backend(kafka_bootstrap, topic)
    big, small = os.urandom(3500), b"small"
    w.write({"ckpt/g/t/0": big, "baseline-index/x": small})
    raw = _raw(kafka_bootstrap, topic)
    chunks = sorted(k for k, v in raw.items() if k.startswith("chunk/") and v is not None)
    assert chunks == [f"chunk/0/{i}/ckpt/g/t/0" for i in range(4)]
    assert raw["ckpt/g/t/0"] is not None and len(raw["ckpt/g/t/0"] or b"") < 200  # a manifest
    r = _backend(kafka_bootstrap, topic)
    assert r.read_all() == {"ckpt/g/t/0": big, "baseline-index/x": small}
    assert r.read_new() == {}

    # The next generation goes to the other slot, one after that back to the first; once a
    # generation's manifest is written, the previous generation's chunks are deleted (a value
    # that is not written again must not leave its predecessor in the topic for good).
    bigger = os.urandom(4200)
    w.write({"ckpt/g/t/0": bigger})
    raw = _raw(kafka_bootstrap, topic)
    live = sorted(k for k, v in raw.items() if k.startswith("chunk/") and v is not None)
    assert live == [f"chunk/1/{i}/ckpt/g/t/0" for i in range(5)]
    assert r.read_new() == {"ckpt/g/t/0": bigger}
    assert not r._chunks  # the first generation's chunks, read before, dropped at their deletion
    shorter = os.urandom(1500)
    w.write({"ckpt/g/t/0": shorter})
    raw = _raw(kafka_bootstrap, topic)
    live = sorted(k for k, v in raw.items() if k.startswith("chunk/") and v is not None)
    assert live == ["chunk/0/0/ckpt/g/t/0", "chunk/0/1/ckpt/g/t/0"]
    assert r.read_new() == {"ckpt/g/t/0": shorter}
    assert _backend(kafka_bootstrap, topic).read_all()["ckpt/g/t/0"] == shorter

    # A value that fits a record again: every chunk of the key is deleted.
    w.write({"ckpt/g/t/0": b"tiny"})
    raw = _raw(kafka_bootstrap, topic)
    assert not [k for k, v in raw.items() if k.startswith("chunk/") and v is not None]
    assert r.read_new() == {"ckpt/g/t/0": b"tiny"}
    assert not r._chunks  # nothing held for later
    w.close()
    r.close()


def test_a_read_hands_each_value_over_as_it_comes(kafka_bootstrap: str, fresh_topic_prefix: str) -> None:
    """``take`` is offered the values in write order, a chunked one as soon as its manifest is read
    (its chunks are freed then, not at the end of the read), and the read keeps none it took. The
    baseline store restores from such a read holding at most one baseline's sample at a time: a
    restart held every stored baseline at once before (1,043 MiB at 200 streams of 768-d)."""
    from embedwatch.baseline import Baseline
    from embedwatch.config import DetectionSettings
    from embedwatch.events import StreamKey
    from embedwatch.state import DurableBaselineStore

    topic = f"{fresh_topic_prefix}-state"
    w = _backend(kafka_bootstrap, topic)
    big, small, bigger = os.urandom(3500), b"small", os.urandom(2500)
    w.write({"ckpt/g/t/0": big})
    w.write({"ckpt/g/t/1": small})
    w.write({"ckpt/g/t/0": bigger})
    r = _backend(kafka_bootstrap, topic)
    seen: list[tuple[str, bytes, int]] = []

    def take(key: str, value: bytes) -> bool:
        seen.append((key, value, sum(len(held) for held in r._chunks.values())))
        return key == "ckpt/g/t/0"

    assert r.read_all(take) == {"ckpt/g/t/1": small}
    assert [(k, v) for k, v, _ in seen] == [("ckpt/g/t/0", big), ("ckpt/g/t/1", small), ("ckpt/g/t/0", bigger)]
    assert [held for *_, held in seen] == [0, 0, 0]

    det = DetectionSettings(reference_size=200, window_events=200, baseline_sample=100)
    writer = DurableBaselineStore(w, None, det)
    for i in range(4):
        x = [[float(i + j + k % 3) for k in range(16)] for j in range(300)]
        b = Baseline.from_vectors(StreamKey("m", f"v{i}", "default"), x, ts=float(i), source="test", settings=det)
        b.mean_shift(det)
        writer.save(b)
    reader = DurableBaselineStore(r, None, det)
    with_sample: list[int] = []

    def restore(key: str, value: bytes) -> bool:
        took = reader.take(key, value)
        with_sample.append(sum(b.released_sample_rows is None for b in reader._baselines.values()))
        return took

    assert r.read_new(restore) == {}
    reader.finish_restore()
    assert max(with_sample) == 1 and with_sample[-1] == 0
    assert reader.list() == writer.list()
    assert all(reader.get(StreamKey("m", f"v{i}", "default")).released_sample_rows == 100 for i in range(4))
    w.close()
    r.close()


def test_a_write_that_dies_before_its_manifest_leaves_the_previous_value(
        kafka_bootstrap: str, fresh_topic_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    topic = f"{fresh_topic_prefix}-state"
    w = _backend(kafka_bootstrap, topic)
    first = os.urandom(2500)
    w.write({"ckpt/g/t/1": first})
    r = _backend(kafka_bootstrap, topic)
    assert r.read_all() == {"ckpt/g/t/1": first}

    sends = []
    real_send = w._send

    def dies_after_chunks(records):  # type: ignore[no-untyped-def]
        records = dict(records)
        sends.append(records)
        if len(sends) > 1:
            raise RuntimeError("killed")
        real_send(records.items())

    w._send = dies_after_chunks  # type: ignore[method-assign]
    second = os.urandom(3300)
    with pytest.raises(RuntimeError):
        w.write({"ckpt/g/t/1": second})
    assert sorted(sends[0]) == [f"chunk/1/{i}/ckpt/g/t/1" for i in range(4)]
    # The chunks of the unfinished generation are in the topic; the previous value is what a
    # reader gets, and it keeps those chunks only until a manifest shows they are stale.
    assert _backend(kafka_bootstrap, topic).read_all() == {"ckpt/g/t/1": first}
    assert r.read_new() == {}
    assert sorted(r._chunks["ckpt/g/t/1"]) == [(1, i) for i in range(4)]  # slot, index

    w._send = real_send  # type: ignore[method-assign]
    third = os.urandom(2100)
    w.write({"ckpt/g/t/1": third})
    assert r.read_new() == {"ckpt/g/t/1": third}
    assert _backend(kafka_bootstrap, topic).read_all() == {"ckpt/g/t/1": third}
    # Same slot as the unfinished write, a new generation; its fourth chunk is deleted.
    raw = _raw(kafka_bootstrap, topic)
    assert raw["chunk/1/3/ckpt/g/t/1"] is None
    assert raw["chunk/1/0/ckpt/g/t/1"].startswith(b"EWCC1\n" + (3).to_bytes(8, "little"))  # type: ignore[union-attr]

    # A damaged chunk: the key is refused (logged), never restored from bad bytes. A manifest is
    # assembled from the chunks read before it, so the damaged generation is sent again whole.
    w._producer.send(topic, key=b"chunk/1/0/ckpt/g/t/1", value=b"garbage")
    for i in (1, 2):
        w._producer.send(topic, key=f"chunk/1/{i}/ckpt/g/t/1".encode(), value=raw[f"chunk/1/{i}/ckpt/g/t/1"])
    w._producer.send(topic, key=b"ckpt/g/t/1", value=raw["ckpt/g/t/1"])
    w._producer.flush()
    with caplog.at_level(logging.ERROR, logger="embedwatch.state"):
        assert _backend(kafka_bootstrap, topic).read_all() == {}
    assert "missing or damaged" in caplog.text
    # Manifests that make no sense are refused the same way, without an exception.
    for i, bad in enumerate(({"slot": 0, "gen": -1, "chunks": 1, "bytes": 3, "sha256": ""},
                             {"slot": 0, "gen": 1, "chunks": 10**12, "bytes": 3, "sha256": ""},
                             {"slot": 7, "gen": 1, "chunks": 1, "bytes": 3, "sha256": ""})):
        w._producer.send(topic, key=f"ckpt/g/t/{9 + i}".encode(), value=b"EWCM1\n" + json.dumps(bad).encode())
    w._producer.send(topic, key=b"ckpt/g/t/20", value=b"EWCM1\nnot json")
    w._producer.flush()
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="embedwatch.state"):
        assert _backend(kafka_bootstrap, topic).read_all() == {}
    assert caplog.text.count("unreadable manifest") == 4
    w.close()
    r.close()


def test_the_service_resumes_from_a_checkpoint_written_in_chunks(
        kafka_bootstrap: str, unique_topics, fresh_topic_prefix: str, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Four 768-d streams still collecting their reference events: a partition's checkpoint holds
    them all (several MB, so chunks). Killed after a checkpoint, a successor restores them and builds
    every baseline from the restored events plus the ones that follow; without the restore each
    stream would have seen too few events to build one."""
    from embedwatch.produce import EventGenerator, GeneratorConfig
    from kafka_broker import produce_messages
    from service_proc import ServiceProcess, metric_sum

    (topic,) = unique_topics("embeddings", partitions=1)
    unique_topics("embeddings.dlq", partitions=1)
    state_topic = f"{fresh_topic_prefix}-state"
    messages = EventGenerator(GeneratorConfig(streams=4, dim=768, seed=5, encoding="b64")).messages(4000)

    produce_messages(kafka_bootstrap, topic, messages[:2400])  # 600 per stream: below reference_size (1,000)
    # confluent-kafka, as the Helm chart runs it. (With kafka-python, 2 of 7 runs stalled in the
    # rejoin after a revocation that followed the first assignment, until its source fetched topic
    # metadata after subscribing: test_ingest.test_a_single_replica_keeps_its_first_assignment;
    # 8 of 8 pass on kafka-python since.)
    cfg = {"kafka": {"bootstrap_servers": kafka_bootstrap, "group_id": f"{fresh_topic_prefix}-g",
                     "backend": "confluent", "embeddings_topic": topic, "queries_topic": None,
                     "session_timeout_ms": 6000},
           "state": {"backend": "kafka", "topic": state_topic, "checkpoint_interval_s": 1.0}}
    svc = ServiceProcess(tmp_path, cfg, "first").start()
    try:
        svc.wait_for(lambda m: metric_sum(m, "embedwatch_consumed_events_total") >= 2400
                     and metric_sum(m, "embedwatch_checkpoints_total") >= 2, timeout=120, what="checkpointed")
        assert not metric_sum(svc.metrics(), "embedwatch_baseline_info")
    finally:
        svc.kill()
    raw = _raw(kafka_bootstrap, state_topic)
    key = f"ckpt/{fresh_topic_prefix}-g/{topic}/0"
    assert (raw[key] or b"").startswith(b"EWCM1\n")
    assert sum(1 for k, v in raw.items() if k.endswith("/" + key) and v is not None) >= 5

    svc = ServiceProcess(tmp_path, cfg, "second").start()
    try:
        produce_messages(kafka_bootstrap, topic, messages[2400:])
        got = svc.wait_for(lambda m: metric_sum(m, "embedwatch_consumed_events_total") >= 4000
                           and len(m.get("embedwatch_baseline_info", {})) == 4, timeout=120, what="baselines")
        assert metric_sum(got, "embedwatch_consumed_events_total") == 4000
        assert "restored" in svc.tail(200)
    finally:
        svc.close()
