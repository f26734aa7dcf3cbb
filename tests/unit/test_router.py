"""StreamRouter: stream cap, dimension checks, block order, baselines in a repository."""

from __future__ import annotations

import base64
from typing import Any, cast

import numpy as np
import orjson

from embedwatch.baseline_store import MemoryBaselineStore
from embedwatch.config import Settings
from embedwatch.events import Decoder, Kind, Message, Reason, StreamKey
from embedwatch.monitor import StreamMonitor
from embedwatch.router import StreamRouter


def msg(model: str, vec: Any, version: str = "1", b64: bool = False, ident: str | None = None) -> Message:
    ev: dict[str, Any] = {"model": model, "model_version": version, "ts": 1.0}
    if b64:
        ev["embedding_b64"] = base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode()
    else:
        ev["embedding"] = list(map(float, vec))
    if ident is not None:
        ev["id"] = ident
    return Message(orjson.dumps(ev), topic="embeddings")


def settings(**detection: Any) -> Settings:
    return Settings(limits={"max_streams": 2}, detection={"reference_size": 50, **detection})


def test_stream_limit() -> None:
    r = StreamRouter(settings())
    batch = Decoder().decode([msg("a", [1, 2]), msg("b", [1, 2]), msg("c", [1, 2]), msg("c", [3, 4])])
    res = r.route(batch)
    assert res.new_streams == [StreamKey("a", "1"), StreamKey("b", "1")]
    assert [(x.reason, x.message_index) for x in res.rejections] == [
        (Reason.STREAM_LIMIT, 2), (Reason.STREAM_LIMIT, 3)
    ]
    assert r.rejected == {"stream_limit": 2}
    assert StreamKey("c", "1") not in r.stream_rejected  # no per-stream state for refused streams
    r.remove(StreamKey("a", "1"))
    assert r.route(Decoder().decode([msg("c", [1, 2])])).rejections == []


def test_dimension_mismatch_within_and_across_batches() -> None:
    r = StreamRouter(settings())
    res = r.route(Decoder().decode([msg("a", [1, 2, 3]), msg("a", [1, 2]), msg("a", [4, 5, 6])]))
    assert [(x.reason, x.message_index) for x in res.rejections] == [(Reason.DIMENSION_MISMATCH, 1)]
    assert r.expected_dim(StreamKey("a", "1")) == 3
    res = r.route(Decoder().decode([msg("a", [1, 2, 3, 4])]))
    assert [x.reason for x in res.rejections] == [Reason.DIMENSION_MISMATCH]
    assert r.stream_rejected[StreamKey("a", "1")] == {"dimension_mismatch": 2}
    assert r.monitors[StreamKey("a", "1")].events == 2


def test_list_and_b64_blocks_are_merged_in_message_order() -> None:
    seen: list[np.ndarray] = []

    class Spy:
        def __init__(self, *_: Any) -> None:
            self.expected_dim: int | None = None
            self.baseline = None
            self.query_monitor = None
            self.events = 0

        def update_embeddings(self, vectors: np.ndarray, *_: Any) -> list[Any]:
            seen.append(vectors.copy())
            self.expected_dim = vectors.shape[1]
            return []

        def take_summary(self) -> None:
            return None

    r = StreamRouter(settings(), monitor_factory=lambda *a: cast(StreamMonitor, Spy(*a)))
    vecs = [[float(i), 1.0] for i in range(1, 7)]
    msgs = [msg("a", v, b64=i % 2 == 1) for i, v in enumerate(vecs)]
    r.route(Decoder().decode(msgs))
    assert len(seen) == 1
    assert seen[0][:, 0].tolist() == [1, 2, 3, 4, 5, 6]


def test_a_block_monitored_whole_hands_its_norms_and_similarities_over_once() -> None:
    """The per-event norms and cosines to the baseline centroid the service's histograms reuse
    (float64, against a batch computation) come only with a block its monitor took whole against
    its baseline: not while the reference is collected, not with the block that completes it."""
    r = StreamRouter(settings())  # reference_size 50
    x = np.random.default_rng(3).standard_normal((120, 8)).astype(np.float32)
    key = StreamKey("a", "1")
    assert r.route(Decoder().decode([msg("a", v) for v in x[:30]])).summaries == {}
    assert r.route(Decoder().decode([msg("a", v) for v in x[30:70]])).summaries == {}  # 20 of 40 monitored
    res = r.route(Decoder().decode([msg("a", v) for v in x[70:]]))
    s = res.summaries[key]
    want = x[70:].astype(np.float64)
    norms = np.linalg.norm(want, axis=1)
    np.testing.assert_allclose(s.norms, norms, rtol=1e-12)
    base = r.monitors[key].baseline
    assert base is not None and base.centroid_unit is not None
    np.testing.assert_allclose(s.sims, want @ base.centroid_unit.astype(np.float64) / norms, rtol=1e-12)
    assert r.monitors[key].take_summary() is None  # handed over, not held by the stream


