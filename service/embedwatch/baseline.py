"""The :class:`Baseline` data object: frozen reference statistics + a reference sample + metadata.

A baseline is plain data: a dict of named numpy arrays (:meth:`Baseline.to_arrays`) and a small
JSON-able metadata dict (:attr:`Baseline.metadata`). :meth:`Baseline.from_arrays` rebuilds it and
verifies the content hash. The versioned store (file / Kafka) is built on exactly these two
methods; both are stable (``schema_version`` is bumped on any incompatible change).

Everything a window and the detectors need is frozen here at creation: the centroid, per-dimension
mean/variance, the similarity and norm quantile bin edges and reference counts, the reference
sample with its similarities and norms, and the random-Fourier-feature map (frequencies, phases,
bandwidth chosen by the median heuristic) with the reference mean feature vector and the
eigenvalues of the feature covariance (the analytic null of the MMD^2 test).
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from embedwatch.config import DetectionSettings
from embedwatch.detectors.mean_shift import MeanShiftTest
from embedwatch.detectors.mmd import RFFMMD, shared_matrix
from embedwatch.events import StreamKey
from embedwatch.stats import histogram, quantile_edges
from embedwatch.window import Projection

SCHEMA_VERSION = 1

# The settings a mean-shift fit depends on: (scan_components, scan_shrinkage, seed).
MeanShiftKey = tuple[int, float, int]


def mean_shift_key(settings: DetectionSettings) -> MeanShiftKey:
    return (int(settings.scan_components), float(settings.scan_shrinkage), int(settings.seed))

#: Array names of a baseline, with their dtype.
ARRAY_DTYPES: dict[str, str] = {
    "mean": "float64",  # (d,) per-dimension mean = centroid
    "var": "float64",  # (d,) per-dimension unbiased variance
    # (s, d) reference vectors, float16: half the memory of the largest array of a baseline; kept
    # float32 when float16 would change a row by more than SAMPLE_FLOAT16_TOLERANCE (out of range)
    "sample": "float16",
    "sample_sims": "float64",  # (s,) cosine similarity of the sample to the centroid
    "sample_norms": "float64",  # (s,) L2 norms of the sample
    "sim_edges": "float64",  # interior quantile edges of the similarity histogram
    "sim_hist": "int64",  # reference counts over those bins
    "norm_edges": "float64",
    "norm_hist": "int64",
    "sim_moments": "float64",  # [mean, std] of the reference similarities (change-point scale)
    # (d, D) standard-normal frequencies G (the kernel's are G / rff_bandwidth): the same for every
    # baseline of one seed, d and D, so held once per process (detectors.mmd.shared_frequencies)
    "rff_normal": "float32",
    "rff_offsets": "float32",  # (D,)
    "rff_mean": "float64",  # (D,) mean feature vector of the sample
    "rff_eigvals": "float64",  # (D,) eigenvalues of the sample's feature covariance
    "rff_bandwidth": "float64",  # (1,) Gaussian kernel bandwidth
}


#: Arrays of the earlier layout (same schema_version), still read: a baseline holding
#: ``rff_weights`` (its own (d, D) frequencies, already divided by the bandwidth) instead of
#: ``rff_normal`` keeps and uses them as they are.
LEGACY_ARRAY_DTYPES: dict[str, str] = {"rff_weights": "float32"}


#: Largest relative L2 change of a sample row that float16 storage may make (its rounding alone
#: is at most 2**-11 ~ 4.9e-4; more means values outside float16's normal range).
SAMPLE_FLOAT16_TOLERANCE = 1e-3


def _sample_dtype(sample: np.ndarray, stored: bool) -> str:
    """float16 when it represents the sample well; a stored sample keeps its dtype (float32: the
    earlier layout, or a sample float16 could not hold), since its bytes are hashed."""
    a = np.asarray(sample)
    if stored:
        return "float32" if a.dtype == np.float32 else ARRAY_DTYPES["sample"]
    x = a.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        err = np.linalg.norm(x.astype(np.float16).astype(np.float64) - x, axis=1)
        rel = np.where(err > 0, err / np.linalg.norm(x, axis=1), 0.0)
    ok = bool(np.all(np.isfinite(rel)) and (rel.size == 0 or rel.max() <= SAMPLE_FLOAT16_TOLERANCE))
    return ARRAY_DTYPES["sample"] if ok else "float32"


def _layout(arrays: Mapping[str, Any], stored: bool) -> dict[str, str]:
    """Array names and dtypes of a baseline: the current layout, or the earlier one it was saved in."""
    names = dict(ARRAY_DTYPES)
    if "rff_normal" not in arrays and "rff_weights" in arrays:
        del names["rff_normal"]
        names.update(LEGACY_ARRAY_DTYPES)
    if "sample" in arrays:
        names["sample"] = _sample_dtype(arrays["sample"], stored)
    return names


def _freeze_all(arrays: Mapping[str, np.ndarray], stored: bool) -> dict[str, np.ndarray]:
    """Read-only C-order copies in the layout's dtypes; the frequency matrix is the shared one.
    ``stored``: the arrays come from :meth:`Baseline.to_arrays` (their dtypes are kept)."""
    out = {k: _frozen(np.asarray(arrays[k]), dtype) for k, dtype in _layout(arrays, stored).items()}
    if "rff_normal" in out:
        out["rff_normal"] = shared_matrix(out["rff_normal"])
    return out


def content_hash(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 over the arrays (sorted by name; name, dtype, shape and bytes of each)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(name.encode())
        h.update(a.dtype.str.encode())
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _frozen(a: np.ndarray, dtype: str) -> np.ndarray:
    out = np.array(a, dtype=dtype, copy=True, order="C")
    out.flags.writeable = False
    return out


@dataclass(frozen=True, eq=False)
class Baseline:
    """Frozen reference of one stream. Build with :meth:`from_vectors` or :meth:`from_arrays`."""

    key: StreamKey
    created_at: float
    count: int
    source: str
    arrays: Mapping[str, np.ndarray] = field(repr=False)
    content_hash: str
    schema_version: int = SCHEMA_VERSION
    #: Rows of the reference sample when the sample itself is not held (see :meth:`without_sample`).
    released_sample_rows: int | None = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_vectors(
        cls,
        key: StreamKey,
        vectors: np.ndarray,
        ts: np.ndarray | float | None,
        source: str,
        settings: DetectionSettings,
    ) -> Baseline:
        """Baseline of a set of reference vectors.

        ``ts``: the events' timestamps (``created_at`` = the newest) or a single timestamp.
        The sample is a seeded uniform subset of at most ``settings.baseline_sample`` vectors.
        """
        x = np.asarray(vectors, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError("a baseline needs a (n >= 2, d) array of vectors")
        x64 = x.astype(np.float64)
        mean = x64.mean(axis=0)
        var = x64.var(axis=0, ddof=1)
        rng = np.random.default_rng([settings.seed, x.shape[1], 0x42])
        if x.shape[0] > settings.baseline_sample:
            idx = np.sort(rng.choice(x.shape[0], size=settings.baseline_sample, replace=False))
            sample = x[idx]
        else:
            sample = x
        return cls._build(key, mean, var, x.shape[0], sample, x, _created(ts), source, settings)

    @classmethod
    def _build(
        cls,
        key: StreamKey,
        mean: np.ndarray,
        var: np.ndarray,
        count: int,
        sample: np.ndarray,
        hist_rows: np.ndarray,
        created_at: float,
        source: str,
        settings: DetectionSettings,
    ) -> Baseline:
        cnorm = float(np.linalg.norm(mean))
        unit = mean / cnorm if cnorm > 0 else mean

        def sims_norms(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            x64 = x.astype(np.float64)
            norms = np.sqrt(np.einsum("ij,ij->i", x64, x64))
            with np.errstate(divide="ignore", invalid="ignore"):
                sims = np.where(norms > 0, (x64 @ unit) / norms, 0.0)
            return sims, norms

        all_sims, all_norms = sims_norms(hist_rows)
        s_sims, s_norms = sims_norms(sample)
        sim_edges = quantile_edges(all_sims, settings.histogram_bins)
        norm_edges = quantile_edges(all_norms, settings.histogram_bins)
        mmd = RFFMMD.fit(sample, settings.rff_features, settings.seed)
        arrays = {
            "mean": mean,
            "var": var,
            "sample": sample,
            "sample_sims": s_sims,
            "sample_norms": s_norms,
            "sim_edges": sim_edges,
            "sim_hist": histogram(all_sims, sim_edges),
            "norm_edges": norm_edges,
            "norm_hist": histogram(all_norms, norm_edges),
            "sim_moments": np.array([all_sims.mean(), all_sims.std(ddof=1) if all_sims.size > 1 else 0.0]),
            "rff_normal": mmd.weights,
            "rff_offsets": mmd.offsets,
            "rff_mean": mmd.reference_mean,
            "rff_eigvals": mmd.eigvals,
            "rff_bandwidth": np.array([mmd.bandwidth]),
        }
        frozen = _freeze_all(arrays, stored=False)
        return cls(key=key, created_at=float(created_at), count=int(count), source=str(source),
                   arrays=frozen, content_hash=content_hash(frozen))

    @classmethod
    def from_arrays(cls, metadata: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Baseline:
        """Rebuild a baseline from :attr:`metadata` and :meth:`to_arrays`; verifies the content hash."""
        version = int(metadata.get("schema_version", -1))
        if version != SCHEMA_VERSION:
            raise ValueError(f"unsupported baseline schema_version {version} (expected {SCHEMA_VERSION})")
        missing = sorted(set(_layout(arrays, stored=True)) - set(arrays))
        if missing:
            raise ValueError(f"baseline arrays missing: {', '.join(missing)}")
        frozen = _freeze_all(arrays, stored=True)
        digest = content_hash(frozen)
        if digest != metadata.get("content_hash"):
            raise ValueError("baseline content hash mismatch: arrays do not match their metadata")
        key = StreamKey(str(metadata["model"]), str(metadata["model_version"]), str(metadata["segment"]))
        b = cls(key=key, created_at=float(metadata["created_at"]), count=int(metadata["count"]),
                source=str(metadata["source"]), arrays=frozen, content_hash=digest, schema_version=version)
        if int(metadata.get("dim", b.dim)) != b.dim:
            raise ValueError("baseline metadata dim does not match its arrays")
        return b

    # ----------------------------------------------------------------- serialisation
    @property
    def baseline_id(self) -> str:
        """Content-hash prefix: equal ids mean equal statistics."""
        return self.content_hash[:16]

    @property
    def metadata(self) -> dict[str, Any]:
        """JSON-able metadata (the other half of the serialised form)."""
        return {
            "baseline_id": self.baseline_id,
            "model": self.key.model,
            "model_version": self.key.model_version,
            "segment": self.key.segment,
            "dim": self.dim,
            "created_at": self.created_at,
            "count": self.count,
            "source": self.source,
            "content_hash": self.content_hash,
            "schema_version": self.schema_version,
        }

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The named arrays (read-only views; copy before modifying)."""
        if self.released_sample_rows is not None:
            raise ValueError(self._released())
        return dict(self.arrays)

    def without_sample(self, settings: DetectionSettings) -> Baseline:
        """The same baseline without its reference sample in memory, for a monitor and a store
        that already persisted it (or, without durable state, never will).

        A running stream needs the sample once: to fit the mean-shift scan when the baseline is
        activated. That fit (for ``settings``) is made now and carried over, so activating the
        returned copy again costs nothing; what needs the sample itself (serialising it, a scan fit
        for other settings) raises ``ValueError``. The content hash, and so the ``baseline_id``,
        stay those of the full baseline: 1.5 MiB less per 768-d stream at the default
        ``baseline_sample``.
        """
        if self.released_sample_rows is not None:
            return self
        if settings.scan_windows:
            self.mean_shift(settings)
        slim = replace(self, arrays={k: v for k, v in self.arrays.items() if k != "sample"},
                       released_sample_rows=self.sample_rows)
        slim.__dict__["_mean_shift"] = dict(self.__dict__.get("_mean_shift", {}))
        return slim

    def _released(self) -> str:
        return (f"baseline {self.baseline_id}: its reference sample was released from memory (the "
                "baseline store holds it)")

    # ----------------------------------------------------------------- views used by the monitor
    @property
    def dim(self) -> int:
        return int(self.arrays["mean"].shape[0])

    @property
    def mean(self) -> np.ndarray:
        return self.arrays["mean"]

    @functools.cached_property
    def centroid_unit(self) -> np.ndarray | None:
        """The centroid scaled to unit length, float32 and read-only (``None`` when it is zero):
        kept, because the service projects every batch of the stream on it."""
        n = float(np.linalg.norm(self.mean))
        if not n > 0:
            return None
        unit = (self.mean / n).astype(np.float32)
        unit.flags.writeable = False
        return unit

    @property
    def var(self) -> np.ndarray:
        return self.arrays["var"]

    @property
    def sample(self) -> np.ndarray:
        if self.released_sample_rows is not None:
            raise ValueError(self._released())
        return self.arrays["sample"]

    @property
    def sample_rows(self) -> int:
        """Vectors in the reference sample (held or not)."""
        if self.released_sample_rows is not None:
            return self.released_sample_rows
        return int(self.arrays["sample"].shape[0])

    @property
    def sim_mean(self) -> float:
        return float(self.arrays["sim_moments"][0])

    @property
    def sim_std(self) -> float:
        return float(self.arrays["sim_moments"][1])

    @property
    def mean_norm(self) -> float:
        return float(np.mean(self.arrays["sample_norms"]))

    def mmd(self) -> RFFMMD:
        """The calibrated MMD^2 test frozen with this baseline."""
        a = self.arrays
        bw = float(a["rff_bandwidth"][0])
        if "rff_normal" in a:
            return RFFMMD(a["rff_normal"], a["rff_offsets"], a["rff_mean"], a["rff_eigvals"],
                          self.sample_rows, bw, 1.0 / bw)
        return RFFMMD(a["rff_weights"], a["rff_offsets"], a["rff_mean"], a["rff_eigvals"],
                      self.sample_rows, bw)

    def mean_shift(self, settings: DetectionSettings) -> MeanShiftTest:
        """The calibrated mean-shift test of this baseline, fitted on its sample.

        Not stored with the baseline: it is a deterministic function of the sample, the mean and
        the settings (seeded split), so it is derived on activation and cached on this object.
        """
        key = mean_shift_key(settings)
        cache: dict[MeanShiftKey, MeanShiftTest] = self.__dict__.setdefault("_mean_shift", {})
        t = cache.get(key)
        if t is None:
            t = cache[key] = MeanShiftTest.fit(self.sample, self.mean, self.count, settings.scan_components,
                                               settings.scan_shrinkage, settings.seed)
        return t

    def mean_shift_fits(self) -> dict[MeanShiftKey, MeanShiftTest]:
        """The mean-shift tests fitted on this baseline so far, by :func:`mean_shift_key`."""
        return dict(self.__dict__.get("_mean_shift", {}))

    def keep_mean_shift(self, key: MeanShiftKey, test: MeanShiftTest) -> None:
        """Take a test fitted on this baseline before (stored beside it), so that
        :meth:`mean_shift` does not fit it again."""
        self.__dict__.setdefault("_mean_shift", {})[key] = test

    def held_arrays(self) -> list[np.ndarray]:
        """The arrays this object holds: its own and its fitted mean-shift tests'. Some are
        shared with other baselines (the random-feature frequencies, one matrix per process)."""
        fits = [a for t in self.__dict__.get("_mean_shift", {}).values()
                for a in (t.basis, t.gains, t.eigvals, t.mean_projection)]
        return [*self.arrays.values(), *fits]

    def projection(self, mmd: RFFMMD | None = None) -> Projection:
        """Centroid, bin edges and feature map for a :class:`embedwatch.window.Window`."""
        m = mmd if mmd is not None else self.mmd()
        unit = self.centroid_unit
        return Projection(self.mean.astype(np.float32) if unit is None else unit, self.arrays["sim_edges"],
                          self.arrays["norm_edges"], m.feature_sum, m.features)


