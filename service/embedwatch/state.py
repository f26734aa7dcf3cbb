"""Durable state: baseline versions and per-partition checkpoints of stream state.

Two backends keep the same key -> bytes records:

* ``kafka`` (default): a compacted topic (``state.topic``). Compaction keeps the newest value
  per key, so the topic stays about as large as the state itself.
* ``file``: one file per key in ``state.directory`` (a PersistentVolume in Kubernetes), written
  atomically.

Keys::

    ckpt/<group>/<topic>/<partition>      checkpoint of the streams whose home is that partition
    baseline/<stream>/<baseline_id>       one baseline version (self-checking bytes)
    baseline-index/<stream>               the version history and the active id (JSON)

A value larger than ``chunk_bytes`` (the kafka backend) is written as chunks, then a small
manifest under its own key (see :class:`KafkaStateBackend`): a partition's checkpoint grows with
its streams (a stream still collecting its reference holds it, 3 MB at d = 768), and one record
per partition would outgrow any record size limit.

A checkpoint is a self-describing blob: a JSON header (schema version, the partition's next
offset, its ledger, each stream's monitor metadata) and an npz of the monitors' arrays in a zlib
stream (stored, not compressed: see :func:`encode_checkpoint`), with a sha256 so a damaged record
is refused rather than restored.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import json
import logging
import os
import time
import zlib
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote

import numpy as np

from embedwatch.baseline import Baseline, mean_shift_key
from embedwatch.baseline_store import (
    BaselineIntegrityError,
    MemoryBaselineStore,
    _Index,
    atomic_write,
    attach_fits,
    decode_baseline,
    encode_baseline,
    encode_fits,
    safe_name,
)
from embedwatch.config import DetectionSettings, Settings
from embedwatch.events import StreamKey

log = logging.getLogger(__name__)

CHECKPOINT_SCHEMA_VERSION = 1
_MAGIC = b"EWCK1\n"


class StateError(RuntimeError):
    """State could not be read or written (backend unreachable, damaged record)."""


class StateBackend(Protocol):
    def read_all(self) -> dict[str, bytes]:
        """Every key's newest value (a full scan; used at startup)."""
        ...

    def read_new(self) -> dict[str, bytes]:
        """Values written since the last read (by this or another replica)."""
        ...

    def write(self, records: Mapping[str, bytes]) -> None:
        """Durably write these records; returns only once they are acknowledged."""
        ...

    def close(self) -> None: ...


class NullStateBackend:
    """``state.backend: none``: nothing survives a restart."""

    def read_all(self) -> dict[str, bytes]:
        return {}

    def read_new(self) -> dict[str, bytes]:
        return {}

    def write(self, records: Mapping[str, bytes]) -> None:
        return None

    def close(self) -> None:
        return None


