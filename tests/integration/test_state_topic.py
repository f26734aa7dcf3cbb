"""The kafka state backend's topic against the real broker: a topic that would delete stored
baselines is refused, and a topic deleted while the service runs comes back compacted, not as the
broker's plain auto-created topic."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import pytest
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import KafkaError

from embedwatch.config import Settings
from embedwatch.state import KafkaStateBackend, StateError
from kafka_broker import live_keys

pytestmark = pytest.mark.integration


def _backend(bootstrap: str, topic: str) -> KafkaStateBackend:
    # Metadata refreshed every 2 s: another replica's view of a topic created again is seen fast.
    return KafkaStateBackend(_settings(bootstrap, topic), metadata_max_age_ms=2000)


def _settings(bootstrap: str, topic: str) -> Settings:
    return Settings(kafka={"bootstrap_servers": bootstrap}, state={"backend": "kafka", "topic": topic})  # type: ignore[arg-type]


def _policy(admin: Any, topic: str) -> str:
    got = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic, configs=["cleanup.policy"])],
                                 config_filter="all")
    return str(got["topic"][topic]["cleanup.policy"]["value"])


def _produce(bootstrap: str, topic: str, messages: list[tuple[Any, bytes]], partition_of: dict[Any, int]) -> None:
    """Each stream's events to the partition given for it (its key), acknowledged."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    for k, v in messages:
        p.send(topic, key=k, value=v, partition=partition_of[k])
    p.flush(timeout=120)
    p.close()


def _wait(what: str, cond: Any, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_a_state_topic_that_deletes_its_records_is_refused_until_it_is_compacted(
        kafka_bootstrap: str, kafka_admin: Any, fresh_topic_prefix: str) -> None:
    """A state topic created by hand (or by a broker's auto-creation) with the default policy
    deletes the baselines after its retention: refused with the fix, then taken once compacted."""
    topic = f"{fresh_topic_prefix}-state"
    kafka_admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"cleanup.policy": "delete"})])
    try:
        _wait("the topic", lambda: topic in kafka_admin.list_topics())
        with pytest.raises(StateError, match=r"cleanup\.policy=delete .*kafka-configs\.sh .*--entity-name "
                                             + topic):
            KafkaStateBackend(_settings(kafka_bootstrap, topic))
        kafka_admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic,
                                                  configs={"cleanup.policy": "compact,delete"})])
        _wait("the new policy", lambda: _policy(kafka_admin, topic) == "compact,delete")
        # Compacted, but old records are still deleted after the retention.
        with pytest.raises(StateError, match=r"cleanup\.policy=compact,delete with retention\.ms="):
            KafkaStateBackend(_settings(kafka_bootstrap, topic))
        kafka_admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic,
                                                  configs={"cleanup.policy": "compact"})])
        _wait("the new policy", lambda: _policy(kafka_admin, topic) == "compact")
        backend = KafkaStateBackend(_settings(kafka_bootstrap, topic))
        backend.write({"k": b"v"})
        assert backend.read_all() == {"k": b"v"}
        backend.close()
    finally:
        kafka_admin.delete_topics([topic])


def test_a_state_topic_deleted_while_running_is_created_again_compacted(
        kafka_bootstrap: str, kafka_admin: Any, fresh_topic_prefix: str) -> None:
    """Deleted under a running backend: the backend's clients do not create it again (a broker
    with auto-creation would make it a plain topic, deleting the state after its retention); the
    first write that fails creates it compacted and moves the epoch, and the write tried again
    lands in it."""
    topic = f"{fresh_topic_prefix}-state"
    backend = _backend(kafka_bootstrap, topic)
    other = _backend(kafka_bootstrap, topic)  # another replica
    idle = _backend(kafka_bootstrap, topic)  # a replica that neither writes nor fails meanwhile
    # One whose metadata is 5 minutes old when it reads (kafka-python's default age, the worst case).
    reader = KafkaStateBackend(_settings(kafka_bootstrap, topic), metadata_max_age_ms=300_000)
    try:
        assert _policy(kafka_admin, topic) == "compact"
        backend.write({"k": b"v1", "other": b"x"})
        assert backend.read_new() == {"k": b"v1", "other": b"x"}
        other.write({"o": b"1"})
        assert idle.read_new() == reader.read_new() == {"k": b"v1", "other": b"x", "o": b"1"}
        for deleted_at in (1, 2):
            kafka_admin.delete_topics([topic])
            _wait("the deletion", lambda: topic not in kafka_admin.list_topics())
            with pytest.raises(KafkaError):  # a checkpoint's write, or a read at an assignment
                backend.write({"k": b"v2"}) if deleted_at == 1 else backend.read_new()
            assert backend.epoch == deleted_at
            assert topic in kafka_admin.list_topics()
            assert _policy(kafka_admin, topic) == "compact"
            backend.write({"k": b"v2"})  # the caller's retry
            assert backend.read_new() == {"k": b"v2"}  # read from the new topic's start
            assert backend.epoch == deleted_at
            if deleted_at == 1:
                # Its metadata still names the deleted topic, but its position lies beyond the new
                # topic's end: it reads the new topic from its start (an assignment right after
                # another replica created it again), and counts the loss.
                assert reader.read_new() == {"k": b"v2"}
                assert reader.epoch == 1
            # The other replica's writes go on by name, into the new topic; its metadata's topic
            # id tells it, at its checkpoint pass (refresh), that what it wrote before is gone.
            deadline = time.monotonic() + 30
            while other.epoch < deleted_at and time.monotonic() < deadline:
                with contextlib.suppress(KafkaError):  # it may find the topic gone itself first
                    other.write({"o": b"1"})
                other.refresh()
                time.sleep(0.5)
            assert other.epoch == deleted_at
            # The idle one learns it at its next checkpoint pass (refresh) or read, and reads the
            # new topic from its start.
            deadline = time.monotonic() + 30
            while idle.epoch < deleted_at and time.monotonic() < deadline:
                idle.refresh()
                time.sleep(0.5)
            assert idle.epoch == deleted_at
            assert idle.read_new().get("k") == b"v2"
    finally:
        backend.close()
        other.close()
        idle.close()
        reader.close()
    fresh = KafkaStateBackend(_settings(kafka_bootstrap, topic))
    try:
        assert fresh.read_all() == {"k": b"v2", "o": b"1"}  # what was written before the deletion is gone
    finally:
        fresh.close()
        kafka_admin.delete_topics([topic])


