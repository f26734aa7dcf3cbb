"""Offline replay: run the service's detectors over a JSONL file of events (docs/replay.md).

``embedwatch replay EVENTS.jsonl --report REPORT.json [--config FILE] [--reference-size N]
[--baseline FILE ...]`` is a contract (DESIGN.md, "Offline replay"). The file holds one JSON
event per line, in stream order. Lines are decoded by :class:`~embedwatch.events.Decoder` in
chunks, as messages without a Kafka timestamp, and routed by the same
:class:`~embedwatch.router.StreamRouter` as the live service, so the detectors, the stream cap
and the dimension checks are exactly those of ``embedwatch run`` with the same configuration.
A line has no topic to tell a query event by: an event carrying ``query_id``, ``results`` or
``relevant_ids`` is a query event (monitored as the service monitors its queries topic), any
other an embedding event.
Events without ``ts`` get timestamp 0 (there is no Kafka timestamp to default to), which keeps a
report reproducible; give ``ts`` if the time bound of the window matters. A stream given a
baseline file (``--baseline``, written by ``baseline build``) is monitored against it from its
first event, as the service monitors a stream whose baseline is in its store.

``embedwatch baseline build EVENTS.jsonl -o FILE`` (:func:`build_baseline`) builds baselines
from the first ``reference_size`` accepted events of each stream (all of them if fewer; a stream
with fewer than 50 is skipped with a warning).
"""

from __future__ import annotations

import errno
import math
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

import numpy as np
import orjson
from pydantic import ValidationError

from embedwatch.baseline import Baseline
from embedwatch.baseline_store import (
    BaselineIntegrityError,
    BaselineNotFoundError,
    MemoryBaselineStore,
    load_file,
    safe_name,
    save_file,
)
from embedwatch.config import ConfigError, DetectionSettings, Settings
from embedwatch.events import DecodedBatch, DecodeLimits, Decoder, Kind, Message, Reason, StreamKey
from embedwatch.monitor import MIN_PROMOTED_EVENTS, Alarm, StreamMonitor
from embedwatch.router import RouteResult, StreamRouter

CHUNK_LINES = 2000
#: Change points listed per stream in a report; more are counted in ``changepoints_omitted``
#: (a stream flapping on every event must not make the report, or the replay's memory, unbounded).
MAX_REPORT_CHANGEPOINTS = 10_000


