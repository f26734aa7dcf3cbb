"""The per-batch histograms of Service.process against a batch numpy computation over the same events."""

from __future__ import annotations

import base64

import numpy as np
import orjson
import pytest

from embedwatch.app import Service
from embedwatch.config import Settings
from embedwatch.events import Kind, Message
from embedwatch.metrics_catalog import BY_NAME
from embedwatch.produce import EventGenerator, GeneratorConfig


def _histograms(svc: Service) -> dict[str, tuple[np.ndarray, float]]:
    """Per histogram name: (cumulative counts incl. +Inf, sum) of the only stream observed."""
    out = {}
    for name, _edges, series in svc.exporter.histograms.snapshot():
        assert len(series) == 1
        _labels, cum, total = series[0]
        out[name] = (cum, total)
    return out


def _expected(name: str, values: list[np.ndarray]) -> tuple[np.ndarray, float]:
    v = np.concatenate(values)
    edges = np.asarray(BY_NAME[name].buckets, dtype=np.float64)
    counts = np.bincount(np.searchsorted(edges, v, side="left"), minlength=edges.size + 1)
    return np.cumsum(counts), float(v.sum())


def _assert_histograms(svc: Service, norms: list[np.ndarray], sims: list[np.ndarray]) -> None:
    got = _histograms(svc)
    for name, values in (("embedwatch_embedding_norm", norms), ("embedwatch_similarity_to_baseline", sims)):
        want_cum, want_sum = _expected(name, values)
        cum, total = got[name]
        # float32 products against float64 ones: a value within 1e-6 of a bucket bound may land
        # on the other side, which these generated vectors never bring about
        np.testing.assert_array_equal(cum, want_cum, err_msg=name)
        assert total == pytest.approx(want_sum, rel=1e-6), name


@pytest.mark.parametrize("sizes", [[60, *[3] * 30], [60, 1, 2, 40, 5, 200]])
def test_norm_and_similarity_histograms_equal_a_batch_computation(sizes: list[int]) -> None:
    """Batches of a few events (observed value by value) and long ones: the norm histogram holds
    every event's norm, the similarity histogram every event's cosine to the stream's baseline
    centroid once the stream has one, each in the bucket numpy puts it in."""
    svc = Service(Settings(detection={"reference_size": 50, "window_events": 100,  # type: ignore[arg-type]
                                           "min_window_events": 91}))
    gen = EventGenerator(GeneratorConfig(streams=1, dim=24, seed=5, encoding="b64"))
    norms: list[np.ndarray] = []
    sims: list[np.ndarray] = []
    offset = 0
    for n in sizes:
        msgs = [Message(v, topic="embeddings", offset=offset + i, timestamp_ms=1_700_000_000_000, key=k)
                for i, (k, v) in enumerate(gen.messages(n, ts=1.7e9))]
        offset += n
        batch, rejections = svc.process(msgs, now=1.7e9 + 1)
        assert not rejections
        (block,) = batch.blocks
        assert block.kind is Kind.EMBEDDING and block.n == n
        x = block.vectors.astype(np.float64)
        nrm = np.linalg.norm(x, axis=1)
        norms.append(nrm)
        base = svc.router.monitors[block.stream].baseline
        if base is not None:  # the batch that completes the reference is compared with it too
            unit = base.mean / np.linalg.norm(base.mean)
            sims.append(x @ unit / nrm)
        _assert_histograms(svc, norms, sims)


