"""Versioned baseline stores: layout, round trip, promote/rollback, integrity, atomicity."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embedwatch.baseline import Baseline
from embedwatch.baseline_store import (
    MAX_HELD_VERSIONS,
    BaselineHistoryError,
    BaselineIntegrityError,
    BaselineNotFoundError,
    BaselineRepository,
    BaselineStore,
    MemoryBaselineStore,
    _Index,
    decode_baseline,
    encode_baseline,
    load_file,
    safe_name,
    save_file,
)
from embedwatch.config import DetectionSettings
from embedwatch.events import StreamKey

DET = DetectionSettings(baseline_sample=50, rff_features=16, histogram_bins=8)
KEY = StreamKey("all-MiniLM-L6-v2", "2024-05-01", "web search")


def make(seed: int, key: StreamKey = KEY, n: int = 60, d: int = 8) -> Baseline:
    rng = np.random.default_rng(seed)
    return Baseline.from_vectors(key, rng.normal(size=(n, d)) + 1.0, ts=1_700_000_000.0 + seed,
                                 source=f"test:{seed}", settings=DET)


def assert_same(a: Baseline, b: Baseline) -> None:
    assert a.metadata == b.metadata
    aa, bb = a.to_arrays(), b.to_arrays()
    assert aa.keys() == bb.keys()
    for name in aa:
        assert aa[name].dtype == bb[name].dtype and aa[name].shape == bb[name].shape
        assert aa[name].tobytes() == bb[name].tobytes(), name


@pytest.fixture(params=["dir", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> BaselineRepository:
    if request.param == "dir":
        return BaselineStore(tmp_path / "baselines")
    return MemoryBaselineStore()


def test_protocol() -> None:
    assert isinstance(MemoryBaselineStore(), BaselineRepository)


def test_layout_on_disk(tmp_path: Path) -> None:
    s = BaselineStore(tmp_path)
    b = make(1)
    md = s.save(b)
    assert md["active"] is True and md["stream"] == str(KEY) and md["baseline_id"] == b.baseline_id
    d = tmp_path / safe_name(KEY)
    assert d.name == "all-MiniLM-L6-v2+2024-05-01+web%20search"
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [f"{b.baseline_id}.npz", f"{b.baseline_id}.json", "index.json"]
    )
    index = json.loads((d / "index.json").read_text())
    assert index == {"stream": str(KEY), "versions": [b.baseline_id], "active": b.baseline_id, "previous": []}
    with np.load(d / f"{b.baseline_id}.npz", allow_pickle=False) as z:
        assert set(z.files) == set(b.to_arrays())
    assert not list(tmp_path.rglob("*.tmp"))


def test_versions_promote_rollback(store: BaselineRepository) -> None:
    b1, b2, b3 = make(1), make(2), make(3)
    store.save(b1)
    store.save(b2)
    store.save(b3, activate=False)
    listed = store.list(KEY)
    assert [m["baseline_id"] for m in listed] == [b1.baseline_id, b2.baseline_id, b3.baseline_id]
    assert [m["active"] for m in listed] == [False, True, False]
    assert store.get(KEY).baseline_id == b2.baseline_id
    assert store.get(str(KEY), b1.baseline_id).baseline_id == b1.baseline_id

    assert store.promote(KEY, b3.baseline_id)["active"] is True
    assert store.get(KEY).baseline_id == b3.baseline_id
    assert store.rollback(KEY)["baseline_id"] == b2.baseline_id
    assert store.rollback(KEY)["baseline_id"] == b1.baseline_id
    with pytest.raises(BaselineHistoryError, match="no previous baseline"):
        store.rollback(KEY)
    assert store.get(KEY).baseline_id == b1.baseline_id


def test_rollback_without_history_and_unknowns(store: BaselineRepository) -> None:
    with pytest.raises(BaselineNotFoundError):
        store.get(KEY)
    with pytest.raises(BaselineNotFoundError):
        store.rollback(KEY)
    store.save(make(1))
    with pytest.raises(BaselineHistoryError):
        store.rollback(KEY)
    with pytest.raises(BaselineNotFoundError):
        store.promote(KEY, "nope")
    with pytest.raises(BaselineNotFoundError):
        store.get(KEY, "nope")


def test_an_index_naming_a_version_the_store_lacks_is_not_found(store: BaselineRepository) -> None:
    """A version named by the index but not stored (a damaged record a restore skipped) is a
    BaselineNotFoundError naming it, which the router handles: a KeyError from the memory store
    stopped the service loop."""
    assert isinstance(store, BaselineStore | MemoryBaselineStore)
    b = make(1)
    store.save(b)
    store._store_index(_Index(KEY, [b.baseline_id, "gone"], "gone", [b.baseline_id]))
    with pytest.raises(BaselineNotFoundError, match="gone"):
        store.get(KEY)
    with pytest.raises(BaselineNotFoundError, match="gone"):
        store.list(KEY)
    with pytest.raises(BaselineNotFoundError, match="gone"):
        store.promote(KEY, "gone")
    assert store.get(KEY, b.baseline_id).baseline_id == b.baseline_id


def test_inactive_first_save_has_no_active(store: BaselineRepository) -> None:
    store.save(make(1), activate=False)
    with pytest.raises(BaselineNotFoundError, match="no active"):
        store.get(KEY)


def test_save_is_idempotent(store: BaselineRepository) -> None:
    b = make(1)
    store.save(b)
    store.save(b)
    assert len(store.list(KEY)) == 1


def test_list_all_streams(store: BaselineRepository) -> None:
    other = StreamKey("m", "..", "default")
    store.save(make(1))
    store.save(make(2, other))
    listed = store.list()
    assert sorted(m["stream"] for m in listed) == sorted([str(KEY), str(other)])
    assert all(m["active"] for m in listed)


def test_reopen_directory(tmp_path: Path) -> None:
    b1, b2 = make(1), make(2)
    s = BaselineStore(tmp_path)
    s.save(b1)
    s.save(b2)
    again = BaselineStore(tmp_path)
    assert [m["active"] for m in again.list()] == [False, True]
    assert again.rollback(KEY)["baseline_id"] == b1.baseline_id
    assert_same(again.get(KEY), b1)


def test_tampered_arrays_are_refused(tmp_path: Path) -> None:
    s = BaselineStore(tmp_path)
    b = make(1)
    s.save(b)
    npz = s.path(KEY, b.baseline_id)
    arrays = dict(np.load(npz, allow_pickle=False))
    arrays["mean"] = arrays["mean"] + 1e-9
    np.savez(npz, **arrays)
    with pytest.raises(BaselineIntegrityError, match="content hash"):
        s.get(KEY)
    with pytest.raises(BaselineIntegrityError):
        s.promote(KEY, b.baseline_id)


def test_tampered_metadata_is_refused(tmp_path: Path) -> None:
    s = BaselineStore(tmp_path)
    b = make(1)
    s.save(b)
    js = s.path(KEY, b.baseline_id).with_suffix(".json")
    header = json.loads(js.read_text())
    header["metadata"]["count"] = 10**6
    js.write_text(json.dumps(header))
    with pytest.raises(BaselineIntegrityError, match="metadata"):
        s.get(KEY)


def test_corrupt_npz_is_refused(tmp_path: Path) -> None:
    s = BaselineStore(tmp_path)
    b = make(1)
    s.save(b)
    npz = s.path(KEY, b.baseline_id)
    npz.write_bytes(npz.read_bytes()[:100])
    with pytest.raises(BaselineIntegrityError, match="unreadable"):
        s.get(KEY)


def test_pickled_object_array_is_refused(tmp_path: Path) -> None:
    b = make(1)
    npz, _ = save_file(b, tmp_path / "b")
    arrays = dict(np.load(npz, allow_pickle=False))
    arrays["mean"] = np.array([{"evil": 1}], dtype=object)
    np.savez(npz, **arrays)  # needs pickle to read back
    with pytest.raises(BaselineIntegrityError):
        load_file(npz)


def test_save_file_load_file_pair(tmp_path: Path) -> None:
    b = make(4)
    npz, js = save_file(b, tmp_path / "sub" / "base.json")
    assert (npz.name, js.name) == ("base.npz", "base.json")
    assert_same(load_file(tmp_path / "sub" / "base"), b)
    assert_same(load_file(npz), b)
    with pytest.raises(BaselineNotFoundError):
        load_file(tmp_path / "missing.npz")


def test_failed_write_leaves_previous_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = BaselineStore(tmp_path)
    b1 = make(1)
    s.save(b1)
    real_replace = os.replace

    def boom(src: str, dst: str) -> None:
        if str(dst).endswith("index.json"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        s.save(make(2))
    monkeypatch.setattr(os, "replace", real_replace)
    assert [m["baseline_id"] for m in s.list()] == [b1.baseline_id]
    assert_same(s.get(KEY), b1)
    assert not list(tmp_path.rglob("*.tmp"))


def test_encode_decode_bytes() -> None:
    b = make(5)
    data = encode_baseline(b)
    assert_same(decode_baseline(data), b)
    with pytest.raises(BaselineIntegrityError):
        decode_baseline(data[:-50])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(2, 40),
    d=st.integers(1, 12),
    seed=st.integers(0, 2**32 - 1),
    scale=st.floats(1e-3, 1e3),
    label=st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"), blacklist_characters="/"),
                  min_size=1, max_size=12).filter(str.isprintable),
)
def test_round_trip_is_exact(tmp_path: Path, n: int, d: int, seed: int, scale: float, label: str) -> None:
    rng = np.random.default_rng(seed)
    key = StreamKey(label, "v1", label)
    b = Baseline.from_vectors(key, rng.normal(scale=scale, size=(n, d)), ts=float(seed), source="prop",
                              settings=DET)
    s = BaselineStore(tmp_path / f"s{seed}")
    s.save(b)
    assert_same(BaselineStore(tmp_path / f"s{seed}").get(key), b)
    m = MemoryBaselineStore()
    m.save(b)
    assert_same(m.get(key), b)
    assert_same(decode_baseline(encode_baseline(b)), b)


def _held(store: MemoryBaselineStore) -> set[str]:
    """Ids of the versions the store holds in memory (every map it keeps them in)."""
    ids = {bid for _, bid in store._baselines}
    assert ids == {bid for _, bid in store._meta} and len(store._baselines) == len(ids)
    return ids


def test_memory_store_holds_a_bounded_number_of_versions() -> None:
    """Every promotion's version stayed in memory for the life of the process (243 KiB each at
    384-d); now the active one and the four a rollback reaches first."""
    assert MAX_HELD_VERSIONS == 5
    store = MemoryBaselineStore()
    saved = [make(i) for i in range(12)]
    for b in saved:
        store.save(b)  # a promotion
    last = [b.baseline_id for b in saved[-5:]]
    assert [m["baseline_id"] for m in store.list(KEY)] == last
    assert _held(store) == set(last)
    old = saved[0].baseline_id
    for call in (lambda: store.get(KEY, old), lambda: store.promote(KEY, old)):
        with pytest.raises(BaselineNotFoundError, match=old):  # the API's 404
            call()
    # Rollback goes back through every version held, newest first, then has nothing left.
    assert [store.rollback(KEY)["baseline_id"] for _ in range(4)] == last[-2::-1]
    with pytest.raises(BaselineHistoryError):
        store.rollback(KEY)
    assert store.get(KEY).baseline_id == last[0]
    # Re-activating a held version by id works as before.
    assert store.promote(KEY, last[-1])["active"] is True and store.get(KEY).baseline_id == last[-1]


def test_the_bound_keeps_what_a_rollback_reaches_first(tmp_path: Path) -> None:
    """A re-activated old version stays over newer ones a rollback would not reach before it;
    rollbacks within the bound go where the directory store (which keeps every version) goes."""
    b = [make(i) for i in range(7)]
    stores: list[BaselineStore | MemoryBaselineStore] = [BaselineStore(tmp_path), MemoryBaselineStore()]
    for store in stores:
        for x in b[:4]:
            store.save(x)
        store.promote(KEY, b[0].baseline_id)
        for x in b[4:]:
            store.save(x)
    disk, mem = stores
    assert len(disk.list(KEY)) == 7
    # b6 active, earlier ones b0 b1 b2 b3 b0 b4 b5: a rollback goes to b5, b4, b0, b3 (not b2,
    # which the five newest saves would keep instead of b0)
    kept = [b[i].baseline_id for i in (0, 3, 4, 5, 6)]
    assert [m["baseline_id"] for m in mem.list(KEY)] == kept
    assert isinstance(mem, MemoryBaselineStore) and _held(mem) == set(kept)
    back = [disk.rollback(KEY)["baseline_id"] for _ in range(4)]
    assert back == [b[i].baseline_id for i in (5, 4, 0, 3)]
    assert [mem.rollback(KEY)["baseline_id"] for _ in range(4)] == back


def test_an_index_read_back_drops_the_versions_it_no_longer_lists() -> None:
    """A durable store reads back every version ever written at a restart, then the stream's
    index: the versions a save dropped go again, and an index from before the bound is cut to it.
    A version newer than every listed one (saved just before its index) stays."""
    store = MemoryBaselineStore()
    b = [make(i) for i in range(9)]
    for x in b:
        store._write_version(KEY, x)
    ids = [x.baseline_id for x in b]
    store._store_index(_Index(KEY, ids[2:6], ids[5], ids[2:5]))
    assert _held(store) == set(ids[2:6]) | set(ids[6:])  # b0, b1 dropped; b6..b8 are newer
    store._store_index(_Index(KEY, ids[:8], ids[7], ids[:7]))  # 8 versions listed: cut to 5
    assert [m["baseline_id"] for m in store.list(KEY)] == ids[3:8]
    assert _held(store) == set(ids[3:9])
    other = make(1, key=StreamKey("m", "v"))
    store.save(other)
    assert store.get(StreamKey("m", "v")).baseline_id == other.baseline_id


def test_durable_store_restart_holds_the_bounded_versions(tmp_path: Path) -> None:
    from embedwatch.state import DurableBaselineStore, FileStateBackend

    store = DurableBaselineStore(FileStateBackend(tmp_path))
    saved = [make(i) for i in range(9)]
    for x in saved:
        store.save(x)
    store.rollback(KEY)
    again = DurableBaselineStore(FileStateBackend(tmp_path), FileStateBackend(tmp_path).read_all())
    want = [x.baseline_id for x in saved[-5:]]
    assert [m["baseline_id"] for m in again.list(KEY)] == want
    assert _held(store) == _held(again) == set(want)
    assert again.get(KEY).baseline_id == want[-2]
    assert [again.rollback(KEY)["baseline_id"] for _ in range(3)] == want[-3::-1]


def test_forget_removes_a_retired_stream_and_every_version_of_it(store: BaselineRepository, tmp_path: Path) -> None:
    other_key = StreamKey("m", "v")
    saved = [make(i) for i in range(3)]
    for b in saved:
        store.save(b)
    store.rollback(KEY)
    other = make(7, key=other_key)
    store.save(other)
    assert store.forget(KEY) == [b.baseline_id for b in saved]
    assert store.list(KEY) == []
    assert [m["stream"] for m in store.list()] == [str(other_key)]
    for call in (lambda: store.get(KEY), lambda: store.get(KEY, saved[0].baseline_id),
                 lambda: store.rollback(KEY), lambda: store.forget(KEY)):
        with pytest.raises(BaselineNotFoundError):
            call()
    assert store.get(other_key).baseline_id == other.baseline_id
    if isinstance(store, BaselineStore):
        assert not store.stream_dir(KEY).exists()  # every file of the stream, its directory too
        assert store.stream_dir(other_key).is_dir()
    else:
        assert isinstance(store, MemoryBaselineStore)
        assert _held(store) == {other.baseline_id}
    # A stream that comes back starts a new history.
    store.save(saved[1])
    assert [m["baseline_id"] for m in store.list(KEY)] == [saved[1].baseline_id]


def test_the_memory_store_tells_what_it_holds() -> None:
    """Versions held and the bytes of their arrays, an array several share counted once (the
    random-feature frequencies: one matrix per process and dimension)."""
    store = MemoryBaselineStore()
    assert store.held() == (0, 0)
    a, b = make(1), make(2, key=StreamKey("m", "v"))
    store.save(a)
    store.save(b)

    def size(bl: Baseline, skip: str = "") -> int:
        return sum(x.nbytes for k, x in bl.arrays.items() if k not in ("sample", skip))

    assert np.shares_memory(a.arrays["rff_normal"], b.arrays["rff_normal"])
    sample = a.arrays["sample"].nbytes + b.arrays["sample"].nbytes
    assert store.held() == (2, size(a) + size(b, "rff_normal") + sample)
    scan = DetectionSettings(baseline_sample=50, rff_features=16, histogram_bins=8, scan_components=4)
    slim = a.without_sample(scan)  # held as the router holds a saved baseline: its scan fit, no sample
    store.hold(slim)
    t = slim.mean_shift(scan)
    assert t.basis.shape == (8, 4)
    fit = t.basis.nbytes + t.gains.nbytes + t.eigvals.nbytes + t.mean_projection.nbytes
    assert store.held() == (2, size(a) + fit + size(b, "rff_normal") + b.arrays["sample"].nbytes)
    store.forget(KEY)
    assert store.held() == (1, size(b) + b.arrays["sample"].nbytes)
    # Counted again after a change of the held versions, or once the count is max_age_s old: a
    # scan fitted on a held version changes no version.
    t = b.mean_shift(scan)
    assert store.held() == (1, size(b) + b.arrays["sample"].nbytes)
    fit = t.basis.nbytes + t.gains.nbytes + t.eigvals.nbytes + t.mean_projection.nbytes
    assert store.held(max_age_s=0.0) == (1, size(b) + b.arrays["sample"].nbytes + fit)


def test_the_durable_store_deletes_the_versions_a_save_drops(tmp_path: Path) -> None:
    """Every promotion left a version in the state backend for good (2.6 MB at 768-d), read and
    decoded by every replica at every restart only to be dropped as unlisted. A save deletes the
    records of the versions it drops; versions an earlier save left there go at the stream's next
    save by a store that read them back."""
    from embedwatch.state import DurableBaselineStore, FileStateBackend

    def stored(backend: FileStateBackend) -> dict[str, list[str]]:
        recs = backend.read_all()
        return {kind: sorted(k.rsplit("/", 1)[1] for k in recs if k.startswith(f"{kind}/{safe_name(KEY)}/"))
                for kind in ("baseline", "baseline-fit")}

    scan = DetectionSettings(baseline_sample=50, rff_features=16, histogram_bins=8, scan_components=4)
    backend = FileStateBackend(tmp_path / "state")
    store = DurableBaselineStore(backend, None, scan)
    saved = [make(i) for i in range(8)]
    for x in saved:
        x.mean_shift(scan)  # a fits record beside each version
        store.save(x)
    want = sorted(x.baseline_id for x in saved[-5:])
    assert stored(backend) == {"baseline": want, "baseline-fit": want}

    # Records an earlier version of embedwatch left: dropped from memory at a restart, deleted
    # from the backend once the stream saves a version through the restarted store.
    from embedwatch.baseline_store import encode_baseline

    backend.write({f"baseline/{safe_name(KEY)}/{x.baseline_id}": encode_baseline(x) for x in saved[:3]})
    again = DurableBaselineStore(FileStateBackend(tmp_path / "state"), FileStateBackend(tmp_path / "state").read_all(),
                                 scan)
    assert _held(again) == set(want)
    assert len(stored(backend)["baseline"]) == 8
    newest = make(9)
    again.save(newest)
    want = sorted(x.baseline_id for x in [*saved[-4:], newest])
    assert stored(backend)["baseline"] == want and _held(again) == set(want)