class ReplayError(Exception):
    """A problem with what replay was given (a missing file, an unknown stream, a bad baseline
    file...): the CLI prints the message on one line and exits with ``status``."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def make_decoder(settings: Settings) -> Decoder:
    """The decoder the service builds from ``settings``, telling query events by their fields
    (a file's lines have no topic; docs/replay.md)."""
    lim = settings.limits
    return Decoder(DecodeLimits(
        max_message_bytes=lim.max_message_bytes,
        max_dim=lim.max_dim,
        max_events_per_message=lim.max_events_per_message,
        max_label_length=lim.max_label_length,
        precision_k=settings.detection.precision_k,
        max_future_skew_s=lim.max_future_skew_s,
    ), kind_by_fields=True)


def with_reference_size(settings: Settings, reference_size: int | None) -> Settings:
    """``settings`` with ``detection.reference_size`` replaced (a copy; None: unchanged), checked
    as the configuration checks it: :class:`ConfigError` when out of range."""
    if reference_size is None:
        return settings
    # Validated through the section's model (model_copy(update=) would not run its checks). Not
    # through Settings: that would read the EMBEDWATCH_* variables again, which would win over
    # the command-line value.
    try:
        detection = DetectionSettings.model_validate(
            {**settings.detection.model_dump(), "reference_size": reference_size})
    except ValidationError as e:
        problems = "; ".join(
            f"detection.{'.'.join(str(p) for p in err['loc']) or 'reference_size'}: {err['msg']}"
            for err in e.errors())
        raise ConfigError(f"invalid --reference-size {reference_size}: {problems}") from None
    return settings.model_copy(update={"detection": detection})


def check_readable(path: Path) -> None:
    """:class:`ReplayError` unless ``path`` opens for reading (missing, a directory, no permission)."""
    try:
        with path.open("rb"):
            pass
    except OSError as e:
        raise ReplayError(f"cannot read {path}: {e.strerror or e}") from None


def check_writable(path: Path) -> None:
    """:class:`ReplayError` unless ``path`` can be written (its missing parent directories
    created): checked before a replay, which may run for minutes, rather than found when the
    report is written at its end. Creates nothing."""
    try:
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if path.parent.is_dir():
            existed = path.exists()
            with path.open("ab"):  # appends nothing: an existing file is left as it is
                pass
            if not existed:
                path.unlink()
            return
        ancestor = next(p for p in (path.parent, *path.parent.parents) if p.exists())
        if not ancestor.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as e:
        raise ReplayError(f"cannot write {path}: {e.strerror or e}") from None


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
    changepoints_omitted: int = 0


class _ReplayMonitor(StreamMonitor):
    """The service's monitor, keeping every change point until the replay takes them: the
    service's monitor keeps the last 100 (its API shows recent ones), and one chunk of lines can
    hold more than 100 events' worth of change points of a stream (array lines, small
    ``changepoint_min_instances``)."""

    def __init__(self, key: StreamKey, settings: DetectionSettings, baseline: Baseline | None = None) -> None:
        super().__init__(key, settings, baseline)
        self._changepoints = deque()  # unbounded: emptied by take_changepoints after each chunk

    def take_changepoints(self) -> list[Alarm]:
        taken = list(self._changepoints)
        self._changepoints.clear()
        return taken


def load_baselines(paths: Sequence[str | Path]) -> dict[StreamKey, Baseline]:
    """The baselines of files written by ``baseline build`` (``X.npz``, ``X.json`` or ``X``),
    by stream; :class:`ReplayError` for a missing or damaged file, or two files of one stream."""
    out: dict[StreamKey, Baseline] = {}
    origin: dict[StreamKey, str] = {}
    for path in paths:
        try:
            b = load_file(path)
        except (BaselineNotFoundError, BaselineIntegrityError) as e:
            raise ReplayError(f"baseline {path}: {e}") from None
        except (OSError, ValueError) as e:  # unreadable, not an npz, bad metadata
            raise ReplayError(f"baseline {path}: cannot load it: {e}") from None
        if b.key in out:
            raise ReplayError(f"baselines {origin[b.key]} and {path} are both of stream {b.key}")
        out[b.key] = b
        origin[b.key] = str(path)
    return out


def _alarm_entry(a: Alarm) -> dict[str, Any]:
    return {"index": int(a.index), "ts": float(a.ts), "detector": str(a.detector),
            "score": float(a.score), "p_value": None if a.p_value is None else float(a.p_value)}


def _drive(
    events_path: Path,
    settings: Settings,
    router: StreamRouter,
    progress: bool,
    on_batch: Callable[[DecodedBatch], DecodedBatch] | None = None,
    on_result: Callable[[RouteResult], None] | None = None,
) -> int:
    """Decode ``events_path`` chunk by chunk and route it; returns the number of lines read."""
    check_readable(events_path)
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
        if on_result is not None:
            on_result(result)
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
    baselines: Mapping[StreamKey, Baseline] | None = None,
) -> dict[str, Any]:
    """Replay ``events_path``; write the report (contract layout) to ``report_path`` unless None,
    print a per-stream summary table to ``out`` (default stdout; ``progress=False`` and
    ``out=None`` from tests is fine), and return the report.

    ``baselines`` (:func:`load_baselines`): streams monitored against the given baseline from
    their first event, as the service monitors a stream whose baseline is in its store; the other
    streams build theirs from their first ``reference_size`` events. :class:`ReplayError` when
    the events cannot be read or the report cannot be written (checked before replaying);
    :class:`~embedwatch.config.ConfigError` for a bad ``reference_size``."""
    events_path = Path(events_path)
    settings = with_reference_size(settings, reference_size)
    check_readable(events_path)
    if report_path is not None:
        check_writable(Path(report_path))
    given: Mapping[StreamKey, Baseline] = baselines or {}
    # Offline, memory is not what limits: every model keeps version_probe_size ids from its first
    # version on, so a file of the old version followed by the new one pairs as fully as an
    # interleaved dual write (the service keeps only version_solo_probe_size per single-version model).
    d = settings.detection
    settings = settings.model_copy(update={"detection": d.model_copy(
        update={"version_solo_probe_size": d.version_probe_size})})
    ref = settings.detection.reference_size
    store: MemoryBaselineStore | None = None
    if given:
        # The service's path for a stored baseline (router.monitor_for): the same dimension check
        # (other dimensions are rejected as dimension_mismatch) and the same handling after.
        store = MemoryBaselineStore()
        for b in given.values():
            store.save(b, activate=True)
    router = StreamRouter(settings, baselines=store, monitor_factory=_ReplayMonitor)
    logs: dict[StreamKey, _StreamLog] = {}
    # Counted here rather than read from the router, which counts a stream's rejections only
    # while it has a monitor: a rejection before the stream's first accepted event (in an earlier
    # chunk) or of a stream with none would be missed, and the counts would depend on chunking.
    rejected_by_stream: dict[StreamKey, Counter[str]] = {}

    def log_alarm(a: Alarm) -> None:
        key = StreamKey.parse(a.stream)
        log = logs.setdefault(key, _StreamLog([], []))
        # Against a given baseline (for mmd_query, the query embeddings') from the first event.
        compared_with = key.query_side() if a.detector == "mmd_query" else key
        if a.index < (0 if compared_with in given else ref):
            return  # contract: the reference events never alarm
        if a.detector == "changepoint":
            if len(log.changepoints) < MAX_REPORT_CHANGEPOINTS:
                log.changepoints.append(_alarm_entry(a))
            else:
                log.changepoints_omitted += 1
        elif a.kind == "start":
            log.alarms.append(_alarm_entry(a))

    def on_result(result: RouteResult) -> None:
        for a in result.alarms:
            log_alarm(a)
        for r in result.rejections:
            if r.stream is not None:
                rejected_by_stream.setdefault(r.stream, Counter())[r.reason.value] += 1
        # Change points are not returned by update_embeddings: take the new ones after each chunk.
        for mon in router.monitors.values():
            if isinstance(mon, _ReplayMonitor):
                for a in mon.take_changepoints():
                    log_alarm(a)

    t0 = time.monotonic()
    lines = _drive(events_path, settings, router, progress, on_result=on_result)
    elapsed = time.monotonic() - t0
    report = build_report(router, logs, ref, rejected_by_stream, given)
    if report_path is not None:
        try:
            Path(report_path).parent.mkdir(parents=True, exist_ok=True)
            Path(report_path).write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
        except OSError as e:
            raise ReplayError(f"cannot write {report_path}: {e.strerror or e}", status=1) from None
    print_summary(report, lines, elapsed, out if out is not None else sys.stdout)
    for key, b in sorted(given.items(), key=lambda kv: str(kv[0])):
        wrong = rejected_by_stream.get(key.document_side(), Counter())["dimension_mismatch"]
        mon = router.monitors.get(key.document_side())
        if mon is None or (key.is_query_side and (mon.query_monitor is None or not mon.query_monitor.events)):
            what = "query embeddings" if key.is_query_side else "events"
            print(f"embedwatch: warning: baseline {b.baseline_id} is of stream {key}, which has no "
                  f"{what} in {events_path}", file=sys.stderr)
        elif wrong:
            print(f"embedwatch: warning: stream {key}: {wrong} events rejected as dimension_mismatch: "
                  f"its baseline {b.baseline_id} has {b.dim} dimensions", file=sys.stderr)
    return report