class FileStateBackend:
    """One file per key under ``directory``; atomic replace on write."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._seen: dict[str, float] = {}

    def _path(self, key: str) -> Path:
        return self.directory / quote(key, safe="")

    def read_all(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for p in self.directory.iterdir():
            if p.name.startswith(".") or p.name.endswith(".tmp"):
                continue
            out[unquote(p.name)] = p.read_bytes()
            self._seen[unquote(p.name)] = p.stat().st_mtime
        return out

    def read_new(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for p in self.directory.iterdir():
            if p.name.startswith(".") or p.name.endswith(".tmp"):
                continue
            key, mtime = unquote(p.name), p.stat().st_mtime
            if self._seen.get(key) != mtime:
                out[key] = p.read_bytes()
                self._seen[key] = mtime
        return out

    def write(self, records: Mapping[str, bytes]) -> None:
        # Not marked as seen: read_new returns this replica's writes too, as the kafka backend's
        # does (the service re-reads its own checkpoints when a partition comes back).
        for key, value in records.items():
            atomic_write(self._path(key), value)  # its temporary files start with "." and are skipped by reads

    def close(self) -> None:
        return None


_CHUNK = b"EWCC1\n"
_MANIFEST = b"EWCM1\n"
#: Largest value written as one record: under the broker's default ``max.message.bytes`` (1 MiB)
#: with the key and the record's framing, so a state topic created by hand works as well.
CHUNK_BYTES = 1_000_000


def _chunk_key(key: str, slot: int, index: int) -> str:
    # No other key starts with "chunk/".
    return f"chunk/{slot}/{index}/{key}"


def _parse_chunk_key(ckey: str) -> tuple[str, int, int] | None:
    parts = ckey.split("/", 3)
    if len(parts) != 4 or parts[0] != "chunk" or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[3], int(parts[1]), int(parts[2])


class KafkaStateBackend:
    """A compacted topic, created if missing; written with acks=all, read with a group-less consumer.

    A value longer than ``chunk_bytes`` is split. Its chunks (each tagged with the value's
    generation) go to keys ``chunk/<slot>/<i>/<key>`` and are acknowledged before a manifest
    (slot, generation, count, length, sha256) is written under ``key``. Successive generations of a
    key alternate between two slots, so a crash while writing one leaves the previous manifest and
    its chunks intact; a reader returns a value only when every chunk of its manifest's generation
    is there and the digest matches. Once a manifest is acknowledged, the previous generation's
    chunks are deleted (tombstones), as are chunks a smaller value no longer uses, so compaction
    keeps one generation per key. Requests stay small too: the
    producer's ``max_request_size`` is a couple of chunks, so its encode buffer (kept per thread by
    kafka-python at the largest request's size) stays a few MiB.
    """

    def __init__(self, settings: Settings, max_record_bytes: int = 64 << 20,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        from kafka import KafkaConsumer, KafkaProducer, TopicPartition

        from embedwatch.sources.kafka_python import security_kwargs

        k = settings.kafka
        self.topic = settings.state.topic
        self._tp = TopicPartition
        sec = security_kwargs(k)
        self._ensure_topic(k.bootstrap_servers, sec, max_record_bytes)
        self.chunk_bytes = int(chunk_bytes)
        # Per key: the slot and generation of its newest chunked value (written or read) and how
        # many chunks each slot holds; chunks read whose manifest has not been seen yet.
        self._slot: dict[str, int] = {}
        self._gen: dict[str, int] = {}
        self._nchunks: dict[tuple[str, int], int] = {}
        self._chunks: dict[str, bytes] = {}
        request = 2 * self.chunk_bytes + (64 << 10)
        self._producer = KafkaProducer(
            bootstrap_servers=k.bootstrap_servers.split(","), client_id=f"{k.client_id}-state", acks="all",
            max_request_size=request, compression_type=None, retries=2**31 - 1,
            # Fail fast while the broker is away: the caller retries with backoff and reports
            # itself unready instead of blocking a minute inside send().
            max_block_ms=5000, **sec)
        self._consumer = KafkaConsumer(
            bootstrap_servers=k.bootstrap_servers.split(","), client_id=f"{k.client_id}-state-reader",
            group_id=None, enable_auto_commit=False, max_partition_fetch_bytes=request,
            fetch_max_bytes=max(request, 8 << 20), **sec)
        parts = self._consumer.partitions_for_topic(self.topic) or {0}
        self._parts = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self._consumer.assign(self._parts)
        self._consumer.seek_to_beginning(*self._parts)

    def _ensure_topic(self, bootstrap: str, sec: dict[str, Any], max_record_bytes: int) -> None:
        from kafka.admin import KafkaAdminClient, NewTopic
        from kafka.errors import TopicAlreadyExistsError

        admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), client_id="embedwatch-state-admin", **sec)
        try:
            if self.topic in set(admin.list_topics()):
                return
            with contextlib.suppress(TopicAlreadyExistsError):  # another replica was faster
                admin.create_topics([NewTopic(self.topic, 1, -1, topic_configs={
                    "cleanup.policy": "compact", "max.message.bytes": str(max_record_bytes),
                    "min.compaction.lag.ms": "60000"})])
        finally:
            admin.close()

    def _drain(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        ends = self._consumer.end_offsets(self._parts)
        deadline = time.monotonic() + 60
        while any(self._consumer.position(tp) < end for tp, end in ends.items()):
            if time.monotonic() > deadline:
                raise StateError(f"timed out reading state topic {self.topic}")
            for recs in self._consumer.poll(timeout_ms=500).values():
                for r in recs:
                    if r.key is None:
                        continue
                    key = r.key.decode()
                    if _parse_chunk_key(key) is not None:
                        if r.value is None:
                            self._chunks.pop(key, None)
                        else:
                            self._chunks[key] = r.value
                    elif r.value is None:
                        out.pop(key, None)
                    else:
                        out[key] = r.value
        return self._assemble(out)

    def _assemble(self, out: dict[str, bytes]) -> dict[str, bytes]:
        """Replace each manifest in ``out`` by its value; chunks of older generations are dropped,
        those of a newer one (a write still in progress) kept for a later read."""
        by_key: dict[str, list[tuple[int, int, str]]] = {}
        for ckey in self._chunks:
            parsed = _parse_chunk_key(ckey)
            assert parsed is not None
            key, slot, i = parsed
            by_key.setdefault(key, []).append((slot, i, ckey))
            n = self._nchunks.get((key, slot), 0)
            self._nchunks[key, slot] = max(n, i + 1)
        for key, value in list(out.items()):
            if not value.startswith(_MANIFEST):
                continue
            try:
                m = json.loads(value[len(_MANIFEST):])
                slot, gen, count, length, digest = (int(m["slot"]), int(m["gen"]), int(m["chunks"]),
                                                    int(m["bytes"]), str(m["sha256"]))
                if slot not in (0, 1) or not 0 < count <= len(self._chunks):
                    raise ValueError(f"slot {slot}, {count} chunks ({len(self._chunks)} read)")
                tag = _CHUNK + gen.to_bytes(8, "little")
            except (ValueError, KeyError, TypeError, OverflowError) as e:
                log.error("state record %s: unreadable manifest or chunks missing (%s); ignored", key, e)
                del out[key]
                continue
            self._slot[key] = slot
            self._gen[key] = max(self._gen.get(key, 0), gen)
            parts = [self._chunks.get(_chunk_key(key, slot, i), b"") for i in range(count)]
            whole = b"".join(p[len(tag):] for p in parts if p.startswith(tag))
            if len(whole) != length or hashlib.sha256(whole).hexdigest() != digest:
                log.error("state record %s: chunks of generation %d missing or damaged; ignored", key, gen)
                del out[key]
            else:
                out[key] = whole
            for s, _i, ckey in by_key.get(key, ()):
                chunk = self._chunks[ckey]
                older = int.from_bytes(chunk[len(_CHUNK):len(_CHUNK) + 8], "little") <= gen
                if s == slot or older or not chunk.startswith(_CHUNK):
                    del self._chunks[ckey]
        return out

    def read_all(self) -> dict[str, bytes]:
        self._consumer.seek_to_beginning(*self._parts)
        return self._drain()

    def read_new(self) -> dict[str, bytes]:
        return self._drain()

    def write(self, records: Mapping[str, bytes]) -> None:
        chunks: dict[str, bytes] = {}
        heads: dict[str, bytes] = {}
        stale: list[str] = []
        counts: dict[tuple[str, int], int] = {}
        written: dict[str, tuple[int, int]] = {}  # key -> slot, generation of its chunks
        for key, value in records.items():
            if len(value) <= self.chunk_bytes:
                heads[key] = value
                stale += [_chunk_key(key, s, i) for s in (0, 1) for i in range(self._nchunks.get((key, s), 0))]
                counts[key, 0] = counts[key, 1] = 0
                continue
            slot, gen = 1 - self._slot.get(key, 1), self._gen.get(key, 0) + 1
            tag = _CHUNK + gen.to_bytes(8, "little")
            view = memoryview(value)
            n = -(-len(value) // self.chunk_bytes)
            for i in range(n):
                chunks[_chunk_key(key, slot, i)] = tag + view[i * self.chunk_bytes:(i + 1) * self.chunk_bytes]
            heads[key] = _MANIFEST + json.dumps({"slot": slot, "gen": gen, "chunks": n, "bytes": len(value),
                                                 "sha256": hashlib.sha256(value).hexdigest()}).encode()
            prev = self._nchunks.get((key, slot), 0)
            stale += [_chunk_key(key, slot, i) for i in range(n, prev)]
            counts[key, slot] = n
            written[key] = slot, gen
            # Before sending: a write that fails halfway still uses up its generation, and the
            # slot may hold this many chunks afterwards.
            self._gen[key] = gen
            self._nchunks[key, slot] = max(prev, n)
            # One value's chunks at a time (a copy of each value in flight, not of all of them),
            # acknowledged before any manifest naming them is sent.
            self._send(chunks)
            chunks.clear()
        self._send(heads)
        for key, (slot, _gen) in written.items():
            self._slot[key] = slot
            # The previous generation is stale once this manifest is acknowledged: deleted now, not
            # when its slot is written again, which the checkpoint of a partition that stays
            # unchanged never is (a start read, and held, 224 MB of such chunks at 200 x 768-d).
            other = 1 - slot
            stale += [_chunk_key(key, other, i) for i in range(self._nchunks.get((key, other), 0))]
            counts[key, other] = 0
        if stale:
            self._send(dict.fromkeys(stale))
        self._nchunks.update(counts)

    def _send(self, records: Mapping[str, bytes | None]) -> None:
        if not records:
            return
        futures = [self._producer.send(self.topic, key=k.encode(), value=v) for k, v in records.items()]
        self._producer.flush(timeout=15)
        for f in futures:
            f.get(timeout=0)

    def close(self) -> None:
        self._producer.close(timeout=5)
        self._consumer.close()


def open_state_backend(settings: Settings) -> StateBackend:
    if settings.state.backend == "kafka":
        return KafkaStateBackend(settings)
    if settings.state.backend == "file":
        return FileStateBackend(settings.state.directory)
    return NullStateBackend()


# --------------------------------------------------------------------------- checkpoints


@dataclass
class StreamCheckpoint:
    key: StreamKey
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]


@dataclass
class Checkpoint:
    """The state of one partition at ``offset`` (the next offset to read)."""

    topic: str
    partition: int
    offset: int
    ledger: dict[str, int]
    streams: list[StreamCheckpoint] = field(default_factory=list)
    created_at: float = 0.0


def checkpoint_prefix(group: str) -> str:
    """What the keys of ``group``'s checkpoints start with."""
    return f"ckpt/{group}/"


