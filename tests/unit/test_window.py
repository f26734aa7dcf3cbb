"""Window buckets: exact mergeability, count/time bounds, reservoir validity."""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as ss

from embedwatch.config import DetectionSettings
from embedwatch.stats import histogram, quantile_edges
from embedwatch.window import Bucket, PrefixSums, Projection, ScalarWindow, Window, merge_buckets

DIM = 6


def projection(seed: int = 0) -> Projection:
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=(500, DIM)) + 0.5
    c = ref.mean(0)
    unit = (c / np.linalg.norm(c)).astype(np.float32)
    sims = (ref @ unit) / np.linalg.norm(ref, axis=1)
    return Projection(unit, quantile_edges(sims, 8), quantile_edges(np.linalg.norm(ref, axis=1), 8))


PROJ = projection()


def data(seed: int, n: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.normal(scale=scale, size=(n, DIM)) + 0.5).astype(np.float32)
    ts = np.sort(rng.uniform(0, 100, size=n))
    return x, ts


def bucket_of(x: np.ndarray, ts: np.ndarray, first: int, k: int, seed: int, chunks: int = 1) -> Bucket:
    b = Bucket(DIM, PROJ.sim_bins, PROJ.norm_bins, k, max(x.shape[0], 1), np.random.default_rng(seed))
    for part in np.array_split(np.arange(x.shape[0]), chunks):
        if part.size:
            a, e = int(part[0]), int(part[-1]) + 1
            b.add(x[a:e], PROJ.summarise(x[a:e]), ts[a:e], first + a)
    return b


def assert_same_stats(got: Bucket, want: Bucket) -> None:
    assert got.count == want.count
    np.testing.assert_allclose(got.sum, want.sum, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got.sumsq, want.sumsq, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(got.sim_hist, want.sim_hist)
    np.testing.assert_array_equal(got.norm_hist, want.norm_hist)
    # Per-event scalars: equal up to BLAS rounding (a row's dot product may take another kernel
    # path depending on the batch it came in).
    np.testing.assert_allclose(got.sims, want.sims, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(got.norms, want.norms, rtol=1e-12)
    assert (got.min_ts, got.max_ts) == (want.min_ts, want.max_ts)


def assert_valid_reservoir(b: Bucket, x: np.ndarray, first: int) -> None:
    k = b.reservoir_size
    assert b.res_n == min(k, b.count)
    idx = b.res_index[: b.res_n]
    assert np.unique(idx).size == idx.size, "a sampled event appears twice"
    assert np.all((idx >= first) & (idx < first + x.shape[0]))
    np.testing.assert_array_equal(b.sample, x[idx - first])


@settings(max_examples=50, deadline=None)
@given(na=st.integers(0, 120), nb=st.integers(0, 120), k=st.integers(1, 40), seed=st.integers(0, 10**6),
       chunks=st.integers(1, 5), scale=st.sampled_from([1e-3, 1.0, 50.0]))
def test_merge_equals_bucket_of_union(na: int, nb: int, k: int, seed: int, chunks: int, scale: float) -> None:
    x, ts = data(seed, na + nb, scale)
    a = bucket_of(x[:na], ts[:na], 0, k, seed, chunks)
    b = bucket_of(x[na:], ts[na:], na, k, seed + 1, chunks)
    union = bucket_of(x, ts, 0, k, seed + 2)
    merged = merge_buckets(a, b, np.random.default_rng(seed))
    assert_same_stats(merged, union)
    assert_valid_reservoir(merged, x, 0)
    # The union's statistics are those of numpy over all rows.
    if na + nb:
        x64 = x.astype(np.float64)
        np.testing.assert_allclose(union.sum, x64.sum(0), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(union.sumsq, (x64 * x64).sum(0), rtol=1e-9, atol=1e-9)
        s = PROJ.summarise(x)
        np.testing.assert_array_equal(union.sim_hist, histogram(s.sims, PROJ.sim_edges))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 50), seed=st.integers(0, 10**6), chunks=st.integers(1, 7))
def test_reservoir_is_a_bounded_sample_of_the_bucket(n: int, k: int, seed: int, chunks: int) -> None:
    x, ts = data(seed, n)
    b = bucket_of(x, ts, 1000, k, seed, chunks)
    assert_valid_reservoir(b, x, 1000)


def _reservoir_matches_algorithm_r(n: int, k: int, seed: int, bounds: list[int]) -> None:
    """Feed a bucket ``x[a:e]`` for each consecutive pair of ``bounds``; its reservoir must be the
    one Algorithm R leaves when run event by event on the same random numbers (one draw per call
    for the events past the k-th)."""
    x, ts = data(seed, n)
    b = Bucket(DIM, PROJ.sim_bins, PROJ.norm_bins, k, n, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    res = np.zeros((k, DIM), dtype=np.float32)
    index = np.full(k, -1, dtype=np.int64)
    for a, e in itertools.pairwise(bounds):
        b.add(x[a:e], PROJ.summarise(x[a:e]), ts[a:e], 7 + a)
        late = [t for t in range(a, e) if t >= k]
        u = iter(rng.random(len(late)).tolist()) if late else iter([])
        for t in range(a, e):
            slot = t if t < k else int(next(u) * (t + 1))
            if slot < k:
                res[slot], index[slot] = x[t], 7 + t
    np.testing.assert_array_equal(b.reservoir[: b.res_n], res[: b.res_n])
    np.testing.assert_array_equal(b.res_index, index)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 40), seed=st.integers(0, 10**6),
       cuts=st.lists(st.integers(1, 299), max_size=5))
