"""StreamMonitor: lifecycle, measures against batch computations, alarm policy, queries, state."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import numpy as np
import pytest
from scipy import stats as ss

from embedwatch.baseline import Baseline
from embedwatch.config import DetectionSettings
from embedwatch.events import StreamKey
from embedwatch.metrics_catalog import METRICS
from embedwatch.monitor import MEASURE_KEYS, Alarm, StreamMonitor
from embedwatch.state import Checkpoint, StreamCheckpoint, decode_checkpoint, encode_checkpoint
from embedwatch.stats import js_divergence, psi

KEY = StreamKey("m", "v1")
D = 16


def det(**kw: Any) -> DetectionSettings:
    base: dict[str, Any] = dict(reference_size=400, window_events=400, buckets=4, reservoir_per_bucket=100,
                                evaluate_every=50, min_window_events=50, baseline_sample=400,
                                rff_features=64, histogram_bins=16, max_evaluations_per_update=1000)
    base.update(kw)
    return DetectionSettings(**base)


MIX = np.random.default_rng(99).normal(size=(D, D)) / 4


def draw(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    x = rng.normal(size=(n, D)) @ MIX + 1.0
    x[:, :4] += shift
    return x.astype(np.float32)


def feed(m: StreamMonitor, x: np.ndarray, start: int, batch: int, ids: list[str | None] | None = None
         ) -> list[Alarm]:
    out: list[Alarm] = []
    for a in range(0, x.shape[0], batch):
        e = min(a + batch, x.shape[0])
        ts = np.arange(start + a, start + e, dtype=np.float64)
        out += m.update_embeddings(x[a:e], ts, np.full(e - a, np.nan), None if ids is None else ids[a:e])
    return out


def test_measure_keys_are_the_catalog_measures() -> None:
    m = StreamMonitor(KEY, det())
    assert set(m.measures()) == set(MEASURE_KEYS) == {x.measure for x in METRICS if x.measure}
    assert all(math.isnan(v) for k, v in m.measures().items()
               if k not in ("baseline_ready", "window_events", "drift_effect_floor", "drift_detected"))
    assert m.measures()["baseline_ready"] == 0.0 and m.measures()["drift_detected"] == 0.0
    assert set(m.counters()) == {"drift_alarms", "changepoints", "duplicate_ids"}


def test_reference_then_window_after_it() -> None:
    rng = np.random.default_rng(0)
    x = draw(rng, 1000, shift=5.0)  # wildly different from anything: still no alarm in the reference
    m = StreamMonitor(KEY, det())
    assert feed(m, x[:400], 0, 37) == []
    assert m.baseline is not None and m.baseline.count == 400 and m.baseline.source == "first_events"
    assert m.measures()["window_events"] == 0.0
    one = StreamMonitor(KEY, det())
    one.update_embeddings(x[:400], np.arange(400.0), np.zeros(400), [None] * 400)
    assert one.baseline is not None and one.baseline.content_hash == m.baseline.content_hash
    feed(m, x[400:520], 400, 1000)
    assert m.events == 520 and m.measures()["window_events"] == 120.0
    np.testing.assert_allclose(m.baseline.mean, x[:400].astype(np.float64).mean(0), rtol=1e-12)
    assert m.measures()["baseline_ready"] == 1.0 and m.measures()["dimension"] == D
    assert m.measures()["baseline_events"] == 400.0


def test_measures_match_batch_computations() -> None:
    rng = np.random.default_rng(1)
    ref = draw(rng, 400)
    win = draw(rng, 400, shift=0.15)
    m = StreamMonitor(KEY, det())
    feed(m, ref, 0, 400)
    feed(m, win, 400, 100)  # 400 % evaluate_every == 0: the last evaluation saw exactly `win`
    me = m.measures()
    r64, w64 = ref.astype(np.float64), win.astype(np.float64)
    bc, wc = r64.mean(0), w64.mean(0)
    cos = bc @ wc / np.linalg.norm(bc) / np.linalg.norm(wc)
    assert me["window_events"] == 400
    assert me["centroid_cosine_distance"] == pytest.approx(1 - cos, rel=1e-6)
    assert me["centroid_euclidean_distance"] == pytest.approx(np.linalg.norm(wc - bc), rel=1e-6)
    unit = bc / np.linalg.norm(bc)
    s_ref = r64 @ unit / np.linalg.norm(r64, axis=1)
    s_win = w64 @ unit / np.linalg.norm(w64, axis=1)
    ks = ss.ks_2samp(s_win, s_ref, method="asymp")
    assert me["similarity_ks_statistic"] == pytest.approx(ks.statistic, rel=1e-6)
    assert me["similarity_ks_p_value"] == pytest.approx(ks.pvalue, rel=1e-6)
    assert me["similarity_wasserstein"] == pytest.approx(ss.wasserstein_distance(s_win, s_ref), rel=1e-6)
    edges = np.quantile(s_ref, np.arange(1, 16) / 16)
    hr = np.bincount(np.searchsorted(edges, s_ref, side="right"), minlength=16)
    hw = np.bincount(np.searchsorted(edges, s_win, side="right"), minlength=16)
    assert me["similarity_psi"] == pytest.approx(psi(hw, hr), rel=1e-6)
    assert me["similarity_js_divergence"] == pytest.approx(js_divergence(hw, hr), rel=1e-6)
    n_ref, n_win = np.linalg.norm(r64, axis=1), np.linalg.norm(w64, axis=1)
    assert me["norm_ks_statistic"] == pytest.approx(ss.ks_2samp(n_win, n_ref).statistic, rel=1e-6)
    assert me["norm_mean_relative_change"] == pytest.approx((n_win.mean() - n_ref.mean()) / n_ref.mean(), rel=1e-6)
    p = ss.ttest_ind(w64, r64, equal_var=False).pvalue
    assert me["dimensions_drifted_ratio"] == float(np.mean(ss.false_discovery_control(p) <= 0.01))
    assert me["dimensions_drifted_ratio"] > 0  # four dimensions moved by 0.15
    # MMD: window reservoir holds every window event here (reservoir_per_bucket = bucket size).
    b = m.baseline
    assert b is not None
    mmd = b.mmd()
    r = mmd.test(mmd.feature_sum(win) / 400, 400, 0.5e-6)  # half the budget: the scan has the other half
    assert me["drift_score"] == pytest.approx(r.score, rel=1e-5)
    assert me["drift_p_value"] == pytest.approx(r.p_value, rel=1e-5)
    assert me["drift_threshold"] == pytest.approx(r.threshold, rel=1e-9)


def test_no_alarm_in_distribution() -> None:
    rng = np.random.default_rng(2)
    m = StreamMonitor(KEY, det())
    alarms = feed(m, draw(rng, 30_000), 0, 700)
    assert alarms == [] and not m.drifting
    assert m.counters()["drift_alarms"] == 0
    me = m.measures()
    assert me["drift_p_value"] > 1e-6 and me["drift_score"] < me["drift_threshold"]


def test_shift_raises_one_alarm_then_ends_with_hysteresis() -> None:
    rng = np.random.default_rng(3)
    s = det(scan_windows=[])  # the MMD test alone
    m = StreamMonitor(KEY, s)
    x = np.concatenate([draw(rng, 1400), draw(rng, 1000, shift=0.6), draw(rng, 2000)])
    alarms = feed(m, x, 0, 100)
    starts = [a for a in alarms if a.kind == "start"]
    ends = [a for a in alarms if a.kind == "end"]
    assert len(starts) == 1 and len(ends) == 1
    a = starts[0]
    assert 1400 <= a.index < 1400 + 300  # caught within a few hundred events
    assert (a.index + 1) % s.evaluate_every == 0 and a.ts == float(a.index)
    assert a.detector == "mmd" and a.p_value is not None and a.p_value <= s.false_alarm_rate
    assert a.score >= s.effect_size_floor
    assert ends[0].index > 2400 and not m.drifting
    assert m.counters()["drift_alarms"] == 1
    assert [x.to_dict() for x in m.alarms()] == [x.to_dict() for x in alarms]
    assert m.changepoints() == []  # a moderate shift is not a change point at these settings


def test_abrupt_change_of_similarity_is_a_change_point() -> None:
    rng = np.random.default_rng(31)
    m = StreamMonitor(KEY, det())
    x = np.concatenate([draw(rng, 3000), -draw(rng, 300)])  # similarity to the centroid flips
    feed(m, x, 0, 256)
    cps = m.changepoints()
    assert [c.index for c in cps if c.index < 3000] == []
    assert cps and 3000 <= cps[0].index < 3050
    assert cps[0].detector == "changepoint" and m.counters()["changepoints"] == len(cps)
    assert m.measures()["changepoint_score"] >= 0


def test_effect_floor_blocks_tiny_but_significant_shifts() -> None:
    rng = np.random.default_rng(4)
    x = np.concatenate([draw(rng, 400), draw(rng, 3000, shift=0.6)])
    loud = StreamMonitor(KEY, det())
    quiet = StreamMonitor(KEY, det(effect_size_floor=10.0, scan_effect_floor=1e9))
    assert [a.kind for a in feed(loud, x, 0, 500)] == ["start"]
    assert feed(quiet, x, 0, 500) == []
    assert quiet.measures()["drift_p_value"] < 1e-6 and quiet.measures()["drift_detected"] == 0.0


def test_evaluation_cap_per_update_keeps_last_due_point() -> None:
    rng = np.random.default_rng(5)
    x = np.concatenate([draw(rng, 400), draw(rng, 2000, shift=1.0)])
    m = StreamMonitor(KEY, det(max_evaluations_per_update=1, scan_windows=[]))
    m.update_embeddings(x[:400], np.arange(400.0))
    alarms = m.update_embeddings(x[400:2399], np.arange(400.0, 2399.0))
    # Due points are 449, 499, ..., 2349; with a cap of 1 only the last one is evaluated.
    assert [(a.kind, a.index) for a in alarms] == [("start", 2349)]


def test_duplicate_ids_are_counted() -> None:
    rng = np.random.default_rng(6)
    ids: list[str | None] = [f"doc-{i % 150}" for i in range(600)]
    ids[5] = None
    m = StreamMonitor(KEY, det())
    feed(m, draw(rng, 600), 0, 64, ids)
    assert m.counters()["duplicate_ids"] == 450 - 1  # every id after the first 150, minus one None


def test_dimension_mismatch_is_an_error() -> None:
    m = StreamMonitor(KEY, det())
    m.update_embeddings(np.ones((3, 4), np.float32), np.zeros(3))
    assert m.expected_dim == 4
    with pytest.raises(ValueError, match="dimension"):
        m.update_embeddings(np.ones((3, 5), np.float32), np.zeros(3))


def test_promote_while_collecting_builds_from_the_events_so_far() -> None:
    """A low-traffic stream can be promoted before it has ``reference_size`` events (the
    BaselineMissing runbook's remedy): from what it collected, once that is 50 events or more."""
    rng = np.random.default_rng(8)
    m = StreamMonitor(KEY, det())
    first = draw(rng, 49)
    feed(m, first, 0, 20)
    with pytest.raises(ValueError, match="has 49 events so far; a baseline needs at least 50"):
        m.promote()
    assert m.baseline is None
    more = draw(rng, 71)
    feed(m, more, 49, 20)
    b = m.promote()
    assert m.baseline is b and b.source == "partial_reference" and b.count == 120
    np.testing.assert_allclose(b.mean, np.concatenate([first, more]).astype(np.float64).mean(0), rtol=1e-9)
    # Monitoring starts with the next event; nothing more is collected.
    feed(m, draw(rng, 60), 120, 20)
    assert m.baseline is b and m.measures()["window_events"] == 60.0


def test_promotion_baseline_is_the_next_events_and_stored_copy_behaves_the_same() -> None:
    rng = np.random.default_rng(7)
    m = StreamMonitor(KEY, det())
    feed(m, draw(rng, 400), 0, 400)
    alarms = feed(m, draw(rng, 100, shift=1.0), 400, 100)
    assert m.drifting and alarms[0].kind == "start"
    with pytest.raises(ValueError, match=r"needs 50\.\.1000000 events, got 49"):
        m.promote(events=49)
    assert m.promote(events=300) is None and m.promotion == {"events": 0, "needed": 300}
    old = m.baseline
    new_normal = draw(rng, 300, shift=1.0)
    feed(m, new_normal[:130], 500, 70)  # collected, and still monitored against the old baseline
    assert m.baseline is old and m.drifting and m.promotion == {"events": 130, "needed": 300}
    assert m.state()["promotion"] == {"events": 130, "needed": 300}
    alarms = feed(m, np.concatenate([new_normal[130:], draw(rng, 40, shift=1.0)]), 630, 100)
    b = m.baseline
    assert b is not old and b is not None and b.source == "promoted" and b.count == 300
    assert m.promotion is None and not m.drifting and alarms[-1].kind == "end"
    np.testing.assert_allclose(b.mean, new_normal.astype(np.float64).mean(0), rtol=1e-9)
    assert m.measures()["window_events"] == 40.0  # the events after the 300 fill the new window
    assert feed(m, draw(rng, 3000, shift=1.0), 970, 500) == []  # the new normal is quiet
    # A monitor started from a stored copy behaves the same.
    stored = Baseline.from_arrays(b.metadata, b.to_arrays())
    m2 = StreamMonitor(KEY, det(), baseline=stored)
    assert m2.expected_dim == D and m2.baseline is stored
    assert feed(m2, draw(rng, 600), 0, 300)[0].kind == "start"  # old normal is now a drift


def test_promotion_in_progress_survives_a_checkpoint_and_another_activation_cancels_it() -> None:
    rng = np.random.default_rng(9)
    m = StreamMonitor(KEY, det())
    feed(m, draw(rng, 500), 0, 100)
    m.promote(events=200)
    part = draw(rng, 120, shift=0.5)
    feed(m, part, 500, 60)
    meta, arrays = m.checkpoint()
    r = StreamMonitor.restore(KEY, det(), meta, arrays, m.baseline)
    assert r.promotion == {"events": 120, "needed": 200}
    rest = draw(rng, 80, shift=0.5)
    feed(r, rest, 620, 80)
    assert r.baseline is not None and r.baseline.source == "promoted" and r.baseline.count == 200
    np.testing.assert_allclose(r.baseline.mean, np.concatenate([part, rest]).astype(np.float64).mean(0),
                               rtol=1e-9)
    assert m.baseline is not None
    m.activate(m.baseline)  # e.g. a rollback or a promotion of a stored version
    assert m.promotion is None


def test_queries() -> None:
    rng = np.random.default_rng(8)
    s = det(no_match_threshold=0.3)
    m = StreamMonitor(KEY, s)
    n = 1000
    top1 = rng.uniform(0.2, 0.9, size=n)
    top1[600:] = rng.uniform(0.0, 0.6, size=400)  # retrieval quality drops after the reference
    nres = rng.integers(0, 11, size=n).astype(np.float64)
    top1[nres == 0] = np.nan
    prec = np.where(rng.random(n) < 0.3, rng.uniform(0, 1, n), np.nan)
    rec = np.where(np.isfinite(prec), rng.uniform(0, 1, n), np.nan)
    ts = np.arange(n, dtype=np.float64)
    for a in range(0, n, 128):
        assert m.update_queries(top1[a:a + 128], nres[a:a + 128], prec[a:a + 128], rec[a:a + 128],
                                np.full(len(ts[a:a + 128]), 0.01), ts[a:a + 128]) == []
    me = m.measures()
    w = slice(n - 400, n)  # window_events = 400
    assert me["query_result_count"] == pytest.approx(nres[w].mean())
    no_match = (nres[w] == 0) | (np.nan_to_num(top1[w], nan=-1) < 0.3)
    assert me["query_no_match_ratio"] == pytest.approx(no_match.mean())
    assert me["query_precision_at_k"] == pytest.approx(np.nanmean(prec[w]))
    assert me["query_recall_at_k"] == pytest.approx(np.nanmean(rec[w]))
    ref = top1[:400][np.isfinite(top1[:400])]
    win = top1[w][np.isfinite(top1[w])]
    ks = ss.ks_2samp(win, ref, method="asymp")
    assert me["query_top1_ks_statistic"] == pytest.approx(ks.statistic, rel=1e-9)
    assert me["query_top1_ks_p_value"] == pytest.approx(ks.pvalue, rel=1e-6)
    assert ks.pvalue < 1e-6
    assert m.query_events == n and m.events == 0


def test_query_vectors_are_monitored_apart_from_documents() -> None:
    rng = np.random.default_rng(9)
    m = StreamMonitor(KEY, det())
    feed(m, draw(rng, 600), 0, 600)
    nan = np.full(800, np.nan)
    qv = np.concatenate([draw(rng, 400), draw(rng, 400, shift=2.0)])
    alarms = m.update_queries(nan, nan, nan, nan, nan, np.arange(800.0), qv)
    assert alarms and alarms[0].detector == "mmd_query"
    assert m.events == 600 and not m.drifting  # documents unaffected
    assert m.state()["query_vectors"]["drifting"] is True


def test_state_is_strict_json() -> None:
    rng = np.random.default_rng(10)
    m = StreamMonitor(KEY, det())
    assert json.loads(json.dumps(m.state(), allow_nan=False))["baseline"] is None
    feed(m, np.concatenate([draw(rng, 400), draw(rng, 500, shift=1.0)]), 0, 100)
    st = json.loads(json.dumps(m.state(), allow_nan=False))
    assert st["stream"] == "m/v1/default" and st["events"] == 900 and st["drifting"] is True
    assert st["baseline"]["baseline_id"] == m.baseline.baseline_id if m.baseline else False
    assert st["alarms"][0]["kind"] == "start" and st["measures"]["drift_detected"] == 1.0
    assert set(st["measures"]) == set(MEASURE_KEYS)
    assert st["measures"]["query_no_match_ratio"] is None


def test_baseline_age_uses_newest_event_or_now() -> None:
    rng = np.random.default_rng(11)
    m = StreamMonitor(KEY, det())
    feed(m, draw(rng, 500), 1000, 500)
    assert m.measures()["baseline_age_seconds"] == pytest.approx(100.0)
    assert m.measures(now=2000.0)["baseline_age_seconds"] == pytest.approx(2000.0 - 1399.0)


def _round_trip(m: StreamMonitor, s: DetectionSettings) -> StreamMonitor:
    """Through a checkpoint record, as the service stores it: the meta as JSON (the encoder
    refuses what JSON cannot hold), each array as its raw bytes (objects refused)."""
    meta, arrays = m.checkpoint()
    record = encode_checkpoint(Checkpoint("t", 0, 0, {}, [StreamCheckpoint(KEY, meta, arrays)]))
    (sc,) = decode_checkpoint(bytes(record)).streams
    return StreamMonitor.restore(KEY, s, sc.meta, sc.arrays, m.baseline)


@pytest.mark.parametrize("split", [150, 400, 1234, 2600])
def test_checkpoint_restore_continues_identically(split: int) -> None:
    """A restored monitor makes the same decisions as one that never stopped."""
    rng = np.random.default_rng(12)
    s = det()
    x = np.concatenate([draw(rng, 1400), draw(rng, 800, shift=0.6), draw(rng, 1200)])
    ids: list[str | None] = [f"d{i % 500}" for i in range(x.shape[0])]
    top1 = rng.uniform(0, 1, size=x.shape[0])
    ref = StreamMonitor(KEY, s)
    want = feed(ref, x, 0, 100, ids)
    a = StreamMonitor(KEY, s)
    got = feed(a, x[:split], 0, 100, ids[:split])
    nan = np.full(split, np.nan)
    a.update_queries(top1[:split], nan + 3, nan, nan, nan, np.arange(float(split)))
    b = _round_trip(a, s)
    assert b.events == split and b.counters() == a.counters()
    got += [al for al in feed_from(b, x, split, ids)]
    assert [(al.kind, al.index) for al in got] == [(al.kind, al.index) for al in want]
    assert b.measures()["drift_score"] == pytest.approx(ref.measures()["drift_score"], rel=1e-9)
    assert b.measures()["window_events"] == ref.measures()["window_events"]
    assert b.query_events == split


@pytest.mark.parametrize("split", [250, 700, 1100])
def test_query_embeddings_continue_identically_after_a_checkpoint(split: int) -> None:
    """The query embeddings' monitor is in the stream's checkpoint, its baseline named under the
    query-side key: restarted empty before, their next events became their baseline again (the
    drifted ones, after a restart during a drift) and an open mmd_query alarm was lost. Splits:
    while their reference is collected, in the window before the shift, during the alarm."""
    rng = np.random.default_rng(31)
    s = det()
    docs = draw(rng, 500)
    qv = np.concatenate([draw(rng, 800), draw(rng, 600, shift=2.0)])
    top1 = rng.uniform(0.5, 0.9, qv.shape[0])
    ref = StreamMonitor(KEY, s)
    feed(ref, docs, 0, 100)
    want = _queries(ref, top1, 0.0, qv)
    assert [(a.kind, a.detector, a.stream) for a in want][:1] == [("start", "mmd_query", str(KEY))]
    a = StreamMonitor(KEY, s)
    feed(a, docs, 0, 100)
    got = _queries(a, top1[:split], 0.0, qv[:split])
    q = a.query_monitor
    assert q is not None and q.key == KEY.query_side() == StreamKey("m", "v1", "default/query")
    meta, arrays = a.checkpoint()
    assert meta["qvec"]["baseline_id"] == (None if q.baseline is None else q.baseline.baseline_id)
    record = encode_checkpoint(Checkpoint("t", 0, 0, {}, [StreamCheckpoint(KEY, meta, arrays)]))
    (sc,) = decode_checkpoint(bytes(record)).streams
    b = StreamMonitor.restore(KEY, s, sc.meta, sc.arrays, a.baseline, q.baseline)
    bq = b.query_monitor
    assert bq is not None and bq.events == q.events == split and bq.drifting == q.drifting
    got += _queries(b, top1[split:], float(split), qv[split:])
    assert [(x.kind, x.index, x.detector, x.stream) for x in got] == \
        [(x.kind, x.index, x.detector, x.stream) for x in want]
    assert b.measures()["query_drift_score"] == pytest.approx(ref.measures()["query_drift_score"], rel=1e-9)
    assert b.state()["query_vectors"]["baseline_id"] == ref.state()["query_vectors"]["baseline_id"]
    if q.baseline is not None:  # named by the checkpoint: restoring without it is refused
        with pytest.raises(ValueError, match="checkpoint needs baseline"):
            StreamMonitor.restore(KEY, s, sc.meta, sc.arrays, a.baseline, None)


def test_a_stored_query_baseline_is_activated_apart_from_the_streams() -> None:
    rng = np.random.default_rng(32)
    s = det()
    old = StreamMonitor(KEY, s)
    _queries(old, rng.uniform(0.5, 0.9, 500), 0.0, draw(rng, 500))
    qb = old.query_monitor.baseline  # type: ignore[union-attr]
    assert qb is not None and qb.key == KEY.query_side()
    m = StreamMonitor(KEY, s)
    with pytest.raises(ValueError, match="query embeddings"):
        m.activate_query(m.baseline or Baseline.from_vectors(KEY, draw(rng, 50), 0.0, "test", s))
    assert m.activate_query(qb) is None and m.baseline is None
    assert m.query_monitor is not None and m.query_monitor.baseline is qb
    # A drifted stream's alarm ends when another query baseline is activated, named as the stream's.
    start = _queries(m, rng.uniform(0.5, 0.9, 400), 0.0, draw(rng, 400, shift=2.0))
    assert [(a.kind, a.detector) for a in start] == [("start", "mmd_query")]
    end = m.activate_query(qb)
    assert end is not None and (end.kind, end.detector, end.stream) == ("end", "mmd_query", str(KEY))
    # Promoted alone: the stream counts it as a change (its checkpoint holds the query monitor).
    with pytest.raises(LookupError, match="no query embeddings"):
        StreamMonitor(KEY, s).promote_query()
    before = m.changes
    assert m.promote_query(100) is None and m.changes == before + 1
    assert m.query_monitor.promotion == {"events": 0, "needed": 100} and m.promotion is None


def test_a_restored_monitor_reports_the_measures_of_its_last_evaluation() -> None:
    """The measures derived lazily from the last evaluated window survive a checkpoint: a restored
    monitor has no window snapshot to derive them from until its next evaluation, and an idle
    stream's gauges would stay NaN (or keep a window older than the last evaluation's)."""
    rng = np.random.default_rng(3)
    s = det()
    x = np.concatenate([draw(rng, 1000), draw(rng, 600, shift=0.4)])
    never_read = StreamMonitor(KEY, s)
    feed(never_read, x, 0, 100)
    read_before = StreamMonitor(KEY, s)
    feed(read_before, x[:1400], 0, 100)
    read_before.measures()  # a scrape, then one more evaluated batch
    feed(read_before, x[1400:], 1400, 100)
    for live in (never_read, read_before):
        restored = _round_trip(live, s)  # before the live one's measures are read (that derives them)
        want, got = live.measures(), restored.measures()
        assert math.isfinite(want["centroid_cosine_distance"]) and math.isfinite(want["drift_p_value"])
        assert got == pytest.approx(want, rel=1e-12, nan_ok=True)


def test_a_reference_restored_under_a_smaller_reference_size_is_built_from_what_was_collected() -> None:
    """A checkpoint taken while 300 reference events were collected, restored with reference_size
    200: the baseline is built from the 300 at the next batch, and every event of that batch is
    monitored with its own stream index (a negative take once collected rows of the wrong part)."""
    rng = np.random.default_rng(0)
    x = draw(rng, 600)
    m = StreamMonitor(KEY, det(reference_size=400))
    m.update_embeddings(x[:300], np.arange(300.0))
    nan = np.full(300, np.nan)
    m.update_queries(np.linspace(0, 1, 300), nan + 3, nan, nan, None, np.arange(300.0))
    meta, arrays = m.checkpoint()
    r = StreamMonitor.restore(KEY, det(reference_size=200), meta, arrays, None)
    r.update_embeddings(x[300:550], np.arange(300.0, 550.0))
    assert r.baseline is not None and r.baseline.count == 300
    np.testing.assert_allclose(r.baseline.mean, x[:300].astype(np.float64).mean(axis=0), rtol=1e-6)
    assert r._window is not None and r._window.count == 250 and r.events == 550
    firsts = [int(b.res_index[: b.res_n].min()) for b in r._window.buckets]
    assert min(firsts) == 300
    r.update_queries(np.full(10, 0.5), np.full(10, 3.0), np.full(10, np.nan), np.full(10, np.nan), None,
                     np.arange(300.0, 310.0))
    assert r._qref_n == 300 and r._qref_done is not None and r._qref_done.shape == (300,)


def test_sealed_buckets_drop_their_vectors_and_a_checkpoint_keeps_their_feature_sums() -> None:
    rng = np.random.default_rng(13)
    s = det()
    m = StreamMonitor(KEY, s)
    feed(m, np.concatenate([draw(rng, 1000), draw(rng, 330, shift=0.3)]), 0, 70)
    w = m._window
    assert w is not None and len(w.buckets) == 4
    # Only the open bucket, and those sealed since the last evaluation, hold vectors.
    assert 1 <= w.held_buckets <= 2 and w.buckets[-1].held
    assert all(b.reservoir.size == 0 for b in w.buckets if not b.held)
    r = _round_trip(m, s)
    assert r._window is not None and [b.held for b in r._window.buckets] == [b.held for b in w.buckets]
    t1, t2 = w.totals(), r._window.totals()
    assert t1.feature_sum is not None and t2.feature_sum is not None
    assert (t1.count, t1.sample_n) == (t2.count, t2.sample_n)
    np.testing.assert_allclose(t2.feature_sum, t1.feature_sum, rtol=1e-12)
    assert r.measures()["drift_score"] == pytest.approx(m.measures()["drift_score"], rel=1e-12)


def feed_from(m: StreamMonitor, x: np.ndarray, start: int, ids: list[str | None]) -> list[Alarm]:
    out: list[Alarm] = []
    # Same batch boundaries as `feed(..., 100)` from 0.
    edges = [start, *range((start // 100 + 1) * 100, x.shape[0], 100), x.shape[0]]
    for a, e in itertools.pairwise(edges):
        if e > a:
            out += m.update_embeddings(x[a:e], np.arange(a, e, dtype=np.float64), None, ids[a:e])
    return out


def test_restore_refuses_a_wrong_baseline() -> None:
    rng = np.random.default_rng(13)
    s = det()
    m = StreamMonitor(KEY, s)
    feed(m, draw(rng, 500), 0, 250)
    meta, arrays = m.checkpoint()
    with pytest.raises(ValueError, match="baseline"):
        StreamMonitor.restore(KEY, s, meta, arrays, None)
    with pytest.raises(ValueError, match="schema"):
        StreamMonitor.restore(KEY, s, {**meta, "schema": 99}, arrays, m.baseline)
    # Changed window settings: the window restarts, the rest is kept.
    s2 = det(window_events=800)
    r = StreamMonitor.restore(KEY, s2, meta, arrays, m.baseline)
    assert r.events == 500 and r.measures()["window_events"] == 0.0


# The step's scan ratio is stat / (the smallest double): +inf, what a degenerate null gives.
@pytest.mark.filterwarnings("ignore:overflow encountered in divide:RuntimeWarning")
def test_a_constant_stream_is_no_drift_and_a_step_away_from_it_is() -> None:
    """A reference of one repeated vector gives null laws of all-zero weights: the same vector
    afterwards scores 0 and must not reject (it did at effect floors of 0, as p = 0), another one
    must."""
    s = det(effect_size_floor=0.0, scan_effect_floor=0.0)
    v = draw(np.random.default_rng(4), 1)
    m = StreamMonitor(KEY, s)
    assert feed(m, np.repeat(v, 1200, axis=0), 0, 100) == []
    me = m.measures()
    assert me["drift_p_value"] == 1.0 and me["mean_shift_threshold_ratio"] == 0.0
    moved = v.copy()
    moved[0, 0] += 1.0
    alarms = feed(m, np.repeat(moved, 200, axis=0), 1200, 100)
    assert alarms and alarms[0].kind == "start" and alarms[0].index < 1300


def test_one_absurd_vector_in_the_window_is_a_rejection_not_an_exception() -> None:
    """Finite values of 1e9 in one event make the scan's statistic too large for the tail's
    root-finding bracket: the monitor raised (and so did the service loop) at every later batch."""
    rng = np.random.default_rng(8)
    m = StreamMonitor(KEY, det())
    feed(m, draw(rng, 600), 0, 100)
    huge = np.full((1, D), 1e9, dtype=np.float32)
    alarms = m.update_embeddings(huge, np.array([600.0]))
    for k in range(5):
        alarms += feed(m, draw(rng, 100), 601 + 100 * k, 100)
    assert [a.kind for a in alarms][:1] == ["start"]
    me = m.measures()
    assert me["window_events"] > 300 and math.isfinite(me["drift_score"])


# --- low-rate streams, silence, time bounds ----------------------------------------------------


def feed_at(m: StreamMonitor, x: np.ndarray, t0: float, dt: float, batch: int) -> tuple[list[Alarm], float]:
    """Feed ``x`` with one event every ``dt`` seconds from ``t0``; returns the alarms and the next ts."""
    out: list[Alarm] = []
    for a in range(0, x.shape[0], batch):
        e = min(a + batch, x.shape[0])
        out += m.update_embeddings(x[a:e], t0 + dt * np.arange(a, e, dtype=np.float64))
    return out, t0 + dt * x.shape[0]


def test_a_scan_alarm_of_a_low_rate_stream_ends_and_window_measures_go_nan() -> None:
    """Fewer than min_window_events per window_seconds: the MMD test never runs, the scan starts an
    alarm, and the alarm ends on the scan's evidence once the stream is back to normal."""
    rng = np.random.default_rng(21)
    s = det(window_seconds=1000.0)  # one event a minute: ~17 events in the window, min is 50
    m = StreamMonitor(KEY, s)
    _, t = feed_at(m, draw(rng, 400), 0.0, 1.0, 100)  # reference
    _, t = feed_at(m, draw(rng, 400), t, 1.0, 50)  # normal, at a rate the MMD test sees
    assert math.isfinite(m.measures()["drift_score"])
    _, t = feed_at(m, draw(rng, 100), t, 60.0, 10)  # the rate drops: the window holds ~17 events
    me = m.measures()
    assert me["window_events"] < s.min_window_events
    for k in ("drift_score", "drift_threshold", "drift_p_value", "centroid_cosine_distance",
              "similarity_ks_statistic", "dimensions_drifted_ratio"):
        assert math.isnan(me[k]), k
    start, t = feed_at(m, draw(rng, 200, shift=1.5), t, 60.0, 10)
    assert [(a.kind, a.detector) for a in start] == [("start", "mean_shift")] and m.drifting
    after, t = feed_at(m, draw(rng, 3000), t, 60.0, 10)
    ends = [a for a in after if a.kind == "end"]
    assert len(ends) == 1 and ends[0].detector == "mean_shift" and not m.drifting
    assert math.isnan(ends[0].score) and ends[0].p_value is None
    assert m.alarms()[-1] == ends[0] and m.measures()["drift_detected"] == 0.0
    # The scan's longest window (1000 events) holds no shifted event ~1000 events after the change
    # ends, plus alarm_end_evaluations evaluations.
    assert ends[0].index <= 400 + 400 + 100 + 200 + 1000 + s.alarm_end_evaluations * s.evaluate_every


def test_expire_empties_a_silent_streams_window_and_ends_its_alarm() -> None:
    rng = np.random.default_rng(22)
    s = det(window_seconds=3600.0)
    m = StreamMonitor(KEY, s)
    _, t = feed_at(m, draw(rng, 800), 0.0, 1.0, 100)
    start, t = feed_at(m, draw(rng, 300, shift=1.5), t, 1.0, 100)
    assert start and m.drifting and math.isfinite(m.measures()["drift_score"])
    last = t - 1.0
    changes = m.changes
    # New events since the previous call (the first one here): a backlog being caught up, not a
    # silent stream; nothing is expired, however old they are.
    assert m.expire(last + 72 * 3600.0) == [] and m.drifting
    assert m.expire(last + 600.0) == [] and m.drifting  # within the time bound: nothing changes
    assert m.changes == changes and m.measures()["window_events"] == 400.0
    ends = m.expire(last + 72 * 3600.0)
    assert len(ends) == 1 and ends[0].kind == "end" and ends[0].detector == start[0].detector
    assert ends[0].index == 1099 and ends[0].ts == last + 72 * 3600.0
    assert m.alarms()[-1] == ends[0] and not m.drifting and m.changes > changes
    me = m.measures()
    assert me["drift_detected"] == 0.0 and me["window_events"] == 0.0
    for k in ("drift_score", "drift_threshold", "centroid_cosine_distance", "similarity_ks_statistic",
              "mean_shift_score", "mean_shift_threshold_ratio"):
        assert math.isnan(me[k]), k
    assert m.expire(last + 73 * 3600.0) == []  # once only
    # A checkpoint of the expired monitor restores as expired.
    r = _round_trip(m, s)
    assert not r.drifting and math.isnan(r.measures()["drift_score"])


def test_expire_ends_the_query_embedding_alarm_as_mmd_query() -> None:
    rng = np.random.default_rng(23)
    m = StreamMonitor(KEY, det(window_seconds=3600.0))
    nan = np.full(800, np.nan)
    qv = np.concatenate([draw(rng, 400), draw(rng, 400, shift=2.0)])
    assert m.update_queries(nan, nan, nan, nan, nan, np.arange(800.0), qv)[0].kind == "start"
    assert m.expire(800.0 + 3600.0) == []  # the first call after new events only notes them
    ends = m.expire(800.0 + 2 * 3600.0)
    assert [(a.kind, a.detector) for a in ends] == [("end", "mmd_query")]
    assert m.measures()["query_drift_detected"] == 0.0


def test_a_stream_back_after_a_long_silence_is_scanned_on_its_new_events_only() -> None:
    """The scan's running sums are count-based: after a silence longer than the window they held
    only old (drifted) events, which kept the alarm going for ~1,100 normal events."""
    rng = np.random.default_rng(24)
    s = det(window_seconds=3600.0)
    m = StreamMonitor(KEY, s)
    _, t = feed_at(m, draw(rng, 800), 0.0, 1.0, 100)
    start, t = feed_at(m, draw(rng, 1000, shift=1.5), t, 1.0, 100)
    assert start and m.drifting
    after, _ = feed_at(m, draw(rng, 1200), t + 3 * 86400.0, 1.0, 50)
    ends = [a for a in after if a.kind == "end"]
    assert ends and not m.drifting
    # Ends within the first evaluations of the new events (it took ~1,100 events before).
    assert ends[0].index - 1800 < s.min_window_events + s.alarm_end_evaluations * s.evaluate_every


# --- query side: export, query-only streams, promotion -----------------------------------------


def _queries(m: StreamMonitor, top1: np.ndarray, t0: float, vectors: np.ndarray | None = None,
             batch: int = 100) -> list[Alarm]:
    out: list[Alarm] = []
    n = top1.shape[0]
    for a in range(0, n, batch):
        e = min(a + batch, n)
        k = e - a
        nres = np.where(np.isfinite(top1[a:e]), 5.0, np.nan)
        out += m.update_queries(top1[a:e], nres, np.full(k, np.nan), np.full(k, np.nan), np.full(k, np.nan),
                                t0 + np.arange(a, e, dtype=np.float64),
                                None if vectors is None else vectors[a:e])
    return out


def test_query_embedding_drift_is_in_the_measures() -> None:
    rng = np.random.default_rng(25)
    m = StreamMonitor(KEY, det())
    feed(m, draw(rng, 600), 0, 600)
    me = m.measures()
    assert math.isnan(me["query_drift_detected"]) and math.isnan(me["query_drift_score"])
    qv = np.concatenate([draw(rng, 600), draw(rng, 400, shift=2.0)])
    alarms = _queries(m, rng.uniform(0.5, 0.9, 1000), 0.0, qv)
    assert alarms[0].detector == "mmd_query" and not m.drifting
    me = m.measures()
    assert me["query_drift_detected"] == 1.0 and me["drift_detected"] == 0.0
    assert me["query_drift_score"] == m._qvec.measures()["drift_score"] > 0  # type: ignore[union-attr]


def test_a_query_only_stream_has_the_baseline_of_its_query_side_and_can_be_promoted() -> None:
    rng = np.random.default_rng(26)
    s = det()
    m = StreamMonitor(KEY, s)
    _queries(m, rng.uniform(0.5, 0.9, 300), 0.0, draw(rng, 300))
    assert m.query_only and m.measures()["baseline_ready"] == 0.0  # query embeddings collecting
    _queries(m, rng.uniform(0.5, 0.9, 200), 300.0, draw(rng, 200))
    me = m.measures()
    assert me["baseline_ready"] == 1.0 and me["baseline_events"] == 400.0
    start = _queries(m, rng.uniform(0.5, 0.9, 400), 500.0, draw(rng, 400, shift=2.0))
    assert start[0].detector == "mmd_query" and m.measures()["query_drift_detected"] == 1.0
    # Promoted: the next 200 query embeddings become the query baseline; the alarm ends then.
    assert m.promote(events=200) is None and m.promotion == {"events": 0, "needed": 200}
    new_normal = draw(rng, 200, shift=2.0)
    assert _queries(m, rng.uniform(0.5, 0.9, 120), 900.0, new_normal[:120]) == []
    assert m.promotion == {"events": 120, "needed": 200} == m.state()["promotion"]
    end = _queries(m, rng.uniform(0.5, 0.9, 80), 1020.0, new_normal[120:])
    assert [(a.kind, a.detector) for a in end] == [("end", "mmd_query")] and m.promotion is None
    qb = m._qvec.baseline  # type: ignore[union-attr]
    assert qb is not None and qb.source == "promoted" and qb.count == 200
    np.testing.assert_allclose(qb.mean, new_normal.astype(np.float64).mean(0), rtol=1e-9)
    assert m.measures()["query_drift_detected"] == 0.0 and m.baseline is None


def test_a_query_only_stream_without_embeddings_is_ready_with_its_top1_reference() -> None:
    rng = np.random.default_rng(27)
    s = det()
    m = StreamMonitor(KEY, s)
    _queries(m, rng.uniform(0.5, 0.9, 399), 0.0)
    assert m.measures()["baseline_ready"] == 0.0
    _queries(m, rng.uniform(0.5, 0.9, 1), 399.0)
    assert m.measures()["baseline_ready"] == 1.0
    assert m.promote() is None and m.promotion == {"events": 0, "needed": 400}
    assert m.measures()["baseline_ready"] == 0.0
    _queries(m, rng.uniform(0.5, 0.9, 400), 400.0)
    assert m.promotion is None and m.measures()["baseline_ready"] == 1.0
    # A stream that never had any event still cannot be promoted.
    with pytest.raises(ValueError, match="0 events so far"):
        StreamMonitor(KEY, s).promote()


def test_promotion_restarts_the_top1_reference() -> None:
    """The KS test compares with the first reference_size queries after the promotion."""
    rng = np.random.default_rng(28)
    s = det()
    m = StreamMonitor(KEY, s)
    feed(m, draw(rng, 500), 0, 500)
    old = rng.uniform(0.6, 0.9, 400)
    shifted = rng.uniform(0.2, 0.5, 1000)
    _queries(m, np.concatenate([old, shifted[:300]]), 0.0)
    assert m.measures()["query_top1_ks_statistic"] == pytest.approx(ss.ks_2samp(shifted[:300], old).statistic)
    m.promote(events=100)
    me = m.measures()
    assert math.isnan(me["query_top1_ks_statistic"]) and math.isnan(me["query_top1_ks_p_value"])
    _queries(m, shifted[300:700], 700.0)  # the new reference: 400 queries
    assert math.isnan(m.measures()["query_top1_ks_statistic"])
    _queries(m, shifted[700:850], 1100.0)
    r = _round_trip(m, s)  # the moved reference survives a checkpoint
    for mon in (m, r):
        _queries(mon, shifted[850:], 1250.0)
        ks = ss.ks_2samp(shifted[700:], shifted[300:700], method="asymp")
        me = mon.measures()
        assert me["query_top1_ks_statistic"] == pytest.approx(ks.statistic, rel=1e-9)
        assert me["query_top1_ks_p_value"] == pytest.approx(ks.pvalue, rel=1e-6)


def test_a_rollback_restarts_the_top1_reference() -> None:
    rng = np.random.default_rng(29)
    m = StreamMonitor(KEY, det())
    feed(m, draw(rng, 500), 0, 500)
    _queries(m, rng.uniform(0.6, 0.9, 600), 0.0)
    assert math.isfinite(m.measures()["query_top1_ks_statistic"])
    assert m.baseline is not None
    m.activate(m.baseline)
    assert math.isnan(m.measures()["query_top1_ks_statistic"])


def test_query_measures_go_nan_when_no_window_query_has_results() -> None:
    rng = np.random.default_rng(30)
    s = det(window_seconds=600.0)
    m = StreamMonitor(KEY, s)
    _queries(m, np.where(np.arange(500) < 450, rng.uniform(0.6, 0.9, 500), 0.05), 0.0)
    me = m.measures()
    assert me["query_no_match_ratio"] > 0 and me["query_result_count"] == 5.0
    assert math.isfinite(me["query_top1_ks_statistic"])
    _queries(m, np.full(100, np.nan), 7200.0)  # later queries carry no results at all
    me = m.measures()
    for k in ("query_no_match_ratio", "query_result_count", "query_top1_ks_statistic",
              "query_top1_ks_p_value", "query_precision_at_k"):
        assert math.isnan(me[k]), k


def test_a_query_only_streams_query_drift_and_baseline_reach_the_metrics() -> None:
    """Through the service's exposition: the query embeddings' alarm is visible (it was in no
    metric) and the stream is not reported as missing its baseline."""
    from embedwatch.app import Service
    from embedwatch.config import Settings
    from embedwatch.events import Message

    rng = np.random.default_rng(31)
    svc = Service(Settings(detection={"reference_size": 200, "window_events": 200,  # type: ignore[arg-type]
                                      "min_window_events": 100}))
    msgs = []
    for i in range(1000):
        v = draw(rng, 1, shift=0.0 if i < 500 else 2.0)[0]
        ev = {"model": "search", "model_version": "1", "ts": 1_700_000_000.0 + i, "query_id": f"q{i}",
              "embedding": v.tolist(), "results": [{"id": "a", "score": 0.8}]}
        msgs.append(Message(json.dumps(ev).encode(), topic=svc.settings.kafka.queries_topic, offset=i,
                            timestamp_ms=1_700_000_000_000))
    for a in range(0, 1000, 100):
        svc.process(msgs[a:a + 100], now=1_700_001_000.0)
    lines = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in svc.exporter.text().splitlines()
             if ln.startswith("embedwatch_") and 'model="search"' in ln}
    lab = '{model="search",model_version="1",segment="default"}'
    assert lines["embedwatch_query_drift_detected" + lab] == 1.0
    assert lines["embedwatch_query_drift_score" + lab] > 0
    assert lines["embedwatch_baseline_ready" + lab] == 1.0
    assert lines["embedwatch_drift_detected" + lab] == 0.0  # the documents' state, unchanged


@pytest.mark.parametrize("scan_windows", [[], None])
def test_an_mmd_alarm_stays_open_while_the_drifting_stream_runs_below_the_minimum(scan_windows: Any) -> None:
    """Too few events in the time bound is no evidence that a drift ended: an alarm the MMD test
    started is kept (expire() ends it once the window is empty), not ended and started again."""
    rng = np.random.default_rng(5)
    kw: dict[str, Any] = {"window_seconds": 1000.0}
    if scan_windows is not None:
        kw["scan_windows"] = scan_windows
    m = StreamMonitor(KEY, det(**kw))
    out: list[Alarm] = []
    t = 0.0
    for n, dt, shift in ((400, 1.0, 0.0), (400, 1.0, 1.5), (150, 30.0, 1.5), (400, 1.0, 1.5)):
        got, t = feed_at(m, draw(rng, n, shift=shift), t, dt, 10)
        out += got
    assert [(a.kind, a.detector) for a in out] == [("start", "mmd")] and m.drifting


def test_expire_ends_the_document_alarm_of_a_stream_whose_queries_go_on() -> None:
    """Documents stop while queries keep coming (the usual retrieval pattern): the document side
    is silent and expires; the query side is not."""
    rng = np.random.default_rng(22)
    m = StreamMonitor(KEY, det(window_seconds=3600.0))
    _, t = feed_at(m, draw(rng, 800), 0.0, 1.0, 100)
    start, t = feed_at(m, draw(rng, 300, shift=1.5), t, 1.0, 100)
    assert start and m.drifting
    ended: list[Alarm] = []
    for minute in range(1, 3 * 60):
        now = t + 60.0 * minute
        top1 = rng.uniform(0.5, 0.9, 3)
        nan = np.full(3, np.nan)
        m.update_queries(top1, np.full(3, 5.0), nan, nan, nan, now - 1.0 + np.arange(3) * 0.1)
        ended += m.expire(now)
    assert [(a.kind, a.detector) for a in ended] == [("end", start[0].detector)] and not m.drifting
    me = m.measures()
    assert me["window_events"] == 0.0 and math.isnan(me["drift_score"])
    assert me["query_result_count"] == 5.0  # the live query side keeps its measures


def test_expire_clears_the_query_measures_of_a_stream_whose_queries_stopped() -> None:
    m = StreamMonitor(KEY, det(window_seconds=3600.0))
    n = 600
    top1 = np.random.default_rng(1).uniform(0.0, 0.4, n)
    m.update_queries(top1, np.full(n, 5.0), np.full(n, 0.5), np.full(n, 0.4), np.full(n, 0.1),
                     np.arange(n, dtype=np.float64))
    keys = ("query_no_match_ratio", "query_result_count", "query_precision_at_k", "query_recall_at_k")
    assert all(math.isfinite(m.measures()[k]) for k in keys)
    assert m.expire(n + 600.0) == []  # the first look after new queries only notes them
    assert all(math.isfinite(m.measures()[k]) for k in keys)  # within the time bound
    m.expire(n + 2 * 3600.0)
    assert all(math.isnan(m.measures()[k]) for k in keys), {k: m.measures()[k] for k in keys}


@pytest.mark.parametrize("batch", [50, 100])
def test_a_silence_inside_a_batch_restarts_the_scan_as_one_between_batches(batch: int) -> None:
    """The scan's reset after a silence longer than the window must not depend on where the poll
    batches (or replay's chunks) fall."""
    def ends(spans_gap: bool) -> list[int]:
        rng = np.random.default_rng(24)
        m = StreamMonitor(KEY, det(window_seconds=3600.0))
        x = np.concatenate([draw(rng, 800), draw(rng, 1000, shift=1.5), draw(rng, 1200)])
        ts = np.arange(x.shape[0], dtype=np.float64)
        ts[1800:] += 3 * 86400.0
        cut = 1800 - batch // 2 if spans_gap else 1800
        bounds = sorted({*range(0, cut, batch), *range(cut, 3000, batch), 3000})
        alarms: list[Alarm] = []
        for a, e in itertools.pairwise(bounds):
            alarms += m.update_embeddings(x[a:e], ts[a:e])
        return [a.index for a in alarms if a.kind == "end"]

    between = ends(False)
    assert len(between) == 1 and between[0] < 2000
    assert ends(True) == between


class _SnapshotsEveryEvaluation(StreamMonitor):
    """Every evaluation merges the whole window, as before evaluations followed by another in the
    same update merged only what the alarm decision reads."""

    def _evaluate(self, index: int, ts: float, snapshot: bool = True) -> Alarm | None:
        return super()._evaluate(index, ts, snapshot=True)


@pytest.mark.parametrize("seed", range(6))
def test_evaluations_without_a_snapshot_change_no_alarm_and_no_measure(seed: int) -> None:
    """Updates of 1 to 700 events (up to 14 evaluations each) over a stream that drifts and comes
    back, with silences that leave fewer than min_window_events in the window: the same alarms,
    and after every update the same measures, as a monitor that keeps every evaluation's totals."""
    rng = np.random.default_rng(seed)
    s = det(window_seconds=300.0, scan_windows=[100, 200])
    a, b = StreamMonitor(KEY, s), _SnapshotsEveryEvaluation(KEY, s)
    t, n = 0.0, 0
    for part, shift in ((1500, 0.0), (900, 1.5), (900, 0.0)):
        x = draw(rng, part, shift)
        pos = 0
        while pos < part:
            k = int(rng.choice([1, 7, 60, 130, 700]))
            xs = x[pos:pos + k]
            t += 400.0 if rng.random() < 0.02 else 0.0  # a silence longer than the window
            ts = t + np.arange(xs.shape[0], dtype=np.float64)
            t = float(ts[-1]) + 1.0
            assert a.update_embeddings(xs, ts) == b.update_embeddings(xs, ts)
            ma, mb = a.measures(), b.measures()
            assert ma.keys() == mb.keys()
            for key in ma:
                assert ma[key] == mb[key] or (math.isnan(ma[key]) and math.isnan(mb[key])), key
            pos += xs.shape[0]
            n += xs.shape[0]
    assert a.counters()["drift_alarms"] >= 1  # the drift was seen: alarms were compared