def usability_problem(b: Baseline) -> str | None:
    """What makes ``b`` unusable by a monitor, or None. A baseline's hashes prove only that it is
    the one written, not that its arrays fit together: one made by other code (or an edited copy
    with hashes made again) could stop a monitor at its first evaluation (its events then
    dead-lettered each time the stream loads it), or hide every measure behind NaN. Checks the
    shapes the monitor relies on and that every number is finite; every baseline read from bytes
    goes through it (:func:`embedwatch.baseline_store.decode_baseline`, ``load_file``)."""
    a = b.arrays
    if "sample" not in a and b.released_sample_rows is None:
        return "it has no reference sample"
    d = b.dim
    if a["mean"].ndim != 1 or d < 1:
        return "mean is not a vector"
    sample_rows = b.sample_rows
    freq = a["rff_normal"] if "rff_normal" in a else a["rff_weights"]
    n_features = freq.shape[1] if freq.ndim == 2 else -1
    shapes = {"var": (d,), "sample_sims": (sample_rows,), "sample_norms": (sample_rows,),
              "sim_hist": (a["sim_edges"].shape[0] + 1,), "norm_hist": (a["norm_edges"].shape[0] + 1,),
              "sim_moments": (2,), "rff_offsets": (n_features,), "rff_mean": (n_features,),
              "rff_eigvals": (n_features,), "rff_bandwidth": (1,),
              "rff_normal" if "rff_normal" in a else "rff_weights": (d, n_features)}
    if b.released_sample_rows is None:
        shapes["sample"] = (sample_rows, d)
    for name, shape in shapes.items():
        if a[name].shape != shape or (name != "sample" and 0 in shape):
            return f"{name} has shape {a[name].shape}, expected {shape}"
    if sample_rows < 2:
        return f"its reference sample has {sample_rows} vectors (at least 2)"
    for name, arr in a.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return f"{name} holds NaN or infinite values"
    if (a["var"] < 0).any() or (a["sim_hist"] < 0).any() or (a["norm_hist"] < 0).any():
        return "a variance or a histogram count is negative"
    if float(a["rff_bandwidth"][0]) <= 0:
        return "rff_bandwidth is not positive"
    return None


def _created(ts: np.ndarray | float | None) -> float:
    arr = np.asarray(ts if ts is not None else [], dtype=np.float64)
    arr = arr[np.isfinite(arr)] if arr.ndim else arr.reshape(1)
    if arr.size == 0:
        return time.time()
    return float(np.max(arr))
