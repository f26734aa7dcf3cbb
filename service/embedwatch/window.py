"""Rolling windows of mergeable sufficient statistics (pure numpy, no I/O).

A :class:`Window` is a ring of at most ``buckets`` :class:`Bucket` s. Each bucket summarises a run
of consecutive events of one stream:

* ``count``, per-dimension ``sum`` and ``sumsq`` (float64 accumulators),
* histograms of the cosine similarity to the baseline centroid and of the vector norm over the
  baseline's quantile bins (integer counts),
* the per-event similarity and norm scalars themselves (8 bytes per event each, bounded by the
  window's count bound; they make the KS/Wasserstein tests exact),
* a bounded uniform reservoir of the vectors (Algorithm R, vectorised per batch) for sample-based
  tests, with the stream index of each sampled event,
* ``min_ts`` / ``max_ts``.

All of these merge exactly: :func:`merge_buckets` gives the statistics of the union (counts,
sums, histograms exactly; the reservoir is a uniform sample of the union, drawn with a
hypergeometric split).

Memory. The sampled vectors are only needed for their random-feature sum, so a bucket that can no
longer change drops them (:meth:`Bucket.release`) once an evaluation has summed their features;
it keeps the sum, their count and stream indices. Only the open bucket and those sealed since the
last evaluation hold vectors: 0.4 instead of 2.0 MiB per 768-d stream at the default settings.

Bounds. A bucket holds at most ``window_events / buckets`` events (the settings require a
multiple) and spans at most ``window_seconds / buckets`` seconds (from its first event, or from the
newest event the window had seen when it opened, if that is later: a late event); a new one
is opened when it is full, and the oldest bucket is dropped when the ring already has ``buckets``
of them (count bound: at most ``window_events`` events, at least ``window_events - window_events /
buckets`` once warm).
Buckets whose newest event is older than ``newest_ts - window_seconds`` are evicted (time bound).

Cost. An update is a handful of vectorised numpy calls per batch plus a few per bucket touched:
O(d) per event, its float64 passes over the float32 rows in :mod:`embedwatch.rowsums` (no float64
copy of the whole batch). Evaluation (:meth:`Window.totals`) is O(buckets * d + window events)
plus the random-feature map of the reservoir rows that changed since the last evaluation: with a
:attr:`Projection.features` map, the features of every stale bucket are computed in one matrix
product, and a bucket still open keeps the feature rows of its reservoir slots, so a later
evaluation maps only the slots overwritten since (the sum is then re-added from the kept rows,
never a running sum that drifts: it equals a recomputation up to the float32 rounding of the
feature map, see :meth:`embedwatch.detectors.mmd.RFFMMD.features`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from embedwatch import rowsums
from embedwatch.config import DetectionSettings

FeatureSum = Callable[[np.ndarray], np.ndarray]
#: Up to this many events, a loop over them costs less than numpy's fixed cost per call (a
#: bucket's reservoir sampling, a batch's timestamp range): many streams, a few events each per poll.
_FEW = 16
#: What a released bucket holds instead of its reservoir (read-only, shared).
_NO_ROWS = np.zeros((0, 0), dtype=np.float32)
_NO_ROWS.flags.writeable = False
_NO_DIRTY = np.zeros(0, dtype=bool)
_NO_DIRTY.flags.writeable = False


def ts_range(ts: np.ndarray) -> tuple[float, float]:
    """``(min, max)`` of a non-empty float64 array; a few values go through a list (a numpy
    reduction's fixed cost is several times a short list's)."""
    if ts.shape[0] <= _FEW:
        t = ts.tolist()
        return min(t), max(t)
    return float(ts.min()), float(ts.max())


def ts_max(ts: np.ndarray) -> float:
    """``max`` of a non-empty float64 array, as :func:`ts_range` (one reduction, not two)."""
    return max(ts.tolist()) if ts.shape[0] <= _FEW else float(ts.max())


class Summary(NamedTuple):
    """Per-event quantities of a batch, computed once per batch by :meth:`Projection.summarise`."""

    norms: np.ndarray  # (n,) float64
    sims: np.ndarray  # (n,) float64 cosine similarity to the baseline centroid
    sim_bins: np.ndarray  # (n,) int64 bin index
    norm_bins: np.ndarray  # (n,) int64 bin index

    def slice(self, a: int, b: int) -> Summary:
        return Summary(self.norms[a:b], self.sims[a:b], self.sim_bins[a:b], self.norm_bins[a:b])


@dataclass(frozen=True)
class Projection:
    """What a window needs from the active baseline to summarise events.

    ``sim_edges`` / ``norm_edges`` are interior bin edges (see
    :func:`embedwatch.stats.quantile_edges`); ``feature_sum`` maps reservoir rows to the sum of
    their random-Fourier feature vectors (``None``: no multivariate test); ``features``, when
    given, maps rows to their ``(n, D)`` float32 feature matrix (row by row: a row's features do not
    depend on the other rows of the call) and lets the window batch and reuse feature rows;
    ``feature_sum(rows)`` must equal ``features(rows).sum(axis=0, dtype=np.float64)``.
    """

    centroid_unit: np.ndarray
    sim_edges: np.ndarray
    norm_edges: np.ndarray
    feature_sum: FeatureSum | None = None
    features: FeatureSum | None = None

    def __post_init__(self) -> None:
        c64 = np.asarray(self.centroid_unit, dtype=np.float64).ravel()
        object.__setattr__(self, "_centroid64", c64)

    @property
    def sim_bins(self) -> int:
        return int(self.sim_edges.shape[0] + 1)

    @property
    def norm_bins(self) -> int:
        return int(self.norm_edges.shape[0] + 1)

    def summarise(self, x: np.ndarray) -> Summary:
        """Norms, similarities and bin indices of a ``(n, d)`` float32 batch, in float64
        (:func:`embedwatch.rowsums.dots_and_squares`)."""
        x = np.asarray(x)
        n = x.shape[0]
        dots, sq_norms = rowsums.dots_and_squares(x, self._centroid64)  # type: ignore[attr-defined]
        norms = np.sqrt(sq_norms, out=sq_norms)
        # A masked divide, not errstate + where: entering np.errstate costs more than the rest of
        # a few-event batch's summary (many streams, a few events each per poll).
        sims = np.zeros(n)
        np.divide(dots, norms, out=sims, where=norms > 0)
        sim_bins = self.sim_edges.searchsorted(sims, side="right")
        norm_bins = self.norm_edges.searchsorted(norms, side="right")
        return Summary(norms, sims, sim_bins, norm_bins)


class Bucket:
    """Mergeable sufficient statistics of a run of events (see the module docstring)."""

    __slots__ = (
        "_dirty",
        "_feat_rows",
        "_feat_sum",
        "_feat_version",
        "_norms",
        "_sims",
        "_version",
        "capacity",
        "closed",
        "count",
        "held",
        "k",
        "max_ts",
        "min_ts",
        "norm_hist",
        "res_index",
        "res_n",
        "reservoir",
        "rng",
        "sim_hist",
        "start_ts",
        "sum",
        "sumsq",
    )

    sum: np.ndarray
    sumsq: np.ndarray
    sim_hist: np.ndarray
    norm_hist: np.ndarray
    reservoir: np.ndarray
    res_index: np.ndarray
    res_n: int
    _sims: np.ndarray
    _norms: np.ndarray
    _dirty: np.ndarray

    def __init__(
        self,
        dim: int,
        sim_bins: int,
        norm_bins: int,
        reservoir_size: int,
        capacity: int,
        rng: np.random.Generator,
        recycle: Bucket | None = None,
        rows: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        """``recycle``: a dropped bucket of the same shape whose arrays are reused (cleared);
        ``rows``: the reservoir arrays a released bucket gave back (:meth:`release`), reused."""
        self.capacity = int(capacity)
        self.k = int(reservoir_size)
        self.count = 0
        self.min_ts = math.inf
        self.max_ts = -math.inf
        self.start_ts = math.nan
        r = recycle
        if (r is not None and r.capacity == self.capacity and r.k == self.k and r.sum.shape[0] == dim
                and r.sim_hist.shape[0] == sim_bins and r.norm_hist.shape[0] == norm_bins):
            # Fresh arrays of this size are fresh pages: reusing them saves the page faults.
            self.sum, self.sumsq, self.sim_hist, self.norm_hist = r.sum, r.sumsq, r.sim_hist, r.norm_hist
            self.sum.fill(0.0)
            self.sumsq.fill(0.0)
            self.sim_hist.fill(0)
            self.norm_hist.fill(0)
            self._sims, self._norms, self.res_index = r._sims, r._norms, r.res_index
            self.res_index.fill(-1)
            if rows is None:
                rows = r.release()
            r.count = r.res_n = 0  # the old bucket no longer owns its arrays
        else:
            self.sum = np.zeros(dim, dtype=np.float64)
            self.sumsq = np.zeros(dim, dtype=np.float64)
            self.sim_hist = np.zeros(sim_bins, dtype=np.int64)
            self.norm_hist = np.zeros(norm_bins, dtype=np.int64)
            self._sims = np.empty(self.capacity, dtype=np.float64)
            self._norms = np.empty(self.capacity, dtype=np.float64)
            self.res_index = np.full(self.k, -1, dtype=np.int64)
        if rows is not None and rows[0].shape == (self.k, dim):
            self.reservoir, self._dirty = rows
            self._dirty.fill(False)
        else:
            self.reservoir = np.empty((self.k, dim), dtype=np.float32)
            self._dirty = np.zeros(self.k, dtype=bool)
        self.held = True  # the reservoir rows are in memory (see release)
        self.res_n = 0
        self.rng = rng
        self.closed = False
        self._version = 0
        self._feat_version = -1
        self._feat_sum: np.ndarray | None = None
        # Feature rows of the reservoir slots (kept only while the bucket can still change);
        # ``_dirty``: the slots written since they were computed.
        self._feat_rows: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(self.sum.shape[0])

    @property
    def reservoir_size(self) -> int:
        return self.k

    @property
    def sims(self) -> np.ndarray:
        return self._sims[: self.count]

    @property
    def norms(self) -> np.ndarray:
        return self._norms[: self.count]

    @property
    def sample(self) -> np.ndarray:
        """The reservoir rows in use (a uniform sample of the bucket's vectors); ``ValueError``
        once they were released."""
        if not self.held:
            raise ValueError("the bucket's sampled vectors were released once their features were summed")
        return self.reservoir[: self.res_n]

    def keep_feature_sum(self, total: np.ndarray) -> None:
        """Take ``total`` as the feature sum of the sample as it is now (a restored checkpoint)."""
        self._feat_sum = np.array(total, dtype=np.float64)
        self._feat_version = self._version

    def release(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Drop the sampled vectors of a final bucket whose feature sum is computed; return the
        freed arrays for a new bucket (``None``: nothing held). What the bucket's tests need of them
        (the feature sum, their count and stream indices) stays."""
        if not self.held:
            return None
        rows = (self.reservoir, self._dirty)
        self.reservoir = _NO_ROWS
        self._dirty = _NO_DIRTY
        self._feat_rows = None
        self.held = False
        return rows

    @property
    def final(self) -> bool:
        """No event can be added any more (closed, or full)."""
        return self.closed or self.count >= self.capacity

    def add(self, x: np.ndarray, s: Summary, ts: np.ndarray, first_index: int) -> None:
        """Add a run of events (``count + len(x) <= capacity``); ``first_index`` = stream index of x[0]."""
        n = x.shape[0]
        if n == 0:
            return
        if self.count + n > self.capacity:
            raise ValueError("bucket overflow")
        if self.count == 0:
            self.start_ts = float(ts[0])
        rowsums.add_rows(x, self.sum, self.sumsq)
        self.sim_hist += np.bincount(s.sim_bins, minlength=self.sim_hist.shape[0])
        self.norm_hist += np.bincount(s.norm_bins, minlength=self.norm_hist.shape[0])
        lo, hi = ts_range(ts)
        self.min_ts = min(self.min_ts, lo)
        self.max_ts = max(self.max_ts, hi)
        self._sims[self.count : self.count + n] = s.sims
        self._norms[self.count : self.count + n] = s.norms
        self._sample_into(x, self.count, first_index)
        self.count += n

    def _sample_into(self, x: np.ndarray, seen: int, first_index: int) -> None:
        """Vectorised Algorithm R: event t (0-based in the bucket) lands in slot t if t < k, else in
        slot j ~ U{0..t} when j < k; a later event overwrites an earlier one in the same slot.

        Only the last writer of each slot is copied (one gather of at most k rows), never a row
        that a later row of the same call overwrites.
        """
        k = self.reservoir_size
        n = x.shape[0]
        nfill = min(n, max(0, k - seen))
        if nfill == n:
            self.reservoir[seen : seen + n] = x
            self.res_index[seen : seen + n] = np.arange(first_index, first_index + n)
            self._dirty[seen : seen + n] = True
        elif n <= _FEW:
            # Event by event on the same draws: a few events (many streams, a few each per poll)
            # cost less as row copies than as the vectorised path's dozen numpy calls.
            draws = self.rng.random(n - nfill).tolist()
            for i in range(n):
                at = seen + i  # the event's index in the bucket
                slot = at if i < nfill else int(draws[i - nfill] * (at + 1))
                if slot < k:
                    self.reservoir[slot] = x[i]
                    self.res_index[slot] = first_index + i
                    self._dirty[slot] = True
        else:
            t = np.arange(seen + nfill, seen + n)
            j = (self.rng.random(t.shape[0]) * (t + 1)).astype(np.int64)
            keep = np.flatnonzero(j < k)
            # Row of the batch that writes each slot last (-1: none); rows increase, so the last
            # writer is the largest.
            owner = np.full(k, -1, dtype=np.int64)
            owner[seen : seen + nfill] = np.arange(nfill)
            np.maximum.at(owner, j[keep], keep + nfill)
            slots = np.flatnonzero(owner >= 0)
            if slots.size:
                rows = owner[slots]
                if slots.size == k and x.dtype == self.reservoir.dtype:
                    # mode='clip' writes straight into out (rows are in range by construction);
                    # the default 'raise' stages the rows in a temporary first: 4x slower.
                    x.take(rows, axis=0, out=self.reservoir, mode="clip")
                    self.res_index[:] = rows
                    self.res_index += first_index
                    self._dirty[:] = True
                else:
                    self.reservoir[slots] = x[rows]
                    self.res_index[slots] = first_index + rows
                    self._dirty[slots] = True
        self.res_n = min(k, seen + n)
        self._version += 1

    @property
    def features_stale(self) -> bool:
        return self._feat_sum is None or self._feat_version != self._version

    def feature_sum(self, fn: FeatureSum) -> np.ndarray:
        """Sum of the random features of the reservoir rows, cached until the reservoir changes."""
        if self._feat_sum is None or self._feat_version != self._version:
            self._feat_sum = fn(self.sample)
            self._feat_version = self._version
            self._feat_rows = None
            self._dirty[:] = False
        return self._feat_sum

    def stale_slots(self) -> np.ndarray:
        """Reservoir slots whose feature rows must be (re)computed for :meth:`set_features`."""
        if self._feat_rows is None:
            return np.arange(self.res_n)
        return np.flatnonzero(self._dirty[: self.res_n])

    def set_features(self, slots: np.ndarray, feats: np.ndarray) -> np.ndarray:
        """Take the feature rows of ``slots`` (from :meth:`stale_slots`); return the feature sum.

        The sum is always the float64 sum of the rows of slots ``0..res_n-1`` in slot order, so it
        equals ``features(sample).sum(axis=0, dtype=np.float64)`` exactly (numpy adds the rows of
        two or more columns in order; a feature map has at least 16). The rows are kept only
        while the bucket can still change (:attr:`final` is false).
        """
        if self._feat_rows is None:
            if self.final:
                self._feat_sum = rowsums.column_sums(feats)
            else:
                self._feat_rows = np.empty((self.reservoir_size, feats.shape[1]), dtype=np.float32)
                self._feat_rows[: self.res_n] = feats
        else:
            self._feat_rows[slots] = feats
        if self._feat_rows is not None:
            self._feat_sum = rowsums.column_sums(self._feat_rows[: self.res_n])
            if self.final:
                self._feat_rows = None
        self._dirty[:] = False
        self._feat_version = self._version
        assert self._feat_sum is not None
        return self._feat_sum


def merge_buckets(a: Bucket, b: Bucket, rng: np.random.Generator | None = None) -> Bucket:
    """Statistics of the union of two buckets (a new bucket; ``a`` and ``b`` are unchanged).

    Counts, sums, sums of squares, histograms and ts bounds are exact. The reservoir (size
    ``max(k_a, k_b)``) is a uniform sample of the union: the number of rows taken from ``a`` is
    hypergeometric(|A|, |B|, size), then uniform subsets of each side's reservoir.
    """
    rng = rng if rng is not None else a.rng
    if not (a.held and b.held):
        raise ValueError("buckets whose sampled vectors were released cannot be merged")
    k = max(a.reservoir_size, b.reservoir_size)
    out = Bucket(a.dim, a.sim_hist.shape[0], a.norm_hist.shape[0], k, a.count + b.count, rng)
    out.count = a.count + b.count
    out.sum = a.sum + b.sum
    out.sumsq = a.sumsq + b.sumsq
    out.sim_hist = a.sim_hist + b.sim_hist
    out.norm_hist = a.norm_hist + b.norm_hist
    out.min_ts = min(a.min_ts, b.min_ts)
    out.max_ts = max(a.max_ts, b.max_ts)
    out.start_ts = a.start_ts if a.count else b.start_ts
    out._sims[:] = np.concatenate([a.sims, b.sims])
    out._norms[:] = np.concatenate([a.norms, b.norms])
    size = min(k, out.count)
    if size:
        from_a = int(rng.hypergeometric(a.count, b.count, size)) if a.count and b.count else (
            size if a.count else 0)
        ia = rng.choice(a.res_n, size=from_a, replace=False) if from_a else np.zeros(0, dtype=np.int64)
        ib = (rng.choice(b.res_n, size=size - from_a, replace=False) if size - from_a
              else np.zeros(0, dtype=np.int64))
        out.reservoir[:size] = np.concatenate([a.reservoir[ia], b.reservoir[ib]])
        out.res_index[:size] = np.concatenate([a.res_index[ia], b.res_index[ib]])
    out.res_n = size
    out.closed = True
    return out


@dataclass
class WindowTotals:
    """The merged statistics of every bucket of a window (what detectors evaluate)."""

    count: int
    sum: np.ndarray
    sumsq: np.ndarray
    sim_hist: np.ndarray
    norm_hist: np.ndarray
    sims: np.ndarray
    norms: np.ndarray
    sample_n: int
    feature_sum: np.ndarray | None
    min_ts: float
    max_ts: float

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)


