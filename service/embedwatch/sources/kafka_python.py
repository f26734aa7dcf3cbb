"""Kafka source and dead-letter sink on kafka-python (pure Python, crc32c-accelerated)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from kafka import KafkaConsumer, KafkaProducer
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.structs import OffsetAndMetadata, TopicPartition

from embedwatch.config import KafkaSettings, Settings
from embedwatch.events import Message
from embedwatch.sources.base import Committed, PartitionId, RebalanceListener

log = logging.getLogger(__name__)


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


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, inner: RebalanceListener) -> None:
        self.inner = inner

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.inner.on_revoked([PartitionId(tp.topic, tp.partition) for tp in revoked])

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.inner.on_assigned([PartitionId(tp.topic, tp.partition) for tp in assigned])


class KafkaPythonSource:
    def __init__(self, settings: Settings, listener: RebalanceListener | None = None) -> None:
        k = settings.kafka
        self._topics = [t for t in (k.embeddings_topic, k.queries_topic) if t]
        self._consumer = KafkaConsumer(
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
            **security_kwargs(k),
        )
        if listener is not None:
            self._consumer.subscribe(self._topics, listener=_Listener(listener))
        else:
            self._consumer.subscribe(self._topics)
        self._connected = False

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
        records = self._consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        out: list[Message] = []
        for tp, recs in records.items():
            for r in recs:
                out.append(
                    Message(
                        value=r.value if r.value is not None else b"",
                        topic=tp.topic,
                        partition=tp.partition,
                        offset=r.offset,
                        timestamp_ms=r.timestamp,
                        key=r.key,
                        headers=tuple((h[0], h[1] or b"") for h in (r.headers or ())),
                    )
                )
        if out:
            self._connected = True
        return out

    def commit(self, positions: dict[PartitionId, Committed]) -> None:
        if not positions:
            return
        self._consumer.commit(
            {
                TopicPartition(p.topic, p.partition): OffsetAndMetadata(c.offset, c.metadata, -1)
                for p, c in positions.items()
            }
        )

    def committed(self, partitions: Sequence[PartitionId]) -> dict[PartitionId, Committed | None]:
        out: dict[PartitionId, Committed | None] = {}
        for p in partitions:
            om = self._consumer.committed(TopicPartition(p.topic, p.partition), metadata=True)
            out[p] = None if om is None or om.offset is None or om.offset < 0 else Committed(
                om.offset, om.metadata or ""
            )
        return out

    def assignment(self) -> set[PartitionId]:
        return {PartitionId(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    def end_offsets(self, partitions: Sequence[PartitionId]) -> dict[PartitionId, int]:
        try:
            ends = self._consumer.end_offsets(
                [TopicPartition(p.topic, p.partition) for p in partitions], timeout_ms=3000
            )
        except Exception:
            self._connected = False
            raise
        self._connected = True
        return {PartitionId(tp.topic, tp.partition): int(o) for tp, o in ends.items()}

    def position(self, partition: PartitionId) -> int | None:
        try:
            return int(self._consumer.position(TopicPartition(partition.topic, partition.partition),
                                               timeout_ms=1000))
        except Exception:
            return None

    def connected(self) -> bool:
        return self._connected

    def close(self) -> None:
        self._consumer.close(autocommit=False)


class KafkaPythonDeadLetterSink:
    def __init__(self, settings: Settings) -> None:
        k = settings.kafka
        self._producer = KafkaProducer(
            bootstrap_servers=k.bootstrap_servers.split(","),
            client_id=f"{k.client_id}-dlq",
            acks="all",
            linger_ms=5,
            max_request_size=max(1 << 20, settings.limits.max_message_bytes + 65536),
            retries=2**31 - 1,
            **security_kwargs(k),
        )
        self._futures: list[Any] = []

    def send(self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]) -> None:
        self._futures.append(self._producer.send(topic, value=value, key=key, headers=headers))

    def flush(self, timeout_s: float) -> None:
        self._producer.flush(timeout=timeout_s)
        futures, self._futures = self._futures, []
        for f in futures:
            f.get(timeout=0)  # raises the send error, if any: the batch must not be committed

    def close(self) -> None:
        self._producer.close(timeout=5)
