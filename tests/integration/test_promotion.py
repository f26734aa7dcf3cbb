"""Baselines against the real broker and service: a drifting stream is promoted, its next events
become its baseline, and the alarm ends when that baseline takes over; the query embeddings keep
their baseline and an open alarm across a restart."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from kafka import KafkaProducer

from embedwatch.produce import EventGenerator, Fault, GeneratorConfig
from kafka_broker import live_keys
from service_proc import ServiceProcess, until

pytestmark = pytest.mark.integration

DIM = 32
TOKEN = "promotion-test-admin-token-4f1c9e"
STREAM = "model-0/v1/default"
QDIM = 24
QSTREAM = "m/v1/default"
QSTREAM_QUERY_SIDE = f"{QSTREAM}/query"


def _config(bootstrap: str, prefix: str, emb: str, qry: str, state: dict[str, Any]) -> dict[str, Any]:
    return {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": f"{prefix}-group", "embeddings_topic": emb,
                  "queries_topic": qry, "max_poll_records": 500, "session_timeout_ms": 6000},
        "http": {"admin_token": TOKEN},
        "detection": {"reference_size": 200, "window_events": 200},
        "state": state,
    }


def test_promotion_collects_the_next_events_and_ends_the_alarm(
        kafka_bootstrap: str, unique_topics: Any, fresh_topic_prefix: str, tmp_path: Path) -> None:
    emb, qry = unique_topics("embeddings", "queries")
    cfg = _config(kafka_bootstrap, fresh_topic_prefix, emb, qry, {"backend": "none"})
    # One stream whose mean moves for good after its 600th event: the new normal to accept.
    gen = EventGenerator(GeneratorConfig(streams=1, dim=DIM, seed=5,
                                         faults=[Fault("shift", at=600, stream=0, magnitude=1.0)]))
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=10)

    def send(n: int) -> None:
        for key, value in gen.messages(n):
            producer.send(emb, key=key, value=value)
        producer.flush(timeout=60)

    def stream() -> dict[str, Any]:
        st: dict[str, Any] = json.loads(svc.get("/api/streams")[1])["streams"][STREAM]
        return st

    def versions() -> list[tuple[str, int, bool]]:
        doc = json.loads(svc.get(f"/api/baselines/{STREAM}")[1])
        return [(b["source"], b["count"], b["active"]) for b in doc["baselines"]]

    send(1000)
    svc = ServiceProcess(tmp_path, cfg).start()
    try:
        until(stream, lambda st: st["drifting"] and st["events"] == 1000, "the shift's alarm", svc)
        status, body = svc.request("POST", f"/api/baselines/{STREAM}/promote", b'{"events": 200}',
                                   {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        assert status == 202, body
        assert json.loads(body) == {"status": "collecting", "stream": STREAM, "events": 0, "needed": 200}
        assert stream()["promotion"] == {"events": 0, "needed": 200}
        assert versions() == [("first_events", 200, True)]  # nothing changes before the events arrive
        send(300)  # still shifted: the stream's new normal
        until(versions, lambda v: v == [("first_events", 200, False), ("promoted", 200, True)],
              "the promoted baseline", svc)
        st = until(stream, lambda s: s["events"] == 1300, "the last events", svc)
        assert st["promotion"] is None and not st["drifting"]
        assert st["baseline"]["source"] == "promoted" and st["alarms"][-1]["kind"] == "end"
        # The new baseline is the new normal: the 100 events after it raise no alarm.
        assert sum(a["kind"] == "start" for a in st["alarms"]) == 1
    finally:
        producer.close()
        svc.close()


def test_a_restart_keeps_the_query_embeddings_baseline_and_their_alarm(
        kafka_bootstrap: str, unique_topics: Any, fresh_topic_prefix: str, tmp_path: Path) -> None:
    """The query embeddings' state across a SIGTERM and a restart: their baseline is stored in the
    state topic under the query-side key and their monitor is in the stream's checkpoint, so the
    restarted service keeps both the baseline and the open mmd_query alarm (it built a new
    baseline from its next, drifted, query embeddings before)."""
    emb, qry = unique_topics("embeddings", "queries")
    cfg = _config(kafka_bootstrap, fresh_topic_prefix, emb, qry,
                  {"backend": "kafka", "topic": f"{fresh_topic_prefix}-state", "checkpoint_interval_s": 1.0})
    rng = np.random.default_rng(3)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=10)
    sent = {"q": 0}

    def send_queries(n: int, shift: float) -> None:
        for v in rng.standard_normal((n, QDIM)) + shift:
            ev = {"model": "m", "model_version": "v1", "ts": time.time(), "embedding": v.tolist(),
                  "results": [{"id": "d1", "score": 0.8}]}
            producer.send(qry, key=QSTREAM.encode(), value=orjson.dumps(ev))
        producer.flush(timeout=60)
        sent["q"] += n

    def send_docs(n: int) -> None:
        for v in rng.standard_normal((n, QDIM)):
            ev = {"model": "m", "model_version": "v1", "ts": time.time(), "embedding": v.tolist()}
            producer.send(emb, key=QSTREAM.encode(), value=orjson.dumps(ev))
        producer.flush(timeout=60)

    def stream(svc: ServiceProcess) -> dict[str, Any]:
        st: dict[str, Any] = json.loads(svc.get("/api/streams")[1])["streams"][QSTREAM]
        return st

    def versions(svc: ServiceProcess, key: str) -> list[str]:
        return [b["baseline_id"] for b in json.loads(svc.get(f"/api/baselines/{key}")[1])["baselines"]]

    send_docs(300)
    send_queries(400, 0.0)
    send_queries(300, 3.0)  # the query embeddings move away from their baseline
    first = ServiceProcess(tmp_path, cfg, name="first").start()
    try:
        st = until(lambda: stream(first), lambda s: s["query_events"] == sent["q"] and s["events"] == 300,
                   "every event", first)
        qv = st["query_vectors"]
        assert qv["stream"] == QSTREAM_QUERY_SIDE and qv["drifting"] and qv["baseline_id"], qv
        assert versions(first, QSTREAM_QUERY_SIDE) == [qv["baseline_id"]]
        assert len(versions(first, QSTREAM)) == 1
        code, _ = first.terminate()
        assert code == 0, first.tail()
    finally:
        first.close()
    send_queries(100, 3.0)  # still drifted after the restart
    again = ServiceProcess(tmp_path, cfg, name="again").start()
    try:
        st = until(lambda: stream(again), lambda s: s["query_events"] == sent["q"], "the new queries", again)
        q2 = st["query_vectors"]
        assert q2["baseline_id"] == qv["baseline_id"] and q2["drifting"], q2
        assert q2["events"] == sent["q"] and st["measures"]["query_drift_detected"] == 1.0
        # One alarm start in all: the restart neither ended it nor raised it again.
        assert [a["kind"] for a in q2["alarms"]] == ["start"], q2["alarms"]
        assert versions(again, QSTREAM_QUERY_SIDE) == [qv["baseline_id"]]
    finally:
        again.close()
        producer.close()


def _baseline_records(keys: set[str]) -> set[str]:
    """The records of stored versions: ``baseline/``, ``baseline-fit/`` and their chunks."""
    def of(k: str) -> str:  # chunk/<slot>/<i>/<key>
        return k.split("/", 3)[3] if k.startswith("chunk/") else k

    return {k for k in keys if of(k).startswith(("baseline/", "baseline-fit/"))}


def test_a_retired_stream_is_forgotten_by_the_cli_through_a_replica_that_does_not_monitor_it(
        kafka_bootstrap: str, unique_topics: Any, fresh_topic_prefix: str, tmp_path: Path) -> None:
    """Every replica reads every stored baseline of the state topic and held them for ever, a
    retired stream's too. `embedwatch baseline forget` removes a stream's and its query embeddings'
    versions: refused by the replica that monitors it, done by one that holds them without
    monitoring it, which drops them from memory and deletes their records (chunks included)."""
    import os
    import subprocess

    from service_proc import BIN

    emb, qry = unique_topics("embeddings", "queries")
    state_topic = f"{fresh_topic_prefix}-state"
    state = {"backend": "kafka", "topic": state_topic, "checkpoint_interval_s": 1.0}
    # 700 reference events of 768-d: a baseline of about 1.5 MB, written in chunks.
    detection = {"detection": {"reference_size": 700, "window_events": 200}}
    cfg = {**_config(kafka_bootstrap, fresh_topic_prefix, emb, qry, state), **detection}
    rng = np.random.default_rng(4)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=10)
    for topic, extra in ((emb, {}), (qry, {"results": [{"id": "d1", "score": 0.8}]})):
        for v in rng.standard_normal((800, 768)):
            ev = {"model": "m", "model_version": "v1", "ts": time.time(), "embedding": v.tolist(), **extra}
            producer.send(topic, key=QSTREAM.encode(), value=orjson.dumps(ev))
    producer.flush(timeout=60)
    producer.close()

    def forget(svc: ServiceProcess, stream: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "EMBEDWATCH_HTTP__ADMIN_TOKEN": TOKEN}
        return subprocess.run([BIN, "baseline", "forget", stream, "--url", f"http://127.0.0.1:{svc.port}"],
                              capture_output=True, text=True, env=env, timeout=60)

    def versions(svc: ServiceProcess, key: str) -> list[str]:
        return [b["baseline_id"] for b in json.loads(svc.get(f"/api/baselines/{key}")[1])["baselines"]]

    owner = ServiceProcess(tmp_path, cfg, name="owner").start()
    try:
        until(lambda: (versions(owner, QSTREAM), versions(owner, QSTREAM_QUERY_SIDE)),
              lambda v: len(v[0]) == len(v[1]) == 1, "both baselines stored", owner)
        doc_id, query_id = versions(owner, QSTREAM)[0], versions(owner, QSTREAM_QUERY_SIDE)[0]
        refused = forget(owner, QSTREAM)
        assert refused.returncode == 1 and "HTTP 409" in refused.stderr, refused.stderr
        code, _ = owner.terminate()
        assert code == 0, owner.tail()
    finally:
        owner.close()
    stored = _baseline_records(live_keys(kafka_bootstrap, state_topic))
    assert any(k.startswith("chunk/") for k in stored)

    # Another deployment on the same state topic: its own group and topics, every stored baseline held.
    other_emb, other_qry = unique_topics("other-embeddings", "other-queries")
    other_cfg = {**_config(kafka_bootstrap, f"{fresh_topic_prefix}-other", other_emb, other_qry, state), **detection}
    other = ServiceProcess(tmp_path, other_cfg, name="other").start()
    try:
        assert other.metrics()["embedwatch_stored_baselines"][()] == 2
        assert other.metrics()["embedwatch_stored_baseline_bytes"][()] > 0
        done = forget(other, QSTREAM)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["forgotten"] == [
            {"stream": QSTREAM, "baseline_id": doc_id}, {"stream": QSTREAM_QUERY_SIDE, "baseline_id": query_id}]
        for key in (QSTREAM, QSTREAM_QUERY_SIDE):  # no versions, and a stream this replica does not monitor
            assert other.get(f"/api/baselines/{key}")[0] == 404
        assert other.metrics()["embedwatch_stored_baselines"][()] == 0
        assert other.metrics()["embedwatch_stored_baseline_bytes"][()] == 0
        again = forget(other, QSTREAM)
        assert again.returncode == 1 and "HTTP 404" in again.stderr, again.stderr
    finally:
        other.close()
    live = live_keys(kafka_bootstrap, state_topic)
    assert _baseline_records(live) == set(), live
    # What stays: each side's index, saying it was forgotten (for replicas that read it later).
    assert {k for k in live if k.startswith("baseline-index/")} == {
        "baseline-index/m+v1+default", "baseline-index/m+v1+default%2Fquery"}


def _produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=10)
    try:
        for key, value in messages:
            producer.send(topic, key=key, value=value)
        producer.flush(timeout=60)
    finally:
        producer.close()


def _upload(svc: ServiceProcess, file: Path) -> dict[str, Any]:
    """`embedwatch baseline upload FILE --activate` to ``svc``: its answer."""
    import os
    import subprocess

    from service_proc import BIN

    up = subprocess.run([BIN, "baseline", "upload", str(file), "--activate", "--url", f"http://127.0.0.1:{svc.port}"],
                        capture_output=True, text=True, env={**os.environ, "EMBEDWATCH_HTTP__ADMIN_TOKEN": TOKEN},
                        timeout=120)
    assert up.returncode == 0, up.stderr
    doc: dict[str, Any] = json.loads(up.stdout)
    return doc


def test_a_baseline_built_offline_and_uploaded_before_the_rollout_watches_the_stream_from_its_first_event(
        kafka_bootstrap: str, unique_topics: Any, fresh_topic_prefix: str, tmp_path: Path) -> None:
    """The rollout path of a validated baseline: `embedwatch baseline build` on a file of good
    events, `embedwatch baseline upload --activate` to the running service before the stream has
    any event, kept in the state topic across a restart, and the stream's first events compared
    with it: a shift from the first live event alarms before `reference_size` events, where the
    stream would otherwise have taken the shifted events as its reference."""
    import subprocess

    from service_proc import BIN

    emb, qry = unique_topics("embeddings", "queries")
    state = {"backend": "kafka", "topic": f"{fresh_topic_prefix}-state", "checkpoint_interval_s": 1.0}
    cfg = _config(kafka_bootstrap, fresh_topic_prefix, emb, qry, state)
    cfg["detection"] = {"reference_size": 1000, "window_events": 200}
    # The file's events are the generator's first 300; the live ones follow, shifted from the first.
    gen = EventGenerator(GeneratorConfig(streams=1, dim=DIM, seed=8,
                                         faults=[Fault("shift", at=300, stream=0, magnitude=1.0)]))
    good = tmp_path / "good.jsonl"
    good.write_bytes(b"\n".join(value for _key, value in gen.messages(300)) + b"\n")
    built = subprocess.run([BIN, "baseline", "build", str(good), "-o", str(tmp_path / "base"), "--stream", STREAM],
                           capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr

    def stream(svc: ServiceProcess) -> dict[str, Any]:
        st: dict[str, Any] = json.loads(svc.get("/api/streams")[1])["streams"][STREAM]
        return st

    first = ServiceProcess(tmp_path, cfg, name="first").start()
    try:
        done = _upload(first, tmp_path / "base.npz")
        assert done["status"] == "active" and done["stream"] == STREAM and done["monitored_here"] is False
        assert done["source"] == "file:good.jsonl" and done["count"] == 300
        code, _ = first.terminate()
        assert code == 0, first.tail()
    finally:
        first.close()
    _produce(kafka_bootstrap, emb, gen.messages(400))
    again = ServiceProcess(tmp_path, cfg, name="again").start()
    try:
        listed = json.loads(again.get(f"/api/baselines/{STREAM}")[1])["baselines"]
        assert [(b["baseline_id"], b["active"]) for b in listed] == [(done["baseline_id"], True)]
        st = until(lambda: stream(again), lambda s: s["events"] == 400, "the live events", again)
        assert (st["baseline"] or {}).get("baseline_id") == done["baseline_id"], st["baseline"]
        assert st["drifting"] and [a["kind"] for a in st["alarms"]] == ["start"], st["alarms"]
        assert st["alarms"][0]["index"] < 400
    finally:
        again.close()


def test_a_baseline_uploaded_through_one_replica_is_taken_by_the_replica_that_gets_the_stream(
        kafka_bootstrap: str, unique_topics: Any, fresh_topic_prefix: str, tmp_path: Path) -> None:
    """Two services on one state topic, both running before the upload: the one that answers the
    upload does not get the stream's events; the one that does reads the state topic when the
    stream's first events come, and compares them with the upload from the first."""
    from embedwatch.baseline import Baseline
    from embedwatch.baseline_store import save_file
    from embedwatch.config import DetectionSettings
    from embedwatch.events import StreamKey

    state = {"backend": "kafka", "topic": f"{fresh_topic_prefix}-state", "checkpoint_interval_s": 1.0}
    emb, qry = unique_topics("embeddings", "queries")
    cfg = _config(kafka_bootstrap, fresh_topic_prefix, emb, qry, state)
    cfg["detection"] = {"reference_size": 1000, "window_events": 200}
    other_emb, other_qry = unique_topics("other-embeddings", "other-queries")
    other_cfg = {**_config(kafka_bootstrap, f"{fresh_topic_prefix}-other", other_emb, other_qry, state),
                 "detection": cfg["detection"]}
    gen = EventGenerator(GeneratorConfig(streams=1, dim=DIM, seed=9,
                                         faults=[Fault("shift", at=300, stream=0, magnitude=1.0)]))
    x = np.stack([orjson.loads(v)["embedding"] for _k, v in gen.messages(300)])
    b = Baseline.from_vectors(StreamKey.parse(STREAM), x, ts=time.time(), source="file:good.jsonl",
                              settings=DetectionSettings(**cfg["detection"]))
    npz, _js = save_file(b, tmp_path / "base")

    owner = ServiceProcess(tmp_path, cfg, name="owner").start()
    answering = ServiceProcess(tmp_path, other_cfg, name="answering").start()
    try:
        assert _upload(answering, npz)["monitored_here"] is False
        _produce(kafka_bootstrap, emb, gen.messages(400))
        st = until(lambda: json.loads(owner.get("/api/streams")[1])["streams"].get(STREAM),
                   lambda s: s is not None and s["events"] == 400, "the live events", owner)
        # Without the upload it would still collect its reference (1000 events): no baseline yet.
        assert (st["baseline"] or {}).get("baseline_id") == b.baseline_id, st["baseline"]
        assert st["drifting"] and [a["kind"] for a in st["alarms"]] == ["start"], st["alarms"]
    finally:
        answering.close()
        owner.close()
