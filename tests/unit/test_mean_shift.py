"""The mean-shift test and the monitor's recent-window scan, against explicit numpy computations."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedwatch.config import DetectionSettings
from embedwatch.detectors.mean_shift import MeanShiftTest
from embedwatch.events import StreamKey
from embedwatch.monitor import StreamMonitor

D = 12
KEY = StreamKey("m", "v1")
MIX = np.random.default_rng(7).normal(size=(D, D)) * np.linspace(2.0, 0.05, D)[:, None]


def draw(rng: np.random.Generator, n: int, shift: float = 0.0) -> np.ndarray:
    x = rng.normal(size=(n, D)) @ MIX + 1.0
    x[:, -3:] += shift  # along the low-variance tail of MIX's spectrum
    return x.astype(np.float32)


def test_statistic_and_null_weights_match_explicit_matrices() -> None:
    rng = np.random.default_rng(0)
    ref = draw(rng, 400).astype(np.float64)
    t = MeanShiftTest.fit(ref, ref.mean(axis=0), 400, components=4, shrinkage=0.5, seed=3)
    perm = np.random.default_rng([3, D, 400, 0x4D53]).permutation(400)
    a, b = ref[perm[:200]], ref[perm[200:]]
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    lam, u = np.linalg.eigh(sa)
    lam, u = lam[::-1], u[:, ::-1]
    eps = 0.5 * np.trace(sa) / D
    uk = u[:, :4]
    model = uk @ np.diag(lam[:4] + eps) @ uk.T + eps * (np.eye(D) - uk @ uk.T)
    assert t.epsilon == pytest.approx(eps, rel=1e-12)
    z = draw(rng, 5, shift=0.3).astype(np.float64) - ref.mean(axis=0)
    want = np.einsum("ij,jk,ik->i", z, np.linalg.inv(model), z)
    np.testing.assert_allclose(t.statistic(z + ref.mean(axis=0)), want, rtol=1e-9)
    ev, evec = np.linalg.eigh(model)
    inv_sqrt = evec @ np.diag(ev ** -0.5) @ evec.T
    w = np.sort(np.linalg.eigvalsh(inv_sqrt @ sb @ inv_sqrt))
    np.testing.assert_allclose(np.sort(t.eigvals), w, rtol=1e-9, atol=1e-12)
    assert t.null_mean(100) == pytest.approx((1 / 100 + 1 / 400) * w.sum(), rel=1e-9)


def test_statistic_from_kept_parts_matches_the_direct_one() -> None:
    rng = np.random.default_rng(1)
    ref = draw(rng, 400).astype(np.float64)
    t = MeanShiftTest.fit(ref, ref.mean(axis=0), 400, components=5, shrinkage=1.0, seed=2)
    w = draw(rng, 7, shift=0.2).astype(np.float64)
    z = w - t.mean
    np.testing.assert_allclose(t.statistic_of(np.einsum("ij,ij->i", z, z), w @ t.basis), t.statistic(w),
                               rtol=1e-10)


def test_false_alarm_rate_is_calibrated() -> None:
    """Windows drawn from the reference distribution reject at about the nominal level."""
    rng = np.random.default_rng(1)
    alpha, m, rejects, tests = 0.01, 100, 0, 0
    for _ in range(20):
        ref = draw(rng, 1000)
        t = MeanShiftTest.fit(ref, ref.astype(np.float64).mean(axis=0), 1000, components=6, shrinkage=0.3, seed=0)
        windows = draw(rng, 500 * m).astype(np.float64).reshape(500, m, D).mean(axis=1)
        rejects += int(np.sum(t.statistic(windows) > t.threshold(m, alpha)))
        tests += 500
    # 10,000 tests at 1%: 100 expected; a test calibrated on the in-sample covariance rejects far more
    assert 0.5 * alpha * tests <= rejects <= 1.6 * alpha * tests


def test_shift_along_a_middle_variance_direction_is_detected() -> None:
    rng = np.random.default_rng(2)
    ref = draw(rng, 1000)
    t = MeanShiftTest.fit(ref, ref.astype(np.float64).mean(axis=0), 1000, components=6, shrinkage=0.3, seed=0)
    lam, vec = np.linalg.eigh(MIX.T @ MIX)  # the population covariance of draw()
    step = 0.5 * np.sqrt(lam[D // 2]) * vec[:, D // 2]  # half an sd along a middle-variance direction
    moved = (draw(rng, 500) + step).astype(np.float64).mean(axis=0)
    same = draw(rng, 500).astype(np.float64).mean(axis=0)
    stats = t.statistic(np.stack([same, moved]))
    thr = t.threshold(500, 1e-6)
    assert stats[0] < thr < stats[1]
    assert t.p_value(float(stats[1]), 500) < 1e-6 < t.p_value(float(stats[0]), 500)


# ------------------------------------------------------------------------------ monitor scan

def det(**kw: Any) -> DetectionSettings:
    base: dict[str, Any] = dict(reference_size=400, window_events=400, buckets=4, reservoir_per_bucket=100,
                                evaluate_every=50, min_window_events=50, baseline_sample=400, rff_features=64,
                                histogram_bins=16, max_evaluations_per_update=1000, scan_every=20,
                                scan_windows=[40, 100, 200], scan_components=4, scan_shrinkage=0.5)
    base.update(kw)
    return DetectionSettings(**base)


def feed(m: StreamMonitor, x: np.ndarray, sizes: list[int]) -> list[Any]:
    out: list[Any] = []
    pos = 0
    k = 0
    while pos < x.shape[0]:
        n = sizes[k % len(sizes)]
        k += 1
        e = min(pos + n, x.shape[0])
        out += m.update_embeddings(x[pos:e], np.arange(pos, e, dtype=np.float64))
        pos = e
    return out


def test_scan_measures_match_explicit_windows() -> None:
    rng = np.random.default_rng(3)
    s = det()
    x = np.concatenate([draw(rng, 400), draw(rng, 333, shift=0.05)])
    m = StreamMonitor(KEY, s)
    feed(m, x, [37, 5, 101])
    assert m.baseline is not None
    t = m.baseline.mean_shift(s)
    last = (x.shape[0] // 20) * 20 - 1  # the last scan point (index 719)
    x64 = x.astype(np.float64)
    alpha = s.false_alarm_rate / 2 / 3
    best = max(((float(t.statistic(x64[last + 1 - w:last + 1].mean(axis=0))[0]), w) for w in s.scan_windows),
               key=lambda sw: sw[0] / t.threshold(sw[1], alpha))
    me = m.measures()
    assert me["mean_shift_threshold_ratio"] == pytest.approx(best[0] / t.threshold(best[1], alpha), rel=1e-9)
    assert me["mean_shift_score"] == pytest.approx(best[0] - t.null_mean(best[1]), rel=1e-9, abs=1e-12)


def test_scan_catches_an_abrupt_shift_at_the_first_scan_point_and_ends() -> None:
    rng = np.random.default_rng(4)
    s = det()
    x = np.concatenate([draw(rng, 1000), draw(rng, 600, shift=10.0), draw(rng, 1400)])
    m = StreamMonitor(KEY, s)
    alarms = feed(m, x, [100])
    starts = [a for a in alarms if a.kind == "start"]
    ends = [a for a in alarms if a.kind == "end"]
    assert [(a.index, a.detector) for a in starts] == [(1019, "mean_shift")]
    assert starts[0].p_value is not None and starts[0].p_value <= s.false_alarm_rate / 2 / 3
    assert starts[0].score >= s.scan_effect_floor
    assert len(ends) == 1 and ends[0].detector == "mean_shift" and 1600 < ends[0].index < 2000
    assert not m.drifting


def test_scan_effect_floor_blocks_an_alarm() -> None:
    rng = np.random.default_rng(5)
    x = np.concatenate([draw(rng, 400), draw(rng, 600, shift=3.0)])
    quiet = StreamMonitor(KEY, det(scan_effect_floor=1e12, effect_size_floor=1e12))
    assert feed(quiet, x, [100]) == []
    assert quiet.measures()["mean_shift_threshold_ratio"] > 1.0


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 250), min_size=1, max_size=6))
def test_alarms_do_not_depend_on_batching(sizes: list[int]) -> None:
    rng = np.random.default_rng(6)
    x = np.concatenate([draw(rng, 700), draw(rng, 300, shift=0.4), draw(rng, 400)])
    s = det()
    want = feed(StreamMonitor(KEY, s), x, [1000])
    got = feed(StreamMonitor(KEY, s), x, sizes)
    assert [a.to_dict() for a in got] == [a.to_dict() for a in want]


def test_a_fitted_test_stored_as_arrays_comes_back_identical() -> None:
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(400, 12)) * np.linspace(3, 0.1, 12)
    t = MeanShiftTest.fit(ref, ref.mean(axis=0), 400, components=5, shrinkage=0.1, seed=3)
    back = MeanShiftTest.from_arrays(ref.mean(axis=0), 400, t.to_arrays())
    means = rng.normal(size=(7, 12))
    np.testing.assert_array_equal(back.statistic(means), t.statistic(means))
    assert back.threshold(50, 1e-6) == t.threshold(50, 1e-6)
    for name, a in t.to_arrays().items():
        np.testing.assert_array_equal(back.to_arrays()[name], a)

    bad = t.to_arrays()
    with pytest.raises(ValueError, match="does not fit"):
        MeanShiftTest.from_arrays(ref.mean(axis=0)[:11], 400, bad)  # another dimension
    with pytest.raises(ValueError, match="does not fit"):
        MeanShiftTest.from_arrays(ref.mean(axis=0), 400, {**bad, "gains": bad["gains"][:4]})
    with pytest.raises(ValueError, match="does not fit"):
        MeanShiftTest.from_arrays(ref.mean(axis=0), 400, {**bad, "epsilon": np.array([0.0])})
    with pytest.raises(ValueError, match="not finite"):
        MeanShiftTest.from_arrays(ref.mean(axis=0), 400, {**bad, "eigvals": bad["eigvals"] * np.nan})
    with pytest.raises(ValueError, match="without"):
        MeanShiftTest.from_arrays(ref.mean(axis=0), 400, {k: v for k, v in bad.items() if k != "basis"})
