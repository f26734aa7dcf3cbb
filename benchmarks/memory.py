"""Memory: RSS of a service holding S streams of dimension D with default windows (run in a fresh process).

    python memory.py STREAMS DIM [EVENTS] [--config FILE]   -> one JSON object on stdout

``--config``: a settings file (e.g. ``profiles/low-memory.yaml``) instead of the defaults.

Each stream gets ``EVENTS`` events, by default ``reference_size + window_events`` (its baseline
is built from the first ``reference_size``, then its window fills); with
``reference_size + window_events + duplicate_window`` its duplicate-id memory is full as well,
the steady state of a stream that runs for long. Events are routed exactly as the service routes them
(``StreamRouter.route`` on decoded blocks, with event ids, so version comparison and duplicate
tracking hold their state too; baselines are saved to the in-memory baseline store as with
``state.backend: none``). RSS is read before the first stream and after the last, after the
heap trim the service's loop runs every ``limits.heap_trim_interval_s`` (RSS before the trim is
reported too); the per-stream figure is the difference divided by S. A breakdown of the largest
numpy arrays per stream is reported too (nbytes, from the objects themselves), to show where the
memory goes; arrays shared by every stream (the random-feature frequency matrix) are left out of
it and reported once.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from typing import Any

import numpy as np
import psutil

from embedwatch import heap
from embedwatch.app import Service
from embedwatch.config import load_settings
from embedwatch.detectors import mmd as mmd_module
from embedwatch.events import Block, DecodedBatch, Kind, StreamKey
from embedwatch.produce import EventGenerator, GeneratorConfig


def _nbytes(obj: Any, seen: set[int], depth: int = 0) -> int:
    """numpy bytes reachable from obj through attributes, dicts, lists (bounded depth)."""
    if id(obj) in seen or depth > 6:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return int(obj.nbytes) if obj.base is None else 0
    if isinstance(obj, bytes):
        return len(obj)
    total = 0
    if isinstance(obj, dict):
        for v in obj.values():
            total += _nbytes(v, seen, depth + 1)
    elif isinstance(obj, list | tuple | set) or type(obj).__name__ == "deque":
        for v in obj:
            total += _nbytes(v, seen, depth + 1)
    else:
        d = getattr(obj, "__dict__", None)
        if d is not None:
            total += _nbytes(d, seen, depth + 1)
        for s in getattr(type(obj), "__slots__", ()):
            if hasattr(obj, s):
                total += _nbytes(getattr(obj, s), seen, depth + 1)
    return total


def main() -> int:
    argv = sys.argv[1:]
    config = None
    if "--config" in argv:
        i = argv.index("--config")
        config = argv[i + 1]
        del argv[i : i + 2]
    streams, dim = int(argv[0]), int(argv[1])
    events = int(argv[2]) if len(argv) > 2 else None
    settings = load_settings(config, limits={"max_streams": max(200, streams)})
    svc = Service(settings)
    proc = psutil.Process()
    gc.collect()
    rss0 = proc.memory_info().rss
    d = settings.detection
    per_stream = events if events is not None else d.reference_size + d.window_events
    gen = EventGenerator(GeneratorConfig(streams=streams, dim=dim, seed=11))
    for s, spec in enumerate(gen.streams):
        key = StreamKey(spec.model, spec.model_version, spec.segment)
        for lo in range(0, per_stream, 1000):
            n = min(1000, per_stream - lo)
            x, _ = gen.vectors(s, np.arange(lo, lo + n))
            ts = np.full(n, 1.7e9 + lo)
            block = Block(stream=key, kind=Kind.EMBEDDING, vectors=x, ts=ts, latency_s=np.full(n, 0.01),
                          ids=[f"{spec.model}-{lo + i}" for i in range(n)],
                          message_index=np.arange(n, dtype=np.int64), payloads=[b""] * n)
            svc.router.route(DecodedBatch(blocks=[block]))
    gc.collect()
    rss_untrimmed = proc.memory_info().rss
    # What the service's loop does every limits.heap_trim_interval_s: freed heap pages go back.
    t = time.perf_counter()
    heap.trim()
    trim_ms = (time.perf_counter() - t) * 1e3
    rss1 = proc.memory_info().rss
    mon = next(iter(svc.router.monitors.values()))
    shared_arrays = list(getattr(mmd_module, "_by_digest", {}).values())

    def stream_bytes(obj: Any) -> int:
        return _nbytes(obj, {id(a) for a in shared_arrays})

    breakdown = {
        "baseline_arrays": stream_bytes(mon.baseline.arrays if mon.baseline is not None else {}),
        "window": stream_bytes(getattr(mon, "_window", None)),
        "mmd_detector": stream_bytes(getattr(mon, "_mmd", None)),
        "duplicate_ids": stream_bytes(getattr(mon, "_dups", None)),
        "monitor_total_numpy": stream_bytes(mon),
    }
    # What the in-memory baseline store holds beyond the monitors' own arrays (0 when it keeps
    # the monitors' Baseline objects by reference).
    held = {id(a) for a in shared_arrays}
    for m in svc.router.monitors.values():
        _nbytes(m, held)
    breakdown["baseline_store_extra_per_stream"] = int(_nbytes(svc.baselines, held) / streams)
    comps = svc.router.comparisons
    if comps:
        breakdown["version_comparison_per_stream"] = int(stream_bytes(comps) / streams)
    print(json.dumps({
        "streams": streams, "dim": dim, "events_per_stream": per_stream, "config": config,
        "live_streams": len(svc.router.monitors),
        "rss_before_mb": rss0 / 2**20, "rss_after_mb": rss1 / 2**20,
        "rss_after_untrimmed_mb": rss_untrimmed / 2**20, "heap_trim_ms": round(trim_ms, 2),
        "mb_per_stream": (rss1 - rss0) / 2**20 / streams,
        "numpy_bytes_per_stream": {k: round(v / 2**20, 3) for k, v in breakdown.items()},
        "shared_numpy_mb": round(sum(int(a.nbytes) for a in shared_arrays) / 2**20, 3),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
