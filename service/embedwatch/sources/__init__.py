"""Where events come from: a small interface, a Kafka backend per client library, and files.

The service loop only sees :class:`~embedwatch.sources.base.Source`; adding a client library means
adding one module here and one branch in :func:`open_kafka_source`.
"""

from __future__ import annotations

from embedwatch.config import Settings
from embedwatch.sources.base import (
    Committed,
    DeadLetterSink,
    PartitionId,
    RebalanceListener,
    Source,
    UnknownTopicError,
)


def open_kafka_source(settings: Settings, listener: RebalanceListener | None = None) -> Source:
    """The Kafka source of the configured backend (``kafka.backend``)."""
    if settings.kafka.backend == "confluent":
        from embedwatch.sources.confluent import ConfluentSource

        return ConfluentSource(settings, listener)
    from embedwatch.sources.kafka_python import KafkaPythonSource

    return KafkaPythonSource(settings, listener)


def open_dead_letter_sink(settings: Settings) -> DeadLetterSink:
    """The dead-letter producer of the configured backend."""
    if settings.kafka.backend == "confluent":
        from embedwatch.sources.confluent import ConfluentDeadLetterSink

        return ConfluentDeadLetterSink(settings)
    from embedwatch.sources.kafka_python import KafkaPythonDeadLetterSink

    return KafkaPythonDeadLetterSink(settings)


__all__ = [
    "Committed",
    "DeadLetterSink",
    "PartitionId",
    "RebalanceListener",
    "Source",
    "UnknownTopicError",
    "open_dead_letter_sink",
    "open_kafka_source",
]
