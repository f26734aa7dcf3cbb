"""Kafka source and dead-letter sink on confluent-kafka (librdkafka): the high-throughput backend."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

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

#: What librdkafka answers for a partition it has no metadata of: a topic or partition that does
#: not exist, but also (``_UNKNOWN_PARTITION``) one whose brokers are all down.
_UNKNOWN = (KafkaError._UNKNOWN_PARTITION, KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART)


def security_config(k: KafkaSettings) -> dict[str, Any]:
    """librdkafka properties for the configured security settings."""
    conf: dict[str, Any] = {"security.protocol": k.security_protocol}
    if k.security_protocol.startswith("SASL"):
        conf["sasl.mechanism"] = k.sasl_mechanism
        conf["sasl.username"] = k.sasl_username
        conf["sasl.password"] = k.sasl_password.get_secret_value() if k.sasl_password else None
    if k.security_protocol.endswith("SSL"):
        for key, value in (("ssl.ca.location", k.ssl_cafile), ("ssl.certificate.location", k.ssl_certfile),
                           ("ssl.key.location", k.ssl_keyfile)):
            if value:
                conf[key] = value
        conf["ssl.endpoint.identification.algorithm"] = "https" if k.ssl_check_hostname else "none"
    return conf


class ConfluentSource:
    def __init__(self, settings: Settings, listener: RebalanceListener | None = None) -> None:
        k = settings.kafka
        self._listener = listener
        self._connected = False
        self._probes = 0
        self._acked = AckedCommits()  # fed by on_commit
        self._consumer = Consumer({
            "bootstrap.servers": k.bootstrap_servers,
            "group.id": k.group_id,
            "client.id": k.client_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": k.auto_offset_reset,
            "session.timeout.ms": k.session_timeout_ms,
            "heartbeat.interval.ms": max(1000, k.session_timeout_ms // 3),
            "max.partition.fetch.bytes": max(1 << 20, settings.limits.max_message_bytes),
            "fetch.max.bytes": max(50 << 20, settings.limits.max_message_bytes),
            "reconnect.backoff.ms": 200,
            # Once a partition's prefetch queue passes its thresholds (queued.min.messages,
            # queued.max.messages.kbytes), librdkafka waits fetch.queue.backoff.ms (1 s by default)
            # before fetching it again. The service drains the queue sooner than that and then sat
            # idle in consume(): about a fifth of a run on a backlog (py-spy). 10 ms keeps it fed.
            "fetch.queue.backoff.ms": 10,
            "reconnect.backoff.max.ms": 5000,
            # Partitions added to a subscribed topic (or a topic created after the subscription)
            # are found at the next metadata refresh: every 5 minutes by default. 10 s, as the
            # kafka-python backend: one small request.
            "topic.metadata.refresh.interval.ms": 10_000,
            # A consumer never creates the topics it reads (librdkafka's default, stated): a
            # misspelled or deleted topic stays missing, and is reported, instead of appearing empty.
            "allow.auto.create.topics": False,
            "error_cb": self._on_error,
            "on_commit": self._on_commit,
            **security_config(k),
        })
        topics = [t for t in (k.embeddings_topic, k.queries_topic) if t]
        self._consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke)

    def _on_error(self, err: Any) -> None:
        # librdkafka retries on its own; an authentication failure (bad SASL credentials, TLS
        # verification) is an operator's problem, so it is logged as an error.
        auth = err.code() in (KafkaError._AUTHENTICATION, KafkaError._SSL)
        log.log(logging.ERROR if auth or err.fatal() else logging.WARNING, "kafka: %s", err)
        if auth or err.code() in (-195, -187):  # _TRANSPORT, _ALL_BROKERS_DOWN
            self._connected = False

    def _on_commit(self, err: Any, partitions: list[TopicPartition]) -> None:
        # Served from consume(): the completions of asynchronous commits.
        if err is not None:
            log.debug("asynchronous commit failed: %s", err)
            return
        for tp in partitions:
            if tp.error is None and tp.offset >= 0:
                self._acked.record(tp.topic, tp.partition, tp.offset)

    def landed(self, positions: dict[PartitionId, Committed]) -> bool:
        return self._acked.landed(positions)

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        if self._listener is not None:
            self._listener.on_assigned([PartitionId(p.topic, p.partition) for p in partitions])

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        revoked = [PartitionId(p.topic, p.partition) for p in partitions]
        self._acked.forget(revoked)
        if self._listener is not None:
            self._listener.on_revoked(revoked)

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
        # Any: a record without error has its topic, partition and offset set (the stubs allow None).
        records: Any = self._consumer.consume(num_messages=max_records, timeout=timeout_ms / 1000.0)
        out: list[Message] = []
        append = out.append
        # Per record: positional arguments and no header tuple unless there are headers. Keyword
        # arguments and an always-built header tuple cost 1.2 µs a record, about a twentieth of a
        # b64 event's whole cost end to end; this costs 0.3.
        for r in records:
            if r.error():
                # Partition EOF and transient errors are informational here; real faults surface
                # through error_cb and the lag probe. A subscribed topic that does not exist is
                # reported here only, once (at each change of its metadata), not to error_cb.
                if r.error().code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    log.warning("kafka: topic %s does not exist: %s", r.topic(), r.error())
                continue
            ts_type, ts = r.timestamp()
            headers: Any = r.headers()
            append(Message(r.value() or b"", r.topic(), r.partition(), r.offset(), ts if ts_type else None,
                           r.key(), tuple((str(h), bytes(v or b"")) for h, v in headers) if headers else ()))
        if out:
            self._connected = True
        return out

    def commit(self, positions: dict[PartitionId, Committed], asynchronous: bool = False) -> None:
        if not positions:
            return
        tps = [TopicPartition(p.topic, p.partition, c.offset, metadata=c.metadata) for p, c in positions.items()]
        if asynchronous:
            self._consumer.commit(offsets=tps, asynchronous=True)
            return
        result = self._consumer.commit(offsets=tps, asynchronous=False)
        for tp in result or ():
            if tp.error:
                raise KafkaException(tp.error)

    def committed(self, partitions: Sequence[PartitionId],
                  timeout_s: float | None = None) -> dict[PartitionId, Committed | None]:
        tps = self._consumer.committed([TopicPartition(p.topic, p.partition) for p in partitions],
                                       timeout=10 if timeout_s is None else timeout_s)
        out: dict[PartitionId, Committed | None] = {}
        for tp in tps:
            key = PartitionId(tp.topic, tp.partition)
            out[key] = Committed(tp.offset, tp.metadata or "") if tp.offset >= 0 else None
        return out

    def assignment(self) -> set[PartitionId]:
        return {PartitionId(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def end_offsets(self, partitions: Sequence[PartitionId]) -> dict[PartitionId, int]:
        out: dict[PartitionId, int] = {}
        # Fetch responses keep librdkafka's high watermarks current; a broker round trip per
        # partition on every probe cost a third of the loop. Ask the broker every 5th probe, which
        # is also the connectivity check.
        self._probes += 1
        cached = self._probes % 5 != 0
        try:
            for p in partitions:
                tp = TopicPartition(p.topic, p.partition)
                high = self._consumer.get_watermark_offsets(tp, cached=True)[1] if cached else -1
                if high is None or high < 0:
                    _, high = self._consumer.get_watermark_offsets(tp, timeout=3)
                out[p] = int(high)
        except KafkaException as e:
            err = e.args[0] if e.args else None
            unknown = self._unknown(partitions) if isinstance(err, KafkaError) and err.code() in _UNKNOWN else None
            self._connected = unknown is not None  # the broker answered that
            if unknown is not None:
                raise unknown from e
            raise
        self._connected = True
        return out

    def _unknown(self, partitions: Sequence[PartitionId]) -> UnknownTopicError | None:
        """The partitions the broker says do not exist, or None when it does not answer (or
        knows them all): librdkafka's own error does not tell a deleted topic from an outage."""
        topics: set[str] = set()
        missing: list[PartitionId] = []
        for topic in sorted({p.topic for p in partitions}):
            try:
                # Never creates the topic: allow.auto.create.topics is off.
                meta = self._consumer.list_topics(topic, timeout=1.0).topics.get(topic)
            except KafkaException:
                return None
            if meta is None or (meta.error is not None and meta.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART):
                topics.add(topic)
            elif meta.error is not None:
                return None
            else:
                missing += [p for p in partitions if p.topic == topic and p.partition not in meta.partitions]
        return UnknownTopicError(topics, missing) if topics or missing else None

    def position(self, partition: PartitionId) -> int | None:
        (tp,) = self._consumer.position([TopicPartition(partition.topic, partition.partition)])
        return int(tp.offset) if tp.offset >= 0 else None

    def connected(self) -> bool:
        return self._connected

    def close(self) -> None:
        self._consumer.close()


