"""The Kafka sources against a real broker: topics that change under a running consumer, and
topics that are not there."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kafka import KafkaProducer
from kafka.admin import NewPartitions

from embedwatch.config import Settings
from embedwatch.sources import PartitionId, Source, UnknownTopicError, open_kafka_source
from kafka_broker import LocalKafka, create_topics

pytestmark = pytest.mark.integration

BACKENDS = ["kafka-python", "confluent"]


def _open(bootstrap: str, group: str, topic: str, backend: str) -> Source:
    return open_kafka_source(Settings(
        kafka={"bootstrap_servers": bootstrap, "group_id": group, "embeddings_topic": topic,  # type: ignore[arg-type]
               "queries_topic": None, "backend": backend, "session_timeout_ms": 6000},
        state={"backend": "none"}))


@pytest.fixture
def sources() -> Iterator[Callable[[str, str, str, str], Source]]:
    opened: list[Source] = []

    def make(bootstrap: str, group: str, topic: str, backend: str) -> Source:
        opened.append(_open(bootstrap, group, topic, backend))
        return opened[-1]

    yield make
    for source in opened:
        source.close()


def _poll_until(source: Source, done: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        source.poll(100, 200)


def _poll_for(source: Source, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        source.poll(100, 200)


def _topics(kafka_admin: object) -> set[str]:
    return set(kafka_admin.list_topics())  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", ["confluent"])
def test_partitions_added_to_the_topic_are_consumed(kafka_bootstrap: str, kafka_admin: object, unique_topics,
                                                    fresh_topic_prefix: str, sources, backend: str) -> None:
    """A topic grown from 1 to 3 partitions while the consumer runs: the new partitions are
    assigned and their events consumed at the next metadata refresh (10 s), not minutes later
    (librdkafka's default refresh is 5 minutes). Not run on kafka-python: its leader's rejoin
    after the change stalls in about a third of the runs (no SyncGroup completes within 45 s)."""
    (topic,) = unique_topics("embeddings", partitions=1)
    source = sources(kafka_bootstrap, f"{fresh_topic_prefix}-group", topic, backend)
    _poll_until(source, lambda: source.assignment() == {PartitionId(topic, 0)}, 60, "the first assignment")
    kafka_admin.create_partitions({topic: NewPartitions(3)})  # type: ignore[attr-defined]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    try:
        producer.send(topic, value=b"on partition 2", partition=2)
        producer.flush(timeout=30)
    finally:
        producer.close()
    got: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + 45
    while not any(p == 2 for p, _ in got):
        assert time.monotonic() < deadline, f"partition 2 not consumed within 45 s; assigned {source.assignment()}"
        got += [(m.partition, m.value) for m in source.poll(100, 200)]
    assert got == [(2, b"on partition 2")]
    assert source.assignment() == {PartitionId(topic, p) for p in range(3)}


def _require_auto_creation(kafka_bootstrap: str, kafka_admin: object, name: str) -> None:
    """Skip unless the broker creates a topic for a client that asks (``auto.create.topics.enable``):
    a consumer that would create its topics could not be told apart otherwise."""
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)  # kafka-python asks for creation
    try:
        producer.partitions_for(name)
    except Exception:  # a broker that refuses creation times out here
        pass
    finally:
        producer.close()
    if name not in _topics(kafka_admin):
        pytest.skip("the broker does not create topics on request (auto.create.topics.enable=false)")
    kafka_admin.delete_topics([name])  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_topic_that_does_not_exist_is_not_created_and_is_reported(kafka_bootstrap: str, kafka_admin: object,
                                                                     fresh_topic_prefix: str, sources,
                                                                     caplog: pytest.LogCaptureFixture,
                                                                     backend: str) -> None:
    """A misspelled topic stays missing (the consumer does not ask the broker to create it), and
    the source says that it does not exist, not that the broker is away: in the log, once (not
    at each of kafka-python's metadata retries, ten a second), and from end_offsets."""
    _require_auto_creation(kafka_bootstrap, kafka_admin, f"{fresh_topic_prefix}-control")
    topic = f"{fresh_topic_prefix}-embedings"
    caplog.set_level(logging.WARNING)
    source = sources(kafka_bootstrap, f"{fresh_topic_prefix}-group", topic, backend)
    try:
        _poll_for(source, 12)  # past a metadata refresh (10 s)
        about = [r.getMessage() for r in caplog.records if topic in r.getMessage()]
        assert [m for m in about if m.startswith(f"kafka: topic {topic} does not exist")], about
        assert len(about) <= 3, about
        assert topic not in _topics(kafka_admin)
        assert source.assignment() == set()
        with pytest.raises(UnknownTopicError) as e:
            source.end_offsets([PartitionId(topic, 0)])
        assert e.value.topics == (topic,) and str(e.value) == f"topic {topic!r} does not exist"
        assert source.connected()  # the broker answered
        assert topic not in _topics(kafka_admin)
    finally:
        if topic in _topics(kafka_admin):
            kafka_admin.delete_topics([topic])  # type: ignore[attr-defined]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_deleted_topic_is_not_created_again_and_is_reported(kafka_bootstrap: str, kafka_admin: object,
                                                              unique_topics, fresh_topic_prefix: str, sources,
                                                              backend: str) -> None:
    _require_auto_creation(kafka_bootstrap, kafka_admin, f"{fresh_topic_prefix}-control")
    (topic,) = unique_topics("embeddings", partitions=2)
    source = sources(kafka_bootstrap, f"{fresh_topic_prefix}-group", topic, backend)
    both = [PartitionId(topic, 0), PartitionId(topic, 1)]
    _poll_until(source, lambda: source.assignment() == set(both), 60, "the assignment")
    assert source.end_offsets(both) == {p: 0 for p in both}
    kafka_admin.delete_topics([topic])  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while True:
        source.poll(100, 200)
        try:
            source.end_offsets(both)
        except UnknownTopicError as e:
            assert e.topics == (topic,) and e.partitions == ()
            break
        assert time.monotonic() < deadline, "the deletion was not reported within 30 s"
    _poll_for(source, 12)  # past a metadata refresh (10 s)
    assert topic not in _topics(kafka_admin)
    # The group lets the partitions go. The rejoin starts at the consumer's own metadata refresh
    # and kafka-python keeps the old assignment until it completes, which once took longer than
    # the 12 s above under the full suite's load: a deadline, as for the assignment at the start.
    _poll_until(source, lambda: source.assignment() == set(), 60, "the group letting the partitions go")
    assert topic not in _topics(kafka_admin)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_partition_beyond_the_topic_is_reported_as_unknown(kafka_bootstrap: str, unique_topics,
                                                             fresh_topic_prefix: str, sources,
                                                             backend: str) -> None:
    (topic,) = unique_topics("embeddings", partitions=2)
    source = sources(kafka_bootstrap, f"{fresh_topic_prefix}-group", topic, backend)
    _poll_until(source, lambda: len(source.assignment()) == 2, 60, "the assignment")
    with pytest.raises(UnknownTopicError) as e:
        source.end_offsets([PartitionId(topic, 0), PartitionId(topic, 5)])
    assert (e.value.topics, e.value.partitions) == ((), (PartitionId(topic, 5),))
    assert str(e.value) == f"topic {topic!r} has no partition 5"


@pytest.fixture(scope="module")
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """A broker of this module's own: stopped and started by the tests."""
    broker = LocalKafka(Path(tmp_path_factory.mktemp("kafka")))
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_broker_that_does_not_answer_is_not_an_unknown_topic(own_broker: LocalKafka, fresh_topic_prefix: str,
                                                               sources, backend: str) -> None:
    """With the broker away, librdkafka reports the partitions as unknown too, and kafka-python
    times out as it does for a partition that does not exist: neither is taken for a missing topic."""
    from kafka import KafkaAdminClient

    bootstrap = own_broker.start() if not own_broker.is_running() else own_broker.bootstrap_servers
    assert bootstrap is not None
    topic = f"{fresh_topic_prefix}-embeddings"
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        create_topics(admin, [topic], partitions=1)
    finally:
        admin.close()
    source = sources(bootstrap, f"{fresh_topic_prefix}-group", topic, backend)
    p = PartitionId(topic, 0)
    _poll_until(source, lambda: source.assignment() == {p}, 90, "the assignment")
    assert source.end_offsets([p]) == {p: 0}
    own_broker.stop()
    try:
        errors: list[Exception] = []
        for _ in range(6):  # the confluent source asks the broker at every 5th call
            source.poll(100, 200)
            try:
                source.end_offsets([p])
            except Exception as e:  # which error it is, is the point
                errors.append(e)
                break
        assert errors, "end_offsets answered with the broker stopped"
        assert not [e for e in errors if isinstance(e, UnknownTopicError)]
        assert not source.connected()
    finally:
        own_broker.start()
