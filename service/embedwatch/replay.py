"""Offline replay: run the service's detectors over a JSONL file of events (docs/replay.md).

``embedwatch replay EVENTS.jsonl --report REPORT.json [--config FILE] [--reference-size N]``
is a contract (DESIGN.md, "Offline replay"). The file holds one JSON event per line, in stream
order. Lines are decoded by :class:`~embedwatch.events.Decoder` in chunks, as messages of the
embeddings topic without a Kafka timestamp, and routed by the same
:class:`~embedwatch.router.StreamRouter` as the live service, so the detectors, the stream cap
and the dimension checks are exactly those of ``embedwatch run`` with the same configuration.
Events without ``ts`` get timestamp 0 (there is no Kafka timestamp to default to), which keeps a
report reproducible; give ``ts`` if the time bound of the window matters.

``embedwatch baseline build EVENTS.jsonl -o FILE`` (:func:`build_baseline`) builds baselines
from the first ``reference_size`` accepted events of each stream (all of them if fewer).
"""

from __future__ import annotations

import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

import numpy as np
import orjson

from embedwatch.baseline import Baseline
from embedwatch.baseline_store import safe_name, save_file
from embedwatch.config import DetectionSettings, Settings
from embedwatch.events import DecodedBatch, DecodeLimits, Decoder, Message, Reason, StreamKey
from embedwatch.monitor import Alarm, StreamMonitor
from embedwatch.router import StreamRouter

CHUNK_LINES = 2000


def make_decoder(settings: Settings) -> Decoder:
    """The decoder the service builds from ``settings`` (embedding events only: no query topic)."""
    lim = settings.limits
    return Decoder(DecodeLimits(
        max_message_bytes=lim.max_message_bytes,
        max_dim=lim.max_dim,
        max_events_per_message=lim.max_events_per_message,
        max_label_length=lim.max_label_length,
        precision_k=settings.detection.precision_k,
    ))


def with_reference_size(settings: Settings, reference_size: int | None) -> Settings:
    """``settings`` with ``detection.reference_size`` replaced (a copy; None: unchanged)."""
    if reference_size is None:
        return settings
    if reference_size < 1:
        raise ValueError(f"reference size must be >= 1, got {reference_size}")
    detection = settings.detection.model_copy(update={"reference_size": int(reference_size)})
    return settings.model_copy(update={"detection": detection})


class _Progress:
    """One status line on stderr, at most once a second: lines, lines/s, % of the file by bytes."""

    def __init__(self, total_bytes: int, stream: TextIO | None, interval: float = 1.0) -> None:
        self.total = max(total_bytes, 1)
        self.out = stream
        self.interval = interval
        self.t0 = self.last = time.monotonic()
        self.shown = False

    def update(self, lines: int, done_bytes: int, final: bool = False) -> None:
        if self.out is None:
            return
        now = time.monotonic()
        if not final and now - self.last < self.interval:
            return
        if final and not self.shown:
            return
        self.last = now
        self.shown = True
        rate = lines / max(now - self.t0, 1e-9)
        end = "\n" if final else ""
        self.out.write(f"\rreplay: {lines:,} lines  {rate:,.0f} lines/s  "
                       f"{100.0 * done_bytes / self.total:5.1f}%{end}")
        self.out.flush()


def read_chunks(path: Path, chunk_lines: int = CHUNK_LINES) -> Iterator[tuple[list[bytes], int]]:
    """Non-blank lines of ``path`` in chunks, with the bytes read so far."""
    done = 0
    chunk: list[bytes] = []
    with path.open("rb") as f:
        for line in f:
            done += len(line)
            line = line.strip()
            if line:
                chunk.append(line)
                if len(chunk) >= chunk_lines:
                    yield chunk, done
                    chunk = []
    if chunk:
        yield chunk, done


