"""Smoke test of the test broker itself: topics, produce, group consume, commits."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

pytestmark = pytest.mark.integration

PARTITIONS = 3
MESSAGES = 100


def test_produce_consume_and_commit(kafka_bootstrap: str, unique_topics, fresh_topic_prefix: str) -> None:
    (topic,) = unique_topics("events", partitions=PARTITIONS)
    group = f"{fresh_topic_prefix}-group"

    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=5)
    try:
        assert producer.partitions_for(topic) == set(range(PARTITIONS))
        futures = [
            producer.send(topic, key=f"key-{i}".encode(), value=f"value-{i}".encode())
            for i in range(MESSAGES)
        ]
        producer.flush(timeout=30)
        produced = Counter(future.get(timeout=30).partition for future in futures)
    finally:
        producer.close(timeout=10)
    # Keys hash onto every partition, so the group below really has to read all three.
    assert sorted(produced) == list(range(PARTITIONS))
    assert sum(produced.values()) == MESSAGES

    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=kafka_bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    received: dict[bytes, bytes] = {}
    try:
        deadline = time.monotonic() + 60
        while len(received) < MESSAGES and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    received[record.key] = record.value
        assert len(received) == MESSAGES
        assert received == {f"key-{i}".encode(): f"value-{i}".encode() for i in range(MESSAGES)}
        consumer.commit()
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        end_offsets = consumer.end_offsets(partitions)
    finally:
        consumer.close()

    assert {tp.partition: offset for tp, offset in end_offsets.items()} == dict(produced)

    # A fresh, unsubscribed member reads the offsets back from the group coordinator.
    checker = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=group, enable_auto_commit=False)
    try:
        committed = {tp.partition: checker.committed(tp) for tp in partitions}
    finally:
        checker.close()
    assert committed == dict(produced)
