"""Detectors against batch scipy/numpy computations and river on the same data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from river.drift import PageHinkley as RiverPageHinkley
from scipy import stats as ss

from embedwatch.detectors import RFFMMD, DimensionMeanShift, DistributionShift, DuplicateIds, PageHinkley


def river_detections(x: np.ndarray, **kw: float | str) -> list[int]:
    ph = RiverPageHinkley(**kw)  # type: ignore[arg-type]
    out = []
    for i, v in enumerate(x.tolist()):
        ph.update(v)
        if ph.drift_detected:
            out.append(i)
    return out


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10**6), mode=st.sampled_from(["up", "down", "both"]),
       alpha=st.sampled_from([1.0, 1 - 1e-4, 0.99]), delta=st.sampled_from([0.005, 0.2, 0.5]),
       threshold=st.sampled_from([5.0, 20.0, 50.0]), batch=st.integers(1, 900))
def test_page_hinkley_matches_river(seed: int, mode: str, alpha: float, delta: float, threshold: float,
                                    batch: int) -> None:
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0, 1, 700), rng.normal(2.5, 1, 500), rng.normal(-1, 2, 600)])
    kw = dict(min_instances=30, delta=delta, threshold=threshold, alpha=alpha, mode=mode)
    want = river_detections(x, **kw)
    ph = PageHinkley(**kw)  # type: ignore[arg-type]
    got: list[int] = []
    for start in range(0, x.size, batch):
        got += [start + int(i) for i in ph.update_many(x[start : start + batch])]
    assert got == want


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), mode=st.sampled_from(["up", "down", "both"]),
       alpha=st.sampled_from([1.0, 1 - 1e-4, 0.99]), threshold=st.sampled_from([2.0, 5.0, 50.0]),
       sizes=st.lists(st.integers(1, 64), min_size=1, max_size=40))
def test_page_hinkley_small_batch_loop_equals_the_vectorised_pass(seed: int, mode: str, alpha: float,
                                                                  threshold: float, sizes: list[int]) -> None:
    """Batches up to ``_SMALL`` run as a plain loop: same detections, bit-identical state."""
    import embedwatch.detectors.page_hinkley as ph_module

    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, sum(sizes)) + np.repeat(rng.normal(0, 2, len(sizes)), sizes)
    kw = dict(min_instances=10, delta=0.05, threshold=threshold, alpha=alpha, mode=mode)
    loop, vec = PageHinkley(**kw), PageHinkley(**kw)  # type: ignore[arg-type]
    assert max(sizes) <= ph_module._SMALL
    start = 0
    for k in sizes:
        got = loop.update_many(x[start : start + k])
        saved, ph_module._SMALL = ph_module._SMALL, 0
        try:
            want = vec.update_many(x[start : start + k])
        finally:
            ph_module._SMALL = saved
        assert got.tolist() == want.tolist()
        assert vars(loop) == vars(vec)
        start += k


@settings(max_examples=60, deadline=None)
@given(u=st.lists(st.floats(-1e6, 1e6), min_size=0, max_size=300), s0=st.floats(-1e6, 1e6),
       alpha=st.sampled_from([1.0, 1 - 1e-4, 0.99, 0.5, 1e-3]))
def test_faded_sums_equal_a_first_order_lfilter_to_the_bit(u: list[float], s0: float, alpha: float) -> None:
    from scipy.signal import lfilter

    from embedwatch.detectors.page_hinkley import faded_sums

    x = np.array(u, dtype=np.float64)
    got = faded_sums(x, s0, alpha)
    assert got.shape == x.shape
    if x.size:
        want, _ = lfilter([1.0], [1.0, -alpha], x, zi=[alpha * s0])
        assert got.tolist() == want.tolist()


def test_page_hinkley_detects_a_shift_and_not_noise() -> None:
    rng = np.random.default_rng(7)
    ph = PageHinkley(delta=0.5, threshold=50.0, alpha=1.0)
    assert ph.update_many(rng.normal(size=50_000)).size == 0
    assert ph.statistic < 50.0
    hits = ph.update_many(rng.normal(-3.0, 1.0, size=200))
    assert hits.size >= 1 and hits[0] < 60
    with pytest.raises(ValueError):
        PageHinkley(mode="sideways")


def test_rff_features_approximate_the_gaussian_kernel() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    mmd = RFFMMD.fit(x, n_features=4096, seed=1)
    f = mmd.features(x).astype(np.float64)
    d2 = ((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1)
    k = np.exp(-d2 / (2 * mmd.bandwidth**2))
    assert np.abs(f @ f.T - k).max() < 0.08


def test_mmd_statistic_is_the_v_statistic_of_the_feature_kernel() -> None:
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(300, 10)).astype(np.float32)
    win = (rng.normal(size=(120, 10)) + 0.2).astype(np.float32)
    mmd = RFFMMD.fit(ref, n_features=128, seed=3)
    fr, fw = mmd.features(ref).astype(np.float64), mmd.features(win).astype(np.float64)
    kxx, kyy, kxy = fw @ fw.T, fr @ fr.T, fw @ fr.T
    v_stat = kxx.mean() + kyy.mean() - 2 * kxy.mean()
    r = mmd.test(mmd.feature_sum(win) / 120, 120, alpha=1e-6)
    assert r.statistic == pytest.approx(v_stat, rel=1e-6)
    # Debiased by the null mean, from the eigenvalues of the reference feature covariance.
    trace = np.trace(np.cov(fr, rowvar=False))
    assert r.score == pytest.approx(v_stat - (1 / 120 + 1 / 300) * trace, rel=1e-6, abs=1e-9)
    assert r.m == 120 and 0 <= r.p_value <= 1


def test_mmd_false_alarm_rate_is_calibrated() -> None:
    """Under H0 the p-values are ~uniform: the rejection rate at level a is close to a."""
    rng = np.random.default_rng(2)
    d, n, m = 16, 1000, 300
    mix = rng.normal(size=(d, d)) / np.sqrt(d)

    def draw(k: int) -> np.ndarray:
        return (rng.standard_t(5, size=(k, d)) @ mix).astype(np.float32)  # heavy-ish tails

    pvals = []
    for _ in range(6):
        mmd = RFFMMD.fit(draw(n), n_features=64, seed=int(rng.integers(1000)))
        feats = mmd.features(draw(m * 50)).astype(np.float64).reshape(50, m, -1).mean(1)
        pvals += [mmd.test(f, m, 0.01).p_value for f in feats]
    p = np.asarray(pvals)
    assert abs(np.mean(p < 0.05) - 0.05) < 0.035
    assert np.mean(p < 0.01) < 0.03
    assert p.min() > 1e-5


def test_mmd_detects_a_shift_and_threshold_matches_p_value() -> None:
    rng = np.random.default_rng(3)
    ref = rng.normal(size=(1000, 8)).astype(np.float32)
    mmd = RFFMMD.fit(ref, n_features=64, seed=0)
    win = rng.normal(size=(400, 8)).astype(np.float32)
    win[:, 0] += 0.6
    r = mmd.test(mmd.feature_sum(win) / 400, 400, alpha=1e-6)
    assert r.p_value < 1e-6 and r.score > r.threshold > 0
    # At exactly the threshold, the p-value is the level.
    raw = r.threshold + mmd.null_mean(400)
    assert mmd.p_value(raw, 400) == pytest.approx(1e-6, rel=1e-3)
    assert math.isnan(mmd.test(np.zeros(64), 1, 0.01).score)


def test_dimension_mean_shift_matches_scipy() -> None:
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(1500, 40))
    win = rng.normal(size=(700, 40))
    win[:, :6] += np.linspace(0.05, 0.5, 6)
    det = DimensionMeanShift(ref.mean(0), ref.var(0, ddof=1), 1500, alpha=0.01)
    p = det.p_values(700, win.mean(0), win.var(0, ddof=1))
    ref_p = ss.ttest_ind(win, ref, equal_var=False).pvalue
    np.testing.assert_allclose(p, ref_p, rtol=1e-6)
    expected = float(np.mean(ss.false_discovery_control(ref_p) <= 0.01))
    assert det.ratio(700, win.mean(0), win.var(0, ddof=1)) == expected
    assert 4 / 40 <= expected <= 7 / 40
    assert math.isnan(det.ratio(1, win[0], np.zeros(40)))


def test_distribution_shift_matches_scipy() -> None:
    rng = np.random.default_rng(5)
    ref = rng.normal(size=1000)
    win = rng.normal(0.2, 1.1, size=640)
    r = DistributionShift(ref).compare(win)
    ks = ss.ks_2samp(win, ref, method="asymp")
    assert r["ks_statistic"] == pytest.approx(ks.statistic, rel=1e-12)
    assert r["ks_p_value"] == pytest.approx(ks.pvalue, rel=1e-6)
    assert r["wasserstein"] == pytest.approx(ss.wasserstein_distance(win, ref), rel=1e-9)
    assert math.isnan(r["psi"]) and math.isnan(r["js"])
    r2 = DistributionShift(ref, np.array([500, 500])).compare(win, np.array([100, 540]))
    assert r2["psi"] > 0.1 and 0 < r2["js"] < 1


def brute_force_duplicates(batches: list[list[str | None]], capacity: int, segment: int = 1) -> list[int]:
    """Duplicates per batch against the ids kept as segments of ``segment`` ids (after each id, the
    oldest dropped while the rest hold ``capacity``); ``segment=1``: the exact last ``capacity``."""
    sealed: list[list[str]] = []
    open_: list[str] = []
    out = []
    for batch in batches:
        before = set(open_).union(*sealed)
        seen: set[str] = set()
        dups = 0
        for i in batch:
            if i is None:
                continue
            if i in before or i in seen:
                dups += 1
            seen.add(i)
            open_.append(i)
            if len(open_) == segment:
                sealed.append(open_)
                open_ = []
            while sealed and sum(map(len, sealed[1:])) + len(open_) >= capacity:
                sealed.pop(0)
        out.append(dups)
    return out


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(st.lists(st.one_of(st.none(), st.sampled_from("abcdefghij")), max_size=12),
                        max_size=10),
       capacity=st.integers(1, 15), small=st.sampled_from([-1, 4, 64]), merge_every=st.sampled_from([1, 3, 256]),
       segments=st.sampled_from([1, 2, 4, 7]))
def test_duplicate_ids_match_a_brute_force_reference(batches: list[list[str | None]], capacity: int, small: int,
                                                     merge_every: int, segments: int) -> None:
    """Every mix of the vectorised path (batches longer than ``small``) and the buffered per-id
    path, merged into the open segment every ``merge_every`` ids, counts what brute force does;
    and between what exact memories of ``capacity`` and ``capacity + segment - 1`` ids count."""
    import embedwatch.detectors.duplicates as dup_module

    saved = dup_module._SMALL, dup_module._MERGE_EVERY, dup_module._SEGMENTS
    dup_module._SMALL, dup_module._MERGE_EVERY, dup_module._SEGMENTS = small, merge_every, segments
    try:
        d = DuplicateIds(capacity)
        got = [d.update(b) for b in batches]
        # The same ids as 64-bit hashes (update_hashes, each path of its own) count the same.
        by_hash = DuplicateIds(capacity)
        hashes = [np.array([hash(i) for i in b if i is not None], dtype=np.int64) for b in batches]
        assert [by_hash.update_hashes(h) if h.shape[0] else 0 for h in hashes] == got
        seg = d.segment
        size = d.size
        d._merge()
    finally:
        dup_module._SMALL, dup_module._MERGE_EVERY, dup_module._SEGMENTS = saved
    assert seg == -(-capacity // segments)
    assert got == brute_force_duplicates(batches, capacity, seg)
    assert d.total == sum(got)
    lo, hi = brute_force_duplicates(batches, capacity), brute_force_duplicates(batches, capacity + seg - 1)
    assert all(a <= g <= b for a, g, b in zip(lo, got, hi, strict=True))
    # Bounded: at least the last ``capacity`` ids (or all of them), fewer than ``capacity + seg``.
    n_ids = sum(1 for b in batches for i in b if i is not None)
    assert min(capacity, n_ids) <= size < capacity + seg
    for keys in (d._sealed, d._open):
        assert keys.dtype == np.int32 and bool(np.all(keys[1:] >= keys[:-1]))
    assert all(n == seg for _, n in d._gens) and d._sealed.shape[0] == d._nsealed == seg * len(d._gens)
    assert sorted(np.unique(d._sealed_gen).tolist()) == sorted(g for g, _ in d._gens)


def test_duplicate_ids_memory_is_5_bytes_per_id_at_steady_state() -> None:
    d = DuplicateIds(100_000)
    rng = np.random.default_rng(0)
    for _ in range(150):
        d.update_hashes(rng.integers(-2**63, 2**63 - 1, size=1000))
    for _ in range(2000):
        d.update_hashes(rng.integers(-2**63, 2**63 - 1, size=10))
    assert 100_000 <= d.size < 125_000
    assert d.nbytes == 5 * d._nsealed + 4 * d._open.shape[0]


def test_duplicate_ids_false_matches_stay_at_the_fingerprint_rate() -> None:
    """Distinct ids falsely match at ``m / 2**32`` per id (32-bit fingerprints of 64-bit hashes):
    1,000,000 distinct hashes through a memory of 100,000 to 125,000 ids expect about 25."""
    d = DuplicateIds(100_000)
    rng = np.random.default_rng(1)
    h = np.unique(rng.integers(-2**63, 2**63 - 1, size=1_000_000))
    h = rng.permutation(h)
    got = sum(d.update_hashes(h[i : i + 2000]) for i in range(0, h.shape[0], 2000))
    sizes = np.minimum(np.arange(h.shape[0]), 112_500)  # memory size seen by each id, about
    expected = float(np.sum(sizes)) / 2**32
    assert 20 < expected < 30
    assert expected / 3 <= got <= expected * 2.5  # Poisson(25): outside with probability < 1e-6


def test_covariance_eigvals_match_numpy_in_both_regimes() -> None:
    from embedwatch.detectors.mmd import covariance_eigvals

    rng = np.random.default_rng(6)
    for n, dim in ((30, 50), (200, 20)):
        f = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim))
        want = np.sort(np.clip(np.linalg.eigvalsh(np.cov(f, rowvar=False)), 0, None))[::-1]
        np.testing.assert_allclose(covariance_eigvals(f), want, rtol=1e-8, atol=1e-8 * want.max())


@pytest.mark.parametrize("module", [
    "embedwatch.detectors.mmd", "embedwatch.detectors.page_hinkley", "embedwatch.detectors.dimensions",
    "embedwatch.detectors.distribution", "embedwatch.detectors.duplicates", "embedwatch.window",
    "embedwatch.stats", "embedwatch.sources.base",
])
def test_docstring_examples_run(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