def test_reservoir_equals_sequential_algorithm_r(n: int, k: int, seed: int, cuts: list[int]) -> None:
    """The vectorised update (only each slot's last writer copied) leaves exactly the reservoir
    of Algorithm R run event by event on the same random numbers (one draw per call, as above)."""
    _reservoir_matches_algorithm_r(n, k, seed, [0, *sorted({c for c in cuts if c < n}), n])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 40), seed=st.integers(0, 10**6), step=st.integers(1, 24))
def test_reservoir_of_few_event_batches_equals_sequential_algorithm_r(n: int, k: int, seed: int, step: int) -> None:
    """The same for a bucket fed a few events at a time (as with many streams), which takes the
    per-event path up to ``_FEW`` events and the vectorised one beyond."""
    _reservoir_matches_algorithm_r(n, k, seed, [*range(0, n, step), n])


def test_reservoir_sampling_is_uniform() -> None:
    """Every event of a bucket is kept with probability k/n, however the bucket was fed."""
    n, k, reps = 200, 20, 400
    x, ts = data(0, n)
    hits = np.zeros(n)
    for r in range(reps):
        b = bucket_of(x, ts, 0, k, seed=r, chunks=1 + r % 5)
        hits[b.res_index[: b.res_n]] += 1
    expected = reps * k / n
    chi2 = float(np.sum((hits - expected) ** 2 / expected))
    assert ss.chi2.sf(chi2, n - 1) > 1e-4
    # Early and late events are treated alike (Algorithm R's classic pitfall).
    assert abs(hits[: n // 2].sum() - hits[n // 2 :].sum()) < 6 * np.sqrt(reps * k / 2)
    # Merged reservoirs are uniform over the union too.
    hits[:] = 0
    for r in range(reps):
        a = bucket_of(x[:50], ts[:50], 0, k, seed=r)
        b = bucket_of(x[50:], ts[50:], 50, k, seed=r + 10_000)
        m = merge_buckets(a, b, np.random.default_rng(r))
        hits[m.res_index[: m.res_n]] += 1
    chi2 = float(np.sum((hits - expected) ** 2 / expected))
    assert ss.chi2.sf(chi2, n - 1) > 1e-4


def settings_(**kw: float) -> DetectionSettings:
    base: dict[str, float] = {"window_events": 100, "buckets": 5, "reservoir_per_bucket": 8, "min_window_events": 81,
                              "window_seconds": 1e9}
    base.update(kw)
    return DetectionSettings(**base)  # type: ignore[arg-type]


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 700), seed=st.integers(0, 10**6), cuts=st.lists(st.integers(1, 699), max_size=8))
def test_count_bound_and_window_is_the_latest_events(n: int, seed: int, cuts: list[int]) -> None:
    x, _ = data(seed, n)
    ts = np.arange(n, dtype=np.float64)
    w = Window(DIM, settings_(), PROJ, seed)
    bounds = [0, *sorted({c for c in cuts if c < n}), n]
    for a, e in itertools.pairwise(bounds):
        w.add(x[a:e], ts[a:e], a)
    cap = 100 // 5
    assert w.count <= 100
    assert w.count >= min(n, 100 - cap + 1)
    assert len(w.buckets) <= 5
    assert all(b.count <= cap for b in w.buckets)
    # Before any evaluation every bucket still holds its sampled vectors: the rows of their events.
    for b in w.buckets:
        np.testing.assert_array_equal(b.sample, x[b.res_index[: b.res_n]])
    tot = w.totals(with_features=False)
    tail = x[n - tot.count :].astype(np.float64)
    np.testing.assert_allclose(tot.sum, tail.sum(0), rtol=1e-9)
    np.testing.assert_allclose(tot.sumsq, (tail * tail).sum(0), rtol=1e-9)
    np.testing.assert_allclose(tot.sims, PROJ.summarise(x[n - tot.count :]).sims, rtol=1e-12, atol=1e-15)
    assert tot.min_ts == n - tot.count and tot.max_ts == n - 1
    idx = np.concatenate([b.res_index[: b.res_n] for b in w.buckets])
    assert np.all(idx >= n - tot.count)
    # Without a feature map the vectors are needed by nothing: every final bucket dropped them.
    assert [b.held for b in w.buckets] == [not b.final for b in w.buckets]