def checkpoint_key(group: str, topic: str, partition: int) -> str:
    return f"{checkpoint_prefix(group)}{topic}/{partition}"


def encode_checkpoint(c: Checkpoint) -> bytes:
    arrays: dict[str, np.ndarray] = {}
    streams = []
    for i, s in enumerate(c.streams):
        for name, arr in s.arrays.items():
            arrays[f"{i}/{name}"] = np.ascontiguousarray(arr)
        streams.append({"key": list(s.key), "meta": s.meta})
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    header = json.dumps({
        "schema_version": CHECKPOINT_SCHEMA_VERSION, "topic": c.topic, "partition": c.partition,
        "offset": c.offset, "ledger": c.ledger, "created_at": c.created_at or time.time(), "streams": streams,
    }, allow_nan=True).encode()
    # body = header length + header + npz, hashed and packed in place: joining it first cost
    # two more copies of the partition's state at every checkpoint (about 200 MB for 200 streams
    # of 768-d).
    head = len(header).to_bytes(8, "little") + header
    with buf.getbuffer() as npz:
        digest = hashlib.sha256(head)
        digest.update(npz)
        # Level 0 (stored): the monitors' float sums shrink by a fifth at most, and compressing
        # them took 1.2 s per 67 streams of 768-d, with the loop waiting. Still a zlib stream, so
        # records written before read the same way.
        z = zlib.compressobj(0)
        packed = [_MAGIC, digest.digest(), z.compress(head), z.compress(npz), z.flush()]
    return b"".join(packed)