def test_version_comparison_is_fed() -> None:
    r = StreamRouter(settings())
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 4))
    msgs = [msg("m", v, version=ver, ident=f"d{i}") for i, v in enumerate(x) for ver in ("1", "2")]
    r.route(Decoder().decode(msgs))
    [res] = r.version_results()
    assert res["shared_ids"] == 20 and res["paired_cosine"] > 0.999


def test_a_dual_write_batch_pairs_in_full_and_only_accepted_blocks_widen_the_ring() -> None:
    """Two versions in one batch: announced before either block is added, so all 100 ids pair
    although the single-version ring holds 10. A refused block (a third stream beyond
    max_streams) announces nothing: model "s" keeps its ring of 10."""
    r = StreamRouter(settings(version_solo_probe_size=10))
    x = np.random.default_rng(1).normal(size=(100, 4))
    msgs = [msg("m", v, version="1", ident=f"d{i}") for i, v in enumerate(x)]
    msgs += [msg("m", v, version="2", ident=f"d{i}") for i, v in enumerate(x)]
    r.route(Decoder().decode(msgs))
    [res] = r.version_results()
    assert res["shared_ids"] == 100
    single = StreamRouter(settings(version_solo_probe_size=10))
    single.route(Decoder().decode([msg("a", [1.0, 2.0], ident="a0")]))
    batch = [msg("s", v, version="1", ident=f"d{i}") for i, v in enumerate(x)]
    batch += [msg("s", v, version="2", ident=f"d{i}") for i, v in enumerate(x)]  # stream 3: refused
    res_s = single.route(Decoder().decode(batch))
    assert {x.reason for x in res_s.rejections} == {Reason.STREAM_LIMIT}
    assert single.comparisons["s"].versions == ["1"]
    assert len(single.comparisons["s"]._versions["1"].index) == 10


def test_baselines_are_loaded_and_saved() -> None:
    store = MemoryBaselineStore()
    r = StreamRouter(settings(), store)
    rng = np.random.default_rng(1)
    r.route(Decoder().decode([msg("a", v) for v in rng.normal(size=(60, 8)) + 2]))
    [md] = store.list()
    assert md["stream"] == "a/1/default" and md["active"] and md["count"] == 50
    # Once saved, the monitor and the store hold one copy without the reference sample.
    first = r.monitors[StreamKey("a", "1")].baseline
    assert first is not None and first.released_sample_rows == 50 and store.get("a/1/default") is first
    # A new router (a restart) starts the stream from the stored baseline: no reference phase.
    r2 = StreamRouter(settings(), store)
    r2.route(Decoder().decode([msg("a", [1.0] * 8)]))
    mon = r2.monitors[StreamKey("a", "1")]
    assert mon.baseline is not None and mon.baseline.baseline_id == md["baseline_id"]
    assert len(store.list()) == 1
    # ... and a vector of another dimension is refused against the stored baseline's dim.
    res = r2.route(Decoder().decode([msg("a", [1.0] * 4)]))
    assert [x.reason for x in res.rejections] == [Reason.DIMENSION_MISMATCH]


def qmsg(model: str, vec: Any) -> Message:
    ev = {"model": model, "model_version": "1", "ts": 1.0, "embedding": list(map(float, vec)),
          "results": [{"id": "d", "score": 0.8}]}
    return Message(orjson.dumps(ev), topic="queries")


def test_query_embedding_baselines_are_saved_and_loaded_under_the_query_side_key() -> None:
    """The query embeddings' baseline is stored apart from the stream's (its key ends in /query):
    a stream that starts again (a restart without its checkpoint, a stream back after it was
    forgotten as idle) monitors its query embeddings against it instead of building one from its
    next queries, and a query-only stream knows its dimension from it."""
    store = MemoryBaselineStore()
    decoder = Decoder(query_topics=frozenset({"queries"}))
    r = StreamRouter(settings(), store)
    rng = np.random.default_rng(2)
    r.route(decoder.decode([qmsg("a", v) for v in rng.normal(size=(60, 8)) + 2]))
    [md] = store.list()
    assert md["stream"] == "a/1/default/query" and md["active"] and md["count"] == 50
    assert store.list("a/1/default/query") == [md] and store.list("a/1/default") == []
    mon = r.monitors[StreamKey("a", "1")]
    q = mon.query_monitor
    assert mon.baseline is None and q is not None and q.baseline is not None
    assert q.baseline.released_sample_rows == 50 and store.get(StreamKey("a", "1").query_side()) is q.baseline
    r2 = StreamRouter(settings(), store)
    res = r2.route(decoder.decode([qmsg("a", [1.0] * 8), qmsg("a", [1.0] * 4)]))
    q2 = r2.monitors[StreamKey("a", "1")].query_monitor
    assert q2 is not None and q2.baseline is not None and q2.baseline.baseline_id == md["baseline_id"]
    assert q2.events == 1 and len(store.list()) == 1
    assert [x.reason for x in res.rejections] == [Reason.DIMENSION_MISMATCH]
    # Documents of the stream build the stream's own baseline beside it.
    r2.route(Decoder().decode([msg("a", v) for v in rng.normal(size=(50, 8))]))
    assert [m["stream"] for m in store.list()] == ["a/1/default", "a/1/default/query"]


