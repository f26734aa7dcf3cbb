"""The vectorised exporter must expose exactly what prometheus_client would for the same values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from embedwatch.exporter import Exporter, make_registry
from embedwatch.metrics_catalog import BY_NAME, METRICS, NORM_BUCKETS


def samples(text: bytes, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            if s.name.startswith(name):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@settings(max_examples=50, deadline=None)
@given(st.lists(st.lists(st.floats(min_value=0, max_value=64, allow_nan=False), max_size=50), max_size=5))
def test_histogram_matches_prometheus_client(batches: list[list[float]]) -> None:
    name = "embedwatch_embedding_norm"
    ref_reg = CollectorRegistry()
    ref = Histogram(name, BY_NAME[name].help, ["model", "model_version", "segment"], buckets=NORM_BUCKETS,
                    registry=ref_reg)
    ex = Exporter()
    for b in batches:
        for v in b:
            ref.labels("m", "1", "default").observe(v)
        ex.histograms.observe(name, ("m", "1", "default"), np.array(b))
    got = samples(generate_latest(make_registry(ex, process_metrics=False)), name)
    want = {k: v for k, v in samples(generate_latest(ref_reg), name).items() if not k[0].endswith("_created")}
    if not any(batches):
        assert got == {}
        return
    assert got.keys() == want.keys()
    for k in want:
        assert np.isclose(got[k], want[k], rtol=1e-12, atol=1e-9), k


@pytest.mark.parametrize("repeat", [1, 20])  # a few values (observed one by one) and an array
def test_non_finite_values_are_not_observed(repeat: int) -> None:
    ex = Exporter()
    values = np.tile([np.nan, 1.0, np.inf, -np.inf], repeat)
    ex.histograms.observe("embedwatch_embedding_norm", ("m", "1", "d"), values)
    text = generate_latest(make_registry(ex, process_metrics=False))
    assert list(samples(text, "embedwatch_embedding_norm_count").values()) == [float(repeat)]
    assert list(samples(text, "embedwatch_embedding_norm_sum").values()) == [float(repeat)]


def test_counters_and_gauges_exposed_with_catalog_help() -> None:
    ex = Exporter()
    ex.counters.inc("embedwatch_events_total", ("m", "1", "d", "embedding"), 5)
    ex.counters.inc("embedwatch_events_total", ("m", "1", "d", "embedding"), 2)
    ex.set_gauge("embedwatch_kafka_connected", (), 1.0)
    ex.gauge_sources.append(lambda: [("embedwatch_drift_score", ("m", "1", "d"), 0.5),
                                     ("embedwatch_drift_p_value", ("m", "1", "d"), float("nan"))])
    text = generate_latest(make_registry(ex, process_metrics=False)).decode()
    assert 'embedwatch_events_total{kind="embedding",model="m",model_version="1",segment="d"} 7.0' in text
    assert "embedwatch_kafka_connected 1.0" in text
    assert 'embedwatch_drift_score{model="m",model_version="1",segment="d"} 0.5' in text
    assert "embedwatch_drift_p_value{" not in text  # NaN = not computed yet: no sample
    assert f"# HELP embedwatch_drift_score {BY_NAME['embedwatch_drift_score'].help}" in text


def test_catalog_is_consistent() -> None:
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for m in METRICS:
        assert m.name.startswith("embedwatch_")
        assert (m.type == "counter") == m.name.endswith("_total"), m.name
        assert (m.type == "histogram") == bool(m.buckets), m.name
        assert list(m.buckets) == sorted(m.buckets)
        assert "id" not in m.labels  # never an unbounded label


def test_metrics_doc_is_current() -> None:
    from pathlib import Path

    from embedwatch.metrics_catalog import reference_markdown

    committed = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text(encoding="utf-8")
    assert committed == reference_markdown(), "run `make docs` to regenerate docs/metrics.md"


labels3 = st.tuples(st.text(max_size=6), st.sampled_from(["1", 'v"2', "a\\b", "x\ny", "é✓"]), st.text(max_size=3))


@settings(max_examples=60, deadline=None)
@given(counts=st.lists(st.tuples(labels3, st.integers(0, 10**12)), max_size=6),
       gauges=st.lists(st.tuples(labels3, st.floats(allow_nan=True, allow_infinity=True)), max_size=6),
       hists=st.lists(st.tuples(st.sampled_from(["embedwatch_embedding_norm", "embedwatch_similarity_to_baseline"]),
                                labels3, st.lists(st.floats(-2, 70, allow_nan=False), min_size=1, max_size=20)),
                      max_size=4),
       emptied=st.booleans())
def test_fast_exposition_is_byte_for_byte_prometheus_client(
        counts: list[tuple[tuple[str, str, str], int]], gauges: list[tuple[tuple[str, str, str], float]],
        hists: list[tuple[str, tuple[str, str, str], list[float]]], emptied: bool) -> None:
    ex = Exporter()
    for lab, n in counts:
        ex.counters.inc("embedwatch_events_total", (*lab, "embedding"), n)
    for lab, v in gauges:
        ex.set_gauge("embedwatch_drift_score", lab, v)
    ex.gauge_sources.append(lambda: [("embedwatch_drift_p_value", lab, v) for lab, v in gauges])
    ex.set_gauge("embedwatch_kafka_connected", (), 1.0)
    for name, lab, vals in hists:
        ex.histograms.observe(name, lab, np.array(vals))
    if emptied:  # a metric whose every series was dropped is not exported at all
        ex.counters.drop("embedwatch_events_total", lambda _: True)
        ex.gauges["embedwatch_drift_score"].clear()
    reg = make_registry(ex, process_metrics=False)
    for _ in range(2):  # the second time from the cached series prefixes
        assert reg.exposition() == generate_latest(reg)
    # With the process collectors (whose values move between two scrapes): the same families.
    full = make_registry(ex)
    fams = [f.name for f in text_string_to_metric_families(full.exposition().decode())]
    assert fams == [f.name for f in text_string_to_metric_families(generate_latest(full).decode())]
    assert "process_cpu_seconds" in fams
