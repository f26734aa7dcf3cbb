"""The source interface the service loop is written against."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from embedwatch.events import Message


class PartitionId(NamedTuple):
    topic: str
    partition: int


@dataclass(frozen=True, slots=True)
class Committed:
    """A committed position: the next offset to read, and the metadata string stored with it."""

    offset: int
    metadata: str = ""


class AckedCommits:
    """The highest offset per partition whose commit the broker acknowledged, as the completions
    of asynchronous commits report them (both Kafka backends keep one)."""

    def __init__(self) -> None:
        self._acked: dict[tuple[str, int], int] = {}

    def record(self, topic: str, partition: int, offset: int) -> None:
        key = (topic, partition)
        self._acked[key] = max(self._acked.get(key, -1), offset)

    def landed(self, positions: dict[PartitionId, Committed]) -> bool:
        acked = self._acked
        return all(acked.get((p.topic, p.partition), -1) >= c.offset for p, c in positions.items())

    def forget(self, partitions: Sequence[PartitionId]) -> None:
        """Revoked partitions: a later owner's commits are not ours to count."""
        for p in partitions:
            self._acked.pop((p.topic, p.partition), None)


#: Header of a dead letter whose value was cut to fit its producer or the broker: the length of
#: the original value (bytes, decimal).
TRUNCATED_HEADER = "embedwatch-truncated"
#: Header of a dead letter whose source headers (or key) were dropped too: how many headers.
DROPPED_HEADERS_HEADER = "embedwatch-dropped-headers"
#: What a record takes on the wire beyond its key, value and headers (record and batch framing),
#: with room to spare: librdkafka and kafka-python count it against their size limits.
RECORD_OVERHEAD_BYTES = 1024


def dead_letter_limit(max_message_bytes: int) -> int:
    """The dead-letter producers' largest record (``message.max.bytes``, ``max_request_size``):
    the largest event the service accepts, with room for the headers it adds."""
    return max(1 << 20, max_message_bytes + 65536)


#: Records one poll asks for at most when :func:`poll_records` raises the bound.
MAX_POLL_RECORDS = 100_000


def poll_records(max_poll_records: int, events_per_stream: int, max_poll_bytes: int,
                 streams: int, mean_bytes: float) -> int:
    """Records the next poll asks for at most: ``max_poll_records``, raised to ``events_per_stream``
    per stream of the previous batch (``streams``) when that is more, within ``max_poll_bytes`` of
    messages of the previous batch's mean size (``mean_bytes``) and :data:`MAX_POLL_RECORDS`.

    Each stream's update costs a fixed ~40-60 µs of small numpy calls, so a backlog of many streams
    spends most of a 2,000-record batch on them (2 events per stream at 1,000 streams). Only a
    service that is behind fills the raised batch; in steady state a poll returns what arrived.

    >>> poll_records(2000, 100, 16 << 20, 3, 2200.0)  # a few streams: the configured bound
    2000
    >>> poll_records(2000, 100, 16 << 20, 50, 2200.0)  # 50 streams x 100 events
    5000
    >>> poll_records(2000, 100, 16 << 20, 1000, 2200.0)  # within 16 MiB of 2.2 kB messages
    7626
    >>> poll_records(2000, 100, 16 << 20, 1000, 20000.0)  # never below the configured bound
    2000
    """
    want = streams * events_per_stream
    if want <= max_poll_records:
        return max_poll_records
    fits = int(max_poll_bytes / max(mean_bytes, 1.0))
    return max(max_poll_records, min(want, fits, MAX_POLL_RECORDS))


class DeadLetter(NamedTuple):
    topic: str
    value: bytes
    key: bytes | None
    headers: list[tuple[str, bytes]]


def record_size(d: DeadLetter) -> int:
    """An upper bound of the record's size as the producers check it."""
    return (RECORD_OVERHEAD_BYTES + len(d.value) + len(d.key or b"")
            + sum(len(k.encode()) + len(v) for k, v in d.headers))


