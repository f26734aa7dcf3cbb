"""Returning freed heap memory to the OS (embedwatch.heap), in a fresh interpreter each time."""

from __future__ import annotations

import subprocess
import sys

import pytest

from embedwatch import heap

# Frees 350 of 400 heap arrays of 256 KiB (after a 16 MiB temporary raised glibc's mmap threshold,
# as numpy's batch temporaries do), keeping every eighth so the heap cannot simply shrink from
# its top; prints how much RSS the trim (or, with "none", nothing) released.
_FRAGMENT = """
import sys, psutil, numpy as np
from embedwatch import heap
proc = psutil.Process()
big = np.ones(16 << 17)
del big
keep, drop = [], []
for i in range(400):
    (keep if i % 8 == 7 else drop).append(np.ones(256 * 128))
drop.clear()
before = proc.memory_info().rss
ok = heap.trim() if sys.argv[1] == "trim" else False
print(ok, (before - proc.memory_info().rss) / 2**20)
"""


def _released(mode: str) -> tuple[bool, float]:
    out = subprocess.run([sys.executable, "-c", _FRAGMENT, mode], capture_output=True, text=True, check=True)
    ok, mib = out.stdout.split()
    return ok == "True", float(mib)


@pytest.mark.skipif(not heap.available(), reason="no glibc malloc_trim in this C library")
def test_trim_returns_the_freed_gaps_of_a_fragmented_heap() -> None:
    freed = 350 * 256 / 1024  # MiB
    ok, released = _released("trim")
    assert ok
    assert released >= 0.8 * freed
    # Without the trim glibc keeps them: the release is the trim's doing.
    _, kept = _released("none")
    assert kept < 0.1 * freed


def test_the_service_loop_trims_at_its_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    from embedwatch.app import Service
    from embedwatch.config import Settings

    calls: list[str] = []
    monkeypatch.setattr(heap, "trim", lambda: calls.append("trim") or True)
    monkeypatch.setattr(heap, "collect", lambda: calls.append("collect") or 0)
    svc = Service(Settings(limits={"heap_trim_interval_s": 60.0}))  # type: ignore[arg-type]
    svc._trim_heap()
    assert calls == []  # not due yet
    svc._last_heap_trim -= 61.0
    svc._trim_heap()
    svc._trim_heap()
    assert calls == ["collect", "trim"]  # cycles first, so that what they held is trimmed too
    off = Service(Settings(limits={"heap_trim_interval_s": 0}))  # type: ignore[arg-type]
    off._last_heap_trim -= 1e9
    off._trim_heap()
    assert calls == ["collect", "trim"]


# Start-up objects, then settle_collector(100); prints what the collector holds and does after it.
_COLLECTOR = """
import gc, json
from embedwatch import heap
import numpy, embedwatch.app  # the start-up objects of a service
before = len(gc.get_objects())
heap.settle_collector(100)
walked = len(gc.get_objects())
young = gc.get_stats()[0]["collections"]
batch = [[] for _ in range(900)]  # 900 tracked objects alive at once, dying together
del batch
batch_collections = gc.get_stats()[0]["collections"] - young
freed = [0]
class Cycle:
    def __init__(self): self.me = self
    def __del__(self): freed[0] += 1
for _ in range(5000):
    Cycle()
print(json.dumps({"before": before, "walked": walked, "frozen": gc.get_freeze_count(),
                  "threshold": gc.get_threshold(), "batch_collections": batch_collections,
                  "cycles_freed": freed[0]}))
"""


def test_the_collector_leaves_start_up_objects_and_a_batch_alone_but_still_frees_cycles() -> None:
    import json

    out = json.loads(subprocess.run([sys.executable, "-c", _COLLECTOR], capture_output=True, text=True,
                                    check=True).stdout)
    assert out["before"] > 10_000  # the imports' objects, which every full collection walked
    assert out["walked"] < 100 and out["frozen"] >= out["before"]
    assert out["threshold"][0] == 1000 and out["threshold"][1:] == [10, 10]
    assert out["batch_collections"] == 0  # at the default 700 the batch is walked while alive
    assert out["cycles_freed"] >= 4000  # the collector still runs by itself


# settle_collector at the default poll batch, then garbage cycles fewer than its young threshold,
# each holding 100 KB (as the frames kafka-python keeps hold fetch data); prints how many of them the
# collector freed by itself and how many heap.collect freed.
_CYCLES = """
import gc, json
from embedwatch import heap
heap.settle_collector(2000)
freed = [0]
class Cycle:
    def __init__(self): self.me, self.data = self, bytes(100_000)
    def __del__(self): freed[0] += 1
for _ in range(500):
    Cycle()
by_itself = freed[0]
heap.collect()
print(json.dumps({"by_itself": by_itself, "collected": freed[0] - by_itself}))
"""


def test_collect_frees_the_cycles_the_settled_collector_leaves_for_later() -> None:
    import json

    out = json.loads(subprocess.run([sys.executable, "-c", _CYCLES], capture_output=True, text=True,
                                    check=True).stdout)
    assert out["by_itself"] == 0  # 50 MB held: far from the young threshold of 20,000 objects
    assert out["collected"] == 500
