"""Steady-rate producer for the latency benchmark (run as a subprocess by kafka_e2e.py).

Sends ``rate`` events/s for ``seconds`` to ``topic``, in small slices every ``tick`` seconds; each
event's ``ts`` field is the wall-clock time at which it is handed to the producer. Writes the send
times per stream to ``OUT.npz`` (arrays ``ts_<stream>``) and a JSON summary to stdout.

    python latency_producer.py BOOTSTRAP TOPIC RATE SECONDS ENCODING OUT.npz
"""

from __future__ import annotations

import sys
import time

import numpy as np
import orjson
from confluent_kafka import Producer

from embedwatch.produce import EventGenerator, GeneratorConfig

PLACEHOLDER = b'"ts":1234567890.5'


def main() -> int:
    bootstrap, topic, rate_s, seconds_s, encoding, out = sys.argv[1:7]
    rate, seconds = float(rate_s), float(seconds_s)
    streams = 3
    gen = EventGenerator(GeneratorConfig(streams=streams, dim=384, encoding=encoding, seed=7))
    pool = gen.messages(30_000, ts=1234567890.5)  # reused cyclically: the detectors see a stationary stream
    assert PLACEHOLDER in pool[0][1]
    heads = [(k, v.split(PLACEHOLDER)) for k, v in pool]
    names = sorted({k.decode() for k, _ in pool})
    sent_ts: dict[str, list[float]] = {n: [] for n in names}
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 2, "acks": 1,
                  "queue.buffering.max.messages": 1_000_000})
    tick = 0.002
    t0 = time.time()
    sent = 0
    i = 0
    late_max = 0.0
    while True:
        now = time.time()
        el = now - t0
        if el >= seconds:
            break
        due = int(el * rate) - sent
        for _ in range(due):
            k, (a, b) = heads[i % len(heads)]
            i += 1
            t = time.time()
            p.produce(topic, key=k, value=a + b'"ts":' + repr(t).encode() + b)
            sent_ts[k.decode()].append(t)
        sent += max(due, 0)
        p.poll(0)
        late_max = max(late_max, time.time() - now)
        time.sleep(max(0.0, tick - (time.time() - now)))
    p.flush(30)
    np.savez(out, **{f"ts_{n}": np.asarray(v) for n, v in sent_ts.items()})
    dt = time.time() - t0
    sys.stdout.write(orjson.dumps({"sent": sent, "seconds": dt, "rate": sent / dt,
                                   "max_slice_seconds": late_max}).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