def build_report(
    router: StreamRouter,
    logs: Mapping[StreamKey, Any],
    reference_size: int,
    rejected_by_stream: Mapping[StreamKey, Counter[str]] | None = None,
    baselines: Mapping[StreamKey, Baseline] | None = None,
) -> dict[str, Any]:
    """The report of a routed file. ``rejected_by_stream``: rejections per stream and reason
    (default the router's counts, which cover only streams with a monitor); a stream with
    rejections only is listed with 0 events. ``baselines``: the streams monitored against a given
    baseline from their first event (``reference_size`` 0, ``baseline_id`` given)."""
    rejected = rejected_by_stream if rejected_by_stream is not None else router.stream_rejected
    given = baselines or {}
    keys = set(router.monitors) | {k for k, c in rejected.items() if sum(c.values())}
    unmonitored: dict[str, Any] | None = None
    streams: dict[str, Any] = {}
    for key in sorted(keys, key=str):
        mon = router.monitors.get(key)
        log = logs.get(key) or _StreamLog([], [])
        if mon is None:
            if unmonitored is None:
                # The measures of a stream that has seen no event (all null), keyed as the others.
                blank = StreamMonitor(key, router.detection)
                unmonitored = {**blank.measures(), **blank.counters()}
            summary = dict(unmonitored)
        else:
            summary = {**mon.measures(), **mon.counters()}
        entry: dict[str, Any] = {
            "events": int(mon.events) if mon is not None else 0,
            "query_events": int(mon.query_events) if mon is not None else 0,
            "rejected": int(sum(rejected.get(key, Counter()).values())),
            "reference_size": 0 if key in given else int(reference_size),
            "alarms": log.alarms,
            "summary": summary,
        }
        if key in given:
            entry["baseline_id"] = given[key].baseline_id
        if key.query_side() in given:
            entry["query_baseline_id"] = given[key.query_side()].baseline_id
        if log.changepoints:
            entry["changepoints"] = log.changepoints
        if log.changepoints_omitted:
            entry["changepoints_omitted"] = int(log.changepoints_omitted)
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
    """A readable per-stream table of a report; with the query measures when a stream has queries."""
    queries = any(s.get("query_events") for s in report["streams"].values())
    rows: list[tuple[str, ...]] = [("stream", "events", "rejected", "alarms", "first alarm", "drift score",
                                    "p-value", "centroid dist", "drifting")]
    if queries:
        rows[0] += ("queries", "no-match", "precision@k", "recall@k")
    for name, s in report["streams"].items():
        summ = s["summary"]
        first = s["alarms"][0]["index"] if s["alarms"] else None
        row: tuple[str, ...] = (
            name, str(s["events"]), str(s["rejected"]), str(len(s["alarms"])), _fmt(first),
            _fmt(summ.get("drift_score")), _fmt(summ.get("drift_p_value")),
            _fmt(summ.get("centroid_cosine_distance")), "yes" if summ.get("drift_detected") else "no")
        if queries:
            row += (str(s.get("query_events", 0)), _fmt(summ.get("query_no_match_ratio")),
                    _fmt(summ.get("query_precision_at_k")), _fmt(summ.get("query_recall_at_k")))
        rows.append(row)
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

    def __init__(self, key: StreamKey, limit: int, queries: bool = False) -> None:
        self.key = key
        self.limit = limit
        self.queries = queries  # collect the query embeddings instead of the documents
        self.baseline: Baseline | None = None
        self.query_monitor: StreamMonitor | None = None
        self.expected_dim: int | None = None
        self.events = 0
        self.vectors: list[np.ndarray] = []
        self.ts: list[np.ndarray] = []

    def _keep(self, vectors: np.ndarray, ts: np.ndarray) -> list[Alarm]:
        if self.expected_dim is None:
            self.expected_dim = int(vectors.shape[1])
        room = self.limit - self.events
        if room > 0:
            self.vectors.append(vectors[:room])
            self.ts.append(ts[:room])
        self.events += int(vectors.shape[0])
        return []

    def update_embeddings(self, vectors: np.ndarray, ts: np.ndarray, *_: Any) -> list[Alarm]:
        return self._keep(vectors, ts)

    def take_summary(self) -> None:
        return None  # nothing is monitored

    def update_queries(self, top1: np.ndarray, n_results: np.ndarray, precision_at_k: np.ndarray,
                       recall_at_k: np.ndarray, latency_s: np.ndarray | None, ts: np.ndarray,
                       vectors: np.ndarray | None = None) -> list[Alarm]:
        return self._keep(vectors, ts) if self.queries and vectors is not None else []


