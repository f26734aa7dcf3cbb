"""VersionComparison against brute-force numpy computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embedwatch.detectors.version_compare import RESULT_KEYS, VersionComparison, knn_overlap, paired_cosine


def brute_paired_cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) for x, y in zip(a, b, strict=True)]))


def brute_knn(x: np.ndarray, k: int) -> list[set[int]]:
    out = []
    for i in range(len(x)):
        sims = [
            (x[i] @ x[j] / (np.linalg.norm(x[i]) * np.linalg.norm(x[j])), j) for j in range(len(x)) if j != i
        ]
        sims.sort(key=lambda t: -t[0])
        out.append({j for _, j in sims[:k]})
    return out


def brute_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    k = min(k, len(a) - 1)
    na, nb = brute_knn(a, k), brute_knn(b, k)
    return float(np.mean([len(x & y) / k for x, y in zip(na, nb, strict=True)]))


def random_rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def ids(n: int, start: int = 0) -> list[str | None]:
    return [f"doc-{i}" for i in range(start, start + n)]


def test_no_result_with_one_version() -> None:
    vc = VersionComparison("m", probe_size=100, k=5)
    vc.update("v1", ids(10), np.random.default_rng(0).normal(size=(10, 8)))
    assert vc.results() == []


def test_identical_versions() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 16)).astype(np.float32)
    vc = VersionComparison("m", probe_size=100, k=5)
    vc.update("v1", ids(60), x)
    vc.update("v2", ids(60), x)
    [r] = vc.results()
    assert set(RESULT_KEYS) <= set(r)
    assert r["model"] == "m" and r["model_version"] == "v2" and r["reference_version"] == "v1"
    assert r["shared_ids"] == 60
    assert r["paired_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert r["knn_overlap"] == 1.0
    assert r["dimension_changed"] is False


def test_matches_brute_force_on_noisy_version() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(80, 12))
    b = a + rng.normal(scale=0.7, size=a.shape)
    vc = VersionComparison("m", probe_size=200, k=7)
    vc.expect(["old", "new"])  # as the router does for two versions in one poll batch
    vc.update("old", ids(80), a.astype(np.float32))
    vc.update("new", ids(80), b.astype(np.float32))
    [r] = vc.results()
    a32, b32 = a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
    assert r["paired_cosine"] == pytest.approx(brute_paired_cosine(a32, b32), rel=1e-9)
    assert r["knn_overlap"] == pytest.approx(brute_overlap(a32, b32, 7), rel=1e-12)
    assert 0 < r["knn_overlap"] < 1


def test_rotation_keeps_neighbourhoods_but_not_paired_cosine() -> None:
    rng = np.random.default_rng(3)
    d = 24
    a = rng.normal(size=(150, d))
    b = a @ random_rotation(d, rng)
    vc = VersionComparison("m", probe_size=500, k=10)
    vc.expect(["v1", "v2"])
    vc.update("v1", ids(150), a)
    vc.update("v2", ids(150), b)
    [r] = vc.results()
    assert r["paired_cosine"] < 0.9
    assert r["paired_cosine"] == pytest.approx(brute_paired_cosine(a, b), abs=1e-5)
    assert r["knn_overlap"] == 1.0


def test_dimension_change_reported_never_crashes() -> None:
    rng = np.random.default_rng(4)
    a = rng.normal(size=(40, 8))
    proj = rng.normal(size=(8, 20))
    b = a @ proj  # a linear map into 20 dims
    vc = VersionComparison("m", probe_size=100, k=5)
    vc.update("v1", ids(40), a)
    vc.update("v2", ids(40), b)
    [r] = vc.results()
    assert r["dimension_changed"] is True
    assert math.isnan(r["paired_cosine"])
    assert r["shared_ids"] == 40
    a32, b32 = a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
    assert r["knn_overlap"] == pytest.approx(brute_overlap(a32, b32, 5))
    assert r["dim"] == 20 and r["reference_dim"] == 8


def test_only_shared_ids_count_and_none_ids_are_ignored() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(50, 6))
    vc = VersionComparison("m", probe_size=100, k=3)
    vc.update("v1", ids(30), x[:30])
    none: list[str | None] = [None] * 10
    mixed = none + ids(20, start=20)  # ids 20..39: 10 shared with v1
    vc.update("v2", mixed, x[20:50])
    [r] = vc.results()
    assert r["shared_ids"] == 10
    assert vc.shared_ids("v2", "v1") == [f"doc-{i}" for i in range(20, 30)]
    # rows 20..29 of v2's batch are x[30..39]: the vectors of ids 20..29 under v2
    expected = brute_paired_cosine(x[20:30].astype(np.float32), x[30:40].astype(np.float32))
    assert r["paired_cosine"] == pytest.approx(expected, rel=1e-6)


def test_no_shared_ids_gives_nan() -> None:
    vc = VersionComparison("m", probe_size=10, k=3)
    vc.update("v1", ids(5), np.ones((5, 4)))
    vc.update("v2", ids(5, start=100), np.ones((5, 4)))
    [r] = vc.results()
    assert r["shared_ids"] == 0 and math.isnan(r["paired_cosine"]) and math.isnan(r["knn_overlap"])


def test_reference_is_first_seen_and_all_pairs_reported() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(20, 4))
    vc = VersionComparison("m", probe_size=50, k=3)
    for v in ("2024-05", "2023-01", "2025-01"):
        vc.update(v, ids(20), x)
    pairs = [(r["model_version"], r["reference_version"]) for r in vc.results()]
    assert pairs == [("2023-01", "2024-05"), ("2025-01", "2024-05"), ("2025-01", "2023-01")]


def test_memory_is_bounded_and_dual_write_pairs_are_pinned() -> None:
    rng = np.random.default_rng(7)
    vc = VersionComparison("m", probe_size=100, k=5)
    # v1 has a long history before the migration: 10,000 ids
    for start in range(0, 10_000, 1000):
        vc.update("v1", ids(1000, start), rng.normal(size=(1000, 8)))
    # dual write: both versions emit the same new ids, in alternating batches
    for start in range(10_000, 10_500, 50):
        x = rng.normal(size=(50, 8))
        vc.update("v2", ids(50, start), x)
        vc.update("v1", ids(50, start), x)
    # afterwards v1 continues alone for a long time: pinned pairs stay
    for start in range(20_000, 25_000, 1000):
        vc.update("v1", ids(1000, start), rng.normal(size=(1000, 8)))
    for v in vc.versions:
        probe = vc._versions[v]
        assert len(probe.index) <= 100 and probe.vectors.shape[0] <= 100
    [r] = vc.results()
    assert r["shared_ids"] == 100
    assert r["paired_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_version_cap_keeps_reference() -> None:
    vc = VersionComparison("m", probe_size=10, k=2, max_versions=3)
    x = np.random.default_rng(8).normal(size=(10, 4))
    for v in ("a", "b", "c", "d"):
        vc.update(v, ids(10), x)
    assert vc.versions == ["a", "c", "d"]


def test_wrong_dim_within_a_version_is_ignored() -> None:
    vc = VersionComparison("m", probe_size=10, k=2)
    vc.update("a", ids(5), np.ones((5, 4)))
    vc.update("a", ids(5, 5), np.ones((5, 7)))
    assert vc._versions["a"].rejected == 5 and len(vc._versions["a"].index) == 5


def test_results_are_cached_until_update() -> None:
    vc = VersionComparison("m", probe_size=10, k=2)
    x = np.random.default_rng(9).normal(size=(6, 3))
    vc.update("a", ids(6), x)
    vc.update("b", ids(6), x)
    first = vc.results()
    assert vc.results() == first
    vc.update("b", ids(6), -x)
    assert vc.results()[0]["paired_cosine"] == pytest.approx(-1.0)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 30), d1=st.integers(2, 6), d2=st.integers(2, 6), k=st.integers(1, 8),
       seed=st.integers(0, 2**32 - 1))
def test_overlap_function_matches_brute_force(n: int, d1: int, d2: int, k: int, seed: int) -> None:
    # d >= 2: in one dimension every cosine is +-1 and neighbourhoods are ties.
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, d1)), rng.normal(size=(n, d2))
    assert knn_overlap(a, b, k) == pytest.approx(brute_overlap(a, b, k))
    if d1 == d2:
        assert paired_cosine(a, b) == pytest.approx(brute_paired_cosine(a, b))
    else:
        assert math.isnan(paired_cosine(a, b))


def _ring_model(batches: list[list[str | None]], vecs: list[np.ndarray], cap: int) -> dict[str, np.ndarray]:
    """Brute force: the `cap` most recently seen ids and the newest vector of each."""
    recency: dict[str, np.ndarray] = {}
    for idents, x in zip(batches, vecs, strict=True):
        for ident, v in zip(idents, x, strict=True):
            if ident is not None:
                recency.pop(ident, None)
                recency[ident] = v
    return dict(list(recency.items())[-cap:])


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=6), universe=st.integers(1, 60),
       cap=st.integers(2, 30), none_share=st.floats(0, 0.3), seed=st.integers(0, 2**32 - 1),
       loop_max=st.sampled_from([-1, 64]))
def test_single_version_ring_matches_brute_force(sizes: list[int], universe: int, cap: int,
                                                  none_share: float, seed: int, loop_max: int) -> None:
    """Both single-version updates (the bulk ring update, ``loop_max=-1``, and the per-id loop
    small batches take) keep exactly the most recent ids and vectors."""
    import embedwatch.detectors.version_compare as vc_module

    saved, vc_module._LOOP_MAX = vc_module._LOOP_MAX, loop_max
    try:
        _check_single_version_ring(sizes, universe, cap, none_share, seed)
    finally:
        vc_module._LOOP_MAX = saved


def _check_single_version_ring(sizes: list[int], universe: int, cap: int, none_share: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    vc = VersionComparison("m", probe_size=cap, k=2)
    batches: list[list[str | None]] = []
    vecs: list[np.ndarray] = []
    for n in sizes:
        idents: list[str | None] = [None if rng.random() < none_share else f"d{rng.integers(universe)}"
                                    for _ in range(n)]
        x = rng.normal(size=(n, 3)).astype(np.float32)
        batches.append(idents)
        vecs.append(x)
        vc.update("v1", idents, x)
    want = _ring_model(batches, vecs, cap)
    probe = vc._versions["v1"]
    assert list(probe.unpinned) == list(want)
    assert set(probe.index) == set(want)
    rows = sorted(probe.index.values())
    assert len(set(rows)) == len(rows) and probe.vectors.shape[0] <= cap
    assert sorted(rows + probe.free) == list(range(len(rows) + len(probe.free)))
    for ident, v in want.items():
        np.testing.assert_array_equal(probe.vectors[probe.index[ident]], v)
    # A second version then pairs with what the ring kept, through the per-id path.
    shared = list(want)
    vc.update("v2", shared, np.stack([want[i] for i in shared]) if shared else np.zeros((0, 3)))
    if shared:
        [r] = vc.results()
        assert r["shared_ids"] == len(shared)


def test_a_second_version_announced_lets_the_first_keep_its_whole_batch() -> None:
    """A dual write's versions come as two blocks of one poll batch: without the announcement the
    first block is cut to the solo ring (its last 64 ids) before the second arrives."""
    x = np.random.default_rng(12).normal(size=(300, 8))
    alone, told = VersionComparison("m", probe_size=1000, k=3), VersionComparison("m", probe_size=1000, k=3)
    told.expect(["v1"])  # one version: nothing changes
    assert told._several is False
    told.expect(["v2", "v1"])
    for vc in (alone, told):
        vc.update("v1", ids(300), x)
        vc.update("v2", ids(300), x)
    assert alone.results()[0]["shared_ids"] == 64
    assert told.results()[0]["shared_ids"] == 300
    # Later batches pair in full either way: the probes may now grow to probe_size.
    for vc in (alone, told):
        vc.update("v1", ids(300, 300), x)
        vc.update("v2", ids(300, 300), x)
    assert [vc.results()[0]["shared_ids"] for vc in (alone, told)] == [364, 600]


def test_single_version_keeps_only_solo_probe_size_until_a_second_version() -> None:
    rng = np.random.default_rng(10)
    vc = VersionComparison("m", probe_size=1000, k=3, solo_probe_size=50)
    vc.update("v1", ids(400), rng.normal(size=(400, 8)))
    probe = vc._versions["v1"]
    assert len(probe.index) == 50 and probe.vectors.shape[0] <= 64  # nothing preallocated
    assert set(probe.index) == {f"doc-{i}" for i in range(350, 400)}
    x = rng.normal(size=(300, 8))
    vc.update("v2", ids(300, 400), x)  # the migration starts: both may now hold probe_size ids
    vc.update("v1", ids(300, 400), x)
    [r] = vc.results()
    assert r["shared_ids"] == 300 and r["paired_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert len(vc._versions["v1"].index) == 350


def _second_migration(vc: VersionComparison, rng: np.random.Generator, announce: bool) -> dict[str, np.ndarray]:
    """v1 -> v2 dual write, v2 alone for long, then a v2 -> v3 dual write; returns the v3 vectors
    by id (v2 emits the same ones)."""
    for start in range(0, 300, 50):  # first migration: fills v1's and v2's probes with pins
        x = rng.normal(size=(50, 8))
        vc.expect(["v1", "v2"])
        vc.update("v1", ids(50, start), x)
        vc.update("v2", ids(50, start), x + rng.normal(scale=0.1, size=x.shape))
    for start in range(300, 2300, 500):  # v1 retired: v2 alone
        vc.update("v2", ids(500, start), rng.normal(size=(500, 8)))
    third: dict[str, np.ndarray] = {}
    for start in range(5000, 5300, 50):  # second migration: both blocks in one poll batch
        old = rng.normal(size=(50, 8))
        new = old + rng.normal(scale=0.5, size=old.shape)
        if announce:
            vc.expect(["v2", "v3"])
        vc.update("v2", ids(50, start), old)
        vc.update("v3", ids(50, start), new)
        third.update(zip([f"doc-{i}" for i in range(start, start + 50)], new.astype(np.float32), strict=True))
    return third


@pytest.mark.parametrize("announce", [True, False])
def test_a_second_migration_is_paired_after_the_first_one_filled_the_probes(announce: bool) -> None:
    """The pins of v1 -> v2 used to last for good: v2's probe, full of them, took none of the
    ids it emitted with v3, and v3 vs v2 had no shared id at all."""
    rng = np.random.default_rng(13)
    vc = VersionComparison("m", probe_size=100, k=5)
    third = _second_migration(vc, rng, announce)
    res = {(r["model_version"], r["reference_version"]): r for r in vc.results()}
    r = res[("v3", "v2")]
    # Announced, v2's block of the batch v3 first appears in is taken whole; otherwise v2's
    # probe restarts when v3 arrives and pairs from the next batch on. Either way the probe
    # fills with the dual write's first probe_size pairs.
    first = 5000 if announce else 5050
    want = [f"doc-{i}" for i in range(first, first + 100)]
    assert r["shared_ids"] == 100 and vc.shared_ids("v3", "v2") == want
    v2 = vc._versions["v2"]
    a = np.stack([v2.vectors[v2.index[i]] for i in want]).astype(np.float64)
    b = np.stack([third[i] for i in want]).astype(np.float64)
    assert r["paired_cosine"] == pytest.approx(brute_paired_cosine(a, b), rel=1e-9)
    assert r["knn_overlap"] == pytest.approx(brute_overlap(a, b, 5), rel=1e-12)
    assert 0.5 < r["paired_cosine"] < 0.99
    # v1 retired before v3 came: no pair with it; v2's pins with v1 left its ring.
    assert res[("v3", "v1")]["shared_ids"] == 0 and res[("v2", "v1")]["shared_ids"] == 0
    for v in vc.versions:  # memory stays bounded by probe_size per version
        p = vc._versions[v]
        assert len(p.index) <= 100 and p.vectors.shape[0] <= 100
        assert p.pinned <= set(p.index) and not (p.pinned & set(p.unpinned))
        assert len(p.pinned) + len(p.unpinned) == len(p.index)


def test_a_dual_write_still_going_on_keeps_pairing_when_a_third_version_appears() -> None:
    rng = np.random.default_rng(14)
    vc = VersionComparison("m", probe_size=60, k=3)
    for start in range(0, 400, 40):
        x = rng.normal(size=(40, 6))
        vc.expect(["a", "b"] + (["c"] if start >= 200 else []))
        vc.update("a", ids(40, start), x)
        vc.update("b", ids(40, start), x)
        if start >= 200:
            vc.update("c", ids(40, start), x)
    res = {(r["model_version"], r["reference_version"]): r["shared_ids"] for r in vc.results()}
    # a and b pin again what they keep emitting together after c restarted the pins; c pairs with both.
    assert res == {("b", "a"): 60, ("c", "a"): 60, ("c", "b"): 60}
    shared = set(vc.shared_ids("c", "a"))
    assert shared == set(vc.shared_ids("c", "b")) == set(vc.shared_ids("b", "a"))
    assert shared <= {f"doc-{i}" for i in range(200, 400)}  # the pairs from before c left the rings


def test_an_announced_version_restarts_the_pins_once() -> None:
    """The pins two versions make in the batch a third one is announced in stay pinned: the third
    version's own first update does not restart them again."""
    rng = np.random.default_rng(15)
    vc = VersionComparison("m", probe_size=40, k=3)
    for start in (0, 100, 200):  # a and b dual write; c, new in the second batch, emits other ids
        x = rng.normal(size=(40, 5))
        vc.expect(["a", "b", "c"] if start else ["a", "b"])
        vc.update("a", ids(40, start), x)
        vc.update("b", ids(40, start), x)
        if start:
            vc.update("c", ids(40, start + 1000), x)
    # The pins of the second batch (made after c's announcement) fill a's and b's probes.
    assert vc.shared_ids("b", "a") == [f"doc-{i}" for i in range(100, 140)]