class ConfluentDeadLetterSink:
    """Records whose delivery failed are kept and produced again at the next :meth:`flush` (as
    kafka-python's sink does): clearing them made the loop's retried flush succeed, and the
    offsets were committed past dead letters that were never written. A record the broker refuses
    as too large is produced again cut (:func:`shrunk`), since the same record would be refused
    for ever."""

    def __init__(self, settings: Settings, producer: Any = None) -> None:
        k = settings.kafka
        # (record, error) of each failed delivery, until it is produced again.
        self._failed: list[tuple[DeadLetter, Any]] = []
        self._producer = producer if producer is not None else Producer({
            "bootstrap.servers": k.bootstrap_servers,
            "client.id": f"{k.client_id}-dlq",
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
            # Never give a dead letter up: during a broker outage the loop waits for them.
            "message.timeout.ms": 0,
            "message.max.bytes": dead_letter_limit(settings.limits.max_message_bytes),
            **security_config(k),
        })

    def _delivered(self, record: DeadLetter, err: Any, msg: Any) -> None:
        if err is not None:
            self._failed.append((record, err))

    def _produce(self, record: DeadLetter) -> None:
        while True:
            try:
                self._producer.produce(record.topic, value=record.value, key=record.key,
                                       headers=list(record.headers),  # type: ignore[arg-type]
                                       on_delivery=functools.partial(self._delivered, record))
                return
            except BufferError:
                self._producer.poll(0.05)

    def send(self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        self._produce(DeadLetter(topic, value, key, list(headers)))

    def flush(self, timeout_s: float) -> None:
        """Produce the records that failed before again, wait for every queued record, and raise
        if any is still not delivered (the caller retries; librdkafka retries transient failures
        itself, message.timeout.ms being unbounded)."""
        while self._failed:
            record, err = self._failed[0]
            # One at a time, removed once queued again: a produce that raises leaves the rest kept.
            self._produce(shrunk(record) if _too_large(err) else record)
            self._failed.pop(0)
        left = self._producer.flush(timeout_s)
        if left or self._failed:
            errors = [str(e) for _, e in self._failed[:3]]
            raise RuntimeError(f"dead-letter delivery failed: {left} undelivered, {len(self._failed)} failed "
                               f"(produced again at the next flush): {errors}")

    def close(self) -> None:
        self._producer.flush(5)


def _too_large(err: Any) -> bool:
    """A delivery error saying the broker refuses the record's size (permanent for that record)."""
    code = getattr(err, "code", None)
    if callable(code):
        return bool(code() == KafkaError.MSG_SIZE_TOO_LARGE)
    return "MSG_SIZE_TOO_LARGE" in str(err)
