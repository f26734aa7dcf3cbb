"""How the loop confirms a batch's asynchronous commit, against the real broker."""

from __future__ import annotations

import time

import pytest

from embedwatch.app import Ledger, Service
from embedwatch.config import Settings
from embedwatch.sources import Committed, PartitionId, open_kafka_source

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("backend", ["kafka-python", "confluent"])
def test_an_asynchronous_commit_is_confirmed_by_reading_it_back(kafka_bootstrap: str, unique_topics,
                                                                 fresh_topic_prefix: str, backend: str) -> None:
    """librdkafka serves a commit's completion from the consumer queue, behind the records already
    fetched: without a poll the client never learns that it landed. Reading the positions back
    finds it (and the metadata each client stores, confluent-kafka's with a trailing NUL, compares
    as the same ledger); other positions are not taken for it."""
    (topic,) = unique_topics("embeddings", partitions=1)
    settings = Settings(kafka={"bootstrap_servers": kafka_bootstrap,  # type: ignore[arg-type]
                               "group_id": f"{fresh_topic_prefix}-group", "embeddings_topic": topic,
                               "queries_topic": None, "backend": backend, "session_timeout_ms": 6000},
                        state={"backend": "none"})
    svc = Service(settings)
    source = open_kafka_source(settings, listener=svc)
    p = PartitionId(topic, 0)
    try:
        deadline = time.monotonic() + 60
        while p not in svc._assigned:
            assert time.monotonic() < deadline, "no assignment within 60 s"
            source.poll(100, 200)
            svc._load_assignment(source)
        want = {p: Committed(7, Ledger(6, 1).encode())}
        assert not svc._held_by_broker(source, want)  # nothing committed yet
        source.commit(want, asynchronous=True)
        # No poll from here on.
        t0 = time.monotonic()
        while not svc._held_by_broker(source, want):
            assert time.monotonic() - t0 < 10, "the commit was not read back within 10 s"
            time.sleep(0.01)
        if backend == "confluent":
            assert not source.landed(want)  # its completion still waits in the consumer queue
        assert not svc._held_by_broker(source, {p: Committed(7, Ledger(7, 0).encode())})
        assert not svc._held_by_broker(source, {p: Committed(8, want[p].metadata)})
    finally:
        source.close()
