"""``embedwatch produce``: argument and fault validation, fair low-rate chunks, broker failures."""

from __future__ import annotations

import socket
import time
from collections import Counter
from typing import Any

import orjson
import pytest

from embedwatch import cli
from embedwatch import produce as produce_mod
from embedwatch.produce import EventGenerator, Fault, GeneratorConfig, ProduceError


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # argparse's usage errors
        rc = int(e.code or 0)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["--streams", "0"], ["--streams", ">= 1"]),
    (["--dim", "0"], ["--dim", ">= 1"]),
    (["--rate", "0"], ["--rate", "> 0"]),
    (["--rate", "-5"], ["--rate", "> 0"]),
    (["--total", "-1"], ["--total", ">= 0"]),
    (["--query-ratio", "1.5"], ["--query-ratio", "<= 1"]),
    (["--streams", "many"], ["--streams", "not an integer"]),
])
def test_bad_numbers_are_usage_errors(argv: list[str], words: list[str],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run(["produce", "--bootstrap", "127.0.0.1:1", *argv], capsys)
    assert rc == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert all(w in last for w in words), err


@pytest.mark.parametrize("fault, words", [
    ("dimension@0,dim=0", ["dim must be >= 1"]),
    ("shift@abc", ["'shift@abc'", "index 'abc' is not an integer"]),
    ("shift@5:2", ["until (2) must be after the index (5)"]),
    ("shift@5:x", ["until 'x' is not an integer"]),
    ("shift@-1", ["index must be >= 0"]),
    ("shift@5,magnitude=big", ["magnitude 'big' is not a number"]),
    ("shift@5,stream", ["option 'stream' needs a value"]),
    ("shift@5,stream=-1", ["stream must be >= 0"]),
    ("rotation@5,planes=0", ["planes must be >= 1"]),
    ("shift@5,stream=3", ["stream=3", "only 3 streams"]),
])
def test_bad_faults_are_one_line_errors(fault: str, words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, err = _run(["produce", "--bootstrap", "127.0.0.1:1", "--streams", "3", "--fault", fault], capsys)
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("embedwatch: fault "), err
    assert all(w in lines[0] for w in words), err


def test_zero_dims_and_streams_are_refused_by_the_generator() -> None:
    with pytest.raises(ValueError, match="streams must be >= 1"):
        EventGenerator(GeneratorConfig(streams=0))
    with pytest.raises(ValueError, match="dim must be >= 1"):
        EventGenerator(GeneratorConfig(dim=0))
    with pytest.raises(ValueError, match="dim must be >= 1"):
        EventGenerator(GeneratorConfig(faults=[Fault("dimension", 0, dim=0)]))


def test_valid_faults_still_parse() -> None:
    f = Fault.parse("shift@5000:6000,stream=1,magnitude=0.6")
    assert (f.kind, f.at, f.until, f.stream, f.magnitude) == ("shift", 5000, 6000, 1, 0.6)
    assert Fault.parse("segment@10,name=new").name == "new"


@pytest.mark.parametrize("streams, chunk", [(4, 3), (3, 2), (5, 1), (4, 6)])
def test_small_chunks_reach_every_stream_evenly(streams: int, chunk: int) -> None:
    # --rate 30 --streams 4 gives chunks of 3: the 4th stream used to get nothing, ever.
    g = EventGenerator(GeneratorConfig(streams=streams, dim=4))
    counts: Counter[str] = Counter()
    for _ in range(streams * 10):
        counts.update(orjson.loads(v)["model"] for _, v in g.messages(chunk))
    assert set(counts) == {f"model-{i}" for i in range(streams)}
    assert max(counts.values()) - min(counts.values()) <= 1, counts
    assert sorted(g.index.tolist()) == sorted(counts[f"model-{i}"] for i in range(streams))


def test_one_call_is_unchanged_and_reproducible() -> None:
    a = EventGenerator(GeneratorConfig(streams=3, dim=4, seed=7)).messages(10, ts=1.0)
    b = EventGenerator(GeneratorConfig(streams=3, dim=4, seed=7)).messages(10, ts=1.0)
    assert a == b
    assert Counter(orjson.loads(v)["model"] for _, v in a) == {"model-0": 4, "model-1": 3, "model-2": 3}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_unreachable_broker_fails_fast_with_one_line(capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(produce_mod, "CONNECT_TIMEOUT_S", 1.0)
    bootstrap = f"127.0.0.1:{_closed_port()}"
    t0 = time.monotonic()
    rc, err = _run(["produce", "--bootstrap", bootstrap, "--total", "100", "--rate", "1000"], capsys)
    assert time.monotonic() - t0 < 8
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 1 and "Traceback" not in err, err
    assert lines[-1].startswith(f"embedwatch: cannot reach the Kafka broker at {bootstrap}"), err
    assert "produced" not in err, err  # no rates for events that went nowhere


class _FakeClient:
    """Stands in for _producer: every third event fails delivery; flush leaves ``left`` undelivered."""

    def __init__(self, left: int = 0) -> None:
        self.left = left
        self.sent = 0

    def __call__(self, bootstrap: str, extra: dict[str, Any], on_failure: Any) -> tuple[Any, Any]:
        def send(topic: str, key: bytes, value: bytes) -> None:
            self.sent += 1
            if self.sent % 3 == 0:
                on_failure("Broker: Message size too large")

        def flush() -> None:
            if self.left:
                raise ProduceError(f"{self.left} events not delivered within 60s to {bootstrap}")

        return send, flush


def test_delivery_failures_are_counted_and_reported(capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(produce_mod, "_producer", _FakeClient())
    r = produce_mod.produce("x:1", EventGenerator(GeneratorConfig(streams=2, dim=4)), 30, None)
    assert (r.sent, r.failed, r.last_error) == (30, 10, "Broker: Message size too large")
    rc, err = _run(["produce", "--bootstrap", "x:1", "--total", "30", "--dim", "4"], capsys)
    assert rc == 1 and "produced 30 events" in err and "10 failed to deliver" in err, err
    assert "Message size too large" in err


def test_undelivered_events_at_the_end_are_one_line(capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(produce_mod, "_producer", _FakeClient(left=5))
    rc, err = _run(["produce", "--bootstrap", "x:1", "--total", "10", "--dim", "4"], capsys)
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == "embedwatch: 5 events not delivered within 60s to x:1", err
