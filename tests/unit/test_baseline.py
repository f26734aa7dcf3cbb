"""Baseline: statistics, determinism and the to_arrays / from_arrays round-trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedwatch.baseline import ARRAY_DTYPES, SCHEMA_VERSION, Baseline, content_hash
from embedwatch.config import DetectionSettings
from embedwatch.detectors.mmd import RFFMMD
from embedwatch.events import StreamKey
from embedwatch.stats import histogram

DET = DetectionSettings(baseline_sample=64, rff_features=32, histogram_bins=16)
KEY = StreamKey("m", "v1", "seg")


def make(seed: int = 0, n: int = 200, d: int = 12) -> tuple[Baseline, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, d)) + 0.3).astype(np.float32)
    return Baseline.from_vectors(KEY, x, np.arange(n, dtype=np.float64) + 100.0, "test", DET), x


def test_statistics_of_the_reference() -> None:
    b, x = make()
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(b.mean, x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(b.var, x64.var(0, ddof=1), rtol=1e-12)
    assert b.count == 200 and b.dim == 12 and b.created_at == 299.0
    a = b.to_arrays()
    assert a["sample"].shape == (64, 12)  # bounded by baseline_sample
    # The sample is made of reference rows (stored as float16).
    rows = {r.tobytes() for r in x.astype(np.float16)}
    assert a["sample"].dtype == np.float16
    assert all(r.tobytes() in rows for r in a["sample"])
    unit = x64.mean(0) / np.linalg.norm(x64.mean(0))
    sims = x64 @ unit / np.linalg.norm(x64, axis=1)
    np.testing.assert_array_equal(a["sim_hist"], histogram(sims, a["sim_edges"]))
    assert a["sim_hist"].sum() == 200 and a["norm_hist"].sum() == 200
    assert a["sim_moments"][0] == pytest.approx(sims.mean(), rel=1e-12)
    assert set(a) == set(ARRAY_DTYPES)
    assert all(str(v.dtype) == ARRAY_DTYPES[k] for k, v in a.items())
    assert a["rff_normal"].shape == (12, 32) and a["rff_eigvals"].shape == (32,)
    with pytest.raises(ValueError):
        a["mean"][0] = 1.0  # frozen


def test_metadata_is_json_and_describes_the_baseline() -> None:
    b, _ = make()
    md = json.loads(json.dumps(b.metadata))
    assert md == {
        "baseline_id": b.content_hash[:16], "model": "m", "model_version": "v1", "segment": "seg",
        "dim": 12, "created_at": 299.0, "count": 200, "source": "test",
        "content_hash": content_hash(b.to_arrays()), "schema_version": SCHEMA_VERSION,
    }


def test_deterministic_and_content_addressed() -> None:
    b1, _ = make(1)
    b2, _ = make(1)
    b3, _ = make(2)
    assert b1.content_hash == b2.content_hash
    assert b1.baseline_id != b3.baseline_id


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), n=st.integers(2, 150), d=st.integers(1, 20))
def test_round_trip(seed: int, n: int, d: int) -> None:
    b, _ = make(seed, n, d)
    r = Baseline.from_arrays(json.loads(json.dumps(b.metadata)),
                             {k: np.array(v) for k, v in b.to_arrays().items()})
    assert r.metadata == b.metadata
    for k, v in b.to_arrays().items():
        np.testing.assert_array_equal(r.to_arrays()[k], v)
    assert r.key == b.key


def test_from_arrays_rejects_damage() -> None:
    b, _ = make()
    arrays = {k: np.array(v) for k, v in b.to_arrays().items()}
    arrays["mean"][0] += 1e-9
    with pytest.raises(ValueError, match="hash"):
        Baseline.from_arrays(b.metadata, arrays)
    with pytest.raises(ValueError, match="missing"):
        Baseline.from_arrays(b.metadata, {k: v for k, v in b.to_arrays().items() if k != "sample"})
    with pytest.raises(ValueError, match="schema_version"):
        Baseline.from_arrays({**b.metadata, "schema_version": 99}, b.to_arrays())
    with pytest.raises(ValueError, match="dim"):
        Baseline.from_arrays({**b.metadata, "dim": 3}, b.to_arrays())


def test_rejects_too_few_vectors() -> None:
    with pytest.raises(ValueError):
        Baseline.from_vectors(KEY, np.ones((1, 4)), None, "x", DET)


def test_frequency_matrix_is_shared_by_baselines_of_one_seed_and_dimension() -> None:
    b1, _ = make(1)
    b2, _ = make(2)
    g = b1.to_arrays()["rff_normal"]
    assert g is b2.to_arrays()["rff_normal"]  # one matrix per process, not one per stream
    assert not g.flags.writeable
    # A baseline read back from (copied) arrays shares it too, and is the same baseline.
    r = Baseline.from_arrays(b1.metadata, {k: np.array(v) for k, v in b1.to_arrays().items()})
    assert r.to_arrays()["rff_normal"] is g and r.content_hash == b1.content_hash
    assert make(1, d=13)[0].to_arrays()["rff_normal"].shape == (13, 32)


def test_shared_frequencies_give_the_per_stream_matrix_features() -> None:
    """(x @ G) / s, with G shared, equals x @ (G / s) (the per-stream matrix of the earlier layout)
    up to float32 rounding."""
    b, x = make(3, n=300, d=24)
    new = b.mmd()
    a = b.to_arrays()
    w, phases = RFFMMD.draw(24, 32, new.bandwidth, DET.seed)
    np.testing.assert_array_equal(phases, a["rff_offsets"])
    old = RFFMMD(w, phases, new.reference_mean, new.eigvals, new.n_reference, new.bandwidth)
    np.testing.assert_allclose(new.features(x), old.features(x), rtol=0, atol=1e-5)
    # Bit-for-bit repeatable within a process; row by row where the BLAS kernel rounds a row
    # independently of its position in the call (see test_window), else to float32 rounding.
    np.testing.assert_array_equal(new.features(x), b.mmd().features(x))
    g = np.asarray(a["rff_normal"], dtype=np.float32)
    if np.array_equal(x[5:7] @ g, (x @ g)[5:7]):
        np.testing.assert_array_equal(new.features(x[5:6]), new.features(x)[5:6])
    else:
        np.testing.assert_allclose(new.features(x[5:6]), new.features(x)[5:6], rtol=0, atol=1e-6)


def test_baselines_of_the_earlier_layout_are_still_read() -> None:
    """A baseline saved with its own ``rff_weights`` (G / s) loads and keeps using that matrix."""
    b, x = make(4)
    arrays = {k: np.array(v) for k, v in b.to_arrays().items()}
    del arrays["rff_normal"]
    arrays["rff_weights"] = RFFMMD.draw(12, 32, b.mmd().bandwidth, DET.seed)[0]
    md = {**b.metadata, "content_hash": content_hash(arrays)}
    old = Baseline.from_arrays(md, arrays)
    assert set(old.to_arrays()) == set(arrays)
    np.testing.assert_array_equal(old.mmd().weights, arrays["rff_weights"])
    assert old.mmd().weight_scale == 1.0
    np.testing.assert_allclose(old.mmd().features(x), b.mmd().features(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="missing"):
        Baseline.from_arrays(md, {k: v for k, v in arrays.items() if k != "rff_weights"})


@pytest.mark.parametrize("scale", [1e6, 1e-9])
def test_sample_float16_cannot_hold_stays_float32(scale: float) -> None:
    rng = np.random.default_rng(5)
    x = ((rng.normal(size=(100, 6)) + 0.3) * scale).astype(np.float32)
    b = Baseline.from_vectors(KEY, x, None, "test", DET)
    sample = b.to_arrays()["sample"]
    assert sample.dtype == np.float32
    rows = {r.tobytes() for r in x}
    assert all(r.tobytes() in rows for r in sample)
    r = Baseline.from_arrays(b.metadata, {k: np.array(v) for k, v in b.to_arrays().items()})
    assert r.to_arrays()["sample"].dtype == np.float32 and r.content_hash == b.content_hash


def test_float32_sample_of_the_earlier_layout_is_read_as_stored() -> None:
    b, x = make(6)
    arrays = {k: np.array(v) for k, v in b.to_arrays().items()}
    arrays["sample"] = x[:64].copy()
    md = {**b.metadata, "content_hash": content_hash(arrays)}
    old = Baseline.from_arrays(md, arrays)
    assert old.sample.dtype == np.float32
    np.testing.assert_array_equal(old.sample, x[:64])


def test_shared_frequency_matrix_lives_only_while_used() -> None:
    import gc
    import weakref

    b, _ = make(7, d=17)
    ref = weakref.ref(b.to_arrays()["rff_normal"])
    again, _ = make(8, d=17)
    assert again.to_arrays()["rff_normal"] is ref()
    del b, again
    gc.collect()
    assert ref() is None  # not kept alive by the process-wide sharing
    np.testing.assert_array_equal(make(7, d=17)[0].to_arrays()["rff_normal"],
                                  RFFMMD.draw(17, 32, 1.0, DET.seed)[0])


def test_a_baseline_without_its_sample_monitors_exactly_like_the_full_one() -> None:
    from embedwatch.monitor import StreamMonitor

    s = DetectionSettings(reference_size=200, window_events=200, baseline_sample=150, rff_features=32,
                          histogram_bins=16, evaluate_every=50, scan_windows=[100, 200])
    b = Baseline.from_vectors(KEY, make(3, n=200, d=12)[1], 100.0, "test", s)
    slim = b.without_sample(s)
    assert slim.without_sample(s) is slim and b.released_sample_rows is None
    assert slim.baseline_id == b.baseline_id and slim.metadata == b.metadata
    assert slim.sample_rows == b.sample_rows == 150 and "sample" not in slim.arrays
    with pytest.raises(ValueError, match="reference sample was released"):
        slim.to_arrays()
    with pytest.raises(ValueError, match="reference sample was released"):
        _ = slim.sample
    with pytest.raises(ValueError, match="reference sample was released"):  # a scan fit for other settings
        slim.mean_shift(DetectionSettings(scan_components=3))
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.normal(size=(300, 12)) + 0.3, rng.normal(size=(300, 12)) + 0.8]).astype(np.float32)
    ts = np.arange(600, dtype=np.float64)
    full_mon, slim_mon = StreamMonitor(KEY, s, b), StreamMonitor(KEY, s, slim)
    got = [slim_mon.update_embeddings(x[i:i + 70], ts[i:i + 70]) for i in range(0, 600, 70)]
    want = [full_mon.update_embeddings(x[i:i + 70], ts[i:i + 70]) for i in range(0, 600, 70)]
    assert [[a.to_dict() for a in g] for g in got] == [[a.to_dict() for a in w] for w in want]
    assert any(want), "the shift must alarm, or the comparison shows nothing"
    m1, m2 = full_mon.measures(), slim_mon.measures()
    assert m1.keys() == m2.keys()
    for k in m1:
        assert m1[k] == m2[k] or (np.isnan(m1[k]) and np.isnan(m2[k])), k
