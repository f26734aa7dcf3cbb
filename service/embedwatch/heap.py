"""The process heap over months of batches: freed memory given back to the OS (glibc only), and
CPython's cyclic collector kept off the objects that live as long as the process.

numpy frees its temporary arrays at once, but glibc keeps freed heap pages: once a large temporary
has been freed, glibc raises its mmap threshold, and later arrays of hundreds of KiB come from the
heap, where freed gaps between live arrays stay resident. In ``benchmarks/memory.py`` (768-d
streams fed to steady state, RSS slope between 4 and 16 streams) that was 1.1 MiB per stream, which
``malloc_trim(0)`` returned. The service's loop calls :func:`collect` and :func:`trim` every
``limits.heap_trim_interval_s`` (a minute by default; 3-5 ms each for the trim).

``embedwatch run`` calls :func:`settle_collector` once, after start-up (see there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def available() -> bool:
    """Whether this C library can return freed heap memory on request."""
    return _malloc_trim() is not None


def trim() -> bool:
    """Return the free heap pages to the OS; False when nothing could be released (or no glibc)."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False


def collect() -> int:
    """Collect every generation's garbage cycles now; the number of objects freed.

    With :func:`settle_collector`'s young threshold, an automatic collection waits for the tracked
    objects that outlive their batch to outnumber it, which in steady state (small batches, nearly
    all freed by reference counting) took 13-40 minutes in a soak at 2,000 events/s. Garbage
    cycles that held large buffers waited as long: kafka-python keeps the frames of a fetch wait
    that timed out in a cycle, with the fetch data its frames still referenced, and the RSS rose
    by 25-60 MB between collections. Collected every minute, they hold a minute's worth. A full
    collection walks only what :func:`settle_collector` left unfrozen: the streams' objects, 60 ms
    for 200 streams on this machine under load, once a minute.
    """
    return gc.collect()


def settle_collector(batch_records: int) -> None:
    """Tune CPython's cyclic collector for a loop of poll batches of up to ``batch_records`` records.
    Process-wide: call once, when start-up is done.

    Two costs, measured on a 300,000-event b64 backlog (3 streams, 384-d, confluent-kafka): 219-309
    ms of collections per run, about 5% of its processing time.

    - Full collections walked the ~59,000 objects of the imports and start-up, which live as long
      as the process: 21-29 ms each, 146-202 ms in all. ``gc.freeze()`` moves them out of the collector's
      sight (they are still freed by reference counting).
    - The young generation was collected 5-6 times a batch (a threshold of 700 allocations), each
      time walking the batch's live records (a Message and a partition tuple each) and promoting
      them, so that they counted towards the next full collection though they die with the batch.
      The threshold becomes ten times the batch's records (20,000 at the default
      ``kafka.max_poll_records``), so the young generation is collected at most about once a full
      batch (the threshold counts objects allocated and not yet freed).

    With both, collections took 35-43 ms of the same runs. Garbage cycles are still collected: the
    collector stays on, its older thresholds keep their defaults, and the service's loop calls
    :func:`collect` every ``limits.heap_trim_interval_s`` (in steady state an automatic collection
    can be an hour away; see there).
    """
    gc.freeze()
    young, older, oldest = gc.get_threshold()
    gc.set_threshold(max(young, 10 * int(batch_records)), older, oldest)
