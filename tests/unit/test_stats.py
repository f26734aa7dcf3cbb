"""embedwatch.stats against the batch computations of scipy / numpy on the same data."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import optimize
from scipy import stats as ss
from scipy.spatial.distance import jensenshannon, pdist

from embedwatch import stats

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)
samples = arrays(np.float64, st.integers(1, 80), elements=finite)
# Few distinct values: many ties.
tied = arrays(np.float64, st.integers(1, 80), elements=st.sampled_from([0.0, 0.5, 1.0, 2.0]))


@settings(max_examples=40, deadline=None)
@given(a=st.one_of(samples, tied), b=st.one_of(samples, tied))
def test_ks_matches_scipy_asymp(a: np.ndarray, b: np.ndarray) -> None:
    d, p = stats.ks_2samp(a, b)
    ref = ss.ks_2samp(a, b, method="asymp")
    assert d == pytest.approx(ref.statistic, rel=1e-12, abs=1e-12)
    # Both are NaN when n*m/(n+m) rounds to 0 (two single values).
    np.testing.assert_allclose(p, ref.pvalue, rtol=1e-6, atol=1e-300, equal_nan=True)


@pytest.mark.parametrize("n", [*range(1, 30), 60, 139, 140, 141, 250, 667, 1000, 5000, 20_000, 100_001])
def test_kolmogorov_sf_matches_scipy_kstwo_on_every_branch(n: int) -> None:
    """Grid over x in n x^2 (where the method changes: 0.754693, 2.2, 4, 18, 370) and in n x
    (the exact ends), plus both ends of the support. Beyond 100,000 points (Pelz-Good for every
    n x^2 < 2.2) only that range: above it both take scipy's smirnov, 0.1 s a call at that n."""
    rng = np.random.default_rng(n)
    nx2 = np.concatenate([np.geomspace(1e-3, 400.0, 60), [0.754693, 2.2, 4.0, 18.0, 370.0]])
    if n > 100_000:
        nx2 = nx2[nx2 < 2.2]
    xs = np.concatenate([np.sqrt(nx2 / n), np.array([0.3, 0.5, 0.75, 0.99]) / n, (n - np.array([1.5, 1.0, 0.5])) / n,
                         rng.uniform(0.0, 1.0, 20), [0.0, 0.5, 1.0, 1.5]])
    if n > 100_000:
        xs = np.sqrt(nx2 / n)
    for x in xs[(xs >= 0) & (xs <= 1.5)]:
        want = float(ss.kstwo.sf(x, n))
        assert stats.kolmogorov_sf(n, float(x)) == pytest.approx(want, rel=1e-8, abs=1e-300), (n, x)
    assert np.isnan(stats.kolmogorov_sf(0, 0.5))


@settings(max_examples=200, deadline=None)
@given(w=arrays(np.float64, st.integers(1, 60), elements=st.floats(1e-6, 1e3)), excess=st.floats(1.0001, 1e4),
       c=st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=3), rtol=st.sampled_from([8.881784197001252e-16, 1e-10]))
def test_brentq_finds_the_same_roots_as_scipy(w: np.ndarray, excess: float, c: list[float], rtol: float) -> None:
    """Same iterates as ``scipy.optimize.brentq``: bit-identical roots, on the saddlepoint equation
    of the weighted chi-square tail (a pole at the bracket's end) and on smooth functions."""
    x = float(w.sum()) * excess
    hi = 0.5 / float(w.max()) * (1.0 - 1e-15)

    def kprime(t: float) -> float:
        return float(np.sum(w / (1.0 - 2.0 * t * w))) - x

    assert stats.brentq(kprime, 0.0, hi, xtol=1e-300, rtol=1e-14, maxiter=500) == optimize.brentq(
        kprime, 0.0, hi, xtol=1e-300, rtol=1e-14, maxiter=500)

    def g(t: float) -> float:
        return c[0] + c[1] * t + abs(c[2]) * t**3 + float(np.tanh(t))

    if (g(-50.0) > 0) != (g(50.0) > 0):
        assert stats.brentq(g, -50.0, 50.0, rtol=rtol) == optimize.brentq(g, -50.0, 50.0, rtol=rtol)
    with pytest.raises(ValueError):
        stats.brentq(lambda t: t * t + 1.0, -1.0, 1.0)