def decode_checkpoint(data: bytes) -> Checkpoint:
    if not data.startswith(_MAGIC):
        raise StateError("not an embedwatch checkpoint")
    digest, packed = data[len(_MAGIC):len(_MAGIC) + 32], data[len(_MAGIC) + 32:]
    try:
        body = zlib.decompress(packed)
    except zlib.error as e:
        raise StateError(f"damaged checkpoint: {e}") from e
    if hashlib.sha256(body).digest() != digest:
        raise StateError("damaged checkpoint: checksum mismatch")
    n = int.from_bytes(body[:8], "little")
    header = json.loads(body[8:8 + n])
    if header.get("schema_version") != CHECKPOINT_SCHEMA_VERSION:
        raise StateError(f"checkpoint schema {header.get('schema_version')} is not {CHECKPOINT_SCHEMA_VERSION}")
    with np.load(io.BytesIO(body[8 + n:]), allow_pickle=False) as z:
        flat = {name: z[name] for name in z.files}
    streams = []
    for i, s in enumerate(header["streams"]):
        prefix = f"{i}/"
        arrays = {name[len(prefix):]: a for name, a in flat.items() if name.startswith(prefix)}
        streams.append(StreamCheckpoint(StreamKey(*s["key"]), s["meta"], arrays))
    return Checkpoint(header["topic"], int(header["partition"]), int(header["offset"]),
                      {k: int(v) for k, v in header["ledger"].items()}, streams, float(header["created_at"]))