def test_time_bound_evicts_old_buckets_and_splits_by_span() -> None:
    s = settings_(window_seconds=100.0, window_events=1000, buckets=10)  # span 10 s per bucket
    w = Window(DIM, s, PROJ, 0)
    x, _ = data(1, 300)
    ts = np.concatenate([np.linspace(0, 50, 100), np.linspace(200, 260, 200)])
    w.add(x, ts, 0)
    # Events up to 50 s are older than 260 - 100: their buckets are gone.
    assert w.totals(with_features=False).min_ts >= 160.0
    assert w.count == 200
    for b in w.buckets:
        assert b.max_ts - b.min_ts <= 10.0
        assert b.max_ts >= 260 - 100
    w.evict(now=1000.0)
    assert w.count == 0 and w.totals().count == 0


def test_time_bound_evicts_expired_buckets_behind_a_newer_one() -> None:
    """Late producers (timestamps out of order): a bucket after the first may expire first; only
    the first was looked at, and up to 57 events past the bound stayed (2 events/s, +-40 s)."""
    s = settings_(window_seconds=100.0, window_events=1000, buckets=10)
    w = Window(DIM, s, PROJ, 0)
    rng = np.random.default_rng(0)
    x, _ = data(2, 3000)
    ts = np.arange(3000) * 0.5 + rng.normal(0, 40, 3000)
    for i in range(0, 3000, 10):
        w.add(x[i:i + 10], ts[i:i + 10], i)
        assert all(b.max_ts >= w.newest_ts - 100.0 for b in w.buckets)
    assert w.totals(with_features=False).count == w.count > 0


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 400), seed=st.integers(0, 10**6), step=st.integers(1, 24))
def test_time_bound_holds_for_batches_of_a_few_or_many_events(n: int, seed: int, step: int) -> None:
    """Batches of a few events take the timestamps' short paths: each bucket still spans at most
    its share of window_seconds, and the window is the latest events of buckets not yet expired."""
    s = settings_(window_seconds=100.0, window_events=10_000, buckets=10)  # span 10 s per bucket
    w = Window(DIM, s, PROJ, seed)
    x, _ = data(seed, n)
    ts = np.cumsum(np.random.default_rng(seed).exponential(2.0, n))  # spans crossed inside batches
    for a in range(0, n, step):
        w.add(x[a : a + step], ts[a : a + step], a)
    assert w.newest_ts == ts[-1]
    for b in w.buckets:
        assert b.max_ts - b.min_ts <= 10.0
        assert b.max_ts >= ts[-1] - 100.0
    tot = w.totals(with_features=False)
    assert tot.count == w.count and tot.min_ts == ts[n - tot.count] and tot.max_ts == ts[-1]
    np.testing.assert_allclose(tot.sum, x[n - tot.count :].astype(np.float64).sum(0), rtol=1e-9)