@settings(max_examples=60, deadline=None)
@given(a=st.one_of(samples, tied), b=st.one_of(samples, tied))
def test_wasserstein_matches_scipy(a: np.ndarray, b: np.ndarray) -> None:
    assert stats.wasserstein_1d(a, b) == pytest.approx(ss.wasserstein_distance(a, b), rel=1e-9, abs=1e-9)


def test_empty_samples_give_nan() -> None:
    assert np.isnan(stats.ks_2samp(np.zeros(0), np.ones(3))[0])
    assert np.isnan(stats.wasserstein_1d(np.ones(3), np.zeros(0)))


def test_histogram_bins_are_left_closed_and_cover_everything() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=5000)
    edges = stats.quantile_edges(x, 16)
    assert edges.shape == (15,)
    h = stats.histogram(x, edges)
    assert h.sum() == x.size
    # Quantile bins spread the reference evenly.
    assert h.min() >= 5000 / 16 - 2 and h.max() <= 5000 / 16 + 2
    # Explicit definition: bin 0 = (-inf, e0), bin i = [e_{i-1}, e_i), last = [e_last, inf).
    full = np.concatenate([[-np.inf], edges, [np.inf]])
    manual = [int(np.sum((x >= lo) & (x < hi))) for lo, hi in itertools.pairwise(full)]
    assert h.tolist() == manual


def test_psi_and_js_match_direct_formulas() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=3000)
    win = rng.normal(0.3, 1.2, size=800)
    edges = stats.quantile_edges(base, 32)
    hb, hw = stats.histogram(base, edges), stats.histogram(win, edges)
    eps = stats.HIST_EPS
    pb = (hb / hb.sum() + eps) / (1 + hb.size * eps)
    pw = (hw / hw.sum() + eps) / (1 + hw.size * eps)
    assert stats.psi(hw, hb) == pytest.approx(float(np.sum((pw - pb) * np.log(pw / pb))), rel=1e-12)
    assert stats.js_divergence(hw, hb) == pytest.approx(jensenshannon(pw, pb, base=2) ** 2, rel=1e-9)
    same = stats.histogram(rng.normal(size=3000), edges)
    assert stats.psi(same, hb) < 0.05 < stats.psi(hw, hb)
    assert 0.0 <= stats.js_divergence(same, hb) < stats.js_divergence(hw, hb) <= 1.0
    # An empty bin on one side stays finite thanks to eps.
    assert np.isfinite(stats.psi(np.array([10, 0]), np.array([0, 10])))


def test_moments_from_sums() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(500, 7))
    mean, var = stats.moments_from_sums(500, x.sum(0), (x * x).sum(0))
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, x.var(0, ddof=1), rtol=1e-9)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n1=st.integers(3, 200), n2=st.integers(3, 200),
       shift=st.floats(-2, 2), scale=st.floats(0.2, 5))
def test_welch_matches_scipy(seed: int, n1: int, n2: int, shift: float, scale: float) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(shift, scale, size=(n1, 5))
    b = rng.normal(0.0, 1.0, size=(n2, 5))
    t, _, p = stats.welch_t(n1, a.mean(0), a.var(0, ddof=1), n2, b.mean(0), b.var(0, ddof=1))
    ref = ss.ttest_ind(a, b, equal_var=False)
    np.testing.assert_allclose(t, ref.statistic, rtol=1e-9)
    np.testing.assert_allclose(p, ref.pvalue, rtol=1e-6, atol=1e-300)


def test_welch_degenerate_dimension_is_not_significant() -> None:
    t, _, p = stats.welch_t(10, np.ones(2), np.zeros(2), 10, np.ones(2), np.zeros(2))
    assert t.tolist() == [0.0, 0.0] and p.tolist() == [1.0, 1.0]


@settings(max_examples=60, deadline=None)
@given(p=arrays(np.float64, st.integers(1, 200), elements=st.floats(0, 1)), alpha=st.floats(0.001, 0.3))
def test_benjamini_hochberg_matches_scipy(p: np.ndarray, alpha: float) -> None:
    expected = ss.false_discovery_control(p) <= alpha
    np.testing.assert_array_equal(stats.benjamini_hochberg(p, alpha), expected)


@pytest.mark.parametrize("k", [3, 14, 100, 256])
@pytest.mark.parametrize("alpha", [0.05, 1e-3, 1e-6, 1e-9])
def test_weighted_chi2_tail_matches_chi2_for_equal_weights(k: int, alpha: float) -> None:
    w = np.full(k, 0.37)
    x = 0.37 * ss.chi2.isf(alpha, k)
    assert stats.weighted_chi2_sf(x, w) == pytest.approx(alpha, rel=0.02)
    assert stats.weighted_chi2_isf(alpha, w) == pytest.approx(x, rel=0.002)


