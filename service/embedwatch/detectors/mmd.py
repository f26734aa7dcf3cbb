"""Calibrated MMD^2 two-sample test with random Fourier features."""

from __future__ import annotations

import hashlib
import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from embedwatch import rowsums
from embedwatch.stats import TwoSampleNull, median_pairwise_distance


@dataclass(frozen=True, slots=True)
class MMDResult:
    """Outcome of one :meth:`RFFMMD.test`.

    ``score`` is the debiased MMD^2 estimate (raw statistic minus its null expectation, so it is
    comparable across window sizes and can be slightly negative); ``threshold`` is the rejection
    threshold of ``score`` at the requested level; ``statistic`` is the raw squared distance of the
    mean feature vectors.
    """

    score: float
    statistic: float
    threshold: float
    p_value: float
    m: int


class RFFMMD:
    """MMD^2 between a window and a frozen reference with random Fourier features.

    The Gaussian kernel ``k(x, y) = exp(-|x - y|^2 / (2 s^2))`` is approximated by
    ``phi(x) = sqrt(2/D) cos(x W + b)`` with ``W ~ N(0, 1/s^2)``, ``b ~ U(0, 2 pi)`` (Rahimi &
    Recht), the bandwidth ``s`` set by the median heuristic on the reference sample and frozen with
    the baseline. The statistic is ``|mean phi(window) - mean phi(reference)|^2``; the mean feature
    vector is a sum, hence exactly mergeable over window buckets.

    **Calibration.** Under H0 (window and reference drawn from the same distribution), by the CLT
    the difference of the two mean feature vectors is ~ ``N(0, (1/m + 1/n) C)`` with ``C`` the
    feature covariance, so the statistic is ~ ``(1/m + 1/n) sum_i lambda_i chi2_1`` with
    ``lambda_i`` the eigenvalues of ``C`` estimated on the reference sample at baseline creation.
    Its tail is computed with a saddlepoint approximation
    (:func:`embedwatch.stats.weighted_chi2_sf`): p-values and the threshold at
    ``false_alarm_rate`` are analytic, so a 1e-6 level needs no 1e6 permutations. The reported
    ``score`` is debiased by the null mean ``(1/m + 1/n) sum lambda_i``.

    **Shared frequencies.** ``W = G / s`` with ``G`` standard normal, drawn from ``(seed, d, D)``
    only, so ``x W == (x G) / s``: every baseline of the same seed, dimension and feature count uses
    one read-only ``G`` (:func:`shared_frequencies`, about ``d * D * 4`` bytes per process instead
    of per stream) and keeps only its bandwidth.

    Parameters
    ----------
    weights
        ``(d, D)`` float32 frequency matrix: ``W`` itself, or ``G`` when ``weight_scale`` is ``1/s``.
    offsets
        ``(D,)`` float32 phases ``b``.
    reference_mean
        ``(D,)`` mean feature vector of the reference sample.
    eigvals
        ``(D,)`` eigenvalues of the reference feature covariance.
    n_reference
        Size of the reference sample the mean and covariance come from.
    bandwidth
        The kernel bandwidth ``s`` (informational).
    weight_scale
        Factor applied to ``x @ weights`` (``1/s`` with the shared ``G``; 1 with a scaled ``W``).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> ref = rng.normal(size=(1000, 8)).astype(np.float32)
    >>> mmd = RFFMMD.fit(ref, n_features=64, seed=0)
    >>> same = rng.normal(size=(500, 8)).astype(np.float32)
    >>> shifted = (rng.normal(size=(500, 8)) + 0.5).astype(np.float32)
    >>> mmd.test(mmd.feature_sum(same) / 500, 500, alpha=1e-6).p_value > 1e-3
    True
    >>> r = mmd.test(mmd.feature_sum(shifted) / 500, 500, alpha=1e-6)
    >>> bool(r.p_value < 1e-6 and r.score > r.threshold)
    True

    References
    ----------
    [^1]: Gretton, A. et al. (2012). A kernel two-sample test. JMLR 13, 723-773.
    [^2]: Rahimi, A. & Recht, B. (2007). Random features for large-scale kernel machines. NIPS.
    [^3]: Zhao, J. & Meng, D. (2015). FastMMD: ensemble of circular discrepancy for efficient
          two-sample test. Neural Computation 27(6).
    [^4]: Kuonen, D. (1999). Saddlepoint approximations for distributions of quadratic forms in
          normal variables. Biometrika 86(4), 929-935.
    """

    def __init__(
        self,
        weights: np.ndarray,
        offsets: np.ndarray,
        reference_mean: np.ndarray,
        eigvals: np.ndarray,
        n_reference: int,
        bandwidth: float,
        weight_scale: float = 1.0,
    ) -> None:
        self.weights = np.ascontiguousarray(weights, dtype=np.float32)
        self.weight_scale = float(weight_scale)
        self._wscale = np.float32(weight_scale)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.float32)
        self.reference_mean = np.asarray(reference_mean, dtype=np.float64)
        self.eigvals = np.clip(np.asarray(eigvals, dtype=np.float64), 0.0, None)
        self.n_reference = int(n_reference)
        self.bandwidth = float(bandwidth)
        self._scale = np.float32(math.sqrt(2.0 / self.weights.shape[1]))
        self._null = TwoSampleNull(self.eigvals, self.n_reference)

    @property
    def n_features(self) -> int:
        return int(self.weights.shape[1])

    @staticmethod
    def draw(dim: int, n_features: int, bandwidth: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """A per-baseline frequency matrix ``G / bandwidth`` (float32) and the phases, as baselines
        of the earlier layout stored them (``rff_weights``); new ones use :func:`shared_frequencies`."""
        rng = np.random.default_rng([seed, dim, n_features, 0x4D4D44])
        w = (rng.standard_normal((dim, n_features)) / bandwidth).astype(np.float32)
        b = rng.uniform(0.0, 2.0 * math.pi, size=n_features).astype(np.float32)
        return w, b

    @classmethod
    def fit(cls, sample: np.ndarray, n_features: int, seed: int) -> RFFMMD:
        """Bandwidth by median heuristic, seeded (shared) frequencies, reference mean and null
        eigenvalues. :attr:`weights` is the shared read-only ``G``; ``weight_scale = 1/bandwidth``."""
        sample = np.asarray(sample, dtype=np.float32)
        bandwidth = median_pairwise_distance(sample, seed=seed)
        g, b = shared_frequencies(sample.shape[1], n_features, seed)
        inv = 1.0 / bandwidth
        probe = cls(g, b, np.zeros(n_features), np.zeros(n_features), max(sample.shape[0], 1), bandwidth, inv)
        feats = probe.features(sample).astype(np.float64)
        mean = feats.mean(axis=0)
        return cls(g, b, mean, covariance_eigvals(feats), sample.shape[0], bandwidth, inv)

    def features(self, x: np.ndarray) -> np.ndarray:
        """``(n, D)`` float32 feature matrix ``sqrt(2/D) cos(x W + b)``.

        A single row goes through the matrix-matrix kernel too (BLAS would otherwise use a
        matrix-vector kernel that rounds differently). Whether a row's features are then
        bit-for-bit independent of the other rows of the call depends on the BLAS kernel: they
        are with OpenBLAS's SkylakeX sgemm; with its Haswell one a row's rounding depends on its
        position in the call (up to ~1e-6 in ``x W``), so feature sums built from different
        batches agree to float32 rounding, not to the bit.
        """
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 2 and x.shape[0] == 1:
            return self.features(np.concatenate([x, x]))[:1]
        z = x @ self.weights
        if self._wscale != 1:
            z *= self._wscale
        z += self.offsets
        np.cos(z, out=z)
        z *= self._scale
        return z

    def feature_sum(self, x: np.ndarray) -> np.ndarray:
        """Sum of the feature vectors of the rows of ``x`` (float64, mergeable)."""
        if x.shape[0] == 0:
            return np.zeros(self.n_features, dtype=np.float64)
        return rowsums.column_sums(self.features(x))

    def null_mean(self, m: int) -> float:
        """Expected raw statistic under H0 for a window of ``m`` sampled vectors."""
        return self._null.mean(m)

    def threshold(self, m: int, alpha: float) -> float:
        """Debiased rejection threshold of ``score`` at level ``alpha`` for window size ``m``."""
        return self._null.isf(m, alpha) - self._null.mean(m)

    def p_value(self, statistic: float, m: int) -> float:
        """``P(raw statistic >= statistic)`` under H0 for a window of ``m`` sampled vectors."""
        return self._null.sf(statistic, m)

    def test(self, window_mean: np.ndarray, m: int, alpha: float) -> MMDResult:
        """Test a window whose mean feature vector over ``m`` sampled vectors is ``window_mean``."""
        if m < 2:
            return MMDResult(math.nan, math.nan, math.nan, math.nan, m)
        diff = np.asarray(window_mean, dtype=np.float64) - self.reference_mean
        stat = float(diff @ diff)
        return MMDResult(
            score=stat - self.null_mean(m),
            statistic=stat,
            threshold=self.threshold(m, alpha),
            p_value=self.p_value(stat, m),
            m=int(m),
        )


_shared_lock = threading.Lock()
# The read-only matrices handed out, by content and by seed. Weak: a matrix lives as long as a
# baseline or detector uses it (d * D * 4 bytes can be large), never because it was cached.
_by_digest: weakref.WeakValueDictionary[tuple[tuple[int, ...], str], np.ndarray] = weakref.WeakValueDictionary()
_by_seed: weakref.WeakValueDictionary[tuple[int, int, int], np.ndarray] = weakref.WeakValueDictionary()
_PHASES_MAX = 256
_phases: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()  # small: D floats each


def _read_only(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def shared_matrix(a: np.ndarray) -> np.ndarray:
    """``a`` (float32, C order) as a read-only array shared by every equal matrix in use.

    Baselines loaded from a store carry their own copy of ``G``; interning it by content makes
    them share one (exact byte equality, so features are unchanged).
    """
    a = np.ascontiguousarray(a, dtype=np.float32)
    key = (tuple(a.shape), hashlib.sha256(a.tobytes()).hexdigest())
    with _shared_lock:
        hit = _by_digest.get(key)
        if hit is not None and np.array_equal(hit, a):
            return hit
        out = _read_only(a.copy() if a.flags.writeable or a.base is not None else a)
        _by_digest[key] = out
        return out


def shared_frequencies(dim: int, n_features: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The standard-normal ``(dim, n_features)`` float32 matrix ``G`` and the phases of a seed
    (read-only, one copy per process while in use: see :class:`RFFMMD`). Same random stream as
    before the matrices were shared: ``G`` then the phases from
    ``default_rng([seed, dim, n_features, ...])``."""
    key = (int(seed), int(dim), int(n_features))
    with _shared_lock:
        g = _by_seed.get(key)
        b = _phases.get(key)
        if g is not None and b is not None:
            _phases.move_to_end(key)
            return g, b
    rng = np.random.default_rng([seed, dim, n_features, 0x4D4D44])
    g = shared_matrix(rng.standard_normal((dim, n_features)).astype(np.float32))
    b = _read_only(rng.uniform(0.0, 2.0 * math.pi, size=n_features).astype(np.float32))
    with _shared_lock:
        _by_seed[key] = g
        _phases[key] = b
        while len(_phases) > _PHASES_MAX:
            _phases.popitem(last=False)
    return g, b


def covariance_eigvals(feats: np.ndarray) -> np.ndarray:
    """Eigenvalues (length D, descending) of the sample covariance of the rows of ``feats``.

    Uses the ``n x n`` Gram matrix of the centred rows when ``n < D`` (same non-zero eigenvalues),
    so the cost is ``O(min(n, D)^2 max(n, D))``.
    """
    n, dim = feats.shape
    out = np.zeros(dim, dtype=np.float64)
    if n < 2:
        return out
    fc = feats - feats.mean(axis=0)
    small = fc @ fc.T if n < dim else fc.T @ fc
    eig = np.linalg.eigvalsh(small / (n - 1.0))[::-1]
    out[: eig.shape[0]] = np.clip(eig, 0.0, None)
    return out
