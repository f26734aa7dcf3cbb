"""Memory of stored baselines: RSS of a replica that holds the stored versions of S streams it does
not monitor (retired, or another replica's), and after forgetting them (run in a fresh process).

    python stored_baselines.py [STREAMS] [DIM]   -> one JSON object on stdout (defaults 200, 768)

A first store writes one baseline per stream (default settings, its mean-shift scan fitted, as a
stream saves it) into a file state backend in a temporary directory; a second store reads them
back as a restarting replica does (each held without its sample once its fit is read). RSS is read
after the heap trim the service runs, before the read, after it and after ``forget`` of every
stream; ``embedwatch_stored_baseline_bytes`` (``MemoryBaselineStore.held``) is reported beside it.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import numpy as np
import psutil

from embedwatch import heap
from embedwatch.baseline import Baseline
from embedwatch.config import DetectionSettings
from embedwatch.events import StreamKey
from embedwatch.state import DurableBaselineStore, FileStateBackend


def _rss_mib() -> float:
    heap.collect()
    heap.trim()
    return psutil.Process().memory_info().rss / 2**20


def main(streams: int, dim: int) -> dict[str, float]:
    det = DetectionSettings()
    directory = tempfile.mkdtemp(prefix="embedwatch-stored-")
    writer = DurableBaselineStore(FileStateBackend(directory), None, det)
    keys = [StreamKey("bench", f"v{i}", "default") for i in range(streams)]
    rng = np.random.default_rng(0)
    for key in keys:
        x = rng.standard_normal((det.reference_size, dim)).astype(np.float32)
        b = Baseline.from_vectors(key, x, ts=1.0, source="bench", settings=det)
        b.mean_shift(det)
        writer.save(b)
    del writer, b, x
    before = _rss_mib()
    backend = FileStateBackend(directory)
    store = DurableBaselineStore(backend, None, det)
    store.read(backend.read_all)
    holding = _rss_mib()
    versions, nbytes = store.held()
    t0 = time.perf_counter()
    for key in keys:
        store.forget(key)
    forget_s = time.perf_counter() - t0
    after = _rss_mib()
    return {"streams": streams, "dim": dim, "versions_held": versions, "rss_before_read_mib": round(before, 1),
            "rss_holding_mib": round(holding, 1), "stored_baseline_bytes_mib": round(nbytes / 2**20, 1),
            "rss_after_forget_mib": round(after, 1),
            "held_mib_per_version": round((holding - before) / max(versions, 1), 3),
            "forget_ms_per_stream": round(forget_s / streams * 1e3, 2)}


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:3]]
    print(json.dumps(main(*(args + [200, 768][len(args):]))))