def test_histograms_of_a_stream_sending_number_lists_and_base64_in_one_batch() -> None:
    """The decoder makes two blocks of such a batch, the router feeds its monitor one: the norms
    and similarities the monitor hands over cover both, so each block's are computed for it, and
    the histograms still hold every event once."""
    svc = Service(Settings(detection={"reference_size": 50, "window_events": 100,  # type: ignore[arg-type]
                                           "min_window_events": 91}))
    gen = EventGenerator(GeneratorConfig(streams=1, dim=24, seed=7, encoding="b64"))
    norms: list[np.ndarray] = []
    sims: list[np.ndarray] = []
    for batch_no, n in enumerate((60, 40, 40)):
        msgs = []
        for i, (k, v) in enumerate(gen.messages(n, ts=1.7e9)):
            if i % 2:  # every other event as a number list
                ev = orjson.loads(v)
                ev["embedding"] = np.frombuffer(base64.b64decode(ev.pop("embedding_b64")), "<f4").tolist()
                v = orjson.dumps(ev)
            msgs.append(Message(v, topic="embeddings", offset=100 * batch_no + i, timestamp_ms=1_700_000_000_000,
                                key=k))
        batch, rejections = svc.process(msgs, now=1.7e9 + 1)
        assert not rejections and len(batch.blocks) == 2
        x = np.concatenate([b.vectors for b in batch.blocks]).astype(np.float64)
        nrm = np.linalg.norm(x, axis=1)
        norms.append(nrm)
        base = svc.router.monitors[batch.blocks[0].stream].baseline
        if base is not None:
            sims.append(x @ (base.mean / np.linalg.norm(base.mean)) / nrm)
        _assert_histograms(svc, norms, sims)


def test_a_block_whose_update_raised_is_neither_counted_nor_observed() -> None:
    """Its events are dead-lettered (processing_error): embedwatch_events_total and the histograms
    hold the events the monitors took, those of the other stream of the batch."""
    from embedwatch.monitor import StreamMonitor

    class Boom(StreamMonitor):
        def update_embeddings(self, *a: object, **k: object) -> list:  # type: ignore[type-arg]
            raise RuntimeError("boom")

    svc = Service(Settings(detection={"reference_size": 50, "window_events": 100,  # type: ignore[arg-type]
                                           "min_window_events": 91}))
    svc.router._factory = lambda key, det, bl: (Boom if key.model == "bad" else StreamMonitor)(key, det, bl)
    rng = np.random.default_rng(3)
    msgs = [Message(orjson.dumps({"model": "bad" if i % 3 == 0 else "m", "model_version": "v1",
                                  "embedding": (rng.standard_normal(8) + 2).tolist()}),
                    topic="embeddings", offset=i, timestamp_ms=1_700_000_000_000) for i in range(30)]
    _, rejections = svc.process(msgs, now=1.7e9 + 1)
    assert {r.reason.value for r in rejections} == {"processing_error"} and len(rejections) == 10
    assert svc.exporter.counters.series("embedwatch_events_total") == {("m", "v1", "default", "embedding"): 20.0}
    for name, _edges, series in svc.exporter.histograms.snapshot():
        assert [labels[0] for labels, _cum, _total in series] == ["m"], name


def test_an_alarm_ended_by_a_baseline_change_through_the_api_is_recorded() -> None:
    """Activating a version ends an open alarm; the end was kept by the stream but left out of the
    service's alarms and its log."""
    from embedwatch.events import StreamKey

    key = StreamKey("m", "1")
    svc = Service(Settings(detection={"reference_size": 100, "window_events": 100,  # type: ignore[arg-type]
                                      "min_window_events": 91, "baseline_sample": 100}))
    rng = np.random.default_rng(1)

    def feed(n: int, shift: float, t0: float) -> None:
        x = rng.normal(size=(n, 8)) + 1.0 + shift
        svc.process([Message(orjson.dumps({"model": "m", "model_version": "1", "embedding": r.tolist(),
                                           "ts": t0 + i}), "embeddings") for i, r in enumerate(x)], now=1.7e9 + 1e4)

    feed(100, 0.0, 1.7e9)
    feed(400, 3.0, 1.7e9 + 100)
    assert svc.router.monitors[key].drifting and svc.alarms[-1].kind == "start"
    active = svc.baselines.active_id(key)
    assert active is not None
    svc.promote_baseline(key, active)  # re-activate it: a fresh window, the alarm ends
    assert not svc.router.monitors[key].drifting
    assert [(a.kind, a.stream) for a in svc.alarms[-2:]] == [("start", "m/1/default"), ("end", "m/1/default")]