def test_a_reader_of_the_guard_gets_in_between_two_streams_updates() -> None:
    # The service passes its exporter lock as the guard: a scrape waiting on it must get it at the
    # end of the stream being updated, not after every stream of the batch (10 s while 200
    # streams of 768-d built their baselines in one batch).
    import threading
    import time

    from embedwatch.fair_lock import FairRLock

    lock = FairRLock()
    order: list[str] = []
    asked = threading.Event()

    def reader() -> None:
        asked.set()
        with lock:
            order.append("reader")

    class Recording(StreamMonitor):
        def update_embeddings(self, *args: Any, **kwargs: Any) -> Any:
            assert lock.owned()
            order.append(self.key.model)
            if len(order) == 1:
                threading.Thread(target=reader).start()
                asked.wait(5)
                time.sleep(0.05)  # the reader is waiting on the lock now
            return super().update_embeddings(*args, **kwargs)

    r = StreamRouter(Settings(detection={"reference_size": 50}),
                     monitor_factory=lambda key, det, baseline: Recording(key, det, baseline))
    r.route(Decoder().decode([msg(m, [1.0, 2.0]) for m in ("a", "b", "c")]), guard=lock)
    deadline = time.monotonic() + 5
    while "reader" not in order and time.monotonic() < deadline:
        time.sleep(0.01)
    assert order == ["a", "reader", "b", "c"]
    assert not lock.owned()


def test_a_stream_whose_update_raises_dead_letters_its_block_and_starts_afresh(caplog: Any) -> None:
    """A defect, or input no check foresaw, in one stream's update: its block is dead-lettered with
    processing_error, nothing it added to the batch's result stays, the other streams go on, and
    the stream gets a fresh monitor (no crash of the service loop, which did not catch it)."""
    created: list[StreamKey] = []
    boom = {"a": 1}

    class Flaky(StreamMonitor):
        def update_embeddings(self, vectors: np.ndarray, *rest: Any) -> list[Any]:
            out = super().update_embeddings(vectors, *rest)
            if boom.get(self.key.model, 0) and self.events > 60:
                boom[self.key.model] -= 1
                raise FloatingPointError("something no check foresaw")
            return out

    def factory(key: StreamKey, det: Any, baseline: Any) -> StreamMonitor:
        created.append(key)
        return Flaky(key, det, baseline)

    r = StreamRouter(settings(), monitor_factory=factory)
    rng = np.random.default_rng(0)
    first = Decoder().decode([msg(m, v) for v in rng.normal(size=(40, 4)) for m in ("a", "b")])
    assert r.route(first).rejections == []
    res = r.route(Decoder().decode([msg(m, v) for v in rng.normal(size=(30, 4)) for m in ("a", "b")]))
    assert [x.message_index for x in res.rejections] == list(range(0, 60, 2))
    assert {(x.reason, x.stream) for x in res.rejections} == {(Reason.PROCESSING_ERROR, StreamKey("a", "1"))}
    assert "FloatingPointError: something no check foresaw" in res.rejections[0].detail
    assert dict(res.accepted) == {(StreamKey("b", "1"), Kind.EMBEDDING): 30}
    assert StreamKey("a", "1") not in res.summaries
    assert res.failed == {(StreamKey("a", "1"), Kind.EMBEDDING)}
    assert created == [StreamKey("a", "1"), StreamKey("b", "1"), StreamKey("a", "1")]
    assert r.monitors[StreamKey("a", "1")].events == 0 and r.monitors[StreamKey("b", "1")].events == 70
    assert r.rejected == {"processing_error": 30}
    assert r.stream_rejected[StreamKey("a", "1")] == {"processing_error": 30}
    assert "Traceback" in caplog.text
    res = r.route(Decoder().decode([msg("a", v) for v in rng.normal(size=(10, 4))]))
    assert res.rejections == [] and r.monitors[StreamKey("a", "1")].events == 10


def test_a_model_comparison_goes_with_the_models_last_stream() -> None:
    """Kept, a replica that no longer owned a model (a rebalance) exported its comparison, and a
    dimension change in it, for ever; and the comparisons grew with every model ever seen."""
    r = StreamRouter(settings())
    x = np.random.default_rng(0).normal(size=(20, 4))
    r.route(Decoder().decode([msg("m", v, version=ver, ident=f"d{i}") for i, v in enumerate(x) for ver in ("1", "2")]))
    assert [res["model"] for res in r.version_results()] == ["m"]
    r.remove(StreamKey("m", "2"))
    assert [res["model"] for res in r.version_results()] == ["m"]  # version 1 still live
    r.remove(StreamKey("m", "1"))
    assert r.version_results() == [] and r.comparisons == {}
