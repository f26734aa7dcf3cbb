"""Per-stream monitor: window + baseline + detectors + alarm policy (pure, no I/O).

Contract used by the service loop (app.py), the replay command and the exporter::

    monitor = StreamMonitor(key, settings, baseline=None)
    alarms = monitor.update_embeddings(vectors, ts, latency_s, ids)   # list[Alarm] ("mmd")
    alarms = monitor.update_queries(top1, n_results, precision_at_k, recall_at_k, latency_s, ts,
                                    vectors=None)
    monitor.measures()   # {Metric.measure: float} for every per-stream measure of metrics_catalog
    monitor.counters()   # {"drift_alarms", "changepoints", "duplicate_ids"}
    monitor.state()      # JSON-able dict for /api/streams and the replay report
    monitor.promote(events=None)           # the next events become the baseline (None: collecting)
    monitor.activate(baseline)             # switch to a stored baseline (promote / rollback)
    monitor.activate_query(baseline)       # the same for the query embeddings (key.query_side())
    monitor.promote_query(events=None)     # the same for the query embeddings
    alarms = monitor.expire(now)           # periodically, wall-clock now: a silent stream's window empties

Lifecycle. Without a baseline, the first ``reference_size`` embedding events are collected (no
alarm is possible inside them), then a :class:`~embedwatch.baseline.Baseline` is built from them
and the window starts with the next event (reference events are never in the window). Activating a
baseline (promotion, rollback) starts a fresh window: window statistics are relative to the
baseline's centroid, bins and features.

Evaluation. Detectors run after event ``i`` (0-based among the stream's accepted events) when
``(i + 1) % evaluate_every == 0`` and the window holds at least ``min_window_events`` events. When a
single update call makes more than ``max_evaluations_per_update`` evaluations due, evenly spaced
due points are evaluated, always including the last; the window state evaluated at ``i`` is
exactly the window after event ``i``.

Alarm policy. The stream enters *drifting* when the calibrated MMD^2 test rejects at
``false_alarm_rate`` (p-value <= false_alarm_rate) AND the effect size ``drift_score`` (debiased
MMD^2) >= ``effect_size_floor``; it leaves it after ``alarm_end_evaluations`` consecutive
evaluations with p > 100 * false_alarm_rate or score < floor (hysteresis); while the window holds
fewer than ``min_window_events`` (no MMD test), an evaluation without a loud scan since the previous
one counts as such. An alarm also ends when :meth:`StreamMonitor.expire` empties the window of a
silent stream. Both transitions are
:class:`Alarm` s (kind "start" / "end"). Page-Hinkley change points on the standardised
similarity-to-centroid score are recorded separately (``state()["changepoints"]``, counter
``changepoints``).
"""

from __future__ import annotations

import math
import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from embedwatch import rowsums
from embedwatch.baseline import Baseline
from embedwatch.config import DetectionSettings
from embedwatch.detectors import DimensionMeanShift, DistributionShift, DuplicateIds, PageHinkley
from embedwatch.detectors.mean_shift import MeanShiftTest
from embedwatch.detectors.mmd import RFFMMD
from embedwatch.events import StreamKey
from embedwatch.metrics_catalog import METRICS
from embedwatch.stats import ks_2samp, moments_from_sums
from embedwatch.window import PrefixSums, Projection, ScalarWindow, Summary, Window, WindowTotals, ts_max, ts_range

#: Every per-stream measure key exported through metrics_catalog (``Metric.measure``).
MEASURE_KEYS: tuple[str, ...] = tuple(m.measure for m in METRICS if m.measure is not None)

_RECENT = 100
#: Prefix of the query embeddings' monitor's arrays in a checkpoint (see StreamMonitor.checkpoint).
_QVEC = "q/"
#: Version of the :meth:`StreamMonitor.checkpoint` layout.
CHECKPOINT_SCHEMA = 1
#: A checkpoint array, or the chunks its rows were collected in (one after the other): a
#: reference being collected is up to 3 MB at d = 768, and joining it for a checkpoint copied every
#: such stream's reference once more while the record was built.
CheckpointArray = np.ndarray | tuple[np.ndarray, ...]
CheckpointArrays = dict[str, CheckpointArray]
_QUERY_COLUMNS = ("top1", "n_results", "precision", "recall", "index")
#: Measures of the events in the time-bounded window: NaN once it holds too few events to test.
_WINDOW_MEASURES = ("centroid_cosine_distance", "centroid_euclidean_distance", "similarity_ks_statistic",
                    "similarity_ks_p_value", "similarity_wasserstein", "similarity_psi",
                    "similarity_js_divergence", "norm_ks_statistic", "norm_mean_relative_change",
                    "dimensions_drifted_ratio", "drift_score", "drift_threshold", "drift_p_value")
_SCAN_MEASURES = ("mean_shift_score", "mean_shift_threshold_ratio")
_QUERY_KS = ("query_top1_ks_statistic", "query_top1_ks_p_value")


@dataclass(frozen=True)
class Alarm:
    """A drift alarm transition (or a change point, detector ``"changepoint"``)."""

    stream: str
    index: int
    ts: float
    detector: str
    score: float
    p_value: float | None
    kind: str  # "start" | "end"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["score"] = _json_float(self.score)
        d["p_value"] = None if self.p_value is None else _json_float(self.p_value)
        d["ts"] = _json_float(self.ts)
        return d


@dataclass(frozen=True, slots=True)
class _ScanPoint:
    """A scan point where a recent window's mean is loud (rejects at 100x the level), for the policy."""

    index: int
    ts: float
    reject: bool  # some window rejects at the scan's share of the false-alarm budget (and its floor)
    effect: float  # the most significant window's debiased statistic
    statistic: float
    m: int


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _alarm_of(d: dict[str, Any]) -> Alarm:
    def f(v: Any) -> float:
        return math.nan if v is None else float(v)

    return Alarm(str(d["stream"]), int(d["index"]), f(d["ts"]), str(d["detector"]), f(d["score"]),
                 None if d["p_value"] is None else float(d["p_value"]), str(d["kind"]))


def _window_config(s: DetectionSettings) -> list[float]:
    return [s.window_events, s.window_seconds, s.buckets, s.reservoir_per_bucket, s.histogram_bins,
            s.rff_features, s.seed, s.scan_every, *s.scan_windows]


#: Fewest events a promotion builds a baseline from (the smallest ``reference_size`` allowed).
MIN_PROMOTED_EVENTS = 50


def _gap_cut(ts: np.ndarray, newest: float, seconds: float) -> int:
    """Index of the first event that comes more than ``seconds`` after every earlier one (the
    window's ``newest`` included), if that is not the first event of ``ts``; else 0."""
    prev = np.maximum.accumulate(np.concatenate(([newest], ts[:-1])))
    gaps = np.flatnonzero(ts - prev > seconds)
    return int(gaps[0]) if gaps.size and gaps[0] > 0 else (int(gaps[1]) if gaps.size > 1 else 0)