# --------------------------------------------------------------------------- baselines


class DurableBaselineStore(MemoryBaselineStore):
    """The in-memory baseline store, written through to a :class:`StateBackend`.

    Restored from the backend's records at start, so baseline versions, the active one and the
    promote/rollback history survive restarts and move between replicas.
    """

    def __init__(self, backend: StateBackend, records: MutableMapping[str, bytes] | None = None,
                 detection: DetectionSettings | None = None) -> None:
        super().__init__()
        self.backend = backend
        # The running settings: a restored baseline whose scan for them is stored (or not needed)
        # is held without its sample.
        self.detection = detection
        self._restoring = False
        self._fitted: set[str] = set()  # baselines (by record name) whose fits are stored
        if records:
            self.restore(records)

    def restore(self, records: MutableMapping[str, bytes]) -> None:
        """Take the baselines and indexes of ``records``, removing each record as it is decoded:
        a restart reads every stored baseline (2.6 MB a 768-d stream), and holding all of them
        next to their decoded copies put the start's peak at 0.99 GiB for 200 streams."""
        self._restoring = True
        try:
            restored: list[Baseline] = []
            for key in [k for k in records if k.startswith("baseline/")]:
                try:
                    b = decode_baseline(records.pop(key), origin=key)
                except ValueError as e:
                    log.error("skipping damaged baseline record %s: %s", key, e)
                    continue
                super()._write_version(_stream_of_baseline(b), b)
                restored.append(b)
            fit_keys = [k for k in records if k.startswith("baseline-fit/")]
            if fit_keys:
                stored = {f"{safe_name(k)}/{bid}": b for (k, bid), b in self._baselines.items()}
                seen = {id(b) for b in restored}
                for key in fit_keys:
                    # A fit may come after its baseline (stored later by another replica).
                    attached = self._attach_fits(key, records.pop(key), stored)
                    if attached is not None and id(attached) not in seen:
                        restored.append(attached)
            self._release_samples(restored)
            for key in [k for k in records if k.startswith("baseline-index/")]:
                doc = json.loads(records.pop(key))
                index = _Index(StreamKey(*doc["stream"]), list(doc["versions"]), doc.get("active"),
                               list(doc.get("previous", [])))
                super()._store_index(index)
        finally:
            self._restoring = False

    def _release_samples(self, baselines: list[Baseline]) -> None:
        """Hold restored baselines without their reference sample when a monitor will not need it:
        their scan for the running settings came with them (or the scan is off). The sample is
        stored already, and only a scan fit reads it. Each replica restores every baseline of the
        group, most of them of streams it does not own: 1.5 MiB a 768-d stream, kept for nothing."""
        det = self.detection
        if det is None:
            return
        key = mean_shift_key(det)
        for b in baselines:
            if not det.scan_windows or key in b.mean_shift_fits():
                self.hold(b.without_sample(det))

    def _attach_fits(self, record: str, data: bytes, stored: Mapping[str, Baseline]) -> Baseline | None:
        """Give a restored baseline (``stored`` by record name) the mean-shift tests fitted on it
        before the restart; returns it (None if there is none or the record is damaged)."""
        name = record.removeprefix("baseline-fit/")
        baseline = stored.get(name)
        if baseline is None:
            log.warning("fitted tests %s belong to no stored baseline: ignored", record)
            return None
        try:
            attach_fits(data, baseline, origin=record)
        except BaselineIntegrityError as e:
            log.error("skipping damaged fitted tests %s (refitted when needed): %s", record, e)
            return None
        self._fitted.add(name)
        return baseline

    def hold(self, baseline: Baseline) -> None:
        """As the in-memory store's, and store the fits of a baseline stored without them once a
        monitor has fitted it: a baseline written by a version of embedwatch that did not store
        fits, or activated through the API before any monitor used it, would otherwise be refitted
        at every restart, and kept with its sample by the replicas that do not own its stream."""
        super().hold(baseline)
        key = _stream_of_baseline(baseline)
        bid = str(baseline.metadata["baseline_id"])
        name = f"{safe_name(key)}/{bid}"
        if self._restoring or name in self._fitted or (key, bid) not in self._baselines:
            return
        fits = self._fits_record(name, baseline)
        if not fits:
            return
        try:
            self.backend.write(fits)
        except (OSError, RuntimeError) as e:  # derived data: without it, a restart refits
            log.warning("cannot store the fitted tests of baseline %s: %s", bid, e)
            return
        self._fitted.add(name)

    @staticmethod
    def _fits_record(name: str, baseline: Baseline) -> dict[str, bytes]:
        """The record of what was fitted on ``baseline`` so far (none if nothing was)."""
        fits = encode_fits(baseline)
        return {} if fits is None else {f"baseline-fit/{name}": fits}

    def _write_version(self, key: StreamKey, baseline: Baseline) -> None:
        super()._write_version(key, baseline)
        if not self._restoring:
            name = f"{safe_name(key)}/{baseline.metadata['baseline_id']}"
            # Beside it, what was fitted on it (a baseline built by a stream is saved once its
            # monitor has fitted its scan): a restart then takes the fit instead of redoing it.
            fits = self._fits_record(name, baseline)
            self.backend.write({f"baseline/{name}": encode_baseline(baseline), **fits})
            if fits:
                self._fitted.add(name)

    def _store_index(self, index: _Index) -> None:
        super()._store_index(index)
        if not self._restoring:
            doc = index.to_json()
            doc["stream"] = list(index.stream)
            self.backend.write({f"baseline-index/{safe_name(index.stream)}": json.dumps(doc).encode()})


def _stream_of_baseline(b: Baseline) -> StreamKey:
    md = b.metadata
    return StreamKey(str(md["model"]), str(md["model_version"]), str(md.get("segment") or "default"))


def checkpoints_in(records: Mapping[str, bytes], group: str) -> builtins.dict[tuple[str, int], bytes]:
    """Checkpoint records of ``group`` by (topic, partition)."""
    out: dict[tuple[str, int], bytes] = {}
    prefix = checkpoint_prefix(group)
    for key, value in records.items():
        if key.startswith(prefix):
            topic, _, part = key[len(prefix):].rpartition("/")
            out[(topic, int(part))] = value
    return out
