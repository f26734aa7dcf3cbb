"""Routing of decoded blocks to per-stream monitors: shared by the live service and ``embedwatch replay``.

The live loop (app.py) and the offline replay (replay.py) must run exactly the same code between
the decoder and the detectors, so that a replay predicts what the service would have done. This
module is that code, and it is pure: no I/O, no clock, no Kafka.

For each :class:`~embedwatch.events.DecodedBatch` :meth:`StreamRouter.route`

* orders the blocks by the position of their first message, merges blocks of one stream, kind and
  dimension (e.g. list and base64 vectors in one batch) back into message order;
* creates the monitor of a new stream, unless ``limits.max_streams`` monitors are live: the events
  of a stream beyond the cap are rejected with :attr:`Reason.STREAM_LIMIT`;
* rejects vectors whose dimension differs from the stream's expected dimension (its baseline's,
  else the first one seen) with :attr:`Reason.DIMENSION_MISMATCH`;
* feeds the accepted events to the stream's :class:`~embedwatch.monitor.StreamMonitor`, and the
  accepted embeddings that carry an ``id`` to the model's
  :class:`~embedwatch.detectors.version_compare.VersionComparison`;
* when a :class:`~embedwatch.baseline_store.BaselineRepository` is given, loads the active
  baseline of a new stream from it, and saves every baseline a monitor builds or is given; the
  same for the stream's query embeddings, whose baselines are stored under
  :meth:`~embedwatch.events.StreamKey.query_side` (``model/model_version/segment/query``).

It returns every rejection (the decoder's and its own) and every alarm, and keeps counters of
rejections per reason and per live stream.

A ``guard`` (the service's lock, which its readers take) is held per stream, not per batch: a
reader waits for one stream's update at most, not for a batch in which many streams build their
baselines.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedwatch.baseline import Baseline
from embedwatch.baseline_store import BaselineIntegrityError, BaselineNotFoundError, BaselineRepository
from embedwatch.config import DetectionSettings, Settings
from embedwatch.detectors.version_compare import VersionComparison
from embedwatch.events import Block, DecodedBatch, Kind, Reason, Rejection, StreamKey
from embedwatch.monitor import Alarm, StreamMonitor
from embedwatch.window import Summary

log = logging.getLogger(__name__)

MonitorFactory = Callable[[StreamKey, DetectionSettings, Baseline | None], StreamMonitor]

_UNGUARDED: AbstractContextManager[Any] = nullcontext()


@dataclass(slots=True)
class RouteResult:
    """What one batch did.

    ``rejections``: all rejected events of the batch (decoder's first, then the router's), each with
    its ``message_index`` in the batch and the payload to dead-letter. ``alarms``: alarms raised by
    the monitors (``kind`` "start" or "end"). ``accepted``: accepted events per stream and kind.
    ``new_streams``: streams created by this batch, in creation order. ``summaries``: per stream
    whose embedding block was monitored whole against its baseline, the events' norms and cosine
    similarities to the baseline centroid (:meth:`StreamMonitor.take_summary`), which the service's
    histograms reuse. ``failed``: the (stream, kind) whose update raised; their events are among
    the rejections (:attr:`Reason.PROCESSING_ERROR`), not accepted.
    """

    rejections: list[Rejection] = field(default_factory=list)
    alarms: list[Alarm] = field(default_factory=list)
    accepted: Counter[tuple[StreamKey, Kind]] = field(default_factory=Counter)
    new_streams: list[StreamKey] = field(default_factory=list)
    summaries: dict[StreamKey, Summary] = field(default_factory=dict)
    failed: set[tuple[StreamKey, Kind]] = field(default_factory=set)


def _default_factory(key: StreamKey, settings: DetectionSettings, baseline: Baseline | None) -> StreamMonitor:
    return StreamMonitor(key, settings, baseline)


def last_activity(newest_ts: float, seen_at: float | None) -> float:
    """When a stream was last active: the later of its newest event's time and the time the
    service last received one of its events (``seen_at``, wall clock; None when not known). A
    backlog of old events being caught up keeps its stream active; -inf for a stream with neither."""
    times = [t for t in (newest_ts, seen_at) if t is not None and math.isfinite(t)]
    return max(times, default=-math.inf)


def is_idle(activity: float, now: float, idle_s: float) -> bool:
    """Whether a stream last active at ``activity`` is idle at ``now`` under
    ``limits.stream_idle_s`` = ``idle_s`` (0: no stream ever is)."""
    return idle_s > 0 and activity < now - idle_s


def _concat(blocks: list[Block]) -> Block:
    """One block from blocks of the same stream, kind and dimension, in message order."""
    if len(blocks) == 1:
        return blocks[0]
    first = blocks[0]
    msg = np.concatenate([b.message_index for b in blocks])
    order = np.argsort(msg, kind="stable")

    def cat(arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays)[order]

    def opt(arrays: list[np.ndarray | None]) -> np.ndarray | None:
        if any(a is None for a in arrays):
            return None
        return cat([a for a in arrays if a is not None])

    ids = [i for b in blocks for i in b.ids]
    payloads = [p for b in blocks for p in b.payloads]
    return Block(
        stream=first.stream,
        kind=first.kind,
        vectors=cat([b.vectors for b in blocks]),
        ts=cat([b.ts for b in blocks]),
        latency_s=cat([b.latency_s for b in blocks]),
        ids=[ids[i] for i in order],
        message_index=msg[order],
        payloads=[payloads[i] for i in order],
        top1=opt([b.top1 for b in blocks]),
        n_results=opt([b.n_results for b in blocks]),
        precision_at_k=opt([b.precision_at_k for b in blocks]),
        recall_at_k=opt([b.recall_at_k for b in blocks]),
    )


def _merged(blocks: Iterable[Block]) -> list[Block]:
    groups: dict[tuple[StreamKey, Kind, int], list[Block]] = {}
    for b in blocks:
        if b.n:
            groups.setdefault((b.stream, b.kind, b.dim), []).append(b)
    merged = [_concat(g) for g in groups.values()]
    merged.sort(key=lambda b: int(b.message_index[0]))
    return merged


def _reject_all(block: Block, reason: Reason, detail: str) -> list[Rejection]:
    return [
        Rejection(int(mi), reason, detail, payload, block.stream)
        for mi, payload in zip(block.message_index.tolist(), block.payloads, strict=True)
    ]


class StreamRouter:
    """Monitors per :class:`StreamKey`, version comparisons per model, and the routing between them.

    ``settings``: the full service settings (``limits.max_streams`` and ``detection`` are used).
    ``baselines``: optional repository; the active baseline of a new stream is loaded from it, and
    baselines built by the monitors (after ``detection.reference_size`` events) are saved to it.
    ``monitor_factory``: how to build a monitor (tests); default ``StreamMonitor(key, detection, baseline)``.
    """

    def __init__(
        self,
        settings: Settings,
        baselines: BaselineRepository | None = None,
        monitor_factory: MonitorFactory | None = None,
    ) -> None:
        self.settings = settings
        self.detection = settings.detection
        self.max_streams = settings.limits.max_streams
        self.baselines = baselines
        self._factory: MonitorFactory = monitor_factory or _default_factory
        self.monitors: dict[StreamKey, StreamMonitor] = {}
        self.comparisons: dict[str, VersionComparison] = {}
        self.rejected: Counter[str] = Counter()
        self.stream_rejected: dict[StreamKey, Counter[str]] = {}
        # Dimension accepted for a stream whose monitor does not know it yet (same batch).
        self._dims: dict[StreamKey, int] = {}
        # baseline_id last persisted (or loaded) per stream, so a baseline is saved once.
        self._saved: dict[StreamKey, str] = {}
        self._failures: set[StreamKey] = set()  # streams whose update raised (logged with a traceback once)

    # -- queries ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.monitors)

    def get(self, key: StreamKey) -> StreamMonitor | None:
        return self.monitors.get(key)

    def expected_dim(self, key: StreamKey) -> int | None:
        mon = self.monitors.get(key)
        if mon is not None:
            # A query-only stream knows its dimension from its query embeddings' baseline (a
            # stored one, at a restart): vectors of another dimension are dimension_mismatch.
            for m in (mon, mon.query_monitor):
                if m is not None and m.expected_dim is not None:
                    return int(m.expected_dim)
        return self._dims.get(key)

    def idle(self, now: float, idle_s: float, seen: Mapping[StreamKey, float]) -> list[StreamKey]:
        """The live streams idle at ``now`` (:func:`is_idle`), given when the service last received
        an event of each (``seen``, wall clock; a stream missing from it is judged by its events'
        times alone). ``now`` is the caller's clock: this module reads none."""
        return [key for key, mon in self.monitors.items()
                if is_idle(last_activity(mon.newest_ts, seen.get(key)), now, idle_s)]

    def version_results(self) -> list[dict[str, Any]]:
        """Version comparison results of every model (see ``VersionComparison.results``)."""
        out: list[dict[str, Any]] = []
        for model in sorted(self.comparisons):
            out.extend(self.comparisons[model].results())
        return out

    # -- mutation -----------------------------------------------------------------------------

    def monitor_for(self, key: StreamKey) -> StreamMonitor | None:
        """The monitor of ``key``, created if the stream cap allows; None when the cap is reached."""
        mon = self.monitors.get(key)
        if mon is not None:
            return mon
        if len(self.monitors) >= self.max_streams:
            return None
        baseline = self._stored(key)
        mon = self._factory(key, self.detection, baseline)
        self.monitors[key] = mon
        self.stream_rejected.setdefault(key, Counter())  # kept across a reset after a failure
        if baseline is not None:
            self._saved[key] = baseline.baseline_id
        qkey = key.query_side()
        query_baseline = self._stored(qkey)
        if query_baseline is not None:
            mon.activate_query(query_baseline)
            self._saved[qkey] = query_baseline.baseline_id
        return mon

    def _stored(self, key: StreamKey) -> Baseline | None:
        """The active stored baseline of ``key`` (a stream's, or its query embeddings'), if any."""
        if self.baselines is None:
            return None
        try:
            return self.baselines.get(key)
        except BaselineNotFoundError:
            return None
        except (BaselineIntegrityError, OSError) as e:
            # A damaged stored baseline must not stop the service: the stream builds a new one.
            log.error("stream %s: cannot load its stored baseline (%s); building a new one", key, e)
            return None

    def mark_saved(self, key: StreamKey, baseline_id: str) -> None:
        """Record that ``baseline_id`` is already in the repository (promote / rollback through the
        API), so the router does not save it again."""
        self._saved[key] = baseline_id

    def adopt(self, monitor: StreamMonitor) -> None:
        """Take over a monitor restored from a checkpoint (its baseline is already persisted)."""
        key = monitor.key
        self.monitors[key] = monitor
        self.stream_rejected.setdefault(key, Counter())
        if monitor.expected_dim is not None:
            self._dims[key] = int(monitor.expected_dim)
        for mon in (monitor, monitor.query_monitor):
            if mon is not None and mon.baseline is not None:
                self._saved[mon.key] = mon.baseline.baseline_id
                # Released now, not at the stream's next batch: a replica restarted on a backlog it
                # had already consumed held every restored baseline's sample (1.5 MiB a 768-d stream).
                self._release_sample(mon)

    def remove(self, key: StreamKey) -> None:
        """Forget a stream (e.g. idle eviction); frees its slot under ``max_streams``. Its model's
        version comparison goes with the model's last live stream: kept, a replica that no longer
        owns the model exported its comparison (and a dimension change, a critical alert) for
        ever, and the comparisons grew with every model ever seen."""
        self.monitors.pop(key, None)
        self.stream_rejected.pop(key, None)
        self._dims.pop(key, None)
        self._saved.pop(key, None)
        self._saved.pop(key.query_side(), None)
        self._failures.discard(key)
        if not any(k.model == key.model for k in self.monitors):
            self.comparisons.pop(key.model, None)

    def route(self, batch: DecodedBatch, guard: AbstractContextManager[Any] = _UNGUARDED) -> RouteResult:
        """Validate and dispatch one decoded batch; see the module docstring.

        ``guard`` is entered around the creation of the batch's monitors, around each stream's
        update and around the final counts, never around the whole batch: building a 768-d
        baseline takes about 150 ms, and when 200 streams built theirs in one batch a reader
        holding the service's lock (a /metrics scrape) waited 10 s.
        """
        res = RouteResult(rejections=list(batch.rejections))
        with guard:
            accepted = self._admit(_merged(batch.blocks), res)
        for block, mon, compared in accepted:
            with guard:
                done = (res.accepted[(block.stream, block.kind)], len(res.alarms))
                try:
                    self._update(block, mon, compared, res)
                except Exception as e:  # never a crash: one stream's failure costs that stream's block
                    self._failed(block, e, res, done)
        with guard:
            for r in res.rejections:
                self.rejected[r.reason.value] += 1
                if r.stream is not None:
                    per_stream = self.stream_rejected.get(r.stream)
                    if per_stream is not None:
                        per_stream[r.reason.value] += 1
        return res

    def _admit(self, blocks: list[Block], res: RouteResult) -> list[tuple[Block, StreamMonitor, bool]]:
        """The blocks to feed, each with its monitor (created if new) and whether it joins its
        model's version comparison; rejections of the others go to ``res``."""
        accepted: list[tuple[Block, StreamMonitor, bool]] = []
        for block in blocks:
            key = block.stream
            is_new = key not in self.monitors
            mon = self.monitor_for(key)
            if mon is None:
                res.rejections.extend(_reject_all(
                    block, Reason.STREAM_LIMIT, f"stream {key} beyond limits.max_streams={self.max_streams}"
                ))
                continue
            if is_new:
                res.new_streams.append(key)
            if block.dim:
                expected = self.expected_dim(key)
                if expected is not None and block.dim != expected:
                    res.rejections.extend(_reject_all(
                        block, Reason.DIMENSION_MISMATCH,
                        f"embedding of {block.dim} dims, stream {key} expects {expected}",
                    ))
                    continue
                self._dims.setdefault(key, block.dim)
            accepted.append((block, mon, block.kind is Kind.EMBEDDING and any(i is not None for i in block.ids)))
        self._announce_versions([b for b, _, compared in accepted if compared])
        return accepted

    def _update(self, block: Block, mon: StreamMonitor, compared: bool, res: RouteResult) -> None:
        """Feed one accepted block to its monitor (and its model's comparison); save a new baseline."""
        key = block.stream
        if block.kind is Kind.QUERY:
            assert block.top1 is not None and block.n_results is not None
            assert block.precision_at_k is not None and block.recall_at_k is not None
            alarms = mon.update_queries(
                block.top1, block.n_results, block.precision_at_k, block.recall_at_k,
                block.latency_s, block.ts, block.vectors if block.dim else None,
            )
        else:
            alarms = mon.update_embeddings(block.vectors, block.ts, block.latency_s, block.ids)
            summary = mon.take_summary()
            if summary is not None:
                res.summaries[key] = summary
            if compared:
                self._comparison(key.model).update(key.model_version, block.ids, block.vectors)
        res.alarms.extend(alarms)
        res.accepted[(key, block.kind)] += block.n
        self._persist(key, mon)

    def _failed(self, block: Block, error: Exception, res: RouteResult, done: tuple[int, int]) -> None:
        """A stream's update raised (a defect, or input no check foresaw): its block is
        dead-lettered with :attr:`Reason.PROCESSING_ERROR` and the stream starts afresh (its
        stored baseline, if any, is loaded again), since its state may be half updated. The
        traceback is logged for a stream's first failure, a line for the next ones."""
        key = block.stream
        first = key not in self._failures
        self._failures.add(key)
        log.error("stream %s: processing %d events failed (%s: %s); they are dead-lettered and the "
                  "stream's state is reset", key, block.n, type(error).__name__, error, exc_info=first)
        res.rejections.extend(_reject_all(
            block, Reason.PROCESSING_ERROR, f"stream {key}: {type(error).__name__}: {error}"[:500]))
        # What the block had added to the result before it raised is taken back: its events are
        # dead-lettered, not accepted, and the alarms of a state now dropped are not raised.
        accepted, alarms = done
        if accepted:
            res.accepted[(key, block.kind)] = accepted
        else:
            del res.accepted[(key, block.kind)]
        del res.alarms[alarms:]
        res.summaries.pop(key, None)
        res.failed.add((key, block.kind))
        self.monitors.pop(key, None)
        self._dims.pop(key, None)
        self._saved.pop(key, None)
        self._saved.pop(key.query_side(), None)
        try:
            self.monitor_for(key)
        except Exception:  # created at its next block, or failing then
            log.exception("stream %s: cannot start afresh", key)

    def _comparison(self, model: str) -> VersionComparison:
        comp = self.comparisons.get(model)
        if comp is None:
            d = self.detection
            comp = self.comparisons[model] = VersionComparison(
                model, d.version_probe_size, d.version_knn_k, solo_probe_size=d.version_solo_probe_size
            )
        return comp

    def _announce_versions(self, blocks: list[Block]) -> None:
        """Tell a model's comparison, before any of them is added, that this batch's accepted
        blocks with ids carry two or more of its versions: a dual write's versions arrive as
        blocks of one batch, and the first must not be cut to the single-version ring before the
        second is seen (a version arriving alone widens the ring itself)."""
        versions: dict[str, set[str]] = {}
        for block in blocks:
            versions.setdefault(block.stream.model, set()).add(block.stream.model_version)
        for model, vs in versions.items():
            if len(vs) > 1:
                self._comparison(model).expect(vs)

    def _persist(self, key: StreamKey, mon: StreamMonitor) -> None:
        """Save the baseline ``mon`` built (and its query embeddings' monitor's, under
        :meth:`StreamKey.query_side`) unless it is saved already."""
        if self.baselines is None:
            return
        self._persist_one(key, mon)
        q = mon.query_monitor
        if q is not None:
            self._persist_one(q.key, q)

    def _persist_one(self, key: StreamKey, mon: StreamMonitor) -> None:
        if self.baselines is None or mon.baseline is None:
            return
        bid = mon.baseline.baseline_id
        if self._saved.get(key) != bid:
            try:
                self.baselines.save(mon.baseline, activate=True)
            except Exception as e:
                # Retried with the next batch of the stream; detection goes on meanwhile. Any
                # error: a durable store's backend raises its client's (e.g. kafka-python's
                # KafkaTimeoutError), and raised from here it cost the stream its block and the
                # baseline it had just built (StreamRouter._failed).
                log.error("stream %s: cannot save baseline %s: %s", key, bid, e)
                return
            self._saved[key] = bid
        self._release_sample(mon)

    def _release_sample(self, mon: StreamMonitor) -> None:
        """Saved: the monitor and the store need no more than a copy of its baseline without the
        sample (the scan fitted on it is carried over)."""
        if self.baselines is None or mon.baseline is None or mon.baseline.released_sample_rows is not None:
            return
        slim = mon.baseline.without_sample(self.detection)
        mon.baseline = slim
        self.baselines.hold(slim)