def fit_dead_letter(d: DeadLetter, limit: int) -> DeadLetter:
    """``d`` as it is if it fits ``limit`` bytes, else with its value cut to fit and marked with
    :data:`TRUNCATED_HEADER` (the original length, kept through a second cut). A record that
    cannot be written is retried for ever and holds its partition's commits: a payload larger
    than the producer's limit (an event refused as ``too_large``), or than the topic's, lands
    cut instead, still with its reason and source headers. Should the source's headers or key
    alone not fit, they go too (embedwatch's headers stay: they say what the record is)."""
    if record_size(d) <= limit:
        return d
    original = next((v for k, v in d.headers if k == TRUNCATED_HEADER), str(len(d.value)).encode())
    headers = [h for h in d.headers if h[0] != TRUNCATED_HEADER]
    cut = DeadLetter(d.topic, b"", d.key, [*headers, (TRUNCATED_HEADER, original)])
    if record_size(cut) > limit:
        earlier = [int(v) for k, v in headers if k == DROPPED_HEADERS_HEADER and v.isdigit()]  # a cut before
        headers = [h for h in headers if h[0] != DROPPED_HEADERS_HEADER]
        ours = [h for h in headers if h[0].startswith("embedwatch-")]
        dropped = len(headers) - len(ours) + sum(earlier)
        cut = DeadLetter(d.topic, b"", None,
                         [*ours, (DROPPED_HEADERS_HEADER, str(dropped).encode()), (TRUNCATED_HEADER, original)])
    return cut._replace(value=d.value[:max(0, limit - record_size(cut))])


def shrunk(d: DeadLetter) -> DeadLetter:
    """``d`` cut to half its size: a broker refused it as too large (a topic's
    ``max.message.bytes`` below the producer's limit), which no retry of the same record changes."""
    return fit_dead_letter(d, record_size(d) // 2)


class UnknownTopicError(LookupError):
    """The broker answered, and these topics, or these partitions of topics that exist, are not
    there: deleted, misspelled, or not visible to this client. A broker that does not answer
    raises the client's own errors instead."""

    def __init__(self, topics: Iterable[str] = (), partitions: Iterable[PartitionId] = ()) -> None:
        self.topics = tuple(sorted(set(topics)))
        self.partitions = tuple(sorted(p for p in set(partitions) if p.topic not in self.topics))
        missing = [f"topic {t!r} does not exist" for t in self.topics]
        for topic in sorted({p.topic for p in self.partitions}):
            numbers = ", ".join(str(p.partition) for p in self.partitions if p.topic == topic)
            missing.append(f"topic {topic!r} has no partition {numbers}")
        super().__init__("; ".join(missing))


class RebalanceListener(Protocol):
    def on_revoked(self, partitions: Sequence[PartitionId]) -> None: ...

    def on_assigned(self, partitions: Sequence[PartitionId]) -> None: ...


class Source(Protocol):
    """A consumer-group source with explicit commits (at-least-once)."""

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
        """Up to ``max_records`` messages, in offset order per partition."""
        ...

    def commit(self, positions: dict[PartitionId, Committed], asynchronous: bool = False) -> None:
        """Commit these positions; synchronous ones raise on failure, asynchronous ones only log."""
        ...

    def landed(self, positions: dict[PartitionId, Committed]) -> bool:
        """Whether the broker has acknowledged a commit at (or beyond) each of these offsets, as far
        as the completions of asynchronous commits served by the polls so far tell."""
        ...

    def committed(self, partitions: Sequence[PartitionId],
                  timeout_s: float | None = None) -> dict[PartitionId, Committed | None]:
        """The group's committed positions, read from the coordinator; raises on failure or after
        ``timeout_s`` (``None``: the client's own bound)."""
        ...

    def assignment(self) -> set[PartitionId]: ...

    def end_offsets(self, partitions: Sequence[PartitionId]) -> dict[PartitionId, int]:
        """Log end offsets; raises :class:`UnknownTopicError` when the broker says a topic or
        partition does not exist, and the client's errors when the broker does not answer."""
        ...

    def position(self, partition: PartitionId) -> int | None: ...

    def connected(self) -> bool: ...

    def close(self) -> None:
        """Leave the group (no auto-commit: the loop commits explicitly before)."""
        ...


class DeadLetterSink(Protocol):
    def send(self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]) -> None: ...

    def flush(self, timeout_s: float) -> None:
        """Block until every send is acknowledged; raises if one failed."""
        ...

    def close(self) -> None: ...