def baseline_file_path(out_path: Path, stream: StreamKey, several: bool) -> Path:
    """Where :func:`build_baseline` writes a stream's pair: ``out_path`` itself for one stream,
    ``<stem>.<model+model_version+segment>.npz`` (``safe_name``) for several."""
    stem = out_path.with_suffix("") if out_path.suffix in (".npz", ".json") else out_path
    if not several:
        return stem.with_name(stem.name + ".npz")
    return stem.with_name(f"{stem.name}.{safe_name(stream)}.npz")


def _stderr_warning(message: str) -> None:
    print(f"embedwatch: warning: {message}", file=sys.stderr)


def build_baseline(
    events_path: str | Path,
    out_path: str | Path,
    settings: Settings,
    stream: str | None = None,
    reference_size: int | None = None,
    warn: Callable[[str], None] = _stderr_warning,
) -> list[dict[str, Any]]:
    """Build a baseline per stream of ``events_path`` (or only ``stream``, "model/version/segment")
    from its first ``detection.reference_size`` accepted events (all if fewer), with the service's
    validation. One stream: ``out_path`` (``X.npz`` + ``X.json``); several: one pair per stream,
    ``X.<model+model_version+segment>.npz``. Returns the metadata of each, plus ``"path"``.
    ``stream`` may be a query-side key ("model/version/segment/query"): the baseline of that
    stream's query embeddings, from its first query events that carry one.

    A stream with fewer than ``MIN_PROMOTED_EVENTS`` (50) accepted events, the fewest the
    service builds a baseline from, is skipped and named to ``warn``. Every stream is checked
    before any file is written: :class:`ReplayError` (nothing written) for an unreadable file,
    a malformed ``stream``, no accepted events (of ``stream``), or too few of every stream or of
    ``stream``; :class:`~embedwatch.config.ConfigError` for a bad ``reference_size``."""
    events_path, out_path = Path(events_path), Path(out_path)
    settings = with_reference_size(settings, reference_size)
    limit = settings.detection.reference_size
    try:
        only = StreamKey.parse(stream) if stream is not None else None
    except ValueError as e:
        raise ReplayError(f"--stream: {e}") from None
    check_readable(events_path)
    # Before reading the file: an output directory that cannot be written is found at once.
    check_writable(baseline_file_path(out_path, only or StreamKey("x", "x"), False))
    # The stream's documents, or (a query-side key) the query embeddings of its query events.
    queries = only is not None and only.is_query_side
    routed = only.document_side() if only is not None else None
    kind = Kind.QUERY if queries else Kind.EMBEDDING
    collectors: dict[StreamKey, _Collector] = {}

    def factory(key: StreamKey, _d: DetectionSettings, _b: Baseline | None) -> StreamMonitor:
        c = collectors[key] = _Collector(key, limit, queries)
        return cast(StreamMonitor, c)

    def keep(batch: DecodedBatch) -> DecodedBatch:
        # A document baseline holds no query embedding, and a query one no document.
        batch.blocks = [b for b in batch.blocks if b.kind is kind and (not queries or b.dim)
                        and (routed is None or b.stream == routed)]
        if routed is not None:
            batch.rejections = [r for r in batch.rejections if r.stream == routed]
        return batch

    router = StreamRouter(settings, monitor_factory=factory)
    _drive(events_path, settings, router, progress=False, on_batch=keep)
    if routed is not None and routed not in collectors:
        raise ReplayError(f"no accepted events of stream {only} in {events_path}")
    if not collectors:
        raise ReplayError(f"no accepted events in {events_path}")
    counts = {key: min(c.events, limit) for key, c in collectors.items()}
    short = sorted((k for k, n in counts.items() if n < MIN_PROMOTED_EVENTS), key=str)
    if len(short) == len(counts):
        which = ", ".join(f"{k} ({counts[k]})" for k in short)
        raise ReplayError(f"too few accepted events in {events_path} for a baseline (at least "
                          f"{MIN_PROMOTED_EVENTS} per stream): {which}")
    for key in short:
        warn(f"stream {key}: skipped, {counts[key]} accepted events in {events_path} "
             f"(a baseline needs at least {MIN_PROMOTED_EVENTS})")
    # The names depend on the streams of the file, not on which were skipped.
    several = len(collectors) > 1
    built: list[tuple[Baseline, Path]] = []
    for key in sorted(collectors, key=str):
        if key in short:
            continue
        c = collectors[key]
        baseline = Baseline.from_vectors(
            key.query_side() if queries else key, np.concatenate(c.vectors), ts=np.concatenate(c.ts),
            settings=settings.detection, source=f"file:{events_path.name}",
        )
        built.append((baseline, baseline_file_path(out_path, baseline.key, several)))
    out: list[dict[str, Any]] = []
    for baseline, path in built:
        try:
            save_file(baseline, path)
        except OSError as e:
            raise ReplayError(f"cannot write {path}: {e.strerror or e}", status=1) from None
        md = dict(baseline.metadata)
        md["path"] = str(path)
        out.append(md)
    return out


__all__ = [
    "MAX_REPORT_CHANGEPOINTS",
    "Reason",
    "ReplayError",
    "baseline_file_path",
    "build_baseline",
    "build_report",
    "check_readable",
    "check_writable",
    "load_baselines",
    "make_decoder",
    "print_summary",
    "read_chunks",
    "run_replay",
    "with_reference_size",
]
