"""float64 sums over the rows of a batch: the per-event passes the statistics share.

Three passes read every event of a monitored batch in float64: each row's dot product with the
baseline centroid and its squared norm (:meth:`embedwatch.window.Projection.summarise`), the column
sums of the rows and of their squares (:meth:`embedwatch.window.Bucket.add`) and the sums of runs of
``scan_every`` rows (:meth:`embedwatch.monitor.StreamMonitor._scan`). With the C extension
``embedwatch._rowsums`` (built by setup.py when a C compiler is there) a float32 batch takes one
loop per pass that converts as it reads: for the three, about 0.2 µs of a 384-d event with the AVX2
loops the extension takes on a CPU that has them, 0.5 µs with its SSE2 ones, against 0.9 in numpy,
which first converts the rows to a float64 buffer and then runs BLAS on it. A fourth loop
gives the mean-shift scan the squared distance of each window's mean to the baseline mean from two
running sums (:func:`pair_distances`), without numpy's temporaries. The same column-sum loop sums
the windows' random features (:func:`column_sums`), and :func:`row_peaks` gives the decoder each
row's largest magnitude.

Anything else (no extension, another dtype) takes the numpy versions below, which agree with the C
loops to rounding. The C loops add a batch's rows into column and segment sums one at a time, in
order, so those sums do not depend on how a stream's events were split into batches (numpy's
reductions add in an order of their own).

>>> x = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]], dtype=np.float32)
>>> dots, squares = dots_and_squares(x, np.array([1.0, 0.5]))
>>> dots.tolist(), squares.tolist()
([2.0, 5.0, 8.0, 11.0], [5.0, 25.0, 61.0, 113.0])
>>> s, q = np.zeros(2), np.zeros(2)
>>> add_rows(x, s, q)
>>> s.tolist(), q.tolist()
([16.0, 20.0], [84.0, 120.0])
>>> segment_sums(x, 2).tolist()
[[4.0, 6.0], [12.0, 14.0]]
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

_rowsums: Any
try:
    from embedwatch import _rowsums
except ImportError:  # pragma: no cover - built by pip where there is a C compiler; else the numpy versions
    _rowsums = None

#: Rows converted to float64 at a time by the numpy versions: 256 x 768 float64 is 1.5 MiB.
CHUNK = 256

_tls = threading.local()


def _float64_rows(x: np.ndarray) -> np.ndarray:
    """``x`` (at most :data:`CHUNK` rows) converted into a reused per-thread float64 buffer.

    A fresh array of this size is a fresh mmap (above glibc's threshold): its page faults cost
    more than the conversion itself. The result is overwritten by the next call.
    """
    n, d = x.shape
    bufs: dict[int, np.ndarray] | None = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    buf = bufs.get(d)
    if buf is None:
        if len(bufs) >= 8:
            bufs.clear()
        buf = bufs[d] = np.empty((CHUNK, d), dtype=np.float64)
    out = buf[:n]
    out[...] = x
    return out


def _compiled(x: np.ndarray) -> bool:
    """The C loops take C-contiguous float32 rows (every batch the decoder makes)."""
    return _rowsums is not None and x.dtype == np.float32 and x.flags.c_contiguous


def dots_and_squares(x: np.ndarray, centroid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(x @ centroid, (x * x).sum(axis=1))`` of ``(n, d)`` rows in float64; ``centroid`` float64."""
    n = x.shape[0]
    dots = np.empty(n)
    squares = np.empty(n)
    if _compiled(x):
        _rowsums.dots_and_squares(x, centroid, dots, squares)
        return dots, squares
    ones = np.ones(x.shape[1])
    for a in range(0, n, CHUNK):
        c64 = _float64_rows(x[a : a + CHUNK])
        dots[a : a + CHUNK] = c64 @ centroid
        np.multiply(c64, c64, out=c64)  # exact: a float32 squared fits a float64
        squares[a : a + CHUNK] = c64 @ ones
    return dots, squares


def add_rows(x: np.ndarray, sums: np.ndarray, squares: np.ndarray | None = None) -> None:
    """Add the rows of ``x`` ``(n, d)`` into ``sums`` ``(d,)`` float64, and their squares into
    ``squares`` unless it is ``None`` (in place)."""
    if _compiled(x):
        _rowsums.add_rows(x, sums, squares)
        return
    for a in range(0, x.shape[0], CHUNK):
        c64 = _float64_rows(x[a : a + CHUNK])
        sums += np.add.reduce(c64, axis=0)
        if squares is not None:
            np.multiply(c64, c64, out=c64)  # exact: a float32 squared fits a float64
            squares += np.add.reduce(c64, axis=0)


def column_sums(x: np.ndarray) -> np.ndarray:
    """``(d,)`` float64: the rows of ``(n, d)`` ``x`` added in order. For ``d >= 2`` that is
    ``x.sum(axis=0, dtype=np.float64)`` to the bit (numpy adds the rows of a C-contiguous array in
    order too, 3-5x slower here; a single column it sums pairwise)."""
    if _compiled(x):
        out = np.zeros(x.shape[1])
        _rowsums.add_rows(x, out, None)
        return out
    sums: np.ndarray = x.sum(axis=0, dtype=np.float64)
    return sums


def segment_sums(x: np.ndarray, e: int, out: np.ndarray | None = None) -> np.ndarray:
    """``(n / e, d)`` float64: the sums of rows ``k e .. k e + e - 1`` of ``x`` (``n`` a multiple of
    ``e``), into ``out`` when given (C-contiguous float64 of that shape)."""
    n, d = x.shape
    if n % e:
        raise ValueError(f"segment_sums: {n} rows are not a whole number of segments of {e}")
    if out is None:
        out = np.empty((n // e, d))
    if _compiled(x):
        _rowsums.segment_sums(x, out)
        return out
    np.add.reduce(x.reshape(n // e, e, d), axis=1, dtype=np.float64, out=out)
    return out


def pair_distances(rows: np.ndarray, a: np.ndarray, b: np.ndarray, scale: np.ndarray,
                   center: np.ndarray) -> np.ndarray:
    """``|| (rows[a, :d] - rows[b, :d]) * scale - center ||^2`` for each pair ``(a[i], b[i])`` of row
    numbers, ``d = len(center)``, in float64: the squared distance of each window mean (a difference
    of two running sums times one over its count) to a point, without the ``(pairs, d)``
    temporaries of the numpy version (the gathered rows, their difference, the scaled difference)."""
    a = np.ascontiguousarray(a, dtype=np.int64)
    b = np.ascontiguousarray(b, dtype=np.int64)
    scale = np.ascontiguousarray(scale, dtype=np.float64)
    center = np.ascontiguousarray(center, dtype=np.float64)
    if _rowsums is not None and rows.dtype == np.float64 and rows.flags.c_contiguous:
        out = np.empty(a.shape[0])
        _rowsums.pair_distances(rows, a, b, scale, center, out)
        return out
    d = center.shape[0]
    z = (rows[a, :d] - rows[b, :d]) * scale[:, None]
    z -= center
    dist: np.ndarray = np.einsum("ij,ij->i", z, z)
    return dist


def row_peaks(x: np.ndarray) -> np.ndarray:
    """``(n,)`` float32: the largest magnitude in each row of ``(n, d)`` float32 rows (``d >= 1``), NaN
    for a row that holds a NaN: ``np.abs(x).max(axis=1)`` without its ``(n, d)`` temporary."""
    if _compiled(x):
        out = np.empty(x.shape[0], dtype=np.float32)
        _rowsums.row_peaks(x, out)
        return out
    peaks: np.ndarray = np.abs(x).max(axis=1)
    return peaks