class StreamMonitor:
    """Window, baseline, detectors and alarm state of one stream. See the module docstring."""

    def __init__(self, key: StreamKey, settings: DetectionSettings, baseline: Baseline | None = None) -> None:
        self.key = key
        self.settings = settings
        self.expected_dim: int | None = None
        self.events = 0
        self.query_events = 0
        self.drifting = False
        self.baseline: Baseline | None = None
        #: Calls that may have changed the state (updates, activations, promotions): the service
        #: skips the checkpoint of a partition none of whose streams changed.
        self.changes = 0
        self._name = str(key)
        self._seed_base = [int(settings.seed), zlib.crc32(self._name.encode())]
        self._generation = 0
        self._ref_chunks: list[np.ndarray] = []
        self._ref_ts: list[np.ndarray] = []
        self._ref_n = 0
        self._promotion = 0  # events a pending promotion collects (0: none)
        self._window: Window | None = None
        self._mmd: RFFMMD | None = None
        self._dims: DimensionMeanShift | None = None
        self._sim_shift: DistributionShift | None = None
        self._norm_shift: DistributionShift | None = None
        self._ph = self._new_ph()
        self._dups = DuplicateIds(settings.duplicate_window)
        self._measures: dict[str, float] = dict.fromkeys(MEASURE_KEYS, math.nan)
        self._alarms: deque[Alarm] = deque(maxlen=_RECENT)
        self._changepoints: deque[Alarm] = deque(maxlen=_RECENT)
        self._drift_alarms = 0
        self._changepoint_count = 0
        self._end_streak = 0
        self._last_eval: tuple[int, float] | None = None
        self._snapshot: WindowTotals | None = None
        self._derived_for: WindowTotals | None = None
        # The last update's norms and similarities, when it was monitored whole (take_summary).
        self._batch_summary: Summary | None = None
        self._mmd_last: tuple[float, int] | None = None
        # recent-window mean-shift scan: sums (and counts) of the last segments of scan_every events
        self._ms: MeanShiftTest | None = None
        self._pre = PrefixSums(0, 1)  # running sums at the last scan points
        self._open_sum = np.zeros(0)
        self._open_n = 0
        self._scan_loud = False
        self._scan_segments = np.zeros(0, dtype=np.int64)
        self._scan_thresholds = np.zeros((3, 0))
        self._scan_sizes = np.zeros(0)  # events per window size
        self._scan_longest = 0  # segments of the longest window
        # (points, windows) of a one-point scan: point 0, every window
        self._scan_one_point = (np.zeros(0, dtype=np.intp), np.zeros(0, dtype=np.intp))
        self._alarm_detector = "mmd"  # the detector that started the current alarm (its end says the same)
        self._newest_ts = -math.inf
        self._expire_mark = -1  # events at the last expire call (see expire)
        self._qexpire_mark = -1  # query_events at the last expire call
        # queries
        self._qwin = ScalarWindow(_QUERY_COLUMNS, settings.window_events, settings.window_seconds)
        self._qref: list[np.ndarray] = []
        self._qref_n = 0
        self._qref_done: np.ndarray | None = None
        self._qref_start = 0  # query index where the top-1 reference starts (moved by a promotion)
        self._qpromotion = False  # a promotion of a query-only stream is pending (see promote)
        self._qvec: StreamMonitor | None = None
        self._qks_pending: np.ndarray | None = None  # window top-1 scores whose KS test is due
        if baseline is not None:
            self.activate(baseline)

    # ------------------------------------------------------------------ baselines
    def _new_ph(self) -> PageHinkley:
        s = self.settings
        return PageHinkley(min_instances=s.changepoint_min_instances, delta=s.changepoint_delta,
                           threshold=s.changepoint_threshold, alpha=s.changepoint_alpha, mode="both")

    def activate(self, baseline: Baseline, restart_query_reference: bool = True) -> Alarm | None:
        """Make ``baseline`` the active one and start a fresh window against it; returns the end of
        the alarm this closes, if one was open.

        The top-1 score reference restarts as well (the KS test compares with the queries after
        the switch), unless ``restart_query_reference`` is false: a stream's first baseline keeps
        the reference collected meanwhile, and a promotion restarted it when it was requested.
        """
        self.changes += 1
        if restart_query_reference:
            self._restart_query_reference()
        end = None
        if self.drifting and self._last_eval is not None:
            idx, ts = self._last_eval
            end = Alarm(self._name, idx, ts, self._alarm_detector, math.nan, None, "end")
            self._alarms.append(end)
        self.baseline = baseline
        self.expected_dim = baseline.dim
        self._generation += 1
        self._mmd = baseline.mmd()
        proj: Projection = baseline.projection(self._mmd)
        self._window = Window(baseline.dim, self.settings, proj, [*self._seed_base, self._generation])
        self._dims = DimensionMeanShift(baseline.mean, baseline.var, baseline.count, self.settings.dimension_alpha)
        a = baseline.arrays
        self._sim_shift = DistributionShift(a["sample_sims"], a["sim_hist"])
        self._norm_shift = DistributionShift(a["sample_norms"])
        self._ph = self._new_ph()
        self._ms = baseline.mean_shift(self.settings) if self.settings.scan_windows else None
        if self._ms is not None:
            self._scan_segments = np.array(self.settings.scan_windows, dtype=np.int64) // self.settings.scan_every
            # rows: threshold, relaxed threshold, null mean; one column per window size
            self._scan_thresholds = np.array([self._scan_threshold(w) for w in self.settings.scan_windows]).T
            self._scan_sizes = (self._scan_segments * self.settings.scan_every).astype(np.float64)
            self._scan_longest = int(self._scan_segments.max())
            n_windows = self._scan_segments.size
            self._scan_one_point = (np.zeros(n_windows, dtype=np.intp), np.arange(n_windows))
        self._reset_scan()
        self.drifting = False
        self._end_streak = 0
        self._snapshot = self._derived_for = None
        self._mmd_last = None
        self._ref_chunks, self._ref_ts, self._ref_n = [], [], 0
        self._promotion = 0
        for k in (*_WINDOW_MEASURES, *_SCAN_MEASURES, "changepoint_score"):
            self._measures[k] = math.nan
        return end

    def _restart_query_reference(self) -> None:
        """The next ``reference_size`` query events become the top-1 score reference."""
        self._qref, self._qref_n, self._qref_done = [], 0, None
        self._qref_start = self.query_events
        self._qks_pending = None
        for k in _QUERY_KS:
            self._measures[k] = math.nan

    def promote(self, events: int | None = None) -> Baseline | None:
        """Accept what the stream emits now as its normal: a new baseline of its next events.

        The next ``events`` (default ``reference_size``) embedding events are collected and become
        the new baseline (source ``promoted``); until then the stream stays monitored against the
        current one, so an alarm ends when the new baseline takes over. A baseline built from the
        events *after* the promotion holds only the new behaviour: the window at the time of an
        alarm still holds mostly events from before the change (the scan catches a shift within
        tens of events), and a baseline of it raised the alarm again. Returns ``None`` (collecting).

        A stream still collecting its first reference (a low-traffic one) is promoted at once from
        the events collected so far, if there are at least :data:`MIN_PROMOTED_EVENTS` (source
        ``partial_reference``): returns that baseline.

        The top-1 score reference restarts at once: the next ``reference_size`` query events
        become it. The query-embedding monitor, when it has a baseline, is promoted too (its next
        ``events`` query embeddings). A stream that only ever had query events is promoted on its
        query side alone: query embeddings (if any) and the top-1 reference; :attr:`promotion`
        gives the progress (a query-embedding monitor still collecting its first reference just
        completes it).
        """
        want = self.settings.reference_size if events is None else int(events)
        self.changes += 1
        if not MIN_PROMOTED_EVENTS <= want <= 1_000_000:
            raise ValueError(f"a promotion needs {MIN_PROMOTED_EVENTS}..1000000 events, got {want}")
        if self.query_only:
            self._restart_query_reference()
            if self._qvec is not None and self._qvec.baseline is not None:
                self._qvec.promote(want)
            self._qpromotion = True
            return None
        if self.baseline is None:
            if self._ref_n < MIN_PROMOTED_EVENTS:
                raise ValueError(f"stream {self._name} has {self._ref_n} events so far; a baseline needs "
                                 f"at least {MIN_PROMOTED_EVENTS}")
            self._restart_query_reference()
            self._activate_collected("partial_reference")
            assert self.baseline is not None
            return self.baseline
        self._restart_query_reference()
        if self._qvec is not None and self._qvec.baseline is not None:
            self._qvec.promote(want)
        self._ref_chunks, self._ref_ts, self._ref_n = [], [], 0
        self._promotion = want
        return None

    @property
    def query_only(self) -> bool:
        """The stream has had query events and never an embedding event: its baseline (readiness,
        promotion) is that of its query side."""
        return self.baseline is None and self.events == 0 and self._ref_n == 0 and self.query_events > 0

    @property
    def promotion(self) -> dict[str, int] | None:
        """Progress of a pending promotion (``events`` collected of ``needed``), or ``None``.

        For a query-only stream: the query embeddings' new (or first) baseline, or without query
        embeddings the top-1 score reference."""
        if self._promotion:
            return {"events": self._ref_n, "needed": self._promotion}
        return self._query_promotion() if self._qpromotion else None

    def _query_promotion(self) -> dict[str, int] | None:
        q, need = self._qvec, self.settings.reference_size
        if q is not None:
            return {"events": q._ref_n, "needed": need} if q.baseline is None else q.promotion
        return None if self._qref_done is not None else {"events": self._qref_n, "needed": need}

    # ------------------------------------------------------------------ embeddings
    def update_embeddings(
        self,
        vectors: np.ndarray,
        ts: np.ndarray,
        latency_s: np.ndarray | None = None,
        ids: Sequence[str | None] | None = None,
    ) -> list[Alarm]:
        """Feed a batch of accepted embedding events of this stream (rows in stream order)."""
        self.changes += 1
        self._batch_summary = None
        x = np.asarray(vectors)
        n = int(x.shape[0]) if x.ndim == 2 else 0
        if n == 0:
            return []
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        ts = np.asarray(ts, dtype=np.float64)
        if self.expected_dim is None:
            self.expected_dim = int(x.shape[1])
        elif x.shape[1] != self.expected_dim:
            raise ValueError(f"stream {self._name}: dimension {x.shape[1]} != expected {self.expected_dim}")
        lo, hi = ts_range(ts)
        # A gap longer than the window inside the batch implies a batch spanning more than it.
        cut = _gap_cut(ts, self._window.newest_ts if self._window is not None else -math.inf,
                       self.settings.window_seconds) if hi - lo > self.settings.window_seconds else 0
        if cut:
            # A silence longer than the window inside the batch: the part after it starts the
            # scan afresh (below), as it would in a batch of its own, so the outcome does not
            # depend on how the events were batched.
            ids_at = list(ids) if ids is not None else None
            split = self.update_embeddings(x[:cut], ts[:cut], None if latency_s is None else latency_s[:cut],
                                           None if ids_at is None else ids_at[:cut])
            split += self.update_embeddings(x[cut:], ts[cut:], None if latency_s is None else latency_s[cut:],
                                            None if ids_at is None else ids_at[cut:])
            self._batch_summary = None  # monitored in two parts: the service summarises the batch itself
            return split
        if ids is not None:
            self._dups.update(ids)
        w = self._window
        if w is not None and self._ms is not None and lo - w.newest_ts > self.settings.window_seconds:
            # Back after a silence longer than the window: the scan's running sums hold only
            # events the time bound dropped; mixed into the new ones' recent windows, they kept an
            # alarm going for a thousand events.
            self._reset_scan()
        self._newest_ts = max(self._newest_ts, hi)
        first = self.events
        pos = 0
        if self.baseline is None:
            # At least 0: a checkpoint restored under a smaller reference_size may hold more.
            take = max(0, min(n, self.settings.reference_size - self._ref_n))
            self._collect(x[:take], ts[:take])
            pos = take
            if self._ref_n >= self.settings.reference_size:
                self._activate_collected("first_events")
        alarms: list[Alarm] = []
        if self._promotion and pos < n:
            # Collected for the new baseline and still monitored against the current one.
            take = min(n, self._promotion - self._ref_n)
            self._collect(x[:take], ts[:take])
            alarms = self._monitor(x[:take], ts[:take], first)
            pos = take
            if self._ref_n >= self._promotion:
                end = self._activate_collected("promoted")
                if end is not None:
                    alarms.append(end)
        if pos < n:
            alarms += self._monitor(x[pos:], ts[pos:], first + pos, keep_summary=pos == 0)
        self.events += n
        return alarms

    @property
    def newest_ts(self) -> float:
        """Time of the newest event of the stream (embeddings and queries; -inf before any)."""
        return self._newest_ts

    def take_summary(self) -> Summary | None:
        """The last :meth:`update_embeddings` batch's per-event norms and cosine similarities to
        the active baseline's centroid (float64, every row), when the whole batch was monitored
        against one baseline; ``None`` otherwise (reference collection, a promotion, a baseline
        activated within the batch). Handed over once: the service's histograms take the norms and
        similarities from here instead of computing them a second time (see
        :meth:`embedwatch.app.Service.process`), and no stream holds them longer.
        """
        s, self._batch_summary = self._batch_summary, None
        return s

    def _collect(self, x: np.ndarray, ts: np.ndarray) -> None:
        self._ref_chunks.append(x.copy())
        self._ref_ts.append(ts.copy())
        self._ref_n += x.shape[0]

    def _activate_collected(self, source: str) -> Alarm | None:
        """Build a baseline from the collected events and activate it (see :meth:`activate`)."""
        return self.activate(Baseline.from_vectors(self.key, np.concatenate(self._ref_chunks),
                                                   np.concatenate(self._ref_ts), source, self.settings),
                             restart_query_reference=False)

    def _monitor(self, x: np.ndarray, ts: np.ndarray, first: int, keep_summary: bool = False) -> list[Alarm]:
        assert self._window is not None and self.baseline is not None
        w = self._window
        s = w.projection.summarise(x)
        if keep_summary:
            self._batch_summary = s
        self._changepoint_scan(s.sims, ts, first)
        n = x.shape[0]
        e = self.settings.evaluate_every
        first_due = ((first + e) // e) * e - 1
        due = np.arange(first_due, first + n, e)
        cap = self.settings.max_evaluations_per_update
        if due.size > cap:
            # Evenly spaced, anchored at the last due point (cap == 1: only the last one).
            due = due[np.unique(np.round(np.linspace(due.size - 1, 0, cap)).astype(np.int64))]
        scans = self._scan(x, ts, first)
        alarms: list[Alarm] = []
        pos = 0
        k = 0
        last = int(due[-1]) if due.size else -1
        for i in due.tolist():
            while k < len(scans) and scans[k].index <= i:
                self._scan_policy(scans[k], alarms)
                k += 1
            end = i - first + 1
            w.add(x[pos:end], ts[pos:end], first + pos, s.slice(pos, end))
            pos = end
            alarm = self._evaluate(i, float(ts[end - 1]), snapshot=i == last)
            if alarm is not None:
                alarms.append(alarm)
        for sp in scans[k:]:
            self._scan_policy(sp, alarms)
        if pos < n:
            w.add(x[pos:], ts[pos:], first + pos, s.slice(pos, n))
        return alarms

    def _scan(self, x: np.ndarray, ts: np.ndarray, first: int) -> list[_ScanPoint]:
        """Mean-shift test of the recent windows at every scan point of the batch, vectorised.

        A scan point is an event ``i`` with ``(i + 1) % scan_every == 0``. The monitor keeps the
        running sums (and counts) of the stream at its last ``max(scan_windows) / scan_every + 1``
        scan points (:class:`PrefixSums`, re-based so magnitudes stay bounded and nothing
        drifts); events after the last scan point wait in an open sum. The
        window of size ``W`` at a scan point is the difference of two of these running sums ``W /
        scan_every`` scan points apart, tested once that many scan points passed since the baseline
        was activated. Returned: the scan points where some window rejects at the relaxed level
        (the only ones the alarm policy needs).
        """
        ms = self._ms
        if ms is None:
            return []
        st = self.settings
        e = st.scan_every
        n = x.shape[0]
        ends = np.arange(((first + e) // e) * e - 1 - first, n, e)
        if ends.size == 0:
            rowsums.add_rows(x, self._open_sum)
            self._open_n += n
            return []
        c = ends.size
        head = int(ends[0]) + 1
        last = int(ends[-1]) + 1
        # Segment 0 adds the batch's first rows to the open sum, in order; the whole segments in
        # between are one pass, written in place.
        seg = np.empty((c, x.shape[1]))
        seg[0] = self._open_sum
        rowsums.add_rows(x[:head], seg[0])
        rowsums.segment_sums(x[head:last], e, out=seg[1:])
        self._open_sum = np.zeros(x.shape[1])
        rowsums.add_rows(x[last:], self._open_sum)
        cnt = np.full(c, e, dtype=np.int64)
        cnt[0] = head + self._open_n
        self._open_n = n - last
        pre = self._pre
        p0 = pre.append(seg, cnt)  # number of the first new scan point
        ks = self._scan_segments
        if c == 1 and p0 >= self._scan_longest:  # a few events per update: every window, one point
            pt, wi = self._scan_one_point
            m, sq, proj = pre.windows(p0, p0 - ks, ms.mean)
        else:
            hi = p0 + np.arange(c)[:, None]  # number of each new scan point
            lo = hi - ks[None, :]  # (points, windows)
            pt, wi = np.nonzero(lo >= 0)
            if pt.size == 0:
                pre.settle()
                return []
            m, sq, proj = pre.windows(hi[pt, 0], lo[pt, wi], ms.mean)
        stat = ms.statistic_of(sq, proj)
        pre.settle()
        if (m == self._scan_sizes[wi]).all():  # the usual case: thresholds per window size, cached
            thr, thr_relaxed, null = self._scan_thresholds[:, wi]
        else:
            thr, thr_relaxed, null = np.array([self._scan_threshold(int(v)) for v in m.tolist()]).T
        effect = stat - null
        ratio = stat / thr
        big = effect >= st.scan_effect_floor
        loud = (stat > thr_relaxed) & big
        # Measures: the last scan point's most significant window.
        if c == 1:  # every row is the one point's
            j = int(np.argmax(ratio))
        else:
            at_last = np.flatnonzero(pt == c - 1)
            j = int(at_last[np.argmax(ratio[at_last])]) if at_last.size else -1
        if j >= 0:
            self._measures["mean_shift_threshold_ratio"] = float(ratio[j])
            self._measures["mean_shift_score"] = float(effect[j])
        if not loud.any():
            return []
        reject = (stat > thr) & big
        out: list[_ScanPoint] = []
        for p in np.unique(pt[loud]).tolist():
            sel = np.flatnonzero((pt == p) & loud)
            j = int(sel[np.argmax(ratio[sel])])
            out.append(_ScanPoint(first + int(ends[p]), float(ts[ends[p]]), bool(reject[sel].any()),
                                  float(effect[j]), float(stat[j]), int(m[j])))
        return out

    def _new_prefix_sums(self, sums: np.ndarray | None = None, counts: np.ndarray | None = None) -> PrefixSums:
        """The scan's running sums (fresh, or restored): enough kept for its longest window."""
        assert self.baseline is not None
        keep = max(self.settings.scan_windows, default=self.settings.scan_every) // self.settings.scan_every
        basis = self._ms.basis if self._ms is not None else None
        if sums is None or counts is None:
            return PrefixSums(self.baseline.dim, keep, basis)
        return PrefixSums.restore(sums, counts, keep, basis)

    def _reset_scan(self) -> None:
        """Forget the scan's running sums: its recent windows hold only the events that follow."""
        assert self.baseline is not None
        self._pre = self._new_prefix_sums()
        self._open_sum = np.zeros(self.baseline.dim)
        self._open_n = 0
        self._scan_loud = False
        for k in _SCAN_MEASURES:
            self._measures[k] = math.nan

    def _scan_threshold(self, m: int) -> tuple[float, float, float]:
        """(threshold, relaxed threshold, null mean) of a scan window of ``m`` events."""
        assert self._ms is not None
        alpha = self.settings.false_alarm_rate / 2.0 / len(self.settings.scan_windows)
        return (self._ms.threshold(m, alpha), self._ms.threshold(m, min(100.0 * alpha, 0.5)),
                self._ms.null_mean(m))

    def _scan_policy(self, sp: _ScanPoint, alarms: list[Alarm]) -> None:
        """A scan point where some window is loud: start an alarm if one rejects; keep one going."""
        assert self._ms is not None
        self._scan_loud = True
        if sp.reject and not self.drifting:
            self._last_eval = (sp.index, sp.ts)
            alarms.append(self._start_alarm("mean_shift", sp.index, sp.ts, sp.effect,
                                            self._ms.p_value(sp.statistic, sp.m)))

    def _start_alarm(self, detector: str, index: int, ts: float, score: float, p_value: float) -> Alarm:
        """Enter the drifting state; the alarm is recorded and returned."""
        self.drifting = True
        self._end_streak = 0
        self._drift_alarms += 1
        self._alarm_detector = detector
        alarm = Alarm(self._name, index, ts, detector, score, p_value, "start")
        self._alarms.append(alarm)
        return alarm

    def _changepoint_scan(self, sims: np.ndarray, ts: np.ndarray, first: int) -> None:
        assert self.baseline is not None
        sd = self.baseline.sim_std
        z = (sims - self.baseline.sim_mean) / (sd if sd > 0 else 1.0)
        for off in self._ph.update_many(z).tolist():
            self._changepoint_count += 1
            self._changepoints.append(
                Alarm(self._name, first + off, float(ts[off]), "changepoint",
                      float(self.settings.changepoint_threshold), None, "start"))
        self._measures["changepoint_score"] = self._ph.statistic

    def _evaluate(self, index: int, ts: float, snapshot: bool = True) -> Alarm | None:
        """Run the alarm decision on the window after event ``index``.

        Only what the decision needs is computed here: the MMD^2 statistic, compared with the
        threshold cached per window size (``p <= alpha`` exactly when ``score >= threshold(alpha)``:
        the null tail is monotone). With ``snapshot`` the window's other merged statistics are
        kept as well, and the descriptive measures and the p-values are derived from them when
        :meth:`measures` is read; an evaluation followed by another in the same update skips them,
        as the next one replaces the snapshot before anyone can read it.
        """
        assert self._window is not None and self._mmd is not None
        s = self.settings
        count, sample_n, feature_sum = self._window.decision_totals()
        if count < s.min_window_events:
            # Too few events in the time bound (a low-rate stream): no MMD test, and its measures
            # describe events the window no longer holds.
            self._clear_window_measures()
            if not self.drifting:
                return None
            # An alarm the scan (count-based) started ends on the scan's evidence alone, after
            # alarm_end_evaluations evaluations' worth of events without a loud scan. One the MMD
            # test started stays open: too few events is no evidence that the drift ended (the
            # scan may not see it at all), and expire() ends it once the window has emptied.
            self._last_eval = (index, ts)
            loud = self._take_scan_loud()
            if self._alarm_detector == "mean_shift" and self._ms is not None and self._quiet_evaluation(loud):
                return self._end_alarm(index, ts, math.nan, None)
            return None
        self._last_eval = (index, ts)
        if snapshot:
            self._snapshot = self._window.totals(with_features=False)  # the feature sum is above
            self._derived_for = None
        if feature_sum is None or sample_n < 2:
            self._mmd_last = None
            return None
        mmd = self._mmd
        m = sample_n
        diff = feature_sum / m - mmd.reference_mean
        stat = float(diff @ diff)
        score = stat - mmd.null_mean(m)
        self._mmd_last = (stat, m)
        self._measures["drift_score"] = score
        self._measures["drift_threshold"] = mmd.threshold(m, self._mmd_alpha)
        self._measures["drift_p_value"] = math.nan  # derived lazily
        return self._policy(index, ts, score, m, stat)

    @property
    def _mmd_alpha(self) -> float:
        """The MMD test's share of the false-alarm budget (half of it when the scan runs)."""
        s = self.settings
        return s.false_alarm_rate / 2.0 if s.scan_windows else s.false_alarm_rate

    def _policy(self, index: int, ts: float, score: float, m: int, stat: float) -> Alarm | None:
        s = self.settings
        assert self._mmd is not None
        floor = s.effect_size_floor
        alpha = self._mmd_alpha
        loud_scan = self._take_scan_loud()
        if not self.drifting:
            if score >= self._mmd.threshold(m, alpha) and score >= floor:
                return self._start_alarm("mmd", index, ts, score, self._mmd.p_value(stat, m))
            return None
        quiet = score < self._mmd.threshold(m, min(100.0 * alpha, 0.5)) or score < floor
        if self._quiet_evaluation(loud_scan or not quiet):
            return self._end_alarm(index, ts, score, self._mmd.p_value(stat, m))
        return None

    def _take_scan_loud(self) -> bool:
        """Whether a scan point was loud since the last evaluation (and forget it)."""
        loud, self._scan_loud = self._scan_loud, False
        return loud

    def _quiet_evaluation(self, loud: bool) -> bool:
        """Count an evaluation of a drifting stream; True when it is the alarm_end_evaluations-th
        quiet one in a row (the alarm ends)."""
        if loud:
            self._end_streak = 0
            return False
        self._end_streak += 1
        return self._end_streak >= self.settings.alarm_end_evaluations

    def _end_alarm(self, index: int, ts: float, score: float, p_value: float | None) -> Alarm:
        self.drifting = False
        self._end_streak = 0
        alarm = Alarm(self._name, index, ts, self._alarm_detector, score, p_value, "end")
        self._alarms.append(alarm)
        return alarm

    def _clear_window_measures(self) -> None:
        self._snapshot = self._derived_for = None
        self._mmd_last = None
        for k in _WINDOW_MEASURES:
            self._measures[k] = math.nan

    def expire(self, now: float) -> list[Alarm]:
        """Apply the window's time bound at wall-clock ``now`` (a silent stream's window empties).

        Events only move the window forward, so a stream that stops sending kept its window, its
        measures and its alarm for as long as it stayed silent. Called periodically by the service:
        buckets whose newest event is older than ``now - window_seconds`` are dropped; a window left
        with fewer than ``min_window_events`` events has its window measures set to NaN; an alarm
        still open when the window has emptied ends (returned, and recorded like any end). The
        query-embedding monitor is expired the same way (its alarms have detector ``"mmd_query"``).

        Only a stream without a new event since the previous call is expired: a consumer catching
        up on a backlog older than ``window_seconds`` delivers events whose timestamps are all
        past ``now``'s bound, and emptying their windows between batches would leave no
        evaluation a full window (a stream slower than the calls may still be expired then).
        """
        alarms: list[Alarm] = []
        w = self._window
        # Marked by event counts per kind: a stream whose documents stopped while its queries go
        # on is silent on the document side (and the reverse).
        fresh, self._expire_mark = self.events != self._expire_mark, self.events
        qfresh, self._qexpire_mark = self.query_events != self._qexpire_mark, self.query_events
        if not qfresh and self._qwin.evict(now):
            self.changes += 1
            self._evaluate_queries()
        if w is not None and w.buckets and not fresh:
            before = w.count
            w.evict(now)
            after = w.count
            if after != before:
                self.changes += 1
                if after < self.settings.min_window_events:
                    self._clear_window_measures()
                if after == 0:
                    self._reset_scan()  # what it summed is gone from the window too
                    if self.drifting:
                        alarms.append(self._end_alarm(max(self.events - 1, 0), float(now), math.nan, None))
        if self._qvec is not None:
            q_alarms = self._qvec.expire(now)
            if q_alarms:
                self.changes += 1
                alarms += self._as_query(q_alarms)
        return alarms

    def _derive(self) -> None:
        """Descriptive measures of the last evaluated window (cached until the next evaluation)."""
        tot = self._snapshot
        if tot is None or self._derived_for is tot:
            return
        self._derived_for = tot
        assert self.baseline is not None and self._dims is not None
        assert self._sim_shift is not None and self._norm_shift is not None and self._mmd is not None
        m = self._measures
        b = self.baseline
        wmean = tot.mean
        bmean = b.mean
        denom = float(np.linalg.norm(wmean) * np.linalg.norm(bmean))
        m["centroid_cosine_distance"] = 1.0 - float(wmean @ bmean) / denom if denom > 0 else math.nan
        m["centroid_euclidean_distance"] = float(np.linalg.norm(wmean - bmean))
        sim = self._sim_shift.compare(tot.sims, tot.sim_hist)
        m["similarity_ks_statistic"] = sim["ks_statistic"]
        m["similarity_ks_p_value"] = sim["ks_p_value"]
        m["similarity_wasserstein"] = sim["wasserstein"]
        m["similarity_psi"] = sim["psi"]
        m["similarity_js_divergence"] = sim["js"]
        m["norm_ks_statistic"] = self._norm_shift.compare(tot.norms, p_value=False)["ks_statistic"]
        bnorm = b.mean_norm
        m["norm_mean_relative_change"] = (float(tot.norms.mean()) - bnorm) / bnorm if bnorm > 0 else math.nan
        mean, var = moments_from_sums(tot.count, tot.sum, tot.sumsq)
        m["dimensions_drifted_ratio"] = self._dims.ratio(tot.count, mean, var)
        if self._mmd_last is not None:
            stat, n = self._mmd_last
            m["drift_p_value"] = self._mmd.p_value(stat, n)

    # ------------------------------------------------------------------ queries
    def update_queries(
        self,
        top1: np.ndarray,
        n_results: np.ndarray,
        precision_at_k: np.ndarray,
        recall_at_k: np.ndarray,
        latency_s: np.ndarray | None,
        ts: np.ndarray,
        vectors: np.ndarray | None = None,
    ) -> list[Alarm]:
        """Feed a batch of query events. NaN = field absent (no results / no labels).

        The top-1 reference is the finite top-1 scores of the first ``reference_size`` query
        events; the KS test compares window queries after them. Query embeddings, when given, are
        monitored by a separate embedding monitor of the same stream (its alarms have detector
        ``"mmd_query"``), so they never mix with document vectors.
        """
        self.changes += 1
        ts = np.asarray(ts, dtype=np.float64)
        n = int(ts.shape[0])
        if n == 0:
            return []
        top1 = np.asarray(top1, dtype=np.float64)
        index = self.query_events + np.arange(n, dtype=np.float64)
        if self._qref_done is None:
            take = max(0, min(n, self.settings.reference_size - self._qref_n))
            self._qref.append(top1[:take])
            self._qref_n += take
            if self._qref_n >= self.settings.reference_size:
                ref = np.concatenate(self._qref)
                self._qref_done = np.sort(ref[np.isfinite(ref)])
                self._qref = []
        if self._qpromotion and self._qvec is None and self._qref_done is not None:
            self._qpromotion = False
        self._qwin.add(ts, top1=top1, n_results=np.asarray(n_results, dtype=np.float64),
                       precision=np.asarray(precision_at_k, dtype=np.float64),
                       recall=np.asarray(recall_at_k, dtype=np.float64), index=index)
        self.query_events += n
        self._newest_ts = max(self._newest_ts, ts_max(ts))
        self._evaluate_queries()
        if vectors is None or vectors.ndim != 2 or vectors.shape[1] == 0:
            return []
        if self._qvec is None:
            self._qvec = StreamMonitor(self.key.query_side(), self.settings)
        lat = latency_s if latency_s is not None else np.full(n, np.nan)
        alarms = self._qvec.update_embeddings(vectors, ts, lat)
        self._qvec.take_summary()  # query vectors have no norm histogram: not held until the next batch
        if self._qpromotion and self._query_promotion() is None:
            self._qpromotion = False
        return self._as_query(alarms)

    def _as_query(self, alarms: Sequence[Alarm]) -> list[Alarm]:
        """The query-embedding monitor's alarms as the stream's: its name, detector ``mmd_query``."""
        return [replace(a, stream=self._name, detector="mmd_query") for a in alarms]

    @property
    def query_monitor(self) -> StreamMonitor | None:
        """The monitor of the stream's query embeddings (key :meth:`StreamKey.query_side`), from
        the first query event that carries one, or from :meth:`activate_query`."""
        return self._qvec

    def activate_query(self, baseline: Baseline) -> Alarm | None:
        """Make ``baseline`` (of :meth:`StreamKey.query_side`) the query embeddings' active
        baseline: a stored one, for a stream that starts again or through the API's promote and
        rollback. Returns the end of the ``mmd_query`` alarm this closes, if one was open."""
        if baseline.key != self.key.query_side():
            raise ValueError(f"baseline of {baseline.key} given as the query embeddings' of {self._name}")
        self.changes += 1
        if self._qvec is None:
            self._qvec = StreamMonitor(baseline.key, self.settings, baseline)
            return None
        end = self._qvec.activate(baseline)
        return None if end is None else self._as_query([end])[0]

    def promote_query(self, events: int | None = None) -> Baseline | None:
        """:meth:`promote` for the query embeddings alone (the stream's documents keep their
        baseline); ``LookupError`` while the stream has had none."""
        if self._qvec is None:
            raise LookupError(f"stream {self._name} has had no query embeddings on this replica yet")
        self.changes += 1
        return self._qvec.promote(events)

    def _evaluate_queries(self) -> None:
        v = self._qwin.view()
        m = self._measures
        top1, nres = v["top1"], v["n_results"]
        known = np.isfinite(nres)
        if known.any():
            no_match = (nres[known] == 0) | (np.nan_to_num(top1[known], nan=-np.inf) < self.settings.no_match_threshold)
            m["query_no_match_ratio"] = float(no_match.mean())
            m["query_result_count"] = float(nres[known].mean())
        else:  # no window query carries results: nothing to measure (the old value would stay)
            m["query_no_match_ratio"] = m["query_result_count"] = math.nan
        for col, key in (("precision", "query_precision_at_k"), ("recall", "query_recall_at_k")):
            vals = v[col][np.isfinite(v[col])]
            m[key] = float(vals.mean()) if vals.size else math.nan
        after = (v["index"] >= self._qref_start + self.settings.reference_size) & np.isfinite(top1)
        if self._qref_done is not None and self._qref_done.size and after.any():
            # The KS test (its p-value costs ~1 ms) is run when the measures are read.
            self._qks_pending = top1[after]
        else:
            self._qks_pending = None
            for k in _QUERY_KS:
                m[k] = math.nan

    def _derive_queries(self) -> None:
        pending, self._qks_pending = self._qks_pending, None
        if pending is not None and self._qref_done is not None:
            m = self._measures
            m["query_top1_ks_statistic"], m["query_top1_ks_p_value"] = ks_2samp(pending, self._qref_done)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> tuple[dict[str, Any], CheckpointArrays]:
        """The stream's state as JSON-able ``meta`` (NaN allowed) + numeric ``arrays`` (no pickle).

        Holds the counters, alarm state, Page-Hinkley state, the reference being collected, the
        window buckets (statistics, per-event scalars, reservoirs, RNG state), the query window
        and the query embeddings' monitor (``meta["qvec"]``, its arrays prefixed ``q/``). Not
        included (restart empty): the duplicate-id memory (ids are hashed with the process's
        salted ``hash``). Baselines are referenced by ``baseline_id`` and must come from the
        baseline store: the stream's under its key, the query embeddings' under
        :meth:`StreamKey.query_side` (``meta["qvec"]["baseline_id"]``).
        """
        s = self.settings
        ph = self._ph
        # The lazily derived measures go in as well: a restored monitor has no window snapshot to
        # derive them from until its next evaluation (an idle stream's gauges stayed NaN).
        self._derive()
        self._derive_queries()
        meta: dict[str, Any] = {
            "schema": CHECKPOINT_SCHEMA,
            "stream": self._name,
            "events": self.events,
            "query_events": self.query_events,
            "expected_dim": self.expected_dim,
            "drifting": self.drifting,
            "end_streak": self._end_streak,
            "drift_alarms": self._drift_alarms,
            "changepoints": self._changepoint_count,
            "duplicate_ids": self._dups.total,
            "newest_ts": self._newest_ts,
            "generation": self._generation,
            "last_eval": list(self._last_eval) if self._last_eval is not None else None,
            "baseline_id": self.baseline.baseline_id if self.baseline is not None else None,
            "ref_n": self._ref_n,
            "promotion": self._promotion,
            "qref_n": self._qref_n,
            "qref_done": self._qref_done is not None,
            "qref_start": self._qref_start,
            "qpromotion": self._qpromotion,
            "page_hinkley": [ph.n, ph.mean, ph.sum_increase, ph.sum_decrease, ph.min_increase,
                             ph.max_decrease, ph.statistic],
            "measures": self._measures,
            "alarms": [a.to_dict() for a in self._alarms],
            "changepoint_list": [a.to_dict() for a in self._changepoints],
            "window_config": _window_config(s),
            "scan": [self._open_n, self._scan_loud, self._alarm_detector],
        }
        arrays: CheckpointArrays = {}
        if (self.baseline is None or self._promotion) and self._ref_chunks:
            # As collected, not joined (see CheckpointArray); the encoder copies each chunk.
            arrays["ref_vectors"] = tuple(self._ref_chunks)
            arrays["ref_ts"] = tuple(self._ref_ts)
        qref = self._qref_done if self._qref_done is not None else (
            np.concatenate(self._qref) if self._qref else np.zeros(0))
        arrays["query_reference"] = np.asarray(qref, dtype=np.float64)
        qcols, meta["qwin"] = self._qwin.state()
        arrays.update({f"qwin_{name}": col for name, col in qcols.items()})
        if self._ms is not None:
            arrays["scan_sums"], arrays["scan_counts"] = self._pre.tail()
            arrays["scan_open_sum"] = self._open_sum
        w = self._window
        if w is not None:
            bs = list(w.buckets)
            meta["window"] = {"newest_ts": w.newest_ts, "rng": w.rng.bit_generator.state,
                              "closed": [b.closed for b in bs],
                              "versions": [b._version for b in bs]}
            if bs:
                arrays["b_count"] = np.array([b.count for b in bs], dtype=np.int64)
                arrays["b_ts"] = np.array([[b.min_ts, b.max_ts, b.start_ts] for b in bs], dtype=np.float64)
                arrays["b_sum"] = np.stack([b.sum for b in bs])
                arrays["b_sumsq"] = np.stack([b.sumsq for b in bs])
                arrays["b_sim_hist"] = np.stack([b.sim_hist for b in bs])
                arrays["b_norm_hist"] = np.stack([b.norm_hist for b in bs])
                arrays["b_sims"] = np.concatenate([b.sims for b in bs])
                arrays["b_norms"] = np.concatenate([b.norms for b in bs])
                arrays["b_res_n"] = np.array([b.res_n for b in bs], dtype=np.int64)
                arrays["b_res_index"] = np.stack([b.res_index for b in bs])
                # Sealed buckets that dropped their vectors keep their feature sum instead.
                arrays["b_held"] = np.array([b.held for b in bs], dtype=bool)
                if any(b.held for b in bs):
                    arrays["b_reservoir"] = np.stack([b.reservoir for b in bs if b.held])
                sums = [b._feat_sum for b in bs if not b.held and b._feat_sum is not None]
                if sums:
                    arrays["b_feat_sum"] = np.stack(sums)
        if self._qvec is not None:
            # Restarted empty before: after a restart the query embeddings' first reference_size
            # events became their baseline again, drifted or not, and an open mmd_query alarm ended.
            meta["qvec"], qarrays = self._qvec.checkpoint()
            arrays.update({_QVEC + k: v for k, v in qarrays.items()})
        return meta, arrays

    @classmethod
    def restore(
        cls,
        key: StreamKey,
        settings: DetectionSettings,
        meta: dict[str, Any],
        stored: Mapping[str, CheckpointArray],
        baseline: Baseline | None,
        query_baseline: Baseline | None = None,
    ) -> StreamMonitor:
        """Rebuild a monitor from :meth:`checkpoint` output; ``ValueError`` if it cannot be used.

        ``baseline`` must be the one named by ``meta["baseline_id"]`` (from the baseline store),
        ``query_baseline`` the one named by ``meta["qvec"]["baseline_id"]`` (the query embeddings',
        stored under :meth:`StreamKey.query_side`); a checkpoint without ``"qvec"`` (the stream had
        no query embeddings, or it was written before they were checkpointed) restores none.
        If the window settings changed since the checkpoint, the window starts afresh (everything
        else is kept). ``stored`` may give the reference's rows as chunks (:meth:`checkpoint`'s
        own output); a decoded checkpoint gives one array each.
        """
        arrays = {k: v for k, v in stored.items() if not isinstance(v, tuple)}
        ref = [[np.asarray(c) for c in v] if isinstance(v, tuple) else [v]
               for v in (stored.get("ref_vectors"), stored.get("ref_ts"))]
        if meta.get("schema") != CHECKPOINT_SCHEMA:
            raise ValueError(f"unsupported monitor checkpoint schema {meta.get('schema')!r}")
        bid = meta.get("baseline_id")
        if bid is not None and (baseline is None or baseline.baseline_id != bid):
            raise ValueError(f"checkpoint needs baseline {bid}, got "
                             f"{None if baseline is None else baseline.baseline_id}")
        m = cls(key, settings, baseline if bid is not None else None)
        m.events = int(meta["events"])
        m.query_events = int(meta["query_events"])
        m.expected_dim = None if meta["expected_dim"] is None else int(meta["expected_dim"])
        m._end_streak = int(meta["end_streak"])
        m._drift_alarms = int(meta["drift_alarms"])
        m._changepoint_count = int(meta["changepoints"])
        m._dups.total = int(meta["duplicate_ids"])
        m._newest_ts = float(meta["newest_ts"])
        m._generation = int(meta["generation"])
        m._last_eval = None if meta["last_eval"] is None else (int(meta["last_eval"][0]),
                                                               float(meta["last_eval"][1]))
        ph = m._ph
        (ph.n, ph.mean, ph.sum_increase, ph.sum_decrease, ph.min_increase, ph.max_decrease,
         ph.statistic) = (int(meta["page_hinkley"][0]), *map(float, meta["page_hinkley"][1:]))
        m._measures.update({k: float(v) if v is not None else math.nan
                            for k, v in meta["measures"].items() if k in m._measures})
        m._alarms.extend(_alarm_of(d) for d in meta["alarms"])
        m._changepoints.extend(_alarm_of(d) for d in meta["changepoint_list"])
        m._promotion = int(meta.get("promotion", 0)) if bid is not None else 0
        if (baseline is None or bid is None or m._promotion) and "ref_vectors" in stored:
            m._ref_chunks = [np.asarray(c, dtype=np.float32) for c in ref[0]]
            m._ref_ts = [np.asarray(c, dtype=np.float64) for c in ref[1]]
            m._ref_n = sum(int(c.shape[0]) for c in m._ref_chunks)
        qref = np.asarray(arrays["query_reference"], dtype=np.float64)
        m._qref_n = int(meta["qref_n"])
        m._qref_start = int(meta.get("qref_start", 0))  # absent: a checkpoint from before promotions moved it
        m._qpromotion = bool(meta.get("qpromotion", False))
        if meta["qref_done"]:
            m._qref_done = qref
        elif qref.size:
            m._qref = [qref]
        m._qwin.restore({k[5:]: v for k, v in arrays.items() if k.startswith("qwin_")}, meta["qwin"])
        if meta.get("qvec") is not None:
            qstored = {k[len(_QVEC):]: v for k, v in stored.items() if k.startswith(_QVEC)}
            m._qvec = StreamMonitor.restore(key.query_side(), settings, meta["qvec"], qstored, query_baseline)
        w = m._window
        wm = meta.get("window")
        if w is not None and wm is not None and meta.get("window_config") == _window_config(settings):
            m.drifting = bool(meta["drifting"])
            sc = meta.get("scan")
            if m._ms is not None and sc is not None and "scan_sums" in arrays:
                pre = np.asarray(arrays["scan_sums"], dtype=np.float64)
                if pre.ndim != 2 or pre.shape[1] != m._open_sum.shape[0] or pre.shape[0] < 1:
                    raise ValueError("checkpointed scan sums do not fit the baseline")
                m._pre = m._new_prefix_sums(pre, np.asarray(arrays["scan_counts"], dtype=np.int64))
                m._open_sum = np.asarray(arrays["scan_open_sum"], dtype=np.float64).copy()
                m._open_n, m._scan_loud, m._alarm_detector = int(sc[0]), bool(sc[1]), str(sc[2])
            w.newest_ts = float(wm["newest_ts"])
            w.rng.bit_generator.state = wm["rng"]
            if "b_count" in arrays:
                counts = arrays["b_count"]
                offsets = np.concatenate([[0], np.cumsum(counts)])
                # Checkpoints from before released buckets hold every bucket's vectors.
                held = arrays["b_held"].tolist() if "b_held" in arrays else [True] * counts.shape[0]
                kept = iter(arrays["b_reservoir"]) if "b_reservoir" in arrays else iter(())
                summed = iter(arrays["b_feat_sum"]) if "b_feat_sum" in arrays else iter(())
                n_features = m._mmd.n_features if m._mmd is not None else -1
                for i, c in enumerate(counts.tolist()):
                    b = w._new_bucket()
                    if c > b.capacity or arrays["b_sum"][i].shape != b.sum.shape:
                        raise ValueError("checkpointed window does not fit the current settings")
                    b.count = int(c)
                    b.min_ts, b.max_ts, b.start_ts = (float(v) for v in arrays["b_ts"][i])
                    b.sum[:] = arrays["b_sum"][i]
                    b.sumsq[:] = arrays["b_sumsq"][i]
                    b.sim_hist[:] = arrays["b_sim_hist"][i]
                    b.norm_hist[:] = arrays["b_norm_hist"][i]
                    b._sims[:c] = arrays["b_sims"][offsets[i]:offsets[i + 1]]
                    b._norms[:c] = arrays["b_norms"][offsets[i]:offsets[i + 1]]
                    b.res_n = int(arrays["b_res_n"][i])
                    b.res_index[:] = arrays["b_res_index"][i]
                    b.closed = bool(wm["closed"][i])
                    b._version = int(wm["versions"][i])
                    if held[i]:
                        rows = next(kept, None)
                        if rows is None or rows.shape != b.reservoir.shape:
                            raise ValueError("checkpointed window does not fit the current settings")
                        b.reservoir[:] = rows
                    else:
                        fs = np.asarray(next(summed, np.zeros(0)), dtype=np.float64)
                        if fs.shape != (n_features,):
                            raise ValueError("checkpointed feature sums do not fit the baseline")
                        b.keep_feature_sum(fs)
                        w.release(b)
        return m

    # ------------------------------------------------------------------ read-out
    def measures(self, now: float | None = None) -> dict[str, float]:
        """Every per-stream measure of metrics_catalog (NaN when not computable yet).

        ``baseline_age_seconds`` is measured against ``now`` (default: the newest event ts seen).
        """
        self._derive()
        self._derive_queries()
        m = dict(self._measures)
        b = self.baseline
        s = self.settings
        q = self._qvec
        if self.query_only:
            # Only query events so far: the query side's reference is the stream's baseline (the
            # query embeddings' baseline, or without them the top-1 score reference).
            b = q.baseline if q is not None else None
            ready = b is not None if q is not None else self._qref_done is not None
        else:
            ready = b is not None
        m["baseline_ready"] = 1.0 if ready else 0.0
        m["baseline_events"] = float(b.count) if b is not None else math.nan
        ref_now = now if now is not None else self._newest_ts
        m["baseline_age_seconds"] = (
            max(0.0, ref_now - b.created_at) if b is not None and math.isfinite(ref_now)
            and math.isfinite(b.created_at) else math.nan)
        m["dimension"] = float(self.expected_dim) if self.expected_dim is not None else math.nan
        m["window_events"] = float(self._window.count) if self._window is not None else 0.0
        m["drift_effect_floor"] = float(s.effect_size_floor)
        m["drift_detected"] = 1.0 if self.drifting else 0.0
        m["query_drift_detected"] = math.nan if q is None else 1.0 if q.drifting else 0.0
        m["query_drift_score"] = math.nan if q is None else q._measures["drift_score"]
        return m

    def counters(self) -> dict[str, int]:
        return {"drift_alarms": self._drift_alarms, "changepoints": self._changepoint_count,
                "duplicate_ids": self._dups.total}

    def alarms(self) -> list[Alarm]:
        """Recent drift alarm transitions (bounded), oldest first."""
        return list(self._alarms)

    def changepoints(self) -> list[Alarm]:
        """Recent change points (bounded), oldest first."""
        return list(self._changepoints)

    def state(self) -> dict[str, Any]:
        """JSON-able summary: identity, progress, baseline metadata, measures, counters, recent alarms."""
        b = self.baseline
        st: dict[str, Any] = {
            "stream": self._name,
            "model": self.key.model,
            "model_version": self.key.model_version,
            "segment": self.key.segment,
            "events": self.events,
            "query_events": self.query_events,
            "dimension": self.expected_dim,
            "drifting": self.drifting,
            "reference_size": self.settings.reference_size,
            "reference_collected": b is not None or self._ref_n >= self.settings.reference_size,
            "reference_events": self._ref_n if b is None else b.count,
            "promotion": self.promotion,
            "baseline": None if b is None else {
                k: (_json_float(v) if isinstance(v, float) else v) for k, v in b.metadata.items()},
            "last_evaluation": None if self._last_eval is None else {
                "index": self._last_eval[0], "ts": _json_float(self._last_eval[1])},
            "measures": {k: _json_float(v) for k, v in self.measures().items()},
            "counters": self.counters(),
            "alarms": [a.to_dict() for a in self._alarms],
            "changepoints": [a.to_dict() for a in self._changepoints],
        }
        if self._qvec is not None:
            q = self._qvec
            st["query_vectors"] = {"stream": str(q.key), "events": q.events, "drifting": q.drifting,
                                   "baseline_id": None if q.baseline is None else q.baseline.baseline_id,
                                   "promotion": q.promotion,
                                   "alarms": [a.to_dict() for a in self._as_query(q._alarms)]}
        return st


def trial(baseline: Baseline, settings: DetectionSettings) -> None:
    """Run a throw-away monitor of ``baseline`` over its own reference sample (up to one window
    of events, so every detector evaluates), raising what a stream activating it would raise at
    its first evaluations. For a baseline made elsewhere, checked before it is stored: a baseline
    that fails in a stream's update costs the stream its block, then fails again each time the
    stream loads it. Its scan fit (for ``settings``) is kept on ``baseline``, so the stream that
    activates it does not fit it again."""
    mon = StreamMonitor(baseline.key, settings, baseline)
    rows = np.asarray(baseline.sample[: settings.window_events], dtype=np.float32)
    mon.update_embeddings(rows, np.full(rows.shape[0], baseline.created_at))
