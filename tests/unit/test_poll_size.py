"""The poll bound: raised after a batch spread over many streams, within the byte budget, and back
to kafka.max_poll_records after a batch of a few streams (the service loop with a fake source)."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import given
from hypothesis import strategies as st
from test_loop_faults import Broker, Sink, Source, settings

from embedwatch.app import Service
from embedwatch.events import Message
from embedwatch.sources.base import MAX_POLL_RECORDS, poll_records


@given(st.integers(1, 100_000), st.integers(0, 100_000), st.integers(1 << 20, 1 << 30),
       st.integers(0, 5000), st.floats(0.0, 1e7))
def test_the_bound_is_never_below_the_configured_one_nor_beyond_the_budget(
        base: int, per_stream: int, max_bytes: int, streams: int, mean_bytes: float) -> None:
    n = poll_records(base, per_stream, max_bytes, streams, mean_bytes)
    assert n >= base
    if n > base:  # raised: for the streams, within the bytes and the hard cap
        assert n <= streams * per_stream
        assert n * max(mean_bytes, 1.0) <= max_bytes
        assert n <= MAX_POLL_RECORDS
    elif streams * per_stream > base:  # could have been raised: the budget or the cap held it
        assert (base + 1) * max(mean_bytes, 1.0) > max_bytes or base >= MAX_POLL_RECORDS


def test_the_bound_is_raised_as_far_as_the_streams_ask() -> None:
    assert poll_records(2000, 100, 16 << 20, 50, 2000.0) == 5000
    assert poll_records(2000, 100, 16 << 20, 1000, 2000.0) == (16 << 20) // 2000
    assert poll_records(2000, 0, 16 << 20, 1000, 2000.0) == 2000  # 0: off
    assert poll_records(2000, 100, 1 << 30, 10_000, 10.0) == MAX_POLL_RECORDS


class _Recording(Source):
    """Takes at most ``max_records`` per poll (the fake's own batch as a further bound) and
    records each bound asked."""

    def __init__(self, *a: Any, **k: Any) -> None:
        super().__init__(*a, **k)
        self.asked: list[int] = []

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
        self.asked.append(max_records)
        self.batch = max_records
        return super().poll(max_records, timeout_ms)


def _event(model: str) -> bytes:
    return orjson.dumps({"model": model, "model_version": "v1", "ts": 1.7e9, "embedding": [1.0, 2.0, 3.0]})


def test_the_service_asks_for_more_after_a_batch_of_many_streams_and_less_after_a_few() -> None:
    s = settings(kafka={"max_poll_records": 50, "poll_events_per_stream": 10, "max_poll_bytes": 1 << 20},
                 limits={"max_streams": 100})
    svc = Service(s)
    broker = Broker()
    for i in range(50):  # the first batch (50 records): 25 streams
        broker.append(_event(f"m{i % 25}"))
    for _ in range(250):  # then one stream
        broker.append(_event("m0"))
    src = _Recording(svc, broker)
    svc.run(src, Sink(broker))
    # 50 (configured), 250 (25 streams x 10), back to 50 after the batch of one stream, ...
    assert src.asked[:3] == [50, 250, 50]
    assert svc.ledgers[next(iter(svc.ledgers))].accepted == 300
    assert svc.exporter.gauges["embedwatch_poll_max_records"][()] == 50.0


def test_without_events_per_stream_the_bound_stays() -> None:
    s = settings(kafka={"max_poll_records": 50, "poll_events_per_stream": 0}, limits={"max_streams": 100})
    svc = Service(s)
    broker = Broker()
    for i in range(300):
        broker.append(_event(f"m{i % 25}"))
    src = _Recording(svc, broker)
    svc.run(src, Sink(broker))
    assert set(src.asked) == {50}