def test_feature_sum_is_cached_until_the_reservoir_changes() -> None:
    calls: list[int] = []

    def fsum(rows: np.ndarray) -> np.ndarray:
        calls.append(rows.shape[0])
        return rows.astype(np.float64).sum(0)

    proj = Projection(PROJ.centroid_unit, PROJ.sim_edges, PROJ.norm_edges, fsum)
    w = Window(DIM, settings_(), proj, 0)
    x, ts = data(2, 50)
    w.add(x, ts, 0)
    t1 = w.totals()
    n_calls = len(calls)
    t2 = w.totals()
    assert len(calls) == n_calls  # nothing changed: all cached
    assert t1.feature_sum is not None and t2.feature_sum is not None
    idx = np.concatenate([b.res_index[: b.res_n] for b in w.buckets])
    np.testing.assert_allclose(t1.feature_sum, x[idx].astype(np.float64).sum(0), rtol=1e-6)
    w.add(x[:5], ts[:5], 50)
    w.totals()
    assert len(calls) == n_calls + 1  # only the open bucket is recomputed


def test_scalar_window_bounds() -> None:
    w = ScalarWindow(("v",), capacity=4, seconds=5.0)
    w.add(np.arange(10.0), v=np.arange(10.0) * 2)
    assert w.view()["v"].tolist() == [12.0, 14.0, 16.0, 18.0]
    w.add(np.array([13.0, 14.0]), v=np.array([1.0, 2.0]))
    assert w.view()["v"].tolist() == [18.0, 1.0, 2.0]  # 8 and 7 are older than 14 - 5


def test_scalar_window_holds_nothing_until_its_first_event_and_round_trips_its_state() -> None:
    w = ScalarWindow(("v", "u"), capacity=4, seconds=5.0)
    assert w._cols is None
    assert set(w.view()) == {"v", "u", "ts"} and all(c.size == 0 for c in w.view().values())
    cols, meta = w.state()
    assert cols == {} and meta[:2] == [0, 0]
    fresh = ScalarWindow(("v", "u"), capacity=4, seconds=5.0)
    assert fresh.restore(cols, meta) is False and fresh._cols is None  # nothing to take back
    w.add(np.arange(6.0), v=np.arange(6.0), u=-np.arange(6.0))
    cols, meta = w.state()
    assert set(cols) == {"v", "u", "ts"}
    assert fresh.restore(cols, meta) is True
    for name, col in w.view().items():
        np.testing.assert_array_equal(fresh.view()[name], col)
    cols["v"][:] = 0.0  # the state is a copy
    assert w.view()["v"].tolist() == [2.0, 3.0, 4.0, 5.0]
    assert ScalarWindow(("v", "u"), capacity=3, seconds=5.0).restore(w.state()[0], meta) is False


def test_bucket_rejects_overflow() -> None:
    x, ts = data(3, 5)
    b = Bucket(DIM, PROJ.sim_bins, PROJ.norm_bins, 2, 4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="overflow"):
        b.add(x, PROJ.summarise(x), ts, 0)


