"""The kafka-python source's poll holds nothing of a batch once the caller drops it (the real
consumer's paths are tested against the broker in tests/integration)."""

from __future__ import annotations

import gc
import sys
from types import SimpleNamespace
from typing import Any

from kafka import TopicPartition

from embedwatch.sources.kafka_python import KafkaPythonSource


class _TimedOutWait:
    """Returns records the way kafka-python 3 does after a fetch wait that timed out: the wait's
    exception is kept in a reference cycle with the frame that caught it (in kafka-python, through
    a future's callbacks), and the frame still holds the records it returned."""

    def poll(self, timeout_ms: int, max_records: int) -> dict[Any, list[Any]]:
        records = self.records
        try:
            raise TimeoutError("fetch wait timed out")
        except TimeoutError as e:
            kept = e
        cycle = [kept]  # this frame (the traceback's) holds the list, the list the exception
        assert cycle
        return records


def test_a_batch_is_not_kept_by_a_cycle_of_the_client_frames() -> None:
    values = [b"event-%d" % i for i in range(5)]
    consumer = _TimedOutWait()
    consumer.records = {TopicPartition("embeddings", 0): [  # type: ignore[attr-defined]
        SimpleNamespace(value=v, headers=[], offset=i, timestamp=1_700_000_000_000, key=None)
        for i, v in enumerate(values)]}
    source = KafkaPythonSource.__new__(KafkaPythonSource)  # no broker: the client is the stand-in
    source._consumer = consumer  # type: ignore[assignment]
    source._connected = False
    gc.disable()  # the cycle stays until a collection, as between the service's collections
    try:
        batch = source.poll(max_records=10, timeout_ms=100)
        del consumer.records  # type: ignore[attr-defined]
        assert [m.value for m in batch] == values and [m.offset for m in batch] == list(range(5))
        assert source.connected
        assert sys.getrefcount(batch) == 2  # this name and the call's argument: no frame holds it
        del batch
        # Each value: the list above and the call's argument. A value held through a kept frame
        # (the poll's own, or the client's records) would count one more.
        assert [sys.getrefcount(values[i]) for i in range(len(values))] == [2] * len(values)
    finally:
        gc.enable()
        gc.collect()
