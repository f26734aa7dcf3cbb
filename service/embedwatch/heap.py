"""Give freed heap memory back to the operating system (glibc only).

numpy frees its temporary arrays at once, but glibc keeps freed heap pages: once a large temporary
has been freed, glibc raises its mmap threshold, and later arrays of hundreds of KiB come from the
heap, where freed gaps between live arrays stay resident. In ``benchmarks/memory.py`` (768-d
streams fed to steady state, RSS slope between 4 and 16 streams) that was 1.1 MiB per stream, which
``malloc_trim(0)`` returned. The service's loop calls :func:`trim` every
``limits.heap_trim_interval_s`` (a minute by default; 3-5 ms each).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
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