def rff_projection(n_features: int = 32) -> tuple[Projection, list[int]]:
    """PROJ with a real random-feature map; the list records how many rows each map call got."""
    from embedwatch.detectors.mmd import RFFMMD

    ref, _ = data(123, 300)
    mmd = RFFMMD.fit(ref, n_features=n_features, seed=5)
    rows: list[int] = []

    def features(x: np.ndarray) -> np.ndarray:
        rows.append(x.shape[0])
        return mmd.features(x)

    return Projection(PROJ.centroid_unit, PROJ.sim_edges, PROJ.norm_edges, mmd.feature_sum, features), rows


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 400), seed=st.integers(0, 10**6), cuts=st.lists(st.integers(1, 399), max_size=10),
       k=st.integers(4, 30))
def test_incremental_feature_sums_equal_a_recomputation(n: int, seed: int, cuts: list[int], k: int) -> None:
    """Feature rows kept per slot of the open bucket, batched over stale buckets, give the same
    window feature sum as mapping every reservoir from scratch, after every add."""
    proj, _ = rff_projection()
    w = Window(DIM, settings_(reservoir_per_bucket=k), proj, seed)
    x, _ = data(seed, n)
    ts = np.arange(n, dtype=np.float64)
    bounds = [0, *sorted({c for c in cuts if c < n}), n]
    assert proj.feature_sum is not None
    for a, e in itertools.pairwise(bounds):
        w.add(x[a:e], ts[a:e], a)
        got = w.totals().feature_sum
        # The sampled vectors of each bucket, from their stream indices (sealed buckets dropped them).
        samples = [x[b.res_index[: b.res_n]] for b in w.buckets]
        want = np.sum([proj.feature_sum(v) for v in samples], axis=0)
        assert got is not None
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
        # The sum of the per-bucket recomputations equals the map of the whole window sample too.
        np.testing.assert_allclose(got, proj.feature_sum(np.concatenate(samples)), rtol=1e-5, atol=1e-5)
        assert all(b.held == (not b.final) for b in w.buckets)


def test_open_bucket_maps_only_overwritten_slots() -> None:
    proj, rows = rff_projection()
    s = settings_(window_events=1000, buckets=2, reservoir_per_bucket=20)  # buckets of 500 events
    w = Window(DIM, s, proj, 0)
    x, _ = data(4, 400)
    ts = np.arange(400, dtype=np.float64)
    w.add(x[:100], ts[:100], 0)
    w.totals()
    assert rows == [20]
    b = w.buckets[-1]
    before = b.res_index.copy()
    w.add(x[100:110], ts[100:110], 100)
    w.totals()
    changed = int(np.count_nonzero(b.res_index != before))
    assert rows[1:] == ([changed] if changed else [])  # only the overwritten slots are mapped again
    w.totals()
    assert len(rows) == 1 + (1 if changed else 0)  # unchanged: nothing mapped
    # Several stale buckets are mapped in one call.
    rows.clear()
    w.add(x[110:400], ts[110:400], 110)
    assert len(w.buckets) == 1
    w2 = Window(DIM, settings_(window_events=100, buckets=5, reservoir_per_bucket=8), proj, 1)
    w2.add(x[:100], ts[:100], 0)
    rows.clear()
    w2.totals()
    assert rows == [5 * 8]


def test_features_of_one_row_match_the_same_row_in_a_batch() -> None:
    from embedwatch.detectors.mmd import RFFMMD

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(200, 384)).astype(np.float32)
    mmd = RFFMMD.fit(ref, n_features=256, seed=0)
    full = mmd.features(ref[:50])
    # Bit-for-bit where the BLAS kernel rounds a row independently of its position in the call
    # (OpenBLAS SkylakeX); to the float32 rounding of x @ W otherwise (OpenBLAS Haswell).
    g = np.asarray(mmd.weights, dtype=np.float32)
    exact = all(np.array_equal(ref[i : i + 2] @ g, (ref[:50] @ g)[i : i + 2]) for i in (0, 7, 48))
    for i in (0, 7, 49):
        one = mmd.features(ref[i : i + 1])
        if exact:
            np.testing.assert_array_equal(one, full[i : i + 1])
        else:
            np.testing.assert_allclose(one, full[i : i + 1], rtol=0, atol=1e-6 * float(np.abs(full).max()))