def _clean(value: Any) -> Any:
    """JSON-able: numpy scalars to Python, NaN/Inf to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class _StreamLog:
    alarms: list[dict[str, Any]]
    changepoints: list[dict[str, Any]]


def _alarm_entry(a: Alarm) -> dict[str, Any]:
    return {"index": int(a.index), "ts": float(a.ts), "detector": str(a.detector),
            "score": float(a.score), "p_value": None if a.p_value is None else float(a.p_value)}


def _drive(
    events_path: Path,
    settings: Settings,
    router: StreamRouter,
    progress: bool,
    on_batch: Callable[[DecodedBatch], DecodedBatch] | None = None,
    on_alarms: Callable[[list[Alarm]], None] | None = None,
) -> int:
    """Decode ``events_path`` chunk by chunk and route it; returns the number of lines read."""
    decoder = make_decoder(settings)
    topic = settings.kafka.embeddings_topic
    total = events_path.stat().st_size
    bar = _Progress(total, sys.stderr if progress else None)
    lines = 0
    for chunk, done in read_chunks(events_path):
        batch = decoder.decode([Message(value=line, topic=topic, timestamp_ms=None) for line in chunk], now=0.0)
        if on_batch is not None:
            batch = on_batch(batch)
        result = router.route(batch)
        if on_alarms is not None:
            on_alarms(result.alarms)
        lines += len(chunk)
        bar.update(lines, done)
    bar.update(lines, total, final=True)
    return lines


def run_replay(
    events_path: str | Path,
    report_path: str | Path | None,
    settings: Settings,
    reference_size: int | None = None,
    progress: bool = True,
    out: TextIO | None = None,
) -> dict[str, Any]:
    """Replay ``events_path``; write the report (contract layout) to ``report_path`` unless None,
    print a per-stream summary table to ``out`` (default stdout; ``progress=False`` and
    ``out=None`` from tests is fine), and return the report."""
    events_path = Path(events_path)
    settings = with_reference_size(settings, reference_size)
    # Offline, memory is not what limits: every model keeps version_probe_size ids from its first
    # version on, so a file of the old version followed by the new one pairs as fully as an
    # interleaved dual write (the service keeps only version_solo_probe_size per single-version model).
    d = settings.detection
    settings = settings.model_copy(update={"detection": d.model_copy(
        update={"version_solo_probe_size": d.version_probe_size})})
    ref = settings.detection.reference_size
    router = StreamRouter(settings)
    logs: dict[StreamKey, _StreamLog] = {}

    def on_alarms(alarms: list[Alarm]) -> None:
        for a in alarms:
            key = StreamKey.parse(a.stream)
            log = logs.setdefault(key, _StreamLog([], []))
            if a.index < ref:
                continue  # contract: the reference events never alarm
            if a.detector == "changepoint":
                log.changepoints.append(_alarm_entry(a))
            elif a.kind == "start":
                log.alarms.append(_alarm_entry(a))

    seen_changepoints: dict[StreamKey, int] = {}

    def collect_changepoints(_alarms: list[Alarm]) -> None:
        # Change points are not returned by update_embeddings: read the new ones after each chunk.
        for key, mon in router.monitors.items():
            count = int(mon.counters().get("changepoints", 0))
            new = count - seen_changepoints.get(key, 0)
            if new > 0:
                seen_changepoints[key] = count
                on_alarms(mon.changepoints()[-new:])

    def on_chunk(alarms: list[Alarm]) -> None:
        on_alarms(alarms)
        collect_changepoints(alarms)

    t0 = time.monotonic()
    lines = _drive(events_path, settings, router, progress, on_alarms=on_chunk)
    elapsed = time.monotonic() - t0
    report = build_report(router, logs, ref)
    if report_path is not None:
        Path(report_path).parent.mkdir(parents=True, exist_ok=True)
        Path(report_path).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    print_summary(report, lines, elapsed, out if out is not None else sys.stdout)
    return report


def build_report(router: StreamRouter, logs: dict[StreamKey, Any], reference_size: int) -> dict[str, Any]:
    streams: dict[str, Any] = {}
    for key in sorted(router.monitors, key=str):
        mon = router.monitors[key]
        log = logs.get(key) or _StreamLog([], [])
        summary: dict[str, Any] = dict(mon.measures())
        summary.update(mon.counters())
        entry: dict[str, Any] = {
            "events": int(mon.events),
            "rejected": int(sum(router.stream_rejected.get(key, Counter()).values())),
            "reference_size": int(reference_size),
            "alarms": log.alarms,
            "summary": summary,
        }
        if log.changepoints:
            entry["changepoints"] = log.changepoints
        streams[str(key)] = entry
    report: dict[str, Any] = {
        "streams": streams,
        "rejected": {reason: int(n) for reason, n in sorted(router.rejected.items())},
        "version_comparisons": router.version_results(),
    }
    return cast(dict[str, Any], _clean(report))


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def print_summary(report: dict[str, Any], lines: int, elapsed: float, out: TextIO) -> None:
    """A readable per-stream table of a report."""
    rows = [("stream", "events", "rejected", "alarms", "first alarm", "drift score", "p-value",
             "centroid dist", "drifting")]
    for name, s in report["streams"].items():
        summ = s["summary"]
        first = s["alarms"][0]["index"] if s["alarms"] else None
        rows.append((name, str(s["events"]), str(s["rejected"]), str(len(s["alarms"])), _fmt(first),
                     _fmt(summ.get("drift_score")), _fmt(summ.get("drift_p_value")),
                     _fmt(summ.get("centroid_cosine_distance")),
                     "yes" if summ.get("drift_detected") else "no"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        out.write("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths,
                                                                                             strict=True))))
        out.write("\n")
        if j == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")
    rej = report["rejected"]
    out.write("rejected: " + (", ".join(f"{k}={v}" for k, v in rej.items()) if rej else "none") + "\n")
    for c in report.get("version_comparisons", []):
        out.write(f"version {c['model']} {c['model_version']} vs {c['reference_version']}: "
                  f"paired cosine {_fmt(c['paired_cosine'])}, knn overlap {_fmt(c['knn_overlap'])}, "
                  f"shared ids {c['shared_ids']}"
                  f"{', DIMENSION CHANGED' if c['dimension_changed'] else ''}\n")
    out.write(f"{lines:,} lines in {elapsed:.2f}s ({lines / max(elapsed, 1e-9):,.0f} lines/s)\n")
    out.flush()


# -- baseline build -------------------------------------------------------------------------------


class _Collector:
    """Stands in for a StreamMonitor during ``baseline build``: keeps the first ``limit`` vectors."""

    def __init__(self, key: StreamKey, limit: int) -> None:
        self.key = key
        self.limit = limit
        self.baseline: Baseline | None = None
        self.expected_dim: int | None = None
        self.events = 0
        self.vectors: list[np.ndarray] = []
        self.ts: list[np.ndarray] = []

    def update_embeddings(self, vectors: np.ndarray, ts: np.ndarray, latency_s: np.ndarray,
                          ids: Sequence[str | None]) -> list[Alarm]:
        if self.expected_dim is None:
            self.expected_dim = int(vectors.shape[1])
        room = self.limit - self.events
        if room > 0:
            self.vectors.append(vectors[:room])
            self.ts.append(ts[:room])
        self.events += int(vectors.shape[0])
        return []

    def take_summary(self) -> None:
        return None  # nothing is monitored

    def update_queries(self, *args: Any, **kwargs: Any) -> list[Alarm]:
        return []


def baseline_file_path(out_path: Path, stream: StreamKey, several: bool) -> Path:
    """Where :func:`build_baseline` writes a stream's pair: ``out_path`` itself for one stream,
    ``<stem>.<model+model_version+segment>.npz`` (``safe_name``) for several."""
    stem = out_path.with_suffix("") if out_path.suffix in (".npz", ".json") else out_path
    if not several:
        return stem.with_name(stem.name + ".npz")
    return stem.with_name(f"{stem.name}.{safe_name(stream)}.npz")


def build_baseline(
    events_path: str | Path,
    out_path: str | Path,
    settings: Settings,
    stream: str | None = None,
    reference_size: int | None = None,
) -> list[dict[str, Any]]:
    """Build a baseline per stream of ``events_path`` (or only ``stream``, "model/version/segment")
    from its first ``detection.reference_size`` accepted events (all if fewer), with the service's
    validation. One stream: ``out_path`` (``X.npz`` + ``X.json``); several: one pair per stream,
    ``X.<model+model_version+segment>.npz``. Returns the metadata of each, plus ``"path"``."""
    events_path, out_path = Path(events_path), Path(out_path)
    settings = with_reference_size(settings, reference_size)
    limit = settings.detection.reference_size
    only = StreamKey.parse(stream) if stream is not None else None
    collectors: dict[StreamKey, _Collector] = {}

    def factory(key: StreamKey, _d: DetectionSettings, _b: Baseline | None) -> StreamMonitor:
        c = collectors[key] = _Collector(key, limit)
        return cast(StreamMonitor, c)

    def keep(batch: DecodedBatch) -> DecodedBatch:
        if only is None:
            return batch
        batch.blocks = [b for b in batch.blocks if b.stream == only]
        batch.rejections = [r for r in batch.rejections if r.stream == only]
        return batch

    router = StreamRouter(settings, monitor_factory=factory)
    _drive(events_path, settings, router, progress=False, on_batch=keep)
    if only is not None and only not in collectors:
        raise ValueError(f"no accepted events of stream {only} in {events_path}")
    if not collectors:
        raise ValueError(f"no accepted events in {events_path}")
    several = len(collectors) > 1
    out: list[dict[str, Any]] = []
    for key in sorted(collectors, key=str):
        c = collectors[key]
        vectors = np.concatenate(c.vectors)
        ts = np.concatenate(c.ts)
        baseline = Baseline.from_vectors(
            key, vectors, ts=ts, settings=settings.detection, source=f"file:{events_path.name}",
        )
        path = baseline_file_path(out_path, key, several)
        save_file(baseline, path)
        md = dict(baseline.metadata)
        md["path"] = str(path)
        out.append(md)
    return out


__all__ = [
    "Reason",
    "baseline_file_path",
    "build_baseline",
    "build_report",
    "make_decoder",
    "print_summary",
    "read_chunks",
    "run_replay",
    "with_reference_size",
]
