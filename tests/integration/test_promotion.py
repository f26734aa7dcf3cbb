"""Promotion against the real broker and service: a drifting stream is promoted, its next events
become its baseline, and the alarm ends when that baseline takes over."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaProducer

from embedwatch.produce import EventGenerator, Fault, GeneratorConfig
from service_proc import ServiceProcess

pytestmark = pytest.mark.integration

DIM = 32
TOKEN = "promotion-test-admin-token-4f1c9e"
STREAM = "model-0/v1/default"


def _until(get: Callable[[], Any], ok: Callable[[Any], bool], what: str, svc: ServiceProcess,
           timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = get()
            if ok(last):
                return last
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what} not reached in {timeout}s; last: {last}\n{svc.tail()}")


def test_promotion_collects_the_next_events_and_ends_the_alarm(
        kafka_bootstrap: str, unique_topics: Any, fresh_topic_prefix: str, tmp_path: Path) -> None:
    emb, qry = unique_topics("embeddings", "queries")
    cfg: dict[str, Any] = {
        "kafka": {"bootstrap_servers": kafka_bootstrap, "group_id": f"{fresh_topic_prefix}-group",
                  "embeddings_topic": emb, "queries_topic": qry, "max_poll_records": 500,
                  "session_timeout_ms": 6000},
        "http": {"admin_token": TOKEN},
        "detection": {"reference_size": 200, "window_events": 200},
        "state": {"backend": "none"},
    }
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
        _until(stream, lambda st: st["drifting"] and st["events"] == 1000, "the shift's alarm", svc)
        status, body = svc.request("POST", f"/api/baselines/{STREAM}/promote", b'{"events": 200}',
                                   {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
        assert status == 202, body
        assert json.loads(body) == {"status": "collecting", "stream": STREAM, "events": 0, "needed": 200}
        assert stream()["promotion"] == {"events": 0, "needed": 200}
        assert versions() == [("first_events", 200, True)]  # nothing changes before the events arrive
        send(300)  # still shifted: the stream's new normal
        _until(versions, lambda v: v == [("first_events", 200, False), ("promoted", 200, True)],
               "the promoted baseline", svc)
        st = _until(stream, lambda s: s["events"] == 1300, "the last events", svc)
        assert st["promotion"] is None and not st["drifting"]
        assert st["baseline"]["source"] == "promoted" and st["alarms"][-1]["kind"] == "end"
        # The new baseline is the new normal: the 100 events after it raise no alarm.
        assert sum(a["kind"] == "start" for a in st["alarms"]) == 1
    finally:
        producer.close()
        svc.close()
