"""Share of dimensions whose mean moved: Welch t per dimension + Benjamini-Hochberg."""

from __future__ import annotations

import math

import numpy as np

from embedwatch.stats import benjamini_hochberg, welch_t


class DimensionMeanShift:
    """Per-dimension Welch t-tests of window vs baseline means, FDR-controlled.

    Works on sufficient statistics only (count, per-dimension mean and unbiased variance), so the
    window side comes straight from the merged bucket sums and sums of squares: ``O(d)`` per
    evaluation, no sample needed. The share of dimensions rejected by Benjamini-Hochberg at level
    ``alpha`` is the measure (0 when nothing moved; the expected share of false discoveries among
    the rejections is at most ``alpha``).

    Parameters
    ----------
    mean
        Baseline per-dimension mean.
    var
        Baseline per-dimension unbiased variance.
    count
        Number of baseline events behind ``mean`` and ``var``.
    alpha
        False discovery rate of the Benjamini-Hochberg procedure.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> ref = rng.normal(size=(2000, 20))
    >>> det = DimensionMeanShift(ref.mean(0), ref.var(0, ddof=1), 2000, alpha=0.01)
    >>> win = rng.normal(size=(1000, 20))
    >>> win[:, :5] += 0.5                     # 5 of 20 dimensions move
    >>> r = det.ratio(1000, win.mean(0), win.var(0, ddof=1))
    >>> bool(0.25 <= r <= 0.35)              # the 5 moved ones, and at most a false discovery
    True

    References
    ----------
    [^1]: Welch, B. L. (1947). The generalization of "Student's" problem when several different
          population variances are involved. Biometrika 34(1/2), 28-35.
    [^2]: Benjamini, Y. & Hochberg, Y. (1995). Controlling the false discovery rate. JRSS B 57(1).
    """

    def __init__(self, mean: np.ndarray, var: np.ndarray, count: int, alpha: float) -> None:
        self.mean = np.asarray(mean, dtype=np.float64)
        self.var = np.asarray(var, dtype=np.float64)
        self.count = int(count)
        self.alpha = float(alpha)

    def p_values(self, count: int, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
        """Two-sided Welch p-value per dimension."""
        _, _, p = welch_t(float(count), mean, var, float(self.count), self.mean, self.var)
        return p

    def ratio(self, count: int, mean: np.ndarray, var: np.ndarray) -> float:
        """Share of dimensions rejected by BH at ``alpha`` (NaN with fewer than 2 events)."""
        if count < 2 or self.count < 2:
            return math.nan
        rejected = benjamini_hochberg(self.p_values(count, mean, var), self.alpha)
        return float(rejected.mean())