def test_weighted_chi2_tail_matches_monte_carlo_for_unequal_weights() -> None:
    rng = np.random.default_rng(3)
    w = rng.exponential(size=40) ** 3  # a few dominant eigenvalues, like a feature covariance
    q = (rng.standard_normal((200_000, 40)) ** 2) @ w
    for alpha in (0.05, 1e-2, 1e-3):
        x = stats.weighted_chi2_isf(alpha, w)
        observed = float(np.mean(q > x))
        sd = np.sqrt(alpha * (1 - alpha) / q.size)
        assert abs(observed - alpha) < 5 * sd + 0.03 * alpha
    # Below the mean the bulk approximation is used; the sf stays a probability and decreases.
    xs = np.linspace(0, 3 * w.sum(), 30)
    sf = [stats.weighted_chi2_sf(float(x), w) for x in xs]
    assert sf[0] == pytest.approx(1.0) and all(a >= b for a, b in itertools.pairwise(sf))


def test_median_pairwise_distance_matches_pdist() -> None:
    x = np.random.default_rng(4).normal(size=(300, 6))
    assert stats.median_pairwise_distance(x) == pytest.approx(float(np.median(pdist(x))), rel=1e-9)


def test_two_sample_null_quantiles_scale_with_the_window_and_cost_one_root_per_level(
        monkeypatch: pytest.MonkeyPatch) -> None:
    w = np.random.default_rng(5).gamma(0.5, 1e-3, size=64)
    null = stats.TwoSampleNull(w, n_reference=1000)
    roots = []
    real = stats.weighted_chi2_isf
    monkeypatch.setattr(stats, "weighted_chi2_isf", lambda a, ww: roots.append(a) or real(a, ww))
    for m in (2, 37, 64, 100, 640, 999, 10**6):
        for alpha in (1e-6, 0.01, 0.5):
            want = real(alpha, null.scale(m) * w)  # the quantile of the scaled law, found directly
            assert null.isf(m, alpha) == pytest.approx(want, rel=1e-8)
            # and it is the level-alpha point of the scaled law's tail
            assert stats.weighted_chi2_sf(null.isf(m, alpha), null.scale(m) * w) == pytest.approx(alpha, rel=1e-6)
    assert sorted(roots) == [1e-6, 0.01, 0.5]


@pytest.mark.parametrize("k", [3, 64])
@pytest.mark.parametrize("alpha", [1e-100, 1e-200, 1e-300])
def test_weighted_chi2_quantiles_of_tiny_levels_match_chi2(k: int, alpha: float) -> None:
    """Levels whose bracket overshoots into the underflowed tail (sf == 0) are found, not log(0)."""
    w = np.full(k, 0.37)
    x = stats.weighted_chi2_isf(alpha, w)
    assert x == pytest.approx(0.37 * ss.chi2.isf(alpha, k), rel=0.002)
    assert stats.weighted_chi2_sf(x, w) == pytest.approx(alpha, rel=0.02)


def test_weighted_chi2_tail_of_a_statistic_beyond_double_precision_is_zero() -> None:
    """One absurd vector in a window gives a statistic ~1e15 times the largest weight or more:
    no root of K' is bracketed in double precision, and the tail (below exp(-x / 2 w_max)) is 0."""
    w = np.random.default_rng(6).gamma(0.5, 1e-3, size=64)
    for x in (1e15 * w.max() * 3, 1e30, 1e300):
        assert stats.weighted_chi2_sf(x, w) == 0.0
    # just below that range the tail is tiny but still a probability
    assert 0.0 <= stats.weighted_chi2_sf(1e3 * w.max(), w) < 1e-100


def test_a_degenerate_null_rejects_every_positive_statistic_and_not_zero() -> None:
    """Every weight 0 (a constant reference): the statistic is 0 exactly under the null."""
    zeros = np.zeros(16)
    assert stats.weighted_chi2_sf(0.0, zeros) == 1.0 and stats.weighted_chi2_sf(1e-300, zeros) == 0.0
    null = stats.TwoSampleNull(zeros, n_reference=1000)
    for m in (2, 100, 10**6):
        thr = null.isf(m, 1e-6)
        assert 0.0 < thr <= 1e-300  # score >= thr: 0 does not reject, 1e-300 does
        assert null.sf(0.0, m) == 1.0
