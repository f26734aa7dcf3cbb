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