def test_recycled_bucket_arrays_start_clean() -> None:
    """A new bucket reusing a dropped one's arrays has the same statistics as a fresh one."""
    s = settings_(window_events=50, buckets=2, reservoir_per_bucket=8, min_window_events=26)  # buckets of 25 events
    x, _ = data(6, 200)
    ts = np.arange(200, dtype=np.float64)
    w = Window(DIM, s, PROJ, 0)
    w.add(x, ts, 0)  # 8 buckets opened, 6 dropped and reused
    newest = w.buckets[-1]
    ref = bucket_of(x[175:200], ts[175:200], 175, 8, 0)
    assert_same_stats(newest, ref)
    assert_valid_reservoir(newest, x[175:200], 175)
    assert np.all(newest.res_index[newest.res_n:] == -1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=30), st.integers(1, 12), st.integers(0, 2**16))
def test_prefix_sums_windows_match_a_brute_force_sum(appends: list[int], keep: int, seed: int) -> None:
    """Every window the scan may ask for (at most ``keep`` points back) sums the right segments,
    through wraps of the ring, re-basings, widening, settling and a checkpoint round trip."""
    rng = np.random.default_rng(seed)
    d, k = 5, 3
    basis = rng.normal(size=(d, k))
    p = PrefixSums(d, keep, basis)
    center = rng.normal(size=d)
    segs: list[np.ndarray] = []
    cnts: list[int] = []
    shift = 0  # the stream's point t is p's point t - shift (a restore renumbers from 0)
    for i, c in enumerate(appends):
        seg = rng.normal(size=(c, d)) * 10.0 ** rng.integers(-2, 3)
        cnt = rng.integers(1, 50, size=c)
        first = p.append(seg, cnt) + shift
        segs.extend(seg)
        cnts.extend(cnt.tolist())
        total = len(segs)
        assert first == total - c + 1 and p.points + shift == total + 1  # point t: after segment t
        for j in range(c):
            point = first + j
            back = np.array([point - w for w in range(1, keep + 1) if point - w >= 0], dtype=np.int64)
            if back.size == 0:
                continue
            diff = p.differences(point - shift, back - shift)
            m, sq, proj = p.windows(point - shift, back - shift, center)
            for i, (row, lo) in enumerate(zip(diff, back.tolist(), strict=True)):
                want = np.sum(segs[lo:point], axis=0)
                got = p.sum_of(row[None])[0]
                np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * max(1.0, np.abs(want).max()))
                assert p.count_of(row[None])[0] == m[i] == sum(cnts[lo:point])
                np.testing.assert_allclose(p.projection_of(row[None])[0], want @ basis, rtol=1e-8,
                                           atol=1e-8 * max(1.0, np.abs(want).max()))
                # The window's mean: its squared distance to a point and its projection.
                mean = want / m[i]
                scale = max(1.0, np.abs(mean).max(), np.abs(center).max())
                np.testing.assert_allclose(sq[i], np.sum((mean - center) ** 2), rtol=1e-8, atol=1e-8 * scale**2)
                np.testing.assert_allclose(proj[i], mean @ basis, rtol=1e-8, atol=1e-8 * scale)
        p.settle()
        assert p.capacity == keep + p.spare
        if i % 3 == 2:  # checkpoint round trip: the restored points answer the same windows
            sums, counts = p.tail()
            q = PrefixSums.restore(sums, counts, keep, basis)
            ph, qh = p.held(), q.held()
            assert ph.size == qh.size == min(keep, p.points)
            np.testing.assert_allclose(q.differences(qh, np.full(qh.size, qh[0])),
                                       p.differences(ph, np.full(ph.size, ph[0])), atol=1e-9)
            shift += p.points - q.points
            p = q


