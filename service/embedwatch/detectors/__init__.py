"""Detectors: small, stateless-or-tiny-state classes over mergeable window statistics.

* :class:`RFFMMD` — the calibrated multivariate two-sample test (MMD^2 with random Fourier
  features, analytic null from the baseline's feature covariance).
* :class:`MeanShiftTest` — the calibrated mean-shift test of recent windows (shrinkage-whitened
  distance of the window mean to the baseline mean, split-sample null).
* :class:`DistributionShift` — KS / Wasserstein-1 on samples and PSI / JS on histograms of a
  scalar score (similarity to the baseline centroid, vector norm, query top-1 score).
* :class:`DimensionMeanShift` — share of dimensions whose mean moved (Welch t + Benjamini-Hochberg).
* :class:`PageHinkley` — vectorised Page-Hinkley change-point detector (same decisions as river's).
* :class:`DuplicateIds` — ids repeated within a bounded memory of recent ids.
"""

from embedwatch.detectors.dimensions import DimensionMeanShift
from embedwatch.detectors.distribution import DistributionShift
from embedwatch.detectors.duplicates import DuplicateIds
from embedwatch.detectors.mean_shift import MeanShiftTest
from embedwatch.detectors.mmd import RFFMMD, MMDResult
from embedwatch.detectors.page_hinkley import PageHinkley

__all__ = [
    "RFFMMD",
    "DimensionMeanShift",
    "DistributionShift",
    "DuplicateIds",
    "MMDResult",
    "MeanShiftTest",
    "PageHinkley",
]
