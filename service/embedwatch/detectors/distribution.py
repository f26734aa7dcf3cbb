"""Shift of a scalar score's distribution: KS and Wasserstein on samples, PSI and JS on histograms."""

from __future__ import annotations

import math

import numpy as np

from embedwatch.stats import HIST_EPS, js_divergence, ks_2samp, psi, wasserstein_1d


class DistributionShift:
    """Compare the distribution of one scalar score in the window with the baseline's.

    Used for the cosine similarity of each vector to the baseline centroid, for vector norms and
    for query top-1 scores. Which data each measure uses is explicit:

    * **KS statistic + asymptotic p-value and Wasserstein-1** on *samples*: every score of the
      window (the window keeps its per-event scalars, bounded by ``window_events``) against the
      baseline's sample of scores — exact, identical to ``scipy.stats.ks_2samp(method="asymp")``
      and ``scipy.stats.wasserstein_distance``.
    * **PSI and JS divergence** on *histograms*: bin counts over the baseline's quantile bins
      (merged exactly from the window buckets) against the baseline's counts, with proportions
      smoothed by ``eps`` (:func:`embedwatch.stats.smoothed_proportions`).

    Parameters
    ----------
    reference
        Baseline sample of the score.
    reference_hist
        Baseline counts over the histogram bins (``None``: PSI/JS are not computed).
    eps
        Smoothing of histogram proportions.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> det = DistributionShift(rng.normal(size=1000))
    >>> r = det.compare(rng.normal(loc=1.0, size=500))
    >>> bool(r["ks_statistic"] > 0.3 and r["ks_p_value"] < 1e-10)
    True
    >>> bool(0.8 < r["wasserstein"] < 1.2)    # the location shift
    True

    References
    ----------
    [^1]: Massey, F. J. (1951). The Kolmogorov-Smirnov test for goodness of fit. JASA 46(253).
    [^2]: Yurdakul, B. (2018). Statistical properties of population stability index. PhD thesis,
          Western Michigan University.
    [^3]: Lin, J. (1991). Divergence measures based on the Shannon entropy. IEEE Trans. Inf. Theory.
    """

    def __init__(
        self, reference: np.ndarray, reference_hist: np.ndarray | None = None, eps: float = HIST_EPS
    ) -> None:
        self.reference = np.sort(np.asarray(reference, dtype=np.float64))
        self.reference_hist = None if reference_hist is None else np.asarray(reference_hist, dtype=np.int64)
        self.eps = float(eps)

    def compare(
        self, window: np.ndarray, window_hist: np.ndarray | None = None, p_value: bool = True
    ) -> dict[str, float]:
        """``ks_statistic``, ``ks_p_value`` (unless ``p_value=False``), ``wasserstein`` and (with
        histograms) ``psi``, ``js``."""
        window = np.asarray(window, dtype=np.float64)
        out = {"ks_statistic": math.nan, "ks_p_value": math.nan, "wasserstein": math.nan,
               "psi": math.nan, "js": math.nan}
        if window.size and self.reference.size:
            out["ks_statistic"], out["ks_p_value"] = ks_2samp(window, self.reference, p_value=p_value)
            out["wasserstein"] = wasserstein_1d(window, self.reference)
        if window_hist is not None and self.reference_hist is not None:
            out["psi"] = psi(window_hist, self.reference_hist, self.eps)
            out["js"] = js_divergence(window_hist, self.reference_hist, self.eps)
        return out