def test_prefix_sums_stay_bounded_on_a_long_stream() -> None:
    """Rows hold sums since a recent base point, not since the stream began: a stream of
    segments with a mean away from zero (as embeddings have) keeps its windows exact."""
    keep = 5
    p = PrefixSums(2, keep, np.eye(2))
    seg = np.array([[1000.0, -3.0]])
    for _ in range(20_000):
        first = p.append(seg, np.array([20]))
        assert np.abs(p._rows).max() <= 2 * keep * 1000.0 + 1000.0
    diff = p.differences(first, np.array([first - keep]))
    np.testing.assert_array_equal(p.sum_of(diff), [[keep * 1000.0, keep * -3.0]])
    assert p.count_of(diff).tolist() == [keep * 20]


def test_prefix_sums_restore_rejects_rows_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        PrefixSums.restore(np.zeros((3, 2)), np.zeros(2, dtype=np.int64), keep=2)


@pytest.mark.parametrize("lag", [0.0, 200.0, 600.0, 1800.0])
def test_batches_of_a_lagging_partition_do_not_shrink_the_window(lag: float) -> None:
    """Poll batches alternate between a partition on time and one ``lag`` seconds behind (more
    than a bucket's 360 s span): a bucket opened by a late batch spanned from its late first event,
    the next on-time batch closed it at 20 events, and the window held ~570 instead of ~960."""
    s = settings_(window_seconds=3600.0, window_events=1000, buckets=10)
    w = Window(DIM, s, PROJ, 0)
    x, _ = data(3, 6000)
    sizes = []
    for k in range(300):  # 10 events/s, batches of 20
        ts = 100.0 + 2.0 * k + 0.1 * np.arange(20)
        if k % 2:
            ts -= lag
        w.add(x[20 * k : 20 * k + 20], ts, 20 * k)
        sizes.append(w.count)
    cap = 1000 // 10
    assert min(sizes[100:]) >= 1000 - cap  # the count bound, not the lag, sets the size
    assert all(b.count == cap for b in list(w.buckets)[:-1])
    tot = w.totals(with_features=False)
    np.testing.assert_allclose(tot.sum, x[6000 - tot.count :].astype(np.float64).sum(0), rtol=1e-9)


class _LooksEveryTime(Window):
    """:meth:`Window.evict` as it was before it kept a lower bound of the buckets' ``max_ts``:
    every bucket looked at on every call."""

    def evict(self, now: float | None = None) -> None:
        ref = self.newest_ts if now is None else max(now, self.newest_ts)
        limit = ref - self.window_seconds
        while self.buckets and self.buckets[0].max_ts < limit:
            self._spare = self.buckets.popleft()
        if any(b.max_ts < limit for b in self.buckets):
            self.buckets = deque(b for b in self.buckets if b.max_ts >= limit)


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 10**6), steps=st.lists(st.tuples(st.integers(1, 30), st.floats(0.0, 60.0),
                                                           st.booleans()), min_size=1, max_size=60),
       jitter=st.sampled_from([0.0, 5.0, 40.0, 120.0]))
def test_eviction_with_late_events_equals_looking_at_every_bucket(
        seed: int, steps: list[tuple[int, float, bool]], jitter: float) -> None:
    """Out-of-order timestamps, batches of 1-30 events, evictions at a later ``now`` between them:
    the window keeps exactly the buckets that looking at every bucket each time keeps."""
    s = settings_(window_seconds=100.0, window_events=100, buckets=10)
    a, b = Window(DIM, s, PROJ, seed), _LooksEveryTime(DIM, s, PROJ, seed)
    rng = np.random.default_rng(seed)
    t, i = 0.0, 0
    for n, gap, evict_later in steps:
        x, _ = data(seed + i, n)
        t += gap
        ts = np.maximum(t + rng.normal(0.0, jitter, n) if jitter else np.full(n, t), 0.0)
        a.add(x, ts, i)
        b.add(x, ts, i)
        i += n
        if evict_later:
            a.evict(now=t + gap)
            b.evict(now=t + gap)
        assert [(c.count, c.max_ts) for c in a.buckets] == [(c.count, c.max_ts) for c in b.buckets]
        assert all(c.max_ts >= max(a.newest_ts, t + gap if evict_later else -np.inf) - 100.0 for c in a.buckets)
