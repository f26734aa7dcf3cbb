"""Prometheus exposition: counters and vectorised histograms kept by the loop, gauges read at scrape.

The hot path never calls prometheus_client per event: histograms take whole numpy arrays
(:meth:`Histograms.observe`, one ``searchsorted`` + ``bincount`` per batch) and per-stream
detection gauges are read from the monitors when Prometheus scrapes. Names, types, labels and
help come from :mod:`embedwatch.metrics_catalog`.
"""

from __future__ import annotations

import bisect
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _untyped_go_float

from embedwatch import __version__
from embedwatch.fair_lock import FairRLock
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


#: Arrays up to this long are observed value by value (bisect into the bounds): with many streams a
#: block holds a few events, and four numpy calls per histogram cost more than that.
_FEW = 16


class Histograms:
    """Cumulative-bucket histograms fed with numpy arrays."""

    def __init__(self) -> None:
        self._buckets: dict[str, np.ndarray] = {}
        self._bounds: dict[str, list[float]] = {}  # the same upper bounds, as a list
        self._counts: dict[str, dict[LabelValues, np.ndarray]] = defaultdict(dict)
        self._sums: dict[str, dict[LabelValues, float]] = defaultdict(dict)

    def observe(self, name: str, labels: LabelValues, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        edges = self._buckets.get(name)
        if edges is None:
            edges = self._buckets[name] = np.asarray(BY_NAME[name].buckets, dtype=np.float64)
            self._bounds[name] = edges.tolist()
        if v.size <= _FEW:
            self._observe_few(name, labels, v.ravel().tolist())
            return
        v = v[np.isfinite(v)]
        if v.size == 0:
            return
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

    def _observe_few(self, name: str, labels: LabelValues, values: list[float]) -> None:
        """:meth:`observe` of a few values, one by one (same buckets: ``bisect_left`` is
        ``searchsorted(side="left")``)."""
        finite = [x for x in values if math.isfinite(x)]
        if not finite:
            return
        per = self._counts[name]
        counts = per.get(labels)
        if counts is None:
            counts = per[labels] = np.zeros(len(self._bounds[name]) + 1, dtype=np.int64)
            self._sums[name][labels] = 0.0
        bounds = self._bounds[name]
        for x in finite:
            counts[bisect.bisect_left(bounds, x)] += 1
        self._sums[name][labels] += sum(finite)

    def snapshot(self) -> list[tuple[str, np.ndarray, list[tuple[LabelValues, np.ndarray, float]]]]:
        """``[(name, upper bounds, [(labels, cumulative counts incl. +Inf, sum)])]``, copied."""
        # Snapshots of the dicts: a histogram first observed by another thread while a scrape runs
        # must not break the scrape ("dictionary changed size during iteration").
        out = []
        for name, per in list(self._counts.items()):
            sums = self._sums[name]
            out.append((name, self._buckets[name],
                        [(labels, np.cumsum(counts), sums.get(labels, 0.0)) for labels, counts in list(per.items())]))
        return out

    @staticmethod
    def families(snapshot: list[tuple[str, np.ndarray, list[tuple[LabelValues, np.ndarray, float]]]]
                 ) -> Iterator[Metric]:
        """prometheus_client families of a :meth:`snapshot`."""
        for name, edges, series in snapshot:
            m = BY_NAME[name]
            fam = HistogramMetricFamily(name, m.help, labels=list(m.labels))
            for labels, cum, total in series:
                buckets = [(_fmt(le), float(c)) for le, c in zip(edges, cum[:-1], strict=True)]
                buckets.append(("+Inf", float(cum[-1])))
                fam.add_metric(list(labels), buckets, total)
            yield fam

    def drop(self, predicate: Callable[[LabelValues], bool]) -> None:
        for name, per in self._counts.items():
            for k in [k for k in per if predicate(k)]:
                del per[k]
                del self._sums[name][k]


def _fmt(x: float) -> str:
    return repr(float(x))


def _go_float(x: float) -> str:
    """A sample value as prometheus_client writes it (Go's float formatting)."""
    out: str = _untyped_go_float(x)  # type: ignore[no-untyped-call]
    return out


def _label_value(v: str) -> str:
    return v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')


def _series_prefix(name: str, pairs: Iterable[tuple[str, str]]) -> str:
    """``name{a="x",b="y"} `` with label names sorted, as prometheus_client writes a sample."""
    body = ",".join(f'{k}="{_label_value(v)}"' for k, v in sorted(pairs))
    return f"{name}{{{body}}} " if body else f"{name} "


def _header(name: str, mtype: str, doc: str) -> str:
    doc = doc.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {doc}\n# TYPE {name} {mtype}\n"


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
        # Fair: the loop takes it again right after each release, and a scrape must still get in.
        self.lock = FairRLock()
        self.counters = Counters()
        self.histograms = Histograms()
        self.gauges: dict[str, dict[LabelValues, float]] = defaultdict(dict)
        # Callables evaluated at scrape time (per-stream detection measures, lag...).
        self.gauge_sources: list[GaugeSource] = []
        self._build = (__version__, f"{sys.version_info.major}.{sys.version_info.minor}")
        # Rendered text of each series' name and labels (see :meth:`text`): series repeat at every
        # scrape, so their label escaping and sorting is done once.
        self._prefixes: dict[tuple[str, LabelValues], Any] = {}

    def set_gauge(self, name: str, labels: LabelValues, value: float) -> None:
        self.gauges[name][labels] = value

    def collect(self) -> Iterator[Metric]:
        # The values are read under the lock, the families built after it is released: formatting
        # the exposition text must not hold up the service loop waiting on the lock.
        with self.lock:
            series = self._series_locked()
            hists = self.histograms.snapshot()
        for name, samples in series.items():
            fam = _family(name)
            for labels, v in samples:
                fam.add_metric(list(labels), v)
            yield fam
        yield from Histograms.families(hists)

    def _series_locked(self) -> dict[str, list[tuple[LabelValues, float]]]:
        """Every gauge and counter sample, by metric name in exposition order (a name appears
        from its first sample on: one with none is not exported)."""
        out: dict[str, list[tuple[LabelValues, float]]] = {"embedwatch_build_info": [(self._build, 1.0)]}
        for name, per in list(self.gauges.items()):
            if per:
                out.setdefault(name, []).extend(list(per.items()))
        for source in self.gauge_sources:
            for name, labels, v in source():
                if not math.isnan(v):
                    out.setdefault(name, []).append((labels, v))
        for name in list(self.counters._values):
            per = self.counters.series(name)
            if per:
                out.setdefault(name, []).extend(per.items())
        return out

    def text(self) -> str:
        """This collector's part of the text exposition (format 0.0.4).

        Byte for byte what ``prometheus_client.generate_latest`` writes for :meth:`collect` (a
        unit test holds it to that), several times faster: each series' name and escaped, sorted
        labels are rendered once and kept, so a scrape only formats the values. A scrape holds the
        GIL while it runs; with hundreds of streams prometheus_client's per-sample label escaping
        took a large share of the service's time.
        """
        with self.lock:
            series = self._series_locked()
            hists = self.histograms.snapshot()
        cache = self._prefixes
        if len(cache) > 200_000:  # label sets of streams that are gone
            cache.clear()
        out: list[str] = []
        add = out.append
        for name, samples in series.items():
            m = BY_NAME[name]
            sname = name.removesuffix("_total") + "_total" if m.type == "counter" else name
            add(_header(sname, m.type, m.help))
            for labels, v in samples:
                key = (name, labels)
                p = cache.get(key)
                if p is None:
                    p = cache[key] = _series_prefix(sname, zip(m.labels, labels, strict=False))
                add(p)
                add(_go_float(v))
                add("\n")
        for name, edges, hseries in hists:
            m = BY_NAME[name]
            add(_header(name, "histogram", m.help))
            les = [_fmt(le) for le in edges] + ["+Inf"]
            with_totals = float(les[0]) >= 0  # prometheus_client drops _count/_sum with a negative bound
            for labels, cum, total in hseries:
                key = (name, labels)
                p = cache.get(key)
                if p is None:
                    pairs = list(zip(m.labels, labels, strict=False))
                    p = cache[key] = ([_series_prefix(name + "_bucket", [*pairs, ("le", le)]) for le in les],
                                      _series_prefix(name + "_count", pairs), _series_prefix(name + "_sum", pairs))
                for bp, c in zip(p[0], cum.tolist(), strict=True):
                    add(bp)
                    add(_go_float(c))
                    add("\n")
                if with_totals:
                    add(p[1])
                    add(_go_float(cum[-1]))
                    add("\n")
                    add(p[2])
                    add(_go_float(total))
                    add("\n")
        return "".join(out)


class ExporterRegistry(CollectorRegistry):
    """The registry /metrics serves: the :class:`Exporter` first, then the process collectors.

    A plain :class:`CollectorRegistry` for prometheus_client (``generate_latest(registry)``
    works); :meth:`exposition` gives the same bytes faster (see :meth:`Exporter.text`).
    """

    def __init__(self, exporter: Exporter, process_metrics: bool = True) -> None:
        super().__init__(auto_describe=False)
        self.exporter = exporter
        self.register(exporter)
        self._others = CollectorRegistry(auto_describe=False)
        if process_metrics:
            from prometheus_client import GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR

            for c in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                self.register(c)
                self._others.register(c)

    def exposition(self) -> bytes:
        """``generate_latest(self)``, byte for byte."""
        return self.exporter.text().encode("utf-8") + generate_latest(self._others)


def make_registry(exporter: Exporter, process_metrics: bool = True) -> ExporterRegistry:
    return ExporterRegistry(exporter, process_metrics)


def labels_of(*parts: Any) -> LabelValues:
    return tuple(str(p) for p in parts)