class Window:
    """Count- and time-bounded rolling window of one stream: a ring of :class:`Bucket` s.

    Parameters
    ----------
    dim
        Vector dimension.
    settings
        ``window_events``, ``window_seconds``, ``buckets`` and ``reservoir_per_bucket`` are used.
    projection
        Centroid, histogram edges and feature map of the active baseline.
    seed
        Seed of the reservoir sampling.
    """

    def __init__(
        self, dim: int, settings: DetectionSettings, projection: Projection, seed: int | Sequence[int]
    ) -> None:
        self.dim = int(dim)
        self.projection = projection
        self.max_buckets = int(settings.buckets)
        self.capacity = max(1, int(settings.window_events) // self.max_buckets)
        self.span = float(settings.window_seconds) / self.max_buckets
        self.window_seconds = float(settings.window_seconds)
        self.reservoir_size = int(settings.reservoir_per_bucket)
        self.buckets: deque[Bucket] = deque()
        self._spare: Bucket | None = None  # a dropped bucket whose arrays the next one reuses
        self._spare_rows: tuple[np.ndarray, np.ndarray] | None = None  # a released reservoir, reused
        self.newest_ts = -math.inf
        self.rng = np.random.default_rng(seed)
        # The smallest ``max_ts`` of the buckets when the newest bucket was ``_floor_of`` (see
        # :meth:`evict`).
        self._floor = -math.inf
        self._floor_of: Bucket | None = None

    def __iter__(self) -> Iterator[Bucket]:
        return iter(self.buckets)

    @property
    def count(self) -> int:
        return sum(b.count for b in self.buckets)

    def _new_bucket(self) -> Bucket:
        spare, self._spare = self._spare, None
        if len(self.buckets) >= self.max_buckets:
            spare = self.buckets.popleft()
        rows, self._spare_rows = self._spare_rows, None
        b = Bucket(self.dim, self.projection.sim_bins, self.projection.norm_bins, self.reservoir_size,
                   self.capacity, self.rng, recycle=spare, rows=rows)
        self.buckets.append(b)
        return b

    def add(self, x: np.ndarray, ts: np.ndarray, first_index: int, summary: Summary | None = None) -> None:
        """Add a batch (rows in stream order). ``summary`` may be passed if already computed."""
        n = x.shape[0]
        if n == 0:
            return
        s = summary if summary is not None else self.projection.summarise(x)
        newest = ts_max(ts)
        pos = 0
        while pos < n:
            b = self.buckets[-1] if self.buckets else None
            if b is None or b.closed or b.count >= b.capacity:
                if b is not None:
                    b.closed = True
                b = self._new_bucket()
            room = b.capacity - b.count
            seg_ts = ts[pos : pos + room]
            fresh = b.count == 0
            # A new bucket's span starts no earlier than the newest event seen: a late event (a
            # partition lagging by more than the span) otherwise anchored it in the past, and the
            # next on-time event closed it after a few events (the window shrank by ~40%).
            start = max(float(seg_ts[0]), self.newest_ts) if fresh else b.start_ts
            limit = start + self.span
            if newest <= limit:  # the usual case: nothing here is past the bucket's time span
                k = seg_ts.shape[0]
            else:
                over = seg_ts > limit
                k = int(np.argmax(over)) if over.any() else seg_ts.shape[0]
            if k == 0:
                b.closed = True
                continue
            b.add(x[pos : pos + k], s.slice(pos, pos + k), seg_ts[:k], first_index + pos)
            if fresh:
                b.start_ts = start
            pos += k
            if k < seg_ts.shape[0]:
                b.closed = True
        self.newest_ts = max(self.newest_ts, newest)
        self.evict()

    def evict(self, now: float | None = None) -> None:
        """Drop buckets whose newest event is older than ``now - window_seconds`` (default: newest ts)."""
        ref = self.newest_ts if now is None else max(now, self.newest_ts)
        limit = ref - self.window_seconds
        while self.buckets and self.buckets[0].max_ts < limit:
            self._spare = self.buckets.popleft()
        if not self.buckets:
            return
        # Out of order (late producers): a bucket after the first may have expired before it.
        # A bucket's max_ts only grows, so the smallest one seen bounds them all from below until
        # a bucket is added: then, and when the bound falls behind the limit, the buckets are
        # looked at again (looking at every update cost 1,000 streams' updates about 8%).
        if self._floor < limit or self.buckets[-1] is not self._floor_of:
            self._floor = min(b.max_ts for b in self.buckets)
            self._floor_of = self.buckets[-1]
            if self._floor < limit:  # looked at again next time
                self.buckets = deque(b for b in self.buckets if b.max_ts >= limit)

    @property
    def held_buckets(self) -> int:
        """Buckets whose sampled vectors are in memory (the open one, and those sealed since the
        last evaluation)."""
        return sum(b.held for b in self.buckets)

    def _release_sealed(self, features_summed: bool) -> None:
        """Free the vectors of final buckets whose feature sums are computed (or never needed)."""
        p = self.projection
        needed = p.features is not None or p.feature_sum is not None
        if needed and not features_summed:
            return
        for b in self.buckets:
            if b.held and b.final and not (needed and b.features_stale):
                self.release(b)

    def release(self, b: Bucket) -> None:
        """Drop the vectors of one of this window's buckets, keeping its arrays for the next one."""
        rows = b.release()
        if self._spare_rows is None:
            self._spare_rows = rows

    def totals(self, with_features: bool = True) -> WindowTotals:
        """Merge every bucket (O(buckets * d)); with ``with_features`` also the random-feature sum."""
        bs = list(self.buckets)
        p = self.projection
        if not bs:
            return WindowTotals(0, np.zeros(self.dim), np.zeros(self.dim), np.zeros(p.sim_bins, np.int64),
                                np.zeros(p.norm_bins, np.int64), np.zeros(0), np.zeros(0), 0, None,
                                math.nan, math.nan)
        fsum = self._feature_total(bs) if with_features else None
        self._release_sealed(with_features)
        return WindowTotals(
            count=sum(b.count for b in bs),
            sum=_total([b.sum for b in bs]),
            sumsq=_total([b.sumsq for b in bs]),
            sim_hist=_total([b.sim_hist for b in bs]),
            norm_hist=_total([b.norm_hist for b in bs]),
            sims=np.concatenate([b.sims for b in bs]),
            norms=np.concatenate([b.norms for b in bs]),
            sample_n=sum(b.res_n for b in bs),
            feature_sum=fsum,
            min_ts=min(b.min_ts for b in bs),
            max_ts=max(b.max_ts for b in bs),
        )

    def decision_totals(self) -> tuple[int, int, np.ndarray | None]:
        """``count``, ``sample_n`` and ``feature_sum`` of :meth:`totals`, without merging the rest:
        what an alarm decision reads. The sums, histograms and per-event scalars only feed the
        descriptive measures, so only an update's last evaluation merges them
        (``totals(with_features=False)``: 10 buckets' merge and two 1,000-value joins)."""
        bs = list(self.buckets)
        if not bs:
            return 0, 0, None
        fsum = self._feature_total(bs)
        self._release_sealed(True)
        return sum(b.count for b in bs), sum(b.res_n for b in bs), fsum

    def _feature_total(self, bs: Sequence[Bucket]) -> np.ndarray | None:
        """The random-feature sum of ``bs`` (``None`` without a feature map)."""
        p = self.projection
        if p.features is not None:
            return _total(self._feature_sums(bs, p.features))
        if p.feature_sum is not None:
            fn = p.feature_sum
            return _total([b.feature_sum(fn) for b in bs])
        return None

    @staticmethod
    def _feature_sums(bs: Sequence[Bucket], features: FeatureSum) -> list[np.ndarray]:
        """Feature sums of ``bs``: the stale rows of every bucket mapped in one matrix product."""
        plan = [(b, b.stale_slots()) for b in bs if b.features_stale]
        if plan:
            # All slots stale (the common case): a view, not a fancy-index copy.
            rows = [b.reservoir[: b.res_n] if slots.shape[0] == b.res_n else b.reservoir[slots]
                    for b, slots in plan]
            feats = features(np.concatenate(rows)) if len(rows) > 1 else features(rows[0])
            off = 0
            for b, slots in plan:
                b.set_features(slots, feats[off : off + slots.shape[0]])
                off += slots.shape[0]
        out: list[np.ndarray] = []
        for b in bs:
            assert b._feat_sum is not None
            out.append(b._feat_sum)
            if b._feat_rows is not None and b.final:
                b._feat_rows = None  # closed without a change since: its rows are no longer needed
        return out


def _total(parts: Sequence[np.ndarray]) -> np.ndarray:
    """Sum of equal-shape arrays, added in order into a fresh array: what ``np.sum(parts, axis=0)``
    gives, without first stacking the list into a new 2-D array (4x the cost for ~10 vectors)."""
    out = parts[0].copy()
    for p in parts[1:]:
        out += p
    return out


class PrefixSums:
    """Running sums of a stream's vectors at its most recent scan points (pure numpy, no I/O).

    Point ``t`` (numbered from 0, the base point) holds the float64 sum and the count of the
    stream's events from the base point up to scan point ``t``; the sum over the events between
    two kept points is the difference of their rows. With a ``basis`` ``(d, k)``, each row's
    projection ``row @ basis`` is kept as well, so the projection of a windowed mean is a
    difference of two ``k``-vectors, not a ``(d, k)`` product per window. Sum, projection and
    count share one row (``d + k + 1`` float64s; counts are exact far beyond any window): a
    window is one row difference, one fancy index for all its parts.

    The rows are a ring of ``keep + spare`` (``spare`` is a tenth of ``keep``): point ``t`` is row
    ``t % capacity``, so an append writes its rows and moves nothing. Every ``keep`` points the
    rows are re-based on the oldest point a window may still reach, so magnitudes stay bounded
    (sums of at most ``2 keep`` segments, as when the rows were compacted at each wrap). Before the
    ring, a stream fed ``spare`` or more points per update (a 100-event poll at the default
    ``scan_every``) compacted every kept row at every update, 29 of the scan's 166 µs. A longer
    append widens the ring, and :meth:`settle` (called once the rows were read) narrows it back.

    >>> p = PrefixSums(dim=2, keep=2)
    >>> p.append(np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]]), np.array([1, 1, 1]))
    1
    >>> d = p.differences(np.array([3]), np.array([1]))  # points 2 and 3: the last two segments
    >>> d[0, :2].tolist(), p.count_of(d).tolist()
    ([3.0, 5.0], [2.0])
    >>> sums, counts = p.tail()  # the last two points, re-based on the first of them
    >>> sums.tolist(), counts.tolist()
    ([[0.0, 0.0], [3.0, 3.0]], [0, 1])
    """

    def __init__(self, dim: int, keep: int, basis: np.ndarray | None = None) -> None:
        self.keep = max(1, int(keep))
        self.spare = max(2, self.keep // 10)
        self.basis = None if basis is None else np.ascontiguousarray(basis, dtype=np.float64)
        self.dim = int(dim)
        self.components = 0 if self.basis is None else int(self.basis.shape[1])
        self._rows = np.zeros((self.keep + self.spare, self.dim + self.components + 1))
        self.points = 1  # point 0: the base point, all zeros
        self._since_base = 0  # points appended since the last re-basing

    @classmethod
    def restore(cls, sums: np.ndarray, counts: np.ndarray, keep: int,
                basis: np.ndarray | None = None) -> PrefixSums:
        """Points saved from :meth:`tail` (``ValueError`` if they do not fit each other); they
        become points ``0 .. len(sums) - 1``, of which the last ``keep`` are held."""
        sums = np.asarray(sums, dtype=np.float64)
        counts = np.asarray(counts, dtype=np.int64)
        if sums.ndim != 2 or sums.shape[0] < 1 or counts.shape != (sums.shape[0],):
            raise ValueError("prefix sums and counts do not fit each other")
        p = cls(sums.shape[1], keep, basis)
        r = sums.shape[0]
        t = np.arange(max(0, r - p.keep), r)
        rows = np.empty((t.size, p._rows.shape[1]))
        rows[:, : p.dim] = sums[t]
        if p.basis is not None:
            np.matmul(sums[t], p.basis, out=rows[:, p.dim : p.dim + p.components])
        rows[:, -1] = counts[t]
        p._rows[t % p.capacity] = rows
        p.points = r
        return p

    @property
    def capacity(self) -> int:
        return int(self._rows.shape[0])

    def held(self) -> np.ndarray:
        """Numbers of the points still held (the last ``keep``, or all since the base point)."""
        return np.arange(max(0, self.points - self.keep), self.points)

    def differences(self, hi: np.ndarray | int, lo: np.ndarray) -> np.ndarray:
        """Rows ``(r, d + k + 1)``: point ``hi`` minus point ``lo`` (each of ``lo`` against ``hi``,
        an int or an array of the same shape): the window's sum, its projection and its count
        (:meth:`sum_of`, :meth:`projection_of`, :meth:`count_of`). Every ``lo`` must be at most
        ``keep`` points before the newest point that preceded the last append."""
        cap = self.capacity
        out: np.ndarray = self._rows[hi % cap] - self._rows[lo % cap]
        return out

    def windows(self, hi: np.ndarray | int, lo: np.ndarray,
                center: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The windows from point ``lo`` to point ``hi`` (as in :meth:`differences`): their event
        counts ``(r,)``, the squared distance of each window's mean to ``center`` ``(r,)`` and each
        mean's projection on the basis ``(r, k)``, what :meth:`differences` gives divided by the
        count, without its ``(r, d)`` rows (:func:`embedwatch.rowsums.pair_distances`)."""
        cap = self.capacity
        lo_rows = np.asarray(lo, dtype=np.int64) % cap
        hi_rows = np.broadcast_to(np.asarray(hi, dtype=np.int64) % cap, lo_rows.shape)
        rows, d = self._rows, self.dim
        tail = rows[hi_rows, d:] - rows[lo_rows, d:]  # the projection and the count, as differences gives them
        m = self.count_of(tail)
        inv = 1.0 / m
        sq = rowsums.pair_distances(rows, hi_rows, lo_rows, inv, center)
        proj = tail[:, : self.components] * inv[:, None]
        return m, sq, proj

    def sum_of(self, diff: np.ndarray) -> np.ndarray:
        return diff[:, : self.dim]

    def projection_of(self, diff: np.ndarray) -> np.ndarray:
        return diff[:, self.dim : self.dim + self.components]

    @staticmethod
    def count_of(diff: np.ndarray) -> np.ndarray:
        return diff[:, -1]

    def tail(self) -> tuple[np.ndarray, np.ndarray]:
        """The last ``keep`` points' sums and counts, re-based on the first of them: what a
        checkpoint needs."""
        rows = self._rows[self.held() % self.capacity]
        rows -= rows[0]
        return np.ascontiguousarray(rows[:, : self.dim]), rows[:, -1].astype(np.int64)

    def append(self, seg: np.ndarray, cnt: np.ndarray) -> int:
        """Add the sums ``seg`` ``(c, d)`` and counts ``cnt`` of ``c`` new segments; return the
        number of the first new point. The ``keep`` points before it are still held."""
        c = int(seg.shape[0])
        if self._since_base >= self.keep:
            self._rebase()
        if self.keep + c > self.capacity:
            self._resize(self.keep + max(c, self.spare))
        d, k = self.dim, self.components
        new = np.empty((c, d + k + 1))
        new[:, :d] = seg
        if self.basis is not None:
            np.matmul(seg, self.basis, out=new[:, d : d + k])
        new[:, -1] = cnt
        rows, cap = self._rows, self.capacity
        start = self.points
        prev = rows[(start - 1) % cap]
        # A loop of row adds: numpy's cumsum along rows is latency-bound and slower here.
        for i in range(c):
            row = rows[(start + i) % cap]
            np.add(prev, new[i], out=row)
            prev = row
        self.points += c
        self._since_base += c
        return start

    def settle(self) -> None:
        """Narrow a ring widened by a long append back to ``keep + spare`` rows."""
        if self.capacity > self.keep + self.spare:
            self._resize(self.keep + self.spare)

    def _resize(self, capacity: int) -> None:
        """The held points in a ring of ``capacity`` rows."""
        t = self.held()
        rows = np.zeros((capacity, self._rows.shape[1]))
        rows[t % capacity] = self._rows[t % self.capacity]
        self._rows = rows

    def _rebase(self) -> None:
        """Subtract the oldest held point from every row (the others are never read again)."""
        oldest = max(0, self.points - self.keep)
        self._rows -= self._rows[oldest % self.capacity].copy()
        self._since_base = 0


class ScalarWindow:
    """Count- and time-bounded window of per-event scalar columns (query events).

    A fixed ring of ``capacity`` rows per column, written with one vectorised assignment per batch;
    the time bound (``seconds`` before the newest ts) is applied when reading. The ring is
    allocated by the first :meth:`add`: most streams never carry query events, and an unused
    window would otherwise hold ``capacity`` float64 rows per column.

    >>> w = ScalarWindow(("top1",), capacity=3, seconds=10.0)
    >>> w.view()["top1"].tolist()
    []
    >>> w.add(np.array([0.0, 1.0, 2.0, 3.0]), top1=np.array([0.1, 0.2, 0.3, 0.4]))
    >>> w.view()["top1"].tolist()
    [0.2, 0.3, 0.4]
    >>> w.add(np.array([20.0]), top1=np.array([0.9]))
    >>> w.view()["top1"].tolist()
    [0.9]
    """

    def __init__(self, columns: Sequence[str], capacity: int, seconds: float) -> None:
        self.capacity = int(capacity)
        self.seconds = float(seconds)
        self.columns = (*columns, "ts")
        self._cols: dict[str, np.ndarray] | None = None
        self._head = 0
        self._size = 0
        self.newest_ts = -math.inf

    def _ring(self) -> dict[str, np.ndarray]:
        if self._cols is None:
            self._cols = {c: np.full(self.capacity, np.nan) for c in self.columns}
        return self._cols

    def add(self, ts: np.ndarray, **columns: np.ndarray) -> None:
        n = ts.shape[0]
        if n == 0:
            return
        data: Mapping[str, np.ndarray] = {**columns, "ts": ts}
        start = max(0, n - self.capacity)
        idx = (self._head + np.arange(n - start)) % self.capacity
        for name, col in self._ring().items():
            col[idx] = np.asarray(data[name], dtype=np.float64)[start:]
        self._head = int((self._head + n - start) % self.capacity)
        self._size = min(self.capacity, self._size + n - start)
        self.newest_ts = max(self.newest_ts, float(np.max(ts)))

    def evict(self, now: float) -> bool:
        """Drop the rows older than ``now - seconds`` (a stream whose queries stopped: the time
        bound otherwise only moves with new rows); True when some were dropped."""
        if self._cols is None or self._size == 0:
            return False
        idx = (self._head - self._size + np.arange(self._size)) % self.capacity
        keep = idx[self._cols["ts"][idx] >= now - self.seconds]
        if keep.size == self._size:
            return False
        kept = {name: col[keep] for name, col in self._cols.items()}
        for name, col in self._cols.items():
            col[:] = np.nan
            col[:keep.size] = kept[name]
        self._head = int(keep.size % self.capacity)
        self._size = int(keep.size)
        return True

    def view(self) -> dict[str, np.ndarray]:
        """Rows inside both bounds, oldest first."""
        if self._cols is None:
            return {name: np.zeros(0) for name in self.columns}
        idx = (self._head - self._size + np.arange(self._size)) % self.capacity
        ts = self._cols["ts"][idx]
        keep = idx[ts >= self.newest_ts - self.seconds]
        return {name: col[keep] for name, col in self._cols.items()}

    def state(self) -> tuple[dict[str, np.ndarray], list[float]]:
        """What a checkpoint keeps: the ring's columns (none before the first event) and
        ``[head, size, newest_ts]``."""
        cols = {} if self._cols is None else {name: col.copy() for name, col in self._cols.items()}
        return cols, [self._head, self._size, self.newest_ts]

    def restore(self, cols: Mapping[str, np.ndarray], meta: Sequence[float]) -> bool:
        """Take back :meth:`state` (False, and nothing changed, if the columns do not fit)."""
        if not all(name in cols and np.shape(cols[name]) == (self.capacity,) for name in self.columns):
            return False
        self._cols = {name: np.array(cols[name], dtype=np.float64) for name in self.columns}
        self._head, self._size, self.newest_ts = int(meta[0]), int(meta[1]), float(meta[2])
        return True
