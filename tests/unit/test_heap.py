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

    calls: list[float] = []
    monkeypatch.setattr(heap, "trim", lambda: calls.append(1.0) or True)
    svc = Service(Settings(limits={"heap_trim_interval_s": 60.0}))  # type: ignore[arg-type]
    svc._trim_heap()
    assert calls == []  # not due yet
    svc._last_heap_trim -= 61.0
    svc._trim_heap()
    svc._trim_heap()
    assert calls == [1.0]
    off = Service(Settings(limits={"heap_trim_interval_s": 0}))  # type: ignore[arg-type]
    off._last_heap_trim -= 1e9
    off._trim_heap()
    assert calls == [1.0]
