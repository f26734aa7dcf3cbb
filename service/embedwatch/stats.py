"""Pure, vectorised statistics used by the detectors (no I/O, no state).

Every function here is checked in ``tests/unit/test_stats.py`` against the batch computation of
scipy/numpy on the same data (``scipy.stats.ks_2samp``, ``wasserstein_distance``,
``ttest_ind(equal_var=False)``, ``false_discovery_control``, ``jensenshannon``...).

Conventions
-----------
* Two-sample tests take the *window* first and the *baseline* second.
* Histogram divergences take bin **counts** and smooth them with a small ``eps`` (see
  :func:`smoothed_proportions`) so that empty bins never give ``inf``.
* :func:`weighted_chi2_sf` / :func:`weighted_chi2_isf` give the tail of ``sum_i w_i chi2_1`` with a
  Lugannani-Rice saddlepoint approximation: this is the null distribution of the random-Fourier-
  feature MMD^2 statistic (see :mod:`embedwatch.detectors.mmd`), and the saddlepoint is accurate
  far in the tail (relative error of a few percent at 1e-6 and below), where a moment-matched
  gamma (Satterthwaite) approximation is not.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import special

FloatArray = np.ndarray

#: Default smoothing of histogram proportions for PSI / JS (added to each proportion).
HIST_EPS = 1e-4


# --------------------------------------------------------------------------------------------
# Kolmogorov-Smirnov and Wasserstein on samples


def ks_2samp(a: FloatArray, b: FloatArray, p_value: bool = True) -> tuple[float, float]:
    """Two-sided two-sample KS statistic and its asymptotic p-value.

    Identical to ``scipy.stats.ks_2samp(a, b, method="asymp")`` (statistic exactly, p-value via
    ``kstwo.sf(D, round(n*m/(n+m)))``) without its per-call overhead. Empty input gives NaNs;
    ``p_value=False`` skips the (comparatively costly) p-value and returns NaN for it.
    """
    a = np.sort(np.asarray(a, dtype=np.float64))
    b = np.sort(np.asarray(b, dtype=np.float64))
    n1, n2 = a.shape[0], b.shape[0]
    if n1 == 0 or n2 == 0:
        return math.nan, math.nan
    both = np.concatenate([a, b])
    cdf1 = np.searchsorted(a, both, side="right") / n1
    cdf2 = np.searchsorted(b, both, side="right") / n2
    d = float(np.max(np.abs(cdf1 - cdf2)))
    if not p_value:
        return d, math.nan
    en = float(n1) * float(n2) / float(n1 + n2)
    return d, kolmogorov_sf(int(np.round(en)), d)


# --------------------------------------------------------------------------------------------
# Distribution of the two-sided one-sample Kolmogorov-Smirnov statistic D_n
#
# The p-value of ks_2samp is P(D_n >= d) with n = round(n1 n2 / (n1 + n2)), as
# scipy.stats.kstwo.sf computes it; here with scipy.special alone, because importing scipy.stats
# adds 37 MiB to the service's resident memory. The method for each (n, x) is Simard & L'Ecuyer's
# choice (exact formulas at the ends of the support, Durbin's matrix for small n x^2, Pelz-Good's
# expansion for large n, 2 * smirnov in the upper tail); tests check it against scipy.

_DURBIN_SCALE = 2.0**128


def kolmogorov_sf(n: int, x: float) -> float:
    """``P(D_n >= x)`` for the two-sided one-sample KS statistic of ``n`` points (NaN if n < 1).

    >>> round(kolmogorov_sf(100, 0.1), 6)   # scipy.stats.kstwo.sf(0.1, 100) gives the same
    0.252693
    >>> kolmogorov_sf(100, 0.0), kolmogorov_sf(100, 1.0)
    (1.0, 0.0)

    References
    ----------
    [^1]: Simard, R. & L'Ecuyer, P. (2011). Computing the two-sided Kolmogorov-Smirnov
          distribution. Journal of Statistical Software 39(11).
    [^2]: Marsaglia, G., Tsang, W. W. & Wang, J. (2003). Evaluating Kolmogorov's distribution.
          Journal of Statistical Software 8(18).
    [^3]: Pelz, W. & Good, I. J. (1976). Approximating the lower tail-areas of the Kolmogorov-
          Smirnov one-sample statistic. JRSS B 38(2), 152-156.
    """
    if n < 1 or math.isnan(x):
        return math.nan
    if x >= 1.0:
        return 0.0
    t = n * x
    if t <= 0.5:
        return 1.0
    if t <= 1.0:  # Ruben-Gambino: P(D_n <= x) = n! / n^n (2t - 1)^n
        return _clip01(1.0 - math.exp(math.lgamma(n + 1.0) - n * math.log(n) + n * math.log(2.0 * t - 1.0)))
    if t >= n - 1:  # Ruben-Gambino, upper end
        return _clip01(2.0 * (1.0 - x) ** n)
    if x >= 0.5:  # the one-sided tails cannot both be crossed: exactly twice one of them
        return _clip01(2.0 * float(special.smirnov(n, x)))
    nx2 = t * x
    if n <= 140:
        if nx2 <= 4.0:
            return _clip01(1.0 - _durbin_cdf(n, x))
        return _clip01(2.0 * float(special.smirnov(n, x)))  # Miller: the tails' overlap is negligible
    if nx2 >= 370.0:
        return 0.0
    if nx2 >= 2.2:
        return _clip01(2.0 * float(special.smirnov(n, x)))
    if n <= 100_000 and n * x**1.5 <= 1.4:
        return _clip01(1.0 - _durbin_cdf(n, x))
    return _clip01(1.0 - _pelz_good_cdf(n, x))


def _clip01(p: float) -> float:
    return min(max(p, 0.0), 1.0)


def _durbin_cdf(n: int, x: float) -> float:
    """``P(D_n < x)`` by Durbin's matrix, as Marsaglia, Tsang & Wang evaluate it: with
    ``k = ceil(n x)``, ``h = k - n x`` and ``H`` the ``(2k-1)``-square lower Hessenberg matrix
    below, ``n! / n^n (H^n)[k-1, k-1]``. The power is taken by squaring, with its scale kept as
    a separate power of two so that nothing overflows."""
    k = math.ceil(n * x)
    h = k - n * x
    m = 2 * k - 1
    inv_fact = np.array([1.0 / math.factorial(j) for j in range(m + 1)])  # 1/j!, underflows to 0
    i, j = np.indices((m, m))
    lag = i - j + 1
    hm = np.where(lag >= 0, inv_fact[np.clip(lag, 0, m)], 0.0)
    powers = h ** np.arange(1, m + 1)
    hm[:, 0] = (1.0 - powers) * inv_fact[1 : m + 1]
    hm[m - 1, :] = hm[:, 0][::-1]
    hm[m - 1, 0] = (1.0 - 2.0 * h**m + max(0.0, 2.0 * h - 1.0) ** m) * inv_fact[m]
    result, result_exp = np.eye(m), 0
    base, base_exp = hm, 0
    e = n
    while e:
        if e & 1:
            result, result_exp = _rescaled(result @ base, result_exp + base_exp)
        e >>= 1
        if e:
            base, base_exp = _rescaled(base @ base, 2 * base_exp)
    q = float(result[k - 1, k - 1])
    if q <= 0.0:
        return 0.0
    return math.exp(math.log(q) + result_exp * math.log(2.0) + math.lgamma(n + 1.0) - n * math.log(n))


def _rescaled(a: np.ndarray, exp: int) -> tuple[np.ndarray, int]:
    """``a * 2**exp`` as ``(a', exp')`` with ``a'``'s entries at most 2**128 (in place)."""
    if float(np.max(np.abs(a))) > _DURBIN_SCALE:
        a /= _DURBIN_SCALE
        exp += 128
    return a, exp


def _pelz_good_cdf(n: int, x: float) -> float:
    """``P(D_n <= x)`` by Pelz & Good's expansion ``K0 + K1/sqrt(n) + K2/n + K3/n^1.5`` in
    ``z = x sqrt(n)``, each term a theta series that converges fast for the small ``z`` it is
    used at (Simard & L'Ecuyer, section 2.3)."""
    z = x * math.sqrt(n)
    z2 = z * z
    pi2 = math.pi**2
    if -pi2 / (8.0 * z2) < -745.0:  # every term underflows
        return 0.0
    kmax = math.ceil(16.0 * z / math.pi)
    odd = (2.0 * np.arange(1, kmax + 1) - 1.0) ** 2  # (2k - 1)^2
    w = np.exp(-pi2 * odd / (8.0 * z2))
    k0 = float(np.sum(w))
    k1 = float(np.sum((pi2 / 4.0 * odd - z2) * w))
    k2 = float(np.sum((6.0 * z2**3 + 2.0 * z2**2 + (2.0 * z2**2 - 5.0 * z2) * pi2 / 4.0 * odd
                       + pi2**2 * (1.0 - 2.0 * z2) / 16.0 * odd**2) * w))
    k3 = float(np.sum((-30.0 * z2**3 - 90.0 * z2**4 + pi2 * (135.0 * z2**2 - 96.0 * z2**3) / 4.0 * odd
                       + pi2**2 * (212.0 * z2**2 - 60.0 * z2) / 16.0 * odd**2
                       + pi2**3 * (5.0 - 30.0 * z2) / 64.0 * odd**3) * w))
    root = math.sqrt(2.0 * math.pi)
    terms = [root * k0 / z, root * k1 / (6.0 * z2**2), root * k2 / (72.0 * z**7), root * k3 / (6480.0 * z**10)]
    # The other theta series of K2 and K3, over all integers.
    sq = np.arange(1, kmax + 1, dtype=np.float64) ** 2
    v = np.exp(-pi2 * sq / (2.0 * z2))
    terms[2] -= pi2 * root / (36.0 * z**3) * float(np.sum(sq * v))
    terms[3] += pi2 * root / (216.0 * z**6) * float(np.sum((3.0 * z2 - pi2 * sq) * sq * v))
    return float(sum(term / n ** (i / 2.0) for i, term in enumerate(terms)))


def wasserstein_1d(a: FloatArray, b: FloatArray) -> float:
    """Wasserstein-1 distance between two empirical 1-D distributions (``∫|F_a - F_b|``).

    Same value as ``scipy.stats.wasserstein_distance(a, b)``.
    """
    a = np.sort(np.asarray(a, dtype=np.float64))
    b = np.sort(np.asarray(b, dtype=np.float64))
    if a.size == 0 or b.size == 0:
        return math.nan
    allv = np.concatenate([a, b])
    allv.sort(kind="mergesort")
    deltas = np.diff(allv)
    fa = np.searchsorted(a, allv[:-1], side="right") / a.size
    fb = np.searchsorted(b, allv[:-1], side="right") / b.size
    return float(np.sum(np.abs(fa - fb) * deltas))


# --------------------------------------------------------------------------------------------
# Histogram divergences


def quantile_edges(x: FloatArray, bins: int) -> FloatArray:
    """Interior bin edges at the ``k/bins`` quantiles of ``x`` (duplicates removed).

    With ``np.searchsorted(edges, v, side="right")`` as the bin index, the bins are
    ``(-inf, e0), [e0, e1), ..., [e_last, inf)``: every value falls in a bin, and the reference
    sample is spread (close to) evenly, which is what PSI expects.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return np.zeros(0, dtype=np.float64)
    q = np.quantile(x, np.arange(1, bins) / bins)
    return np.unique(q)


def histogram(x: FloatArray, edges: FloatArray) -> np.ndarray:
    """Counts of ``x`` in the bins defined by interior ``edges`` (see :func:`quantile_edges`)."""
    idx = np.searchsorted(edges, np.asarray(x, dtype=np.float64), side="right")
    return np.bincount(idx, minlength=edges.shape[0] + 1).astype(np.int64)


def smoothed_proportions(counts: FloatArray, eps: float = HIST_EPS) -> FloatArray:
    """``(c_i / N + eps) / (1 + B * eps)``: proportions with every bin at least ~eps, summing to 1."""
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum()
    p = c / total if total > 0 else np.full_like(c, 1.0 / max(c.size, 1))
    return (p + eps) / (1.0 + c.size * eps)


def psi(window_counts: FloatArray, baseline_counts: FloatArray, eps: float = HIST_EPS) -> float:
    """Population stability index ``sum (p_w - p_b) ln(p_w / p_b)`` of smoothed proportions."""
    if np.sum(window_counts) == 0 or np.sum(baseline_counts) == 0:
        return math.nan
    pw = smoothed_proportions(window_counts, eps)
    pb = smoothed_proportions(baseline_counts, eps)
    return float(np.sum((pw - pb) * np.log(pw / pb)))


def js_divergence(window_counts: FloatArray, baseline_counts: FloatArray, eps: float = HIST_EPS) -> float:
    """Jensen-Shannon divergence in bits (0..1) of smoothed proportions.

    Equals ``scipy.spatial.distance.jensenshannon(p, q, base=2) ** 2`` on the same proportions.
    """
    if np.sum(window_counts) == 0 or np.sum(baseline_counts) == 0:
        return math.nan
    p = smoothed_proportions(window_counts, eps)
    q = smoothed_proportions(baseline_counts, eps)
    m = 0.5 * (p + q)
    js = 0.5 * np.sum(p * np.log2(p / m)) + 0.5 * np.sum(q * np.log2(q / m))
    return float(max(js, 0.0))


# --------------------------------------------------------------------------------------------
# Per-dimension mean shift


def moments_from_sums(count: float, total: FloatArray, total_sq: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Mean and unbiased (ddof=1) variance per dimension from count, sum and sum of squares."""
    mean = total / count
    if count < 2:
        return mean, np.full_like(mean, np.nan)
    var = (total_sq - count * mean * mean) / (count - 1.0)
    return mean, np.maximum(var, 0.0)


def welch_t(
    n1: float, mean1: FloatArray, var1: FloatArray, n2: float, mean2: FloatArray, var2: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Welch's unequal-variance t-test from moments: ``(t, df, two-sided p)`` per dimension.

    Same numbers as ``scipy.stats.ttest_ind(x1, x2, equal_var=False)``. A dimension with zero
    variance on both sides gets ``t = 0, p = 1`` (nothing can be said).
    """
    s1 = var1 / n1
    s2 = var2 / n2
    se2 = s1 + s2
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (mean1 - mean2) / np.sqrt(se2)
        df = se2 * se2 / (s1 * s1 / (n1 - 1.0) + s2 * s2 / (n2 - 1.0))
    degenerate = ~(se2 > 0)
    t = np.where(degenerate, 0.0, t)
    df = np.where(degenerate, 1.0, df)
    p = 2.0 * special.stdtr(df, -np.abs(t))
    return t, df, np.clip(p, 0.0, 1.0)


def benjamini_hochberg(p: FloatArray, alpha: float) -> np.ndarray:
    """Boolean mask of hypotheses rejected by Benjamini-Hochberg at FDR ``alpha``.

    Equivalent to ``scipy.stats.false_discovery_control(p) <= alpha``.
    """
    p = np.asarray(p, dtype=np.float64)
    m = p.size
    if m == 0:
        return np.zeros(0, dtype=bool)
    order = np.argsort(p, kind="mergesort")
    ranked = p[order] * (m / np.arange(1, m + 1))  # the same rounding as scipy: p * (m / i)
    adjusted = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m, dtype=bool)
    out[order] = np.minimum(adjusted, 1.0) <= alpha
    return out


# --------------------------------------------------------------------------------------------
# Root finding


def brentq(f: Callable[[float], float], a: float, b: float, xtol: float = 2e-12,
           rtol: float = 8.881784197001252e-16, maxiter: int = 100) -> float:
    """A root of ``f`` in ``[a, b]`` (``f(a)`` and ``f(b)`` of opposite signs) by Brent's method.

    The algorithm and stopping rule of ``scipy.optimize.brentq`` (a test checks the same roots):
    inverse quadratic interpolation or a secant step while they shrink the bracket fast enough,
    bisection otherwise, until the bracket's half-width is below ``(xtol + rtol * |x|) / 2``.
    Kept here because importing ``scipy.optimize`` for it adds 17 MiB to the service's resident
    memory.

    >>> round(brentq(lambda x: x * x - 2.0, 0.0, 2.0), 12)
    1.414213562373

    References
    ----------
    [^1]: Brent, R. P. (1973). Algorithms for Minimization without Derivatives, ch. 4.
    """
    xpre, xcur = float(a), float(b)
    fpre, fcur = f(xpre), f(xcur)
    if fpre == 0.0:
        return xpre
    if fcur == 0.0:
        return xcur
    if (fpre > 0.0) == (fcur > 0.0):
        raise ValueError("f(a) and f(b) must have opposite signs")
    xblk = fblk = spre = scur = 0.0
    for _ in range(maxiter):
        if fpre != 0.0 and fcur != 0.0 and (fpre < 0.0) != (fcur < 0.0):
            xblk, fblk = xpre, fpre  # the other end of the bracket
            spre = scur = xcur - xpre
        if abs(fblk) < abs(fcur):  # keep the best estimate in xcur
            xpre, xcur, xblk = xcur, xblk, xcur
            fpre, fcur, fblk = fcur, fblk, fcur
        delta = (xtol + rtol * abs(xcur)) / 2.0
        sbis = (xblk - xcur) / 2.0
        if fcur == 0.0 or abs(sbis) < delta:
            return xcur
        if abs(spre) > delta and abs(fcur) < abs(fpre):
            if xpre == xblk:  # secant
                stry = -fcur * (xcur - xpre) / (fcur - fpre)
            else:  # inverse quadratic interpolation
                dpre = (fpre - fcur) / (xpre - xcur)
                dblk = (fblk - fcur) / (xblk - xcur)
                stry = -fcur * (fblk * dblk - fpre * dpre) / (dblk * dpre * (fblk - fpre))
            if 2.0 * abs(stry) < min(abs(spre), 3.0 * abs(sbis) - delta):
                spre, scur = scur, stry  # the interpolation step is accepted
            else:
                spre, scur = sbis, sbis
        else:
            spre, scur = sbis, sbis
        xpre, fpre = xcur, fcur
        xcur += scur if abs(scur) > delta else (delta if sbis > 0 else -delta)
        fcur = f(xcur)
    raise RuntimeError(f"brentq: no convergence in {maxiter} iterations")


# --------------------------------------------------------------------------------------------
# Tail of a positive weighted sum of chi-square(1) variables (null of RFF MMD^2)


def _cumulants(w: FloatArray) -> tuple[float, float]:
    return float(np.sum(w)), float(2.0 * np.sum(w * w))


def _gamma_sf(x: float, w: FloatArray) -> float:
    """Satterthwaite: match mean and variance with a gamma distribution (fine near the bulk)."""
    mean, var = _cumulants(w)
    if var <= 0:
        return 1.0 if x < mean else 0.0
    shape = mean * mean / var
    scale = var / mean
    return float(special.gammaincc(shape, max(x, 0.0) / scale))


def weighted_chi2_sf(x: float, w: FloatArray) -> float:
    """``P(sum_i w_i Z_i^2 > x)`` for ``w_i >= 0`` and independent standard normal ``Z_i``.

    Lugannani-Rice saddlepoint approximation (Kuonen 1999, *Biometrika* 86:929) in the upper
    tail, where it keeps a few percent relative accuracy down to 1e-12 and below; the Satterthwaite
    gamma approximation near and below the mean (p > ~0.3, where the exact value hardly matters).

    >>> round(weighted_chi2_sf(23.68, np.ones(14)), 3)   # chi2(14) 0.95 quantile
    0.05
    """
    w = np.asarray(w, dtype=np.float64)
    w = w[w > 0]
    if w.size == 0:
        # The sum is 0 exactly (a constant reference): a p-value P(T >= x) of 1 at 0, not 0.
        return 1.0 if x <= 0 else 0.0
    mean, _ = _cumulants(w)
    if x <= mean:
        return _gamma_sf(x, w)
    wmax = float(w.max())
    hi = 0.5 / wmax  # K' -> inf as t -> hi
    upper = hi * (1.0 - 1e-15)

    def kprime(t: float) -> float:
        return float(np.sum(w / (1.0 - 2.0 * t * w))) - x

    # K'(0) = mean < x, K'(t) -> inf at hi: a root exists in (0, hi), unless x is beyond what
    # double precision brackets (x > ~1e15 wmax, one absurd vector in a window): the tail, below
    # exp(-x / (2 wmax)), is 0 in double precision.
    if kprime(upper) <= 0:
        return 0.0
    t_hat = float(brentq(kprime, 0.0, upper, xtol=1e-300, rtol=1e-14, maxiter=500))
    one = 1.0 - 2.0 * t_hat * w
    k = float(-0.5 * np.sum(np.log(one)))
    k2 = float(np.sum(2.0 * w * w / (one * one)))
    arg = 2.0 * (t_hat * x - k)
    if arg <= 0 or t_hat <= 0:
        return _gamma_sf(x, w)
    r = math.sqrt(arg)
    u = t_hat * math.sqrt(k2)
    if abs(r - u) < 1e-6 * r:  # numerically at the mean: the correction term is 0/0
        return _gamma_sf(x, w)
    p = float(special.ndtr(-r)) + math.exp(-0.5 * r * r) / math.sqrt(2.0 * math.pi) * (1.0 / u - 1.0 / r)
    if not math.isfinite(p) or p <= 0:
        # Beyond double precision of the normal tail: use the leading exponential term.
        p = math.exp(-0.5 * r * r) / (math.sqrt(2.0 * math.pi) * u)
    return float(min(max(p, 0.0), 1.0))


#: The smallest positive double (subnormal).
_TINY = math.nextafter(0.0, 1.0)


def weighted_chi2_isf(alpha: float, w: FloatArray) -> float:
    """The ``x`` with ``weighted_chi2_sf(x, w) == alpha`` (the rejection threshold at level alpha)."""
    w = np.asarray(w, dtype=np.float64)
    w = w[w > 0]
    if w.size == 0:
        # The sum is 0 exactly: every positive value rejects, 0 itself does not (a constant
        # window against a constant reference is no drift).
        return math.nextafter(0.0, 1.0)
    mean, var = _cumulants(w)
    sd = math.sqrt(var)

    def gap(x: float) -> float:
        # log sf - log alpha; a tail that underflows to 0 counts as the smallest double, so the
        # bracket below may overshoot into it (a tiny alpha, e.g. 1e-200) without a log(0).
        return math.log(max(weighted_chi2_sf(x, w), _TINY)) - math.log(alpha)

    if weighted_chi2_sf(mean, w) <= alpha:  # a quantile at or below the mean (alpha near 1/2 or above)
        return float(brentq(gap, 0.0, mean, rtol=1e-10))
    lo = mean
    hi = mean + 4.0 * sd + 4.0 * float(w.max())
    while weighted_chi2_sf(hi, w) > alpha:
        lo = hi
        hi = mean + 2.0 * (hi - mean)
    return float(brentq(gap, lo, hi, rtol=1e-10))


class TwoSampleNull:
    """Null law of a two-sample quadratic statistic: ``(1/m + 1/n) sum_i w_i chi2_1``.

    The common null of embedwatch's calibrated tests (MMD^2 with random features, the mean-shift
    scan): a window of ``m`` events against a reference of ``n``, weights ``w`` estimated once per
    baseline. The law for ``m`` is ``scale(m)`` times one fixed law (``sum_i w_i chi2_1``), so its
    quantile is ``scale(m)`` times that law's: one root-finding per level ``alpha`` (cached), and
    any window size after that is a multiplication. (Keyed by window size instead, a stream whose
    buckets close on time, and so whose sample size keeps changing, paid a root-finding of
    several milliseconds at almost every evaluation.)

    >>> null = TwoSampleNull(np.ones(14), n_reference=10**12)
    >>> round(null.isf(1, 0.05), 1), round(null.sf(23.68, 1), 3)   # chi2(14) 0.95 quantile: 23.68
    (23.7, 0.05)
    """

    def __init__(self, weights: FloatArray, n_reference: int, cache_size: int = 1024) -> None:
        self.weights = np.clip(np.asarray(weights, dtype=np.float64), 0.0, None)
        self.n_reference = int(n_reference)
        self._trace = float(self.weights.sum())
        self._cache: dict[float, float] = {}
        self._cache_size = cache_size

    def scale(self, m: int) -> float:
        return 1.0 / m + 1.0 / self.n_reference

    def mean(self, m: int) -> float:
        """Expected statistic for a window of ``m`` events."""
        return self.scale(m) * self._trace

    def isf(self, m: int, alpha: float) -> float:
        """The statistic exceeded with probability ``alpha`` (the unit law's quantile is cached)."""
        key = float(alpha)
        q = self._cache.get(key)
        if q is None:
            q = weighted_chi2_isf(alpha, self.weights)
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[key] = q
        t = self.scale(m) * q
        return t if t > 0 else q  # a degenerate null's quantile (the smallest double) stays positive

    def sf(self, statistic: float, m: int) -> float:
        """``P(statistic >= x)`` for a window of ``m`` events."""
        return weighted_chi2_sf(statistic, self.scale(m) * self.weights)


# --------------------------------------------------------------------------------------------
# Misc


def median_pairwise_distance(x: FloatArray, max_points: int = 1000, seed: int = 0) -> float:
    """Median Euclidean distance between distinct rows of ``x`` (median heuristic bandwidth).

    Uses at most ``max_points`` rows (a seeded subsample) so the cost stays bounded.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.shape[0] > max_points:
        idx = np.random.default_rng(seed).choice(x.shape[0], size=max_points, replace=False)
        x = x[idx]
    sq = np.einsum("ij,ij->i", x, x)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    iu = np.triu_indices(x.shape[0], k=1)
    if iu[0].size == 0:
        return 1.0
    med = float(np.sqrt(max(float(np.median(d2[iu])), 0.0)))
    return med if med > 0 else 1.0
