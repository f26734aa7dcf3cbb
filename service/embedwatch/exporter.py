"""Prometheus exposition: counters and vectorised histograms kept by the loop, gauges read at scrape.

The hot path never calls prometheus_client per event: histograms take whole numpy arrays
(:meth:`Histograms.observe`, one ``searchsorted`` + ``bincount`` per batch) and per-stream
detection gauges are read from the monitors when Prometheus scrapes. Names, types, labels and
help come from :mod:`embedwatch.metrics_catalog`.
"""

from __future__ import annotations

import math
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from embedwatch import __version__
from embedwatch.metrics_catalog import BY_NAME

LabelValues = tuple[str, ...]


class Counters:
    """Labelled counters: ``inc(name, labels, n)``; thread-safe through the exporter's lock."""

    def __init__(self) -> None:
        self._values: dict[str, dict[LabelValues, float]] = defaultdict(lambda: defaultdict(float))

    def inc(self, name: str, labels: LabelValues = (), n: float = 1.0) -> None:
        self._values[name][labels] += n

    def set(self, name: str, labels: LabelValues, value: float) -> None:
        self._values[name][labels] = value

    def get(self, name: str, labels: LabelValues = ()) -> float:
        return self._values.get(name, {}).get(labels, 0.0)

    def total(self, name: str) -> float:
        return float(sum(self._values.get(name, {}).values()))

    def series(self, name: str) -> dict[LabelValues, float]:
        return dict(self._values.get(name, {}))

    def drop(self, name: str, predicate: Callable[[LabelValues], bool]) -> None:
        d = self._values.get(name)
        if d:
            for k in [k for k in d if predicate(k)]:
                del d[k]


class Histograms:
    """Cumulative-bucket histograms fed with numpy arrays."""

    def __init__(self) -> None:
        self._buckets: dict[str, np.ndarray] = {}
        self._counts: dict[str, dict[LabelValues, np.ndarray]] = defaultdict(dict)
        self._sums: dict[str, dict[LabelValues, float]] = defaultdict(dict)

    def observe(self, name: str, labels: LabelValues, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return
        edges = self._buckets.get(name)
        if edges is None:
            edges = self._buckets[name] = np.asarray(BY_NAME[name].buckets, dtype=np.float64)
        # side="left": a value equal to an upper bound ``le`` belongs to that bucket.
        idx = np.searchsorted(edges, v, side="left")
        counts = np.bincount(idx, minlength=edges.size + 1)
        per = self._counts[name]
        if labels in per:
            per[labels] += counts
            self._sums[name][labels] += float(v.sum())
        else:
            per[labels] = counts.astype(np.int64)
            self._sums[name][labels] = float(v.sum())

    def families(self) -> Iterator[Metric]:
        # Snapshots of the dicts: a histogram first observed by another thread while a scrape runs
        # must not break the scrape ("dictionary changed size during iteration").
        for name, per in list(self._counts.items()):
            m = BY_NAME[name]
            fam = HistogramMetricFamily(name, m.help, labels=list(m.labels))
            edges = self._buckets[name]
            sums = self._sums[name]
            for labels, counts in list(per.items()):
                cum = np.cumsum(counts)
                buckets = [(_fmt(le), float(c)) for le, c in zip(edges, cum[:-1], strict=True)]
                buckets.append(("+Inf", float(cum[-1])))
                fam.add_metric(list(labels), buckets, sums.get(labels, 0.0))
            yield fam

    def drop(self, predicate: Callable[[LabelValues], bool]) -> None:
        for name, per in self._counts.items():
            for k in [k for k in per if predicate(k)]:
                del per[k]
                del self._sums[name][k]


def _fmt(x: float) -> str:
    return repr(float(x))


def _family(name: str) -> GaugeMetricFamily | CounterMetricFamily:
    m = BY_NAME[name]
    if m.type == "counter":
        # prometheus_client appends _total itself.
        return CounterMetricFamily(name.removesuffix("_total"), m.help, labels=list(m.labels))
    return GaugeMetricFamily(name, m.help, labels=list(m.labels))


GaugeSource = Callable[[], Iterable[tuple[str, LabelValues, float]]]


class Exporter(Collector):
    """Collects everything embedwatch exports; register it on a fresh :class:`CollectorRegistry`."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.counters = Counters()
        self.histograms = Histograms()
        self.gauges: dict[str, dict[LabelValues, float]] = defaultdict(dict)
        # Callables evaluated at scrape time (per-stream detection measures, lag...).
        self.gauge_sources: list[GaugeSource] = []

    def set_gauge(self, name: str, labels: LabelValues, value: float) -> None:
        self.gauges[name][labels] = value

    def collect(self) -> Iterator[Metric]:
        # Families are built under the lock, then handed out after it is released: formatting the
        # exposition text (prometheus_client) must not hold up the service loop waiting on the lock.
        with self.lock:
            out = list(self._collect_locked())
        yield from out

    def _collect_locked(self) -> Iterator[Metric]:
        fams: dict[str, GaugeMetricFamily | CounterMetricFamily] = {}

        def fam(name: str) -> GaugeMetricFamily | CounterMetricFamily:
            f = fams.get(name)
            if f is None:
                f = fams[name] = _family(name)
            return f

        fam("embedwatch_build_info").add_metric(
            [__version__, f"{sys.version_info.major}.{sys.version_info.minor}"], 1.0
        )
        for name, per in list(self.gauges.items()):
            for labels, v in list(per.items()):
                fam(name).add_metric(list(labels), v)
        for source in self.gauge_sources:
            for name, labels, v in source():
                if not math.isnan(v):
                    fam(name).add_metric(list(labels), v)
        for name in list(self.counters._values):
            for labels, v in self.counters.series(name).items():
                fam(name).add_metric(list(labels), v)
        yield from fams.values()
        yield from self.histograms.families()


def make_registry(exporter: Exporter, process_metrics: bool = True) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(exporter)
    if process_metrics:
        from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

        for c in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            registry.register(c)
    return registry


def labels_of(*parts: Any) -> LabelValues:
    return tuple(str(p) for p in parts)
