"""The source interface the service loop is written against."""

from __future__ import annotations

from collections.abc import Sequence
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
        """Log end offsets; raises when the broker does not answer."""
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
