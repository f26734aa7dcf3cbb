"""Kafka source and dead-letter sink on kafka-python (pure Python, crc32c-accelerated)."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError, MessageSizeTooLargeError, RecordListTooLargeError
from kafka.structs import OffsetAndMetadata, TopicPartition

from embedwatch.config import KafkaSettings, Settings
from embedwatch.events import Message
from embedwatch.sources.base import (
    AckedCommits,
    Committed,
    DeadLetter,
    PartitionId,
    RebalanceListener,
    UnknownTopicError,
    dead_letter_limit,
    shrunk,
)

log = logging.getLogger(__name__)


class _MissingTopicLogs(logging.Filter):
    """Once a minute per topic: kafka-python logs a subscribed topic that does not exist at each
    metadata refresh, and retries those every 100 ms (an error line ten times a second)."""

    EVERY_S = 60.0

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[object, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "Topic %s not found in cluster metadata" or not isinstance(record.args, tuple):
            return True
        topic, now = record.args[0] if record.args else None, time.monotonic()
        if now - self._last.get(topic, -self.EVERY_S) < self.EVERY_S:
            return False
        self._last[topic] = now
        return True


logging.getLogger("kafka.cluster").addFilter(_MissingTopicLogs())

# kafka-python >= 3 bootstraps inside the client constructors and raises after this long; a short
# bound keeps the service loop (SIGTERM, /healthz) responsive while the broker refuses us.
_BOOTSTRAP_TIMEOUT_MS = 5_000


def bootstrap_kwargs(cls: Any) -> dict[str, Any]:
    return {"bootstrap_timeout_ms": _BOOTSTRAP_TIMEOUT_MS} if "bootstrap_timeout_ms" in cls.DEFAULT_CONFIG else {}


def _describe(k: KafkaSettings) -> str:
    """Where and as whom we connect, for error messages; never the password."""
    who = f" as {k.sasl_username!r} ({k.sasl_mechanism})" if k.security_protocol.startswith("SASL") else ""
    return f"{k.bootstrap_servers} over {k.security_protocol}{who}"


def security_kwargs(k: KafkaSettings) -> dict[str, Any]:
    """kafka-python arguments for the configured security settings."""
    kw: dict[str, Any] = {"security_protocol": k.security_protocol}
    if k.security_protocol.startswith("SASL"):
        kw["sasl_mechanism"] = k.sasl_mechanism
        kw["sasl_plain_username"] = k.sasl_username
        kw["sasl_plain_password"] = k.sasl_password.get_secret_value() if k.sasl_password else None
    if k.security_protocol.endswith("SSL"):
        kw["ssl_cafile"] = k.ssl_cafile
        kw["ssl_certfile"] = k.ssl_certfile
        kw["ssl_keyfile"] = k.ssl_keyfile
        kw["ssl_check_hostname"] = k.ssl_check_hostname
    return kw


def no_auto_create(client: Any) -> None:
    """Make a consumer's or producer's metadata requests ask the broker not to create missing
    topics. kafka-python 3.0 accepts ``allow_auto_create_topics`` but does not hand it to the
    cluster metadata that builds the requests (which then ask for creation: a misspelled topic was
    created, and a deleted one created again by the client itself)."""
    for attr in ("_cluster", "_metadata"):  # the consumer's, the producer's
        config = getattr(getattr(client, attr, None), "config", None)
        if isinstance(config, dict) and "allow_auto_create_topics" in config:
            config["allow_auto_create_topics"] = False


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, inner: RebalanceListener | None, acked: AckedCommits) -> None:
        self.inner = inner
        self.acked = acked

    def on_partitions_revoked(self, revoked: Any) -> None:
        parts = [PartitionId(tp.topic, tp.partition) for tp in revoked]
        self.acked.forget(parts)
        if self.inner is not None:
            self.inner.on_revoked(parts)

    def on_partitions_assigned(self, assigned: Any) -> None:
        if self.inner is not None:
            self.inner.on_assigned([PartitionId(tp.topic, tp.partition) for tp in assigned])


class KafkaPythonSource:
    """The consumer is created lazily and re-tried from :meth:`poll` while bootstrapping fails
    (broker down, TLS or SASL authentication refused): the service stays up and unready, logging
    why, instead of dying in the constructor."""

    def __init__(self, settings: Settings, listener: RebalanceListener | None = None) -> None:
        self._settings = settings
        self._listener = listener
        k = settings.kafka
        self._topics = [t for t in (k.embeddings_topic, k.queries_topic) if t]
        self._consumer: KafkaConsumer | None = None
        self._acked = AckedCommits()  # fed by the commit_async callbacks
        self._connected = False
        self._failures = 0
        self._ensure_consumer()

    def _ensure_consumer(self) -> KafkaConsumer | None:
        if self._consumer is not None:
            return self._consumer
        settings, k = self._settings, self._settings.kafka
        try:
            consumer = KafkaConsumer(
                bootstrap_servers=k.bootstrap_servers.split(","),
                group_id=k.group_id,
                client_id=k.client_id,
                enable_auto_commit=False,
                auto_offset_reset=k.auto_offset_reset,
                session_timeout_ms=k.session_timeout_ms,
                heartbeat_interval_ms=max(1000, k.session_timeout_ms // 3),
                max_poll_records=k.max_poll_records,
                max_partition_fetch_bytes=max(1 << 20, settings.limits.max_message_bytes),
                fetch_max_bytes=max(50 << 20, settings.limits.max_message_bytes),
                reconnect_backoff_ms=200,
                reconnect_backoff_max_ms=5000,
                request_timeout_ms=max(30_000, k.session_timeout_ms + 5000),
                # A topic created after the subscription, or new partitions, are found at the next
                # metadata refresh: 5 minutes by default; the cost of 10 s is one small request.
                metadata_max_age_ms=10_000,
                # kafka-python's metadata requests create missing topics by default (on a broker
                # with auto.create.topics.enable): a misspelled topic appeared, empty and healthy,
                # and a deleted one was created again by the consumer itself.
                allow_auto_create_topics=False,
                **bootstrap_kwargs(KafkaConsumer),
                **security_kwargs(k),
            )
        except KafkaError as e:
            self._failures += 1
            # The cause (e.g. SaslAuthenticationFailedError) is logged by kafka-python just before.
            log.error("kafka: cannot connect to %s (attempt %d): %s; not ready, retrying",
                      _describe(k), self._failures, e)
            return None
        if self._failures:
            log.info("kafka: connected to %s after %d failed attempts", _describe(k), self._failures)
            self._failures = 0
        no_auto_create(consumer)  # before subscribe(): its metadata requests name the topics
        consumer.subscribe(self._topics, listener=_Listener(self._listener, self._acked))
        for topic in self._topics:
            # Fetch the topics' metadata after subscribing and before joining (the join happens in
            # the first poll). Before joining: a first join without partition metadata (a topic
            # created moments ago) gets an empty assignment, and a rejoin follows. After
            # subscribing: kafka-python 3.0 keeps its snapshot of the subscribed topics' partitions
            # only from metadata that arrives while subscribed, so metadata fetched before
            # subscribe() left the leader's first snapshot empty; the refresh that came 0.1-0.3 s
            # after the first assignment then revoked it and rejoined, at every start. With durable
            # state, 1 in 30-50 starts stalled in that rejoin (the leader's SyncGroup went unanswered).
            # A missing topic is fine: it is joined later through the metadata refresh above.
            try:
                if not consumer.partitions_for_topic(topic):
                    log.warning("kafka: topic %s does not exist; it is consumed once created", topic)
            except KafkaError as e:
                log.warning("kafka: no metadata for topic %s yet: %s", topic, e)
        self._consumer = consumer
        return consumer

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
        consumer = self._ensure_consumer()
        if consumer is None:
            return []
        # No local of this frame may hold the batch. When kafka-python's wait for a fetch times out,
        # it keeps the frames of that wait in a reference cycle (a stored exception and its
        # traceback), and Python 3.11 links a kept frame to its callers' frames, this one included,
        # with whatever locals they held when they returned: a batch held here stayed in memory
        # until the next cyclic collection, minutes away with the service's collector settings
        # (2-3 batches a minute in a soak at 2,000 events/s; RSS rose 25-50 MB between collections).
        return self._messages(consumer.poll(timeout_ms=timeout_ms, max_records=max_records))

    def _messages(self, records: dict[Any, list[Any]]) -> list[Message]:
        """The polled records as messages; ``records`` is emptied (kafka-python's own frames of
        the poll, when kept as :meth:`poll` says, hold it too, and with it every record's value)."""
        out: list[Message] = []
        append = out.append
        # Positional arguments, no header tuple unless there are headers: 0.3 µs a record, not 1.2.
        for tp, recs in records.items():
            topic, partition = tp.topic, tp.partition
            for r in recs:
                v, hs = r.value, r.headers
                append(Message(v if v is not None else b"", topic, partition, r.offset, r.timestamp, r.key,
                               tuple((h[0], h[1] or b"") for h in hs) if hs else ()))
            recs.clear()
        records.clear()
        if out:
            self._connected = True
        return out

    @property
    def _client(self) -> KafkaConsumer:
        if self._consumer is None:  # only reachable with an assignment, i.e. after a connect
            raise KafkaError("not connected")
        return self._consumer

    def commit(self, positions: dict[PartitionId, Committed], asynchronous: bool = False) -> None:
        if not positions:
            return
        offsets = {
            TopicPartition(p.topic, p.partition): OffsetAndMetadata(c.offset, c.metadata, -1)
            for p, c in positions.items()
        }
        if asynchronous:
            self._client.commit_async(offsets, callback=self._on_commit)
        else:
            self._client.commit(offsets)

    def _on_commit(self, offsets: Any, response: Any) -> None:
        # Invoked from poll(): the completion of an asynchronous commit.
        if isinstance(response, Exception):
            log.debug("asynchronous commit failed: %s", response)
            return
        for tp, om in offsets.items():
            self._acked.record(tp.topic, tp.partition, om.offset)

    def landed(self, positions: dict[PartitionId, Committed]) -> bool:
        return self._acked.landed(positions)

    def committed(self, partitions: Sequence[PartitionId],
                  timeout_s: float | None = None) -> dict[PartitionId, Committed | None]:
        out: dict[PartitionId, Committed | None] = {}
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for p in partitions:
            left = None if deadline is None else max(1, int(1000 * (deadline - time.monotonic())))
            om = self._client.committed(TopicPartition(p.topic, p.partition), metadata=True, timeout_ms=left)
            out[p] = None if om is None or om.offset is None or om.offset < 0 else Committed(
                om.offset, om.metadata or ""
            )
        return out

    def assignment(self) -> set[PartitionId]:
        if self._consumer is None:
            return set()
        return {PartitionId(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def end_offsets(self, partitions: Sequence[PartitionId]) -> dict[PartitionId, int]:
        since_ms = time.monotonic() * 1000
        try:
            ends = self._client.end_offsets(
                [TopicPartition(p.topic, p.partition) for p in partitions], timeout_ms=3000
            )
        except Exception as e:
            # kafka-python times out the same way whether the broker is away or the partition is
            # not there (and raises KeyError when only some are not there): the metadata it
            # refreshed meanwhile tells which.
            unknown = self._unknown(partitions, since_ms)
            self._connected = unknown is not None  # the broker answered that
            if unknown is not None:
                raise unknown from e
            raise
        self._connected = True
        return {PartitionId(tp.topic, tp.partition): int(o) for tp, o in ends.items()}

    def _unknown(self, partitions: Sequence[PartitionId], since_ms: float) -> UnknownTopicError | None:
        """The partitions missing from cluster metadata the broker sent after ``since_ms``
        (monotonic), among topics that metadata was asked for; None when no such answer came."""
        cluster = getattr(self._consumer, "_cluster", None)
        answered = getattr(cluster, "_last_successful_refresh_ms", None)
        asked = getattr(cluster, "_topics", None)
        if cluster is None or not isinstance(answered, (int, float)) or answered < since_ms or asked is None:
            return None
        topics: set[str] = set()
        missing: list[PartitionId] = []
        for p in partitions:
            if p.topic not in asked:
                return None
            known = cluster.partitions_for_topic(p.topic)
            if known is None:
                topics.add(p.topic)
            elif p.partition not in known:
                missing.append(p)
        return UnknownTopicError(topics, missing) if topics or missing else None

    def position(self, partition: PartitionId) -> int | None:
        try:
            return int(self._client.position(TopicPartition(partition.topic, partition.partition),
                                               timeout_ms=1000))
        except Exception:
            return None

    def connected(self) -> bool:
        return self._connected

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close(autocommit=False)


class KafkaPythonDeadLetterSink:
    """The producer is created at the first dead letter: kafka-python bootstraps in the
    constructor, which must not block (or kill) startup while the broker refuses us."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._producer: KafkaProducer | None = None
        # (future, record) pairs not yet acknowledged: a failed flush can be retried without
        # losing or duplicating the records that did get through.
        self._pending: list[tuple[Any, DeadLetter]] = []

    def _client(self) -> KafkaProducer:
        if self._producer is None:
            settings, k = self._settings, self._settings.kafka
            self._producer = KafkaProducer(
                bootstrap_servers=k.bootstrap_servers.split(","),
                client_id=f"{k.client_id}-dlq",
                acks="all",
                linger_ms=5,
                max_request_size=dead_letter_limit(settings.limits.max_message_bytes),
                retries=2**31 - 1,
                max_block_ms=5000,  # fail fast while the broker is away; the loop retries with backoff
                **security_kwargs(k),
            )
        return self._producer

    def send(self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        record = DeadLetter(topic, value, key, headers)
        self._pending.append((self._client().send(topic, value=value, key=key, headers=headers), record))

    def flush(self, timeout_s: float) -> None:
        """Wait for every pending record; re-send the failed ones once and raise if any is left."""
        if not self._pending:
            return
        producer = self._client()
        try:
            producer.flush(timeout=timeout_s)
        except KafkaError as e:
            log.warning("dead-letter flush: %s", e)
        left: list[tuple[Any, DeadLetter]] = []
        errors = []
        for fut, record in self._pending:
            if not fut.is_done:
                left.append((fut, record))
            elif fut.failed():
                errors.append(fut.exception)
                if isinstance(fut.exception, (MessageSizeTooLargeError, RecordListTooLargeError)):
                    record = shrunk(record)  # the broker refuses its size: the same record, for ever
                topic, value, key, headers = record
                left.append((producer.send(topic, value=value, key=key, headers=headers), record))
        self._pending = left
        if left:
            raise KafkaError(f"{len(left)} dead letters not acknowledged yet ({errors[:1]})")

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)
