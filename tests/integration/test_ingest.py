"""Issue acceptance for ingest, against the real broker: every event accounted for, crash and
SIGTERM behaviour, startup config errors."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from embedwatch.app import Ledger
from embedwatch.produce import EventGenerator, GeneratorConfig
from service_proc import BIN, ServiceProcess, metric_sum

pytestmark = pytest.mark.integration

DIM = 32
BAD_PER_REASON = 60


def _config(bootstrap: str, prefix: str, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": f"{prefix}-group",
                  "embeddings_topic": f"{prefix}-embeddings", "queries_topic": f"{prefix}-queries",
                  "max_poll_records": 500, "session_timeout_ms": 6000},
        "limits": {"max_streams": 3},
        "detection": {"reference_size": 200, "window_events": 200},
        "state": {"backend": "none"},
    }
    for section, values in over.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def _send(producer: KafkaProducer, topic: str, items: list[tuple[bytes | None, bytes]]) -> None:
    for key, value in items:
        producer.send(topic, key=key, value=value)
    producer.flush(timeout=60)


def _bad_messages() -> list[tuple[str, bytes | None, bytes]]:
    """(expected reason, key, bytes): BAD_PER_REASON single-event messages per reason code."""
    out: list[tuple[str, bytes | None, bytes]] = []
    k0 = b"model-0/v1/default"
    for i in range(BAD_PER_REASON):
        good = {"model": "model-0", "model_version": "v1", "id": f"bad-{i}"}
        out += [
            ("invalid_json", k0, b'{"model": "model-0", "embedding": [1, 2' + str(i).encode()),
            ("schema", k0, orjson.dumps({"model_version": "v1", "embedding": [0.1] * DIM, "n": i})),
            ("non_finite", k0, json.dumps({**good, "embedding": [float("nan")] + [0.1] * (DIM - 1)}).encode()),
            ("zero_vector", k0, orjson.dumps({**good, "embedding": [0.0] * DIM})),
            ("dimension_mismatch", k0, orjson.dumps({**good, "embedding": [0.1] * (DIM * 2)})),
            ("stream_limit", f"overflow-{i}".encode(),
             orjson.dumps({"model": f"overflow-{i}", "model_version": "v1", "embedding": [0.1] * DIM})),
        ]
    return out


def _read_all(bootstrap: str, topic: str, expected: int, timeout: float = 60) -> list[Any]:
    c = KafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
                      consumer_timeout_ms=3000)
    parts = [TopicPartition(topic, p) for p in (c.partitions_for_topic(topic) or [])]
    c.assign(parts)
    c.seek_to_beginning(*parts)
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = c.poll(timeout_ms=1000)
        for recs in batch.values():
            out.extend(recs)
        if not batch and len(out) >= expected:
            break
    c.close()
    return out


def _ledger(m: dict[str, Any], outcome: str) -> float:
    return metric_sum(m, "embedwatch_consumed_events_total", outcome=outcome)


def _drained(total: int):
    return lambda m: _ledger(m, "accepted") + _ledger(m, "dead_lettered") >= total


def test_every_event_is_accounted_for(kafka_bootstrap: str, unique_topics, fresh_topic_prefix: str,
                                      tmp_path: Path) -> None:
    emb, qry, emb_dlq, _ = unique_topics("embeddings", "queries", "embeddings.dlq", "queries.dlq",
                                         partitions=3)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=10)
    gen = EventGenerator(GeneratorConfig(streams=3, dim=DIM, seed=7))
    svc = ServiceProcess(tmp_path, _config(kafka_bootstrap, fresh_topic_prefix)).start()
    try:
        # Phase 1: the three streams exist (so the overflow streams are the ones beyond the cap).
        first = gen.messages(300)
        _send(producer, emb, first)
        svc.wait_for(lambda m: metric_sum(m, "embedwatch_streams") == 3, what="3 streams")
        # Phase 2: good events (some as JSON arrays), query events, and bad ones of every reason.
        bad = _bad_messages()
        good = gen.messages(10_000 - 300 - len(bad) - 500)
        arrays = [(None, b"[" + b",".join(v for _, v in good[i:i + 5]) + b"]") for i in range(0, 500, 5)]
        singles = good[500:]
        queries = [(b"model-1/v1/default", orjson.dumps({
            "model": "model-1", "model_version": "v1", "query_id": f"q{i}",
            "results": [{"id": "d1", "score": 0.8}, {"id": "d2", "score": 0.4}], "relevant_ids": ["d2"]}))
            for i in range(500)]
        _send(producer, emb, singles[: len(singles) // 2] + [(k, v) for _, k, v in bad] + arrays
              + singles[len(singles) // 2:])
        _send(producer, qry, queries)
        produced = len(first) + len(singles) + len(bad) + 500 + len(queries)
        assert produced == 10_000
        m = svc.wait_for(_drained(produced), what="all events accounted")
        time.sleep(1.0)
        m = svc.metrics()
        accepted, dead = _ledger(m, "accepted"), _ledger(m, "dead_lettered")
        assert accepted + dead == produced
        assert dead == len(bad)
        by_reason = {r: metric_sum(m, "embedwatch_events_rejected_total", reason=r) for r in
                     ("invalid_json", "schema", "non_finite", "zero_vector", "dimension_mismatch", "stream_limit")}
        assert by_reason == dict.fromkeys(by_reason, BAD_PER_REASON)
        assert metric_sum(m, "embedwatch_events_total") == accepted
        assert metric_sum(m, "embedwatch_events_total", kind="query") == 500

        expected = {v: r for r, _, v in bad}
        dlq = _read_all(kafka_bootstrap, emb_dlq, len(bad))
        assert len(dlq) == len(bad)
        seen: Counter[str] = Counter()
        for rec in dlq:
            headers = {k: v for k, v in rec.headers}
            reason = headers["embedwatch-error"].decode()
            assert rec.value in expected, "the dead letter must carry the original bytes"
            assert expected[rec.value] == reason
            assert headers["embedwatch-source-topic"].decode() == emb
            assert int(headers["embedwatch-source-offset"]) >= 0
            assert headers["embedwatch-error-detail"]
            seen[reason] += 1
        assert seen == dict.fromkeys(by_reason, BAD_PER_REASON)
    finally:
        svc.close()
        producer.close()


def _replayed_in_log(svc: ServiceProcess) -> int:
    """What a process added to embedwatch_events_replayed_total: it logs each batch's count where
    it adds it to the counter."""
    text = svc.log_path.read_text(errors="replace")
    return sum(int(n) for n in re.findall(r"replayed (\d+) events already processed", text))


@pytest.mark.parametrize("backend", ["kafka-python", "confluent"])
def test_kill_9_and_restart_reconciles(kafka_bootstrap: str, unique_topics, fresh_topic_prefix: str,
                                       tmp_path: Path, backend: str) -> None:
    emb, _, emb_dlq, _ = unique_topics("embeddings", "queries", "embeddings.dlq", "queries.dlq", partitions=3)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=10)
    gen = EventGenerator(GeneratorConfig(streams=3, dim=DIM, seed=3))
    cfg = _config(kafka_bootstrap, fresh_topic_prefix, kafka={"max_poll_records": 200, "backend": backend})
    total = 0
    msgs = gen.messages(30_000)
    # A zero vector every 100 events: dead letters must reconcile too.
    msgs = [(k, orjson.dumps({"model": "model-0", "model_version": "v1", "embedding": [0.0] * DIM}))
            if i % 100 == 99 else (k, v) for i, (k, v) in enumerate(msgs)]
    _send(producer, emb, msgs)
    total = len(msgs)
    n_bad = sum(1 for i in range(total) if i % 100 == 99)
    svc = ServiceProcess(tmp_path, cfg, "a").start()
    procs = [svc]
    try:
        for round_ in range(2):
            svc.wait_for(lambda m, r=round_: _ledger(m, "accepted") + _ledger(m, "dead_lettered")
                         > (r + 1) * total / 4, what="progress")
            svc.kill()
            svc = ServiceProcess(tmp_path, cfg, f"b{round_}").start()
            procs.append(svc)
        m = svc.wait_for(_drained(total), what="drained after restarts")
        time.sleep(1.0)
        m = svc.metrics()
        assert _ledger(m, "accepted") + _ledger(m, "dead_lettered") == total
        assert _ledger(m, "dead_lettered") == n_bad
        assert "embedwatch_events_replayed_total" in m, "the replay count must be exported"
        assert metric_sum(m, "embedwatch_events_replayed_total") == _replayed_in_log(svc)
        # Each killed process's replays, from its log: a lagging partition's replay may come after
        # the progress scrape that precedes the kill, so a scrape there could miss it.
        replayed_total = sum(_replayed_in_log(p) for p in procs)
        # At most one uncommitted batch per partition per kill.
        assert replayed_total <= 2 * 3 * 200
        # The dead-letter topic may hold a replayed batch's letters twice; unique ones reconcile.
        dlq = _read_all(kafka_bootstrap, emb_dlq, n_bad)
        unique = {(dict(r.headers)["embedwatch-source-partition"], dict(r.headers)["embedwatch-source-offset"])
                  for r in dlq}
        assert len(unique) == n_bad
        assert len(dlq) - n_bad <= replayed_total
    finally:
        svc.close()
        producer.close()


@pytest.mark.parametrize("backend", ["kafka-python", "confluent"])
def test_sigterm_commits_and_restart_resumes(kafka_bootstrap: str, unique_topics, fresh_topic_prefix: str,
                                             tmp_path: Path, backend: str) -> None:
    emb, *_ = unique_topics("embeddings", "queries", "embeddings.dlq", "queries.dlq", partitions=3)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=10)
    gen = EventGenerator(GeneratorConfig(streams=3, dim=DIM, seed=5))
    cfg = _config(kafka_bootstrap, fresh_topic_prefix, kafka={"max_poll_records": 100, "backend": backend})
    _send(producer, emb, gen.messages(20_000))
    svc = ServiceProcess(tmp_path, cfg, "a").start()
    try:
        svc.wait_for(lambda m: _ledger(m, "accepted") > 3000, what="progress")
        code, took = svc.terminate()
        assert code == 0, svc.tail()
        assert took < 10.0
        assert "Traceback" not in svc.tail(200)
        # Committed offsets now cover exactly what the first run processed.
        c = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=cfg["kafka"]["group_id"],
                          enable_auto_commit=False)
        parts = [TopicPartition(emb, p) for p in range(3)]
        committed = {tp: c.committed(tp, metadata=True) for tp in parts}
        c.close(autocommit=False)
        assert sum(om.offset for om in committed.values() if om) > 3000
        # Read with kafka-python whichever backend committed: the same ledger (Ledger.decode).
        ledgers = [json.loads(om.metadata.rstrip("\x00")) for om in committed.values() if om]
        assert all(Ledger.decode(om.metadata) == Ledger(d["a"], d["d"], d.get("f", -1))
                   for om, d in zip((om for om in committed.values() if om), ledgers, strict=True))
        assert sum(d["a"] + d["d"] for d in ledgers) == sum(om.offset for om in committed.values() if om)
        assert all("f" not in d for d in ledgers), "a clean shutdown leaves nothing in flight"
        svc = ServiceProcess(tmp_path, cfg, "b").start()
        m = svc.wait_for(_drained(20_000), what="drained after restart")
        assert _ledger(m, "accepted") == 20_000
        assert metric_sum(m, "embedwatch_events_replayed_total") == 0
        # The restarted consumer resumed at the committed offsets: it processed only the rest.
        assert metric_sum(m, "embedwatch_events_total") == 20_000 - sum(
            om.offset for om in committed.values() if om)
    finally:
        svc.close()
        producer.close()


def test_bad_config_fails_at_startup_naming_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("kafka:\n  max_poll_records: zero\n")
    r = subprocess.run([BIN, "run", "--config", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "kafka.max_poll_records" in r.stderr
    cfg.write_text("kafka:\n  max_poll_records: 10\n")
    r = subprocess.run([BIN, "run", "--config", str(cfg)], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", "EMBEDWATCH_LIMITS__MAX_STREAMS": "-1"})
    assert r.returncode == 2
    assert "limits.max_streams" in r.stderr


@pytest.mark.parametrize("backend", ["kafka-python", "confluent"])
def test_a_single_replica_keeps_its_first_assignment(kafka_bootstrap: str, unique_topics, fresh_topic_prefix: str,
                                                     tmp_path: Path, backend: str) -> None:
    """Alone in its group, a replica is assigned every partition once and never revoked. kafka-python
    revoked its first assignment 0.1-0.3 s later at every start while the source fetched metadata
    before subscribing (the coordinator's snapshot of the topics was empty), and with durable state
    1 in 30-50 of those rejoins never completed."""
    emb, _ = unique_topics("embeddings", "embeddings.dlq", partitions=3)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=10)
    msgs = EventGenerator(GeneratorConfig(streams=3, dim=DIM, seed=11)).messages(600)
    _send(producer, emb, msgs)
    producer.close()
    cfg = _config(kafka_bootstrap, fresh_topic_prefix, kafka={"backend": backend, "queries_topic": None})
    svc = ServiceProcess(tmp_path, cfg, "solo").start()
    try:
        svc.wait_for(_drained(len(msgs)), what="drained")
        time.sleep(2.0)  # the revocation came within 0.3 s of the assignment
        log = svc.tail(10_000)
        assert log.count("INFO embedwatch: assigned [") == 1, log
        assert "revoked [PartitionId" not in log, log
    finally:
        svc.close()


@pytest.mark.parametrize("backend", ["kafka-python", "confluent"])
def test_a_backlog_of_many_streams_is_read_in_raised_batches(backend: str, kafka_bootstrap: str, unique_topics,
                                                             fresh_topic_prefix: str, tmp_path: Path) -> None:
    """After a batch of 40 streams the next polls ask for 40 x poll_events_per_stream records, and
    the client hands them over: the same backlog takes a fraction of the batches of a fixed bound."""
    (emb,) = unique_topics("embeddings", partitions=1)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=10)
    try:
        _send(producer, emb, EventGenerator(GeneratorConfig(streams=40, dim=DIM, seed=11)).messages(8000))
    finally:
        producer.close()
    seen: dict[str, tuple[float, float]] = {}
    for name, per_stream in (("fixed", 0), ("raised", 50)):
        cfg = _config(kafka_bootstrap, fresh_topic_prefix, limits={"max_streams": 40},
                      kafka={"group_id": f"{fresh_topic_prefix}-{name}", "queries_topic": "", "backend": backend,
                             "max_poll_records": 100, "poll_events_per_stream": per_stream})
        svc = ServiceProcess(tmp_path, cfg, name=name).start()
        try:
            m = svc.wait_for(_drained(8000), what=f"the backlog consumed ({name})")
            assert _ledger(m, "accepted") == 8000
            seen[name] = (metric_sum(m, "embedwatch_batches_total"), metric_sum(m, "embedwatch_poll_max_records"))
        finally:
            svc.close()
    assert seen["fixed"][0] >= 80 and seen["fixed"][1] == 100
    # 5-6 measured: batches of up to 40 x 50 records. The gauge follows the last batch's streams
    # (fewer than 40 if it held fewer than 40 events), so the count is what is asserted.
    assert seen["raised"][0] <= 20, seen