def test_a_state_topic_created_again_by_another_client_as_a_plain_topic_is_reported(
        kafka_bootstrap: str, kafka_admin: Any, fresh_topic_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """Deleted, then created again by some other client with the broker's default policy: writes
    by name succeed, so only the topic's id tells the loss; the new topic's policy is reported
    at once (a restart would refuse it), never called compacted."""
    topic = f"{fresh_topic_prefix}-state"
    backend = _backend(kafka_bootstrap, topic)
    try:
        backend.write({"k": b"v1"})
        kafka_admin.delete_topics([topic])
        _wait("the deletion", lambda: topic not in kafka_admin.list_topics())
        kafka_admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"cleanup.policy": "delete"})])
        _wait("the plain topic", lambda: topic in kafka_admin.list_topics())
        deadline = time.monotonic() + 30
        with caplog.at_level("ERROR", logger="embedwatch.state"):
            while backend.epoch == 0 and time.monotonic() < deadline:
                with contextlib.suppress(KafkaError):  # until its metadata has the new topic
                    backend.write({"k": b"v2"})
                backend.refresh()
                time.sleep(0.5)
        assert backend.epoch == 1
        assert "exists again" in caplog.text
        assert "has cleanup.policy=delete" in caplog.text and "A restart refuses it" in caplog.text
        with pytest.raises(StateError, match=r"cleanup\.policy=delete"):
            KafkaStateBackend(_settings(kafka_bootstrap, topic))
    finally:
        backend.close()
        kafka_admin.delete_topics([topic])


def test_the_service_writes_its_state_again_into_a_state_topic_deleted_under_it(
        kafka_bootstrap: str, kafka_admin: Any, unique_topics, fresh_topic_prefix: str,  # type: ignore[no-untyped-def]
        tmp_path: Path) -> None:
    """The real service, its state topic deleted while it runs: it goes on consuming, counts the
    loss (EmbedwatchStateLost's series), and its next checkpoints land in a compacted topic created
    again, the unchanged partition's included."""
    from embedwatch.produce import EventGenerator, GeneratorConfig
    from service_proc import ServiceProcess, metric_sum

    (topic,) = unique_topics("embeddings", partitions=2)
    unique_topics("embeddings.dlq", partitions=1)
    state_topic = f"{fresh_topic_prefix}-state"
    messages = EventGenerator(GeneratorConfig(streams=2, dim=32, seed=3)).messages(3000)
    streams = sorted({k for k, _ in messages})
    assert len(streams) == 2
    _produce(kafka_bootstrap, topic, messages[:2000], {streams[0]: 0, streams[1]: 1})
    group = f"{fresh_topic_prefix}-g"
    cfg = {"kafka": {"bootstrap_servers": kafka_bootstrap, "group_id": group, "backend": "confluent",
                     "embeddings_topic": topic, "queries_topic": None, "session_timeout_ms": 6000},
           "state": {"backend": "kafka", "topic": state_topic, "checkpoint_interval_s": 1.0}}
    svc = ServiceProcess(tmp_path, cfg, "svc").start()
    lost = "embedwatch_state_storage_lost_total"
    try:
        svc.wait_for(lambda m: metric_sum(m, "embedwatch_consumed_events_total") >= 2000
                     and metric_sum(m, "embedwatch_checkpoints_total") >= 2, timeout=120, what="checkpointed")
        assert metric_sum(svc.metrics(), lost) == 0
        keys = {f"ckpt/{group}/{topic}/{p}" for p in (0, 1)}
        assert keys <= live_keys(kafka_bootstrap, state_topic)
        kafka_admin.delete_topics([state_topic])
        _wait("the deletion", lambda: state_topic not in kafka_admin.list_topics())
        # Only partition 0 gets events from now on: partition 1's state is unchanged, and only
        # the new topic's loss makes it written again.
        more = [m for m in messages[2000:] if m[0] == streams[0]]
        _produce(kafka_bootstrap, topic, more, {streams[0]: 0})
        got = svc.wait_for(lambda m: metric_sum(m, lost) >= 1
                           and metric_sum(m, "embedwatch_consumed_events_total") >= 2000 + len(more),
                           timeout=120, what="the state topic created again")
        assert metric_sum(got, lost) == 1
        _wait("both checkpoints in the new topic", lambda: keys <= live_keys(kafka_bootstrap, state_topic),
              timeout_s=60)
        assert _policy(kafka_admin, state_topic) == "compact"
        assert "was deleted while embedwatch ran and exists again" in svc.tail(400)
    finally:
        svc.close()
        kafka_admin.delete_topics([state_topic])
