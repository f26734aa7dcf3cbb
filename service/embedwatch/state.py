"""Durable state: baseline versions and per-partition checkpoints of stream state.

Two backends keep the same key -> bytes records:

* ``kafka`` (default): a compacted topic (``state.topic``). Compaction keeps the newest value
  per key, so the topic stays about as large as the state itself.
* ``file``: one file per key in ``state.directory`` (a PersistentVolume in Kubernetes), written
  atomically (a key too long for a file name: a file named after its hash, holding the key).

Keys::

    ckpt/<group>/<topic>/<partition>      checkpoint of the streams whose home is that partition
    baseline/<stream>/<baseline_id>       one baseline version (self-checking bytes)
    baseline-fit/<stream>/<baseline_id>   what was fitted on that version (the mean-shift scans)
    baseline-index/<stream>               the version history and the active id (JSON); for a
                                          stream forgotten through the API, no versions and
                                          ``forgotten_at`` (its other records are deleted)

A value larger than ``chunk_bytes`` (the kafka backend) is written as chunks, then a small
manifest under its own key (see :class:`KafkaStateBackend`): a partition's checkpoint grows with
its streams (a stream still collecting its reference holds it, 3 MB at d = 768), and one record
per partition would outgrow any record size limit.

A checkpoint is a self-describing blob: a JSON header (schema version, the partition's next
offset, its ledger, each stream's monitor metadata, where each array lies) and the monitors'
arrays' raw bytes (see :func:`encode_checkpoint`), with a sha256 so a damaged record is refused
rather than restored.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import json
import logging
import os
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, unquote

import numpy as np

from embedwatch.baseline import Baseline, MeanShiftKey, mean_shift_key
from embedwatch.baseline_store import (
    ATOMIC_WRITE_EXTRA_NAME_BYTES,
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
from embedwatch.monitor import CheckpointArray, CheckpointArrays

log = logging.getLogger(__name__)

CHECKPOINT_SCHEMA_VERSION = 1
_MAGIC = b"EWCK1\n"  # npz in a zlib stream: read, no longer written
_MAGIC2 = b"EWCK2\n"


class StateError(RuntimeError):
    """State could not be read or written (backend unreachable, damaged record)."""


#: Offered each value as a read comes to it (key, value); True takes it: it is not kept for the
#: read's result.
Take = Callable[[str, bytes], bool]


class StateBackend(Protocol):
    def read_all(self, take: Take | None = None) -> dict[str, bytes]:
        """Every key's newest value (a full scan; used at startup), less those ``take`` took.

        ``take`` sees the values in the order they were written (the kafka backend; the file
        backend's order is the directory's), the same key again when it was written again, and
        may be handed a value that a later write of its key replaces or deletes."""
        ...

    def read_new(self, take: Take | None = None) -> dict[str, bytes]:
        """Values written since the last read (by this or another replica), as :meth:`read_all`."""
        ...

    def write(self, records: Mapping[str, bytes | bytearray]) -> None:
        """Durably write these records; returns only once they are acknowledged."""
        ...

    def delete(self, keys: Iterable[str]) -> None:
        """Remove these keys (absent ones are no error); returns once the removal is durable.
        Another reader is not told: what must reach other replicas is written as a record."""
        ...

    #: How many times the backend found its storage gone and started it again empty (a state topic
    #: deleted while the service runs): what was written before is lost, so a writer that skips
    #: records it wrote already (an unchanged checkpoint) writes them again when this moves.
    epoch: int

    def refresh(self) -> None:
        """Notice storage started again elsewhere (a state topic another replica created again)
        without reading or writing: :attr:`epoch` moves. Cheap; called at every checkpoint pass."""
        ...

    def close(self) -> None: ...


class NullStateBackend:
    """``state.backend: none``: nothing survives a restart."""

    epoch = 0

    def refresh(self) -> None:
        return None

    def read_all(self, take: Take | None = None) -> dict[str, bytes]:
        return {}

    def read_new(self, take: Take | None = None) -> dict[str, bytes]:
        return {}

    def write(self, records: Mapping[str, bytes | bytearray]) -> None:
        return None

    def delete(self, keys: Iterable[str]) -> None:
        return None

    def close(self) -> None:
        return None


#: Longest file name the file backend gives a key as itself (percent-encoded): a file system's
#: limit (255 bytes) less what :func:`atomic_write` adds for its temporary file. Every key written
#: before longer ones were hashed had such a name, so their files are still found.
_MAX_PLAIN_NAME = 255 - ATOMIC_WRITE_EXTRA_NAME_BYTES
#: File name prefix of a longer key: then the sha256 of the key. ``quote`` always escapes "=", so
#: no plain name starts with it.
_HASHED_NAME = "=sha256="
#: A hashed name's file starts with this, the key's UTF-8 length (4 bytes) and the key; the value follows.
_KEYED = b"EWFK1\n"
#: The file backend's directory id (see :class:`FileStateBackend`).
_STORAGE_ID = ".storage-id"
#: What the loss of the state's storage means, for both backends' ERROR line.
_STORAGE_LOST = ("Checkpoints are written again in full; the baselines stored in it are lost: streams keep the "
                 "baselines they use until a restart, then build new ones. Promote the streams again before a "
                 "restart (runbook EmbedwatchStateLost)")


class FileStateBackend:
    """One file per key under ``directory``; atomic replace on write.

    A file is named after its key (percent-encoded), or, for a key whose name would be too long
    for the file system (stream labels may be 128 characters each, and a non-ASCII character,
    percent-encoded in the key and again in the name, takes up to 20 bytes), after the key's
    sha256, with the key stored at the start of the file.

    The directory holds a random id (``.storage-id``, skipped by reads as every dot file is): a
    directory emptied or deleted while the service runs, and created again (by a write, which makes
    its parent, or by another replica sharing the volume), has none or another at the next
    :meth:`refresh`, and :attr:`epoch` moves."""

    epoch = 0

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._seen: dict[str, float] = {}  # file name -> modification time when read
        self._lock = threading.Lock()  # writes come from the loop and from the API's threads
        self._id = self._storage_id()  # a directory from before the id was kept gets one now

    def _storage_id(self) -> str:
        """The directory's id, created with the directory (and the id) if either is missing."""
        path = self.directory / _STORAGE_ID
        with contextlib.suppress(FileNotFoundError):
            return path.read_text(encoding="ascii").strip()
        try:
            atomic_write(path, uuid.uuid4().hex.encode())  # creates the directory too
            return path.read_text(encoding="ascii").strip()  # another replica's, if it was faster
        except OSError as e:  # a read-only directory (a command that only reads the state): unknown
            log.debug("state directory %s: cannot keep its storage id: %s", self.directory, e)
            return ""

    def refresh(self) -> None:
        with self._lock:
            sid = self._storage_id()
            if not sid or sid == self._id:
                return
            if not self._id:  # not known before (unwritable then): this is it
                self._id = sid
                return
            self._id = sid
            self.epoch += 1
            self._seen.clear()
        log.error("state directory %s was emptied or deleted while embedwatch ran (its storage id changed). %s",
                  self.directory, _STORAGE_LOST)

    def _path(self, key: str) -> Path:
        name = quote(key, safe="")
        if len(name) > _MAX_PLAIN_NAME:
            name = _HASHED_NAME + hashlib.sha256(key.encode()).hexdigest()
        return self.directory / name

    def read_all(self, take: Take | None = None) -> dict[str, bytes]:
        self._seen.clear()
        return self.read_new(take)

    def read_new(self, take: Take | None = None) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for p in self.directory.iterdir():
            if p.name.startswith(".") or p.name.endswith(".tmp") or not p.is_file():
                continue  # a directory: e.g. the lost+found of a volume's root
            mtime = p.stat().st_mtime
            if self._seen.get(p.name) != mtime:
                self._seen[p.name] = mtime
                read = self._read_keyed(p) if p.name.startswith(_HASHED_NAME) else (unquote(p.name), p.read_bytes())
                if read is None:
                    continue
                key, value = read
                if take is None or not take(key, value):
                    out[key] = value
        return out

    @staticmethod
    def _read_keyed(p: Path) -> tuple[str, bytes] | None:
        """The key and value of a file named after its key's hash; None (logged) if damaged."""
        with p.open("rb") as f:
            head = f.read(len(_KEYED) + 4)
            n = int.from_bytes(head[len(_KEYED):], "little")
            raw = f.read(n) if head.startswith(_KEYED) and len(head) == len(_KEYED) + 4 else b""
            try:
                key = raw.decode()
            except UnicodeDecodeError:
                key = ""
            if not key or len(raw) != n or p.name != _HASHED_NAME + hashlib.sha256(raw).hexdigest():
                log.error("state file %s: no key of its name at its start (damaged?); ignored", p)
                return None
            return key, f.read()

    def write(self, records: Mapping[str, bytes | bytearray]) -> None:
        # Not marked as seen: read_new returns this replica's writes too, as the kafka backend's
        # does (the service re-reads its own checkpoints when a partition comes back).
        for key, value in records.items():
            path = self._path(key)  # atomic_write's temporary files start with "." and are skipped by reads
            if path.name.startswith(_HASHED_NAME):
                raw = key.encode()
                atomic_write(path, value, head=_KEYED + len(raw).to_bytes(4, "little") + raw)
            else:
                atomic_write(path, value)

    def delete(self, keys: Iterable[str]) -> None:
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            self._seen.pop(path.name, None)

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


def retention_problem(config: Mapping[str, str | None]) -> str | None:
    """Why a topic with these settings (``cleanup.policy``, ``retention.ms``, ``retention.bytes``,
    as the broker describes them) would lose state, or None when it keeps each key's newest value
    for ever. The state topic holds baselines written once, at a promotion: a topic that deletes
    old records (the broker's default policy, with a week's retention) loses them silently, and a
    restart after that starts every stream afresh."""
    policy = config.get("cleanup.policy") or "delete"
    policies = {p.strip() for p in policy.split(",")}
    ms, size = config.get("retention.ms") or "-1", config.get("retention.bytes") or "-1"
    if "compact" not in policies and ms == "-1" and size == "-1":
        return (f"has cleanup.policy={policy} with no retention limit: it is never compacted, so it keeps every "
                "checkpoint ever written (megabytes at every checkpoint interval) and a start reads them all")
    if "compact" not in policies:
        return (f"has cleanup.policy={policy} (retention.ms={ms}, retention.bytes={size}): the broker deletes "
                "its old records, the baselines among them")
    if "delete" in policies and (ms != "-1" or size != "-1"):
        return (f"has cleanup.policy={policy} with retention.ms={ms}, retention.bytes={size}: the broker "
                "deletes records older than that, compacted or not, the baselines among them")
    return None


def _topic_id_of(raw: Any) -> str | None:
    """A topic id as text (a ``uuid.UUID`` from client metadata, text from the admin client);
    None for none, or the zero id of a broker without topic ids."""
    tid = "" if raw is None else str(raw)
    return None if tid in ("", "00000000-0000-0000-0000-000000000000") else tid


class KafkaStateBackend:
    """A compacted topic, created if missing; written with acks=all, read with a group-less consumer.

    An existing topic must keep its records (see :func:`retention_problem`): one that does not is
    refused with a :class:`StateError` that says how to fix it. Neither client of the backend
    creates the topic by itself (kafka-python's metadata requests would, on a broker with
    ``auto.create.topics.enable``, as a plain topic that deletes its records after the broker's
    retention); a read or write that finds it gone (deleted while the service runs) creates it
    again, compacted, and moves :attr:`epoch`.

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
                 chunk_bytes: int = CHUNK_BYTES, metadata_max_age_ms: int = 60_000) -> None:
        from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
        from kafka.errors import KafkaError

        from embedwatch.sources.kafka_python import bootstrap_kwargs, no_auto_create, security_kwargs

        k = settings.kafka
        self.topic = settings.state.topic
        self.epoch = 0
        # Writes come from the loop and from the API's threads (promotions); only the loop reads.
        self._lock = threading.Lock()
        self._reread = False  # the topic was started again: the next read starts at its beginning
        self._probe_after = 0.0  # no check for a deleted topic before this (monotonic; see _start_again_if_gone)
        self._tp = TopicPartition
        sec = security_kwargs(k)
        # A bounded bootstrap: after a failed write during a broker outage, the check for a deleted
        # topic waited 30 s (kafka-python's default) on top of the write's own timeout.
        self._admin_kwargs: dict[str, Any] = {"bootstrap_servers": k.bootstrap_servers.split(","), **sec,
                                              **bootstrap_kwargs(KafkaAdminClient)}
        self._max_record_bytes = max_record_bytes
        self._tid = self._ensure_topic(check=True)[0]  # the topic's id: one created again has another
        if self._tid is None:
            log.warning("state topic %s: the broker gave no topic id; a state topic deleted and created "
                        "again by another replica is not noticed by this one", self.topic)
        self.chunk_bytes = int(chunk_bytes)
        # Per key: the slot and generation of its newest chunked value (written or read) and how
        # many chunks each slot holds; chunks read whose manifest has not been seen yet.
        self._slot: dict[str, int] = {}
        self._gen: dict[str, int] = {}
        self._nchunks: dict[tuple[str, int], int] = {}
        self._chunks: dict[str, dict[tuple[int, int], bytes]] = {}  # value key -> (slot, index) -> chunk
        request = 2 * self.chunk_bytes + (64 << 10)
        self._producer = KafkaProducer(
            bootstrap_servers=k.bootstrap_servers.split(","), client_id=f"{k.client_id}-state", acks="all",
            max_request_size=request, compression_type=None, retries=2**31 - 1,
            # Fail fast while the broker is away: the caller retries with backoff and reports
            # itself unready instead of blocking a minute inside send().
            max_block_ms=5000, allow_auto_create_topics=False,
            # Its metadata tells a state topic created again by another replica (another topic id,
            # the same name: writes succeed) within this age; kafka-python's default is 5 minutes.
            metadata_max_age_ms=metadata_max_age_ms, **sec)
        self._consumer = KafkaConsumer(
            bootstrap_servers=k.bootstrap_servers.split(","), client_id=f"{k.client_id}-state-reader",
            group_id=None, enable_auto_commit=False, max_partition_fetch_bytes=request,
            fetch_max_bytes=max(request, 8 << 20), allow_auto_create_topics=False, **sec)
        try:
            no_auto_create(self._producer)
            no_auto_create(self._consumer)
            # The producer's metadata then follows the topic from the start (its id included), also
            # on a replica that has not written yet. Only that: a broker slow to answer is no error.
            with contextlib.suppress(KafkaError):
                self._producer.partitions_for(self.topic)
            parts = self._consumer.partitions_for_topic(self.topic) or {0}
            self._parts = [TopicPartition(self.topic, p) for p in sorted(parts)]
            self._consumer.assign(self._parts)
            self._consumer.seek_to_beginning(*self._parts)
        except BaseException:
            self.close()  # the start loop tries again: each try's clients and threads are freed
            raise

    def _ensure_topic(self, check: bool) -> tuple[str | None, bool]:
        """Create the topic (compacted) if it does not exist, or (``check``) make sure the existing
        one keeps its records; the topic's id (None when the broker gives none) and whether this
        call created it."""
        from kafka.admin import NewTopic
        from kafka.errors import TopicAlreadyExistsError

        created = False
        with self._admin() as admin:
            if self.topic in set(admin.list_topics()):
                if check:
                    self._check_retention(admin)
            else:
                with contextlib.suppress(TopicAlreadyExistsError):  # another replica was faster
                    admin.create_topics([NewTopic(self.topic, 1, -1, topic_configs={
                        "cleanup.policy": "compact", "max.message.bytes": str(self._max_record_bytes),
                        "min.compaction.lag.ms": "60000"})])
                    created = True
            return self._topic_id(admin), created

    @contextlib.contextmanager
    def _admin(self) -> Iterator[Any]:
        from kafka.admin import KafkaAdminClient

        admin = KafkaAdminClient(client_id="embedwatch-state-admin", **self._admin_kwargs)
        try:
            yield admin
        finally:
            admin.close()

    def _topic_id(self, admin: Any) -> str | None:
        # A topic created a moment ago may not be in every broker's metadata yet.
        deadline = time.monotonic() + 10
        while True:
            (desc,) = admin.describe_topics([self.topic])
            if desc.get("error_code") == 0 or time.monotonic() > deadline:
                return _topic_id_of(desc.get("topic_id"))
            time.sleep(0.2)

    def _check_retention(self, admin: Any) -> None:
        from kafka.admin import ConfigResource, ConfigResourceType
        from kafka.errors import KafkaError

        keys = ["cleanup.policy", "retention.ms", "retention.bytes"]
        try:
            described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, self.topic, configs=keys)],
                                               config_filter="all")
            config = {name: entry.get("value") for name, entry in described["topic"][self.topic].items()}
            if "cleanup.policy" not in config:
                # kafka-python drops a resource's error (no DescribeConfigs permission, say) and
                # answers nothing for it: unknown, not the broker's default policy.
                raise KeyError("the broker described no cleanup.policy (no DescribeConfigs permission?)")
        except (KafkaError, KeyError, TypeError, AttributeError) as e:
            # The topic may well be compacted: said, not refused.
            log.warning("state topic %s: cannot read its cleanup.policy (%s); it must be compacted "
                        "(cleanup.policy=compact), or stored baselines are deleted after its retention",
                        self.topic, e)
            return
        problem = retention_problem(config)
        if problem is not None:
            raise StateError(
                f"state topic {self.topic} {problem}; make it compacted (kafka-configs.sh --bootstrap-server "
                f"<broker> --alter --entity-type topics --entity-name {self.topic} --add-config "
                "cleanup.policy=compact, and retention.ms=-1 if cleanup.policy keeps delete) or set state.topic "
                "to a topic that does not exist yet (embedwatch creates it compacted)")

    #: After a check that found no deleted topic (a broker outage, most often), the next one waits
    #: this long: each builds an admin client, up to 5 s with the broker down, on top of the
    #: failed request's own wait.
    PROBE_INTERVAL_S = 60.0

    def _start_again_if_gone(self) -> None:
        """After a failed read or write: if the topic is gone (deleted while the service runs),
        create it again, compacted. Any error here (the broker is down, say) is left to the
        caller, which has the failure's own error to report and retries."""
        if time.monotonic() < self._probe_after:
            return
        try:
            tid, created = self._ensure_topic(check=False)  # a new topic is checked by _note_topic
        except Exception as e:  # the failure's own error is the one raised; this one is only logged
            log.debug("state topic %s: cannot check whether it exists: %s", self.topic, e)
            tid, created = None, False
        if not self._note_topic(tid, created):
            self._probe_after = time.monotonic() + self.PROBE_INTERVAL_S

    def refresh(self) -> None:
        """Compare the topic's id in the producer's metadata (refreshed every
        ``metadata_max_age_ms`` by its own thread) with the one known: see :meth:`_note_topic`."""
        topic_id = getattr(self._producer._metadata, "topic_id", None)  # kafka-python >= 3
        if topic_id is not None:
            self._note_topic(_topic_id_of(topic_id(self.topic)))

    def _note_topic(self, tid: str | None, created: bool = False) -> bool:
        """Take ``tid`` as the topic's id; True if it is another than the one known, or the topic
        was just ``created`` by this replica (the id may be unknown). That is another topic under
        the same name: the topic was deleted and created again (by this replica or another
        client), and what this replica wrote before is gone, so :attr:`epoch` moves and the next
        read starts at the new topic's beginning."""
        with self._lock:
            if not created:
                if tid is None or tid == self._tid:
                    return False
                if self._tid is None:  # not known at the start (a broker slow to describe it): this is it
                    self._tid = tid
                    return False
            self._tid = tid
            self.epoch += 1
            self._reread = True
        log.error("state topic %s was deleted while embedwatch ran and exists again: another topic under its "
                  "name, created by this replica (compacted) or by another client. %s", self.topic, _STORAGE_LOST)
        self._check_new_topic()
        return True

    def _check_new_topic(self) -> None:
        """A topic created again by another client (an older embedwatch, a console consumer on a
        broker that creates topics) may delete its records: said now, while it can be fixed, not
        only by the refusal at the next start."""
        try:
            with self._admin() as admin:
                self._check_retention(admin)
        except StateError as e:
            log.error("%s. A restart refuses it until it is fixed", e)
        except Exception as e:  # a check, not the write: the broker may be away again
            log.warning("state topic %s: cannot check the settings of the new topic: %s", self.topic, e)

    def _drain(self, take: Take | None) -> dict[str, bytes]:
        from kafka.errors import KafkaError

        out: dict[str, bytes] = {}
        deferred: set[str] = set()  # manifests read before all their chunks: offered to take at the end
        self.refresh()
        if self._reread:  # only the loop reads: the consumer is moved on its thread
            self._reread = False
            self._consumer.seek_to_beginning(*self._parts)
        try:
            ends = self._consumer.end_offsets(self._parts)
        except KafkaError:
            self._start_again_if_gone()  # the caller reads again, from the new topic's start
            raise
        if any(self._consumer.position(tp) > end for tp, end in ends.items()):
            # Read further than the topic reaches: another topic under its name, created again
            # before this replica's metadata says so (up to metadata_max_age_ms): read from its start.
            with contextlib.suppress(Exception):  # the id only counts the loss; the read goes on
                self._note_topic(self._ensure_topic(check=False)[0])
            self._reread = False
            self._consumer.seek_to_beginning(*self._parts)
        deadline = time.monotonic() + 60
        while any(self._consumer.position(tp) < end for tp, end in ends.items()):
            if time.monotonic() > deadline:
                self._start_again_if_gone()  # deleted after end_offsets answered
                raise StateError(f"timed out reading state topic {self.topic}")
            for recs in self._consumer.poll(timeout_ms=500).values():
                for r in recs:
                    if r.key is None:
                        continue
                    key = r.key.decode()
                    parsed = _parse_chunk_key(key)
                    if parsed is not None:
                        of, at = parsed[0], parsed[1:]
                        if r.value is not None:
                            self._chunks.setdefault(of, {})[at] = r.value
                        elif (held := self._chunks.get(of)) is not None:
                            held.pop(at, None)
                            if not held:
                                del self._chunks[of]
                        continue
                    deferred.discard(key)  # a later record of the key supersedes it
                    if r.value is None:
                        out.pop(key, None)
                        continue
                    value: bytes = r.value
                    if value.startswith(_MANIFEST):
                        # Assembled as it comes: its chunks were acknowledged before it was sent,
                        # so they were read before it, and are freed now rather than at the end
                        # of the read (a start held every stored baseline's chunks at once, 600
                        # MB at 200 x 768-d). Not all there (a topic of several partitions, or
                        # compacted under a newer write): tried again at the end.
                        whole = self._assemble_one(key, value, final=False)
                        if whole is None:
                            out[key] = value
                            deferred.add(key)
                            continue
                        value = whole
                    if take is not None and take(key, value):
                        out.pop(key, None)
                    else:
                        out[key] = value
        out = self._assemble(out)
        if take is not None:
            # Assembled only now (its chunks came after it: a state topic of several partitions,
            # or compacted under a newer write): a stored baseline left here was never restored.
            for key in [k for k in deferred if k in out]:
                if take(key, out[key]):
                    del out[key]
        return out

    def _assemble(self, out: dict[str, bytes]) -> dict[str, bytes]:
        """Replace each manifest left in ``out`` by its value, or drop it (logged) when its chunks
        are missing or damaged."""
        for key, value in list(out.items()):
            if value.startswith(_MANIFEST):
                whole = self._assemble_one(key, value, final=True)
                if whole is None:
                    del out[key]
                else:
                    out[key] = whole
        for key, held in self._chunks.items():  # a write still in progress: its slot is in use
            for slot, i in held:
                self._nchunks[key, slot] = max(self._nchunks.get((key, slot), 0), i + 1)
        return out

    def _assemble_one(self, key: str, manifest: bytes, final: bool) -> bytes | None:
        """The value ``manifest`` names, from the chunks read; None when they are not all there or
        do not match it (an error when ``final``; otherwise nothing is dropped, for a later try).
        Chunks of older generations are dropped, those of a newer one (a write still in
        progress) kept for a later read."""
        held = self._chunks.get(key, {})
        try:
            m = json.loads(manifest[len(_MANIFEST):])
            slot, gen, count, length, digest = (int(m["slot"]), int(m["gen"]), int(m["chunks"]),
                                                int(m["bytes"]), str(m["sha256"]))
            if slot not in (0, 1) or not 0 < count <= len(held):
                raise ValueError(f"slot {slot}, {count} chunks ({len(held)} read)")
            tag = _CHUNK + gen.to_bytes(8, "little")
        except (ValueError, KeyError, TypeError, OverflowError) as e:
            if final:
                log.error("state record %s: unreadable manifest or chunks missing (%s); ignored", key, e)
            return None
        parts = [held.get((slot, i), b"") for i in range(count)]
        joined = b"".join(memoryview(p)[len(tag):] for p in parts if p.startswith(tag))
        whole: bytes | None = joined
        if len(joined) != length or hashlib.sha256(joined).hexdigest() != digest:
            if not final:
                return None
            log.error("state record %s: chunks of generation %d missing or damaged; ignored", key, gen)
            whole = None
        self._slot[key] = slot
        self._gen[key] = max(self._gen.get(key, 0), gen)
        for (s, i), chunk in list(held.items()):
            self._nchunks[key, s] = max(self._nchunks.get((key, s), 0), i + 1)
            older = int.from_bytes(chunk[len(_CHUNK):len(_CHUNK) + 8], "little") <= gen
            if s == slot or older or not chunk.startswith(_CHUNK):
                del held[s, i]
        if not held:
            self._chunks.pop(key, None)
        return whole

    def read_all(self, take: Take | None = None) -> dict[str, bytes]:
        self._consumer.seek_to_beginning(*self._parts)
        return self._drain(take)

    def read_new(self, take: Take | None = None) -> dict[str, bytes]:
        return self._drain(take)

    def write(self, records: Mapping[str, bytes | bytearray]) -> None:
        heads: dict[str, bytes | bytearray] = {}
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
            # Each chunk made as it is sent (one at a time in memory, besides the producer's
            # buffer, not a copy of the whole value), all acknowledged before any manifest naming
            # them is sent.
            cb = self.chunk_bytes
            self._send((_chunk_key(key, slot, i), tag + view[i * cb:(i + 1) * cb]) for i in range(n))
        self._send(heads.items())
        for key, (slot, _gen) in written.items():
            self._slot[key] = slot
            # The previous generation is stale once this manifest is acknowledged: deleted now, not
            # when its slot is written again, which the checkpoint of a partition that stays
            # unchanged never is (a start read, and held, 224 MB of such chunks at 200 x 768-d).
            other = 1 - slot
            stale += [_chunk_key(key, other, i) for i in range(self._nchunks.get((key, other), 0))]
            counts[key, other] = 0
        if stale:
            self._send((k, None) for k in stale)
        self._nchunks.update(counts)

    def delete(self, keys: Iterable[str]) -> None:
        # A tombstone per key and per chunk either slot may hold: compaction then removes them all.
        # The generation is kept, so a later value of the key is not taken for an older one's.
        tombs: list[str] = []
        for key in keys:
            tombs.append(key)
            for s in (0, 1):
                tombs += [_chunk_key(key, s, i) for i in range(self._nchunks.pop((key, s), 0))]
            self._slot.pop(key, None)
        self._send((k, None) for k in tombs)

    def _send(self, records: Iterable[tuple[str, bytes | bytearray | None]]) -> None:
        from kafka.errors import KafkaError

        try:
            futures = [self._producer.send(self.topic, key=k.encode(), value=v) for k, v in records]
            if not futures:
                return
            self._producer.flush(timeout=15)
            for f in futures:
                f.get(timeout=0)
        except KafkaError:
            # The caller retries the whole write: on a topic created again, if that was the cause.
            self._start_again_if_gone()
            raise

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
    """One stream's monitor state (:meth:`StreamMonitor.checkpoint`). A decoded checkpoint gives
    every array as one ``np.ndarray``; one being encoded may give an array as its row chunks."""

    key: StreamKey
    meta: dict[str, Any]
    arrays: CheckpointArrays
    #: When (wall clock) the service last received one of the stream's events, if known: with
    #: ``meta["newest_ts"]`` it tells a stream gone idle (``limits.stream_idle_s``) from one whose
    #: old events are being caught up. None in checkpoints written before it was recorded.
    seen_at: float | None = None


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


def encode_checkpoint(c: Checkpoint) -> bytearray:
    """``c`` as one self-checking record: :func:`build_checkpoint`, then :func:`seal_checkpoint`."""
    return seal_checkpoint(build_checkpoint(c))


def build_checkpoint(c: Checkpoint) -> bytearray:
    """``c`` as a record not sealed yet: magic, room for the sha256 of the rest, the header's
    length, the header (JSON, with where each array lies) and the arrays' bytes one after the
    other. The record holds copies: once built, it no longer depends on ``c``'s arrays.

    Each array is copied once, into the record, and an array given as row chunks (a reference
    being collected) is copied chunk by chunk, never joined first. The npz in a zlib stream
    written before held the partition's state in three or four copies at once while it was
    built (a partition of 67 streams of 768-d collecting their reference is up to 210 MB; a first
    checkpoint during the collection put a cold start's peak at 1.4-1.6 GiB for 200 streams).
    The service builds a record under the exporter lock (a consistent cut) and seals it after
    the lock is released: the hash is half the time of the two."""
    table: list[list[Any]] = []
    parts: list[tuple[np.ndarray, ...]] = []
    streams = []
    offset = 0
    for i, s in enumerate(c.streams):
        for name, arr in s.arrays.items():
            chunks, dtype, shape = _array_layout(arr, f"checkpoint array {name} of {s.key}")
            table.append([f"{i}/{name}", dtype.str, list(shape), offset])
            parts.append(chunks)
            offset += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        entry: dict[str, Any] = {"key": list(s.key), "meta": s.meta}
        if s.seen_at is not None:
            entry["seen_at"] = s.seen_at
        streams.append(entry)
    header = json.dumps({
        "schema_version": CHECKPOINT_SCHEMA_VERSION, "topic": c.topic, "partition": c.partition,
        "offset": c.offset, "ledger": c.ledger, "created_at": c.created_at or time.time(), "streams": streams,
        "arrays": table,
    }, allow_nan=True).encode()
    start = len(_MAGIC2) + 32
    body = start + 8 + len(header)
    out = bytearray(body + offset)
    out[:len(_MAGIC2)] = _MAGIC2
    out[start:body] = len(header).to_bytes(8, "little") + header
    view = memoryview(out)
    for chunks, (_name, dtype, _shape, at) in zip(parts, table, strict=True):
        at = body + at
        for a in chunks:
            # Into the record at its offset, C order, whatever the array's layout.
            np.copyto(np.frombuffer(view, dtype=dtype, count=a.size, offset=at).reshape(a.shape), a)
            at += a.nbytes
    return out


def seal_checkpoint(record: bytearray) -> bytearray:
    """Write the sha256 of a :func:`build_checkpoint` record into it; returns the record."""
    view = memoryview(record)
    start = len(_MAGIC2) + 32
    view[len(_MAGIC2):start] = hashlib.sha256(view[start:]).digest()
    return record


def _array_layout(arr: CheckpointArray, what: str) -> tuple[tuple[np.ndarray, ...], np.dtype[Any], tuple[int, ...]]:
    """The chunks of a checkpoint array, its dtype and its shape (a tuple of chunks stands for
    their rows one after the other); :class:`StateError` for objects or chunks that do not stack."""
    chunks = tuple(np.asarray(a) for a in arr) if isinstance(arr, tuple) else (np.asarray(arr),)
    if not chunks:
        raise StateError(f"{what} has no chunks")
    first = chunks[0]
    if first.dtype.hasobject:
        raise StateError(f"{what} holds objects")
    if len(chunks) == 1:
        return chunks, first.dtype, first.shape
    if any(a.ndim == 0 or a.dtype != first.dtype or a.shape[1:] != first.shape[1:] for a in chunks):
        raise StateError(f"{what}: its chunks do not stack as rows of one array")
    return chunks, first.dtype, (sum(a.shape[0] for a in chunks), *first.shape[1:])


def decode_checkpoint(data: bytes | bytearray) -> Checkpoint:
    if data.startswith(_MAGIC):
        return _decode_checkpoint_v1(data)
    if not data.startswith(_MAGIC2):
        raise StateError("not an embedwatch checkpoint")
    view = memoryview(data)
    start = len(_MAGIC2) + 32
    try:
        if hashlib.sha256(view[start:]).digest() != bytes(view[len(_MAGIC2):start]):
            raise StateError("damaged checkpoint: checksum mismatch")
        n = int.from_bytes(view[start:start + 8], "little")
        header = json.loads(bytes(view[start + 8:start + 8 + n]))
        if header.get("schema_version") != CHECKPOINT_SCHEMA_VERSION:
            raise StateError(f"checkpoint schema {header.get('schema_version')} is not {CHECKPOINT_SCHEMA_VERSION}")
        body = start + 8 + n
        flat: dict[str, np.ndarray] = {}
        end = 0
        for name, dtype, shape, at in header["arrays"]:
            dt = np.dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64))
            if dt.hasobject or int(at) != end or body + end + count * dt.itemsize > len(view):
                raise ValueError(f"array {name} ({dtype}, {shape} at {at}) is not where the arrays lie")
            end += count * dt.itemsize
            # A copy: the arrays outlive the record, and a monitor writes to some of them.
            flat[name] = np.frombuffer(view, dtype=dt, count=count, offset=body + int(at)).reshape(shape).copy()
        if body + end != len(view):
            raise ValueError(f"{len(view) - body - end} bytes after the arrays")
    except (ValueError, TypeError, KeyError) as e:
        raise StateError(f"damaged checkpoint: {e}") from e
    return _checkpoint_of(header, flat)


def _checkpoint_of(header: dict[str, Any], flat: dict[str, np.ndarray]) -> Checkpoint:
    streams = []
    for i, s in enumerate(header["streams"]):
        prefix = f"{i}/"
        arrays: CheckpointArrays = {name[len(prefix):]: a for name, a in flat.items() if name.startswith(prefix)}
        seen_at = s.get("seen_at")
        streams.append(StreamCheckpoint(StreamKey(*s["key"]), s["meta"], arrays,
                                        None if seen_at is None else float(seen_at)))
    return Checkpoint(header["topic"], int(header["partition"]), int(header["offset"]),
                      {k: int(v) for k, v in header["ledger"].items()}, streams, float(header["created_at"]))


def _decode_checkpoint_v1(data: bytes | bytearray) -> Checkpoint:
    """A checkpoint written before 2026-12-06 (an npz in a zlib stream)."""
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
    return _checkpoint_of(header, flat)


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
        # Per baseline (by record name): the settings (mean_shift_key) of the fits its stored fits
        # record holds, as this store last wrote or read it.
        self._fitted: dict[str, set[MeanShiftKey]] = {}
        self._names: dict[str, tuple[StreamKey, str]] = {}  # record name -> stored version
        # Read before their baseline (the file backend's order): attached when it comes.
        self._early_fits: dict[str, bytes] = {}
        self._indexes_read: dict[str, bytes] = {}  # applied once every version is read
        # Per stream: its index as read (key, value), when applied without versions not held.
        self._partial_indexes: dict[StreamKey, tuple[str, bytes]] = {}
        if records:
            self.restore(records)

    def restore(self, records: MutableMapping[str, bytes]) -> None:
        """Take the baselines, their fits and the indexes of ``records``, removing each record
        as it is decoded (see :meth:`take`), then :meth:`finish_restore`."""
        for key in list(records):
            if self.take(key, records[key]):
                del records[key]
        self.finish_restore()

    def take(self, key: str, value: bytes) -> bool:
        """Restore one record of the baseline store as a read comes to it (a :data:`Take`); False
        for a record that is not one.

        Each baseline is decoded as it is read, and held without its sample as soon as its fits
        are (see :meth:`_release_samples`), so a restart holds one stored baseline's bytes at a
        time: reading them all first held every one (2.6 MB a 768-d stream, all of the group's
        streams) and then their decoded copies, a peak of 1,043 MiB at 200 x 768-d. Indexes wait
        for :meth:`finish_restore`."""
        if not key.startswith(("baseline/", "baseline-fit/", "baseline-index/")):
            return False
        with self._lock, self._restore_mode():
            if key.startswith("baseline/"):
                self._take_baseline(key, value)
            elif key.startswith("baseline-fit/"):
                name = key.removeprefix("baseline-fit/")
                if self._has_running_fit(name):  # attached or written by this store already
                    pass
                elif name in self._names:
                    self._take_fits(name, value)
                else:
                    self._early_fits[name] = value
            else:
                self._indexes_read[key] = value
        return True

    def read(self, read: Callable[[Take | None], dict[str, bytes]],
             each: Callable[[], None] | None = None) -> dict[str, bytes]:
        """Run a backend read (``read_all`` or ``read_new``) that hands this store its records as
        they come (:meth:`take`), then :meth:`finish_restore`; returns the other records.
        ``each`` is called for every record read (a sign of life while a long read runs)."""
        def take(key: str, value: bytes) -> bool:
            if each is not None:
                each()
            return self.take(key, value)

        try:
            return read(take)
        finally:
            self.finish_restore()

    def finish_restore(self) -> None:
        """Apply what :meth:`take` kept for the end of a read: the indexes, and fits read before
        their baseline."""
        with self._lock, self._restore_mode():
            for name in [n for n in self._early_fits if n in self._names]:
                self._take_fits(name, self._early_fits.pop(name))
            for name in self._early_fits:
                log.warning("fitted tests baseline-fit/%s belong to no stored baseline: ignored", name)
            self._early_fits.clear()
            for key, data in self._indexes_read.items():
                doc = json.loads(data)
                index = _Index(StreamKey(*doc["stream"]), list(doc["versions"]), doc.get("active"),
                               list(doc.get("previous", [])))
                if "forgotten_at" in doc:  # forgotten through another replica's API (or before a restart)
                    self._partial_indexes.pop(index.stream, None)
                    self._drop_stream(index)
                    continue
                if self._drop_missing_versions(index):
                    # Kept as read: a version written just before its index may come in the next
                    # read (a directory listed while another replica wrote), then it is applied again.
                    self._partial_indexes[index.stream] = key, data
                else:
                    self._partial_indexes.pop(index.stream, None)
                super()._store_index(index)
            self._indexes_read.clear()

    def _forget_stream(self, index: _Index) -> builtins.list[str]:
        """Write the stream's forgotten index, then delete its versions' records; the other
        replicas drop the versions they hold when they read the index (at their next partition
        assignment or restart), also those whose records a failed delete left."""
        stream = index.stream
        doc = {"stream": list(stream), "versions": [], "active": None, "previous": [], "forgotten_at": time.time()}
        self.backend.write({f"baseline-index/{safe_name(stream)}": json.dumps(doc).encode()})
        self._partial_indexes.pop(stream, None)
        self._delete_records(stream, [bid for k, bid in list(self._names.values()) if k == stream])
        return self._drop_stream(index)

    def _delete_records(self, key: StreamKey, ids: Iterable[str]) -> None:
        """Delete the records (version and fits) of versions of ``key`` that no index lists any
        more and this store knows are stored; a failure leaves them there (logged), where every
        reader drops them as unlisted."""
        names = [n for n in (_record_name(key, bid) for bid in ids) if n in self._names]
        if not names:
            return
        try:
            self.backend.delete(f"{kind}/{n}" for n in names for kind in ("baseline", "baseline-fit"))
        except Exception as e:
            log.warning("stream %s: cannot delete the records of %d unlisted baseline versions (%s): they stay "
                        "in the state backend, where every reader drops them", key, len(names), e)
            return
        for n in names:
            del self._names[n]
            self._fitted.pop(n, None)

    def _drop_stream(self, index: _Index) -> builtins.list[str]:
        """Drop the stream of ``index`` from memory, with every version of it held."""
        for name in [n for n, (k, _bid) in self._names.items() if k == index.stream]:
            del self._names[name]
            self._fitted.pop(name, None)
            self._early_fits.pop(name, None)
        return super()._forget_stream(index)

    def _drop_missing_versions(self, index: _Index) -> bool:
        """Remove from ``index`` the versions this store does not hold (a damaged record, skipped):
        an index naming them made list() and get() fail. Without its active version, the stream
        has none and builds a new baseline, as for a stored one that does not load. True if any was."""
        stream = index.stream
        held = [bid for bid in index.versions if (stream, bid) in self._baselines]
        if len(held) == len(index.versions):
            return False
        if index.active is not None and (stream, index.active) not in self._baselines:
            log.error("stream %s: its active baseline %s is not stored (damaged record?): the stream "
                      "has no active baseline and builds a new one", stream, index.active)
            index.active = None
        index.versions = held
        index.previous = [bid for bid in index.previous if (stream, bid) in self._baselines]
        return True

    @contextlib.contextmanager
    def _restore_mode(self) -> Iterator[None]:
        # Restored records are not written back.
        before, self._restoring = self._restoring, True
        try:
            yield
        finally:
            self._restoring = before

    def _take_baseline(self, key: str, data: bytes) -> None:
        if key.removeprefix("baseline/") in self._names:
            # Held already: this replica's own write, read back at an assignment. An id is a
            # content hash, so it is the same version; decoding it again took 7 ms and a copy with
            # its sample (768-d), 1.3 s for the 200 baselines of a cold start's first rebalance.
            return
        try:
            b = decode_baseline(data, origin=key)
        except ValueError as e:
            log.error("skipping damaged baseline record %s: %s", key, e)
            return
        stream = _stream_of_baseline(b)
        self._write_version(stream, b)
        if stream in self._partial_indexes:  # its index was applied without some version: again
            index_key, index_data = self._partial_indexes.pop(stream)
            self._indexes_read.setdefault(index_key, index_data)  # unless a newer one was read
        name = key.removeprefix("baseline/")
        fits = self._early_fits.pop(name, None)
        if fits is not None:
            self._take_fits(name, fits)
        else:
            self._release_samples([b])

    def _take_fits(self, name: str, data: bytes) -> None:
        """Give a stored baseline the mean-shift tests fitted on it before the restart."""
        baseline = self._baselines.get(self._names[name])
        if baseline is None:  # a version dropped from memory (MAX_HELD_VERSIONS) meanwhile
            return
        try:
            keys = attach_fits(data, baseline, origin=f"baseline-fit/{name}")
        except BaselineIntegrityError as e:
            log.error("skipping damaged fitted tests baseline-fit/%s (refitted when needed): %s", name, e)
            return
        self._fitted[name] = set(keys)  # the record read is the stored one now
        self._release_samples([baseline])

    def _has_running_fit(self, name: str) -> bool:
        """Whether the stored fits of baseline ``name`` are known to hold all the running settings
        need: another fits record of it (another replica's) has nothing more for this store."""
        if name not in self._fitted:
            return False
        det = self.detection
        return det is None or not det.scan_windows or mean_shift_key(det) in self._fitted[name]

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
            if b.released_sample_rows is None and (not det.scan_windows or key in b.mean_shift_fits()):
                self.hold(b.without_sample(det))

    def hold(self, baseline: Baseline) -> None:
        """As the in-memory store's, and store the fits of a baseline stored without them once a
        monitor has fitted it: a baseline written by a version of embedwatch that did not store
        fits, or activated through the API before any monitor used it, would otherwise be refitted
        at every restart, and kept with its sample by the replicas that do not own its stream.
        So is a fit for settings its stored fits lack (the scan settings changed at a restart):
        its fits record is rewritten with every fit it holds."""
        super().hold(baseline)
        key = _stream_of_baseline(baseline)
        bid = str(baseline.metadata["baseline_id"])
        name = _record_name(key, bid)
        keys = set(baseline.mean_shift_fits())
        if self._restoring or keys <= self._fitted.get(name, set()) or (key, bid) not in self._baselines:
            return
        fits = self._fits_record(name, baseline)
        if not fits:
            return
        try:
            self.backend.write(fits)
        except Exception as e:
            # Derived data: without it, a restart refits. Any backend error: a KafkaError raised
            # from here failed the router's update of the stream (its block dead-lettered).
            log.warning("cannot store the fitted tests of baseline %s: %s", bid, e)
            return
        self._fitted[name] = keys

    @staticmethod
    def _fits_record(name: str, baseline: Baseline) -> dict[str, bytes]:
        """The record of what was fitted on ``baseline`` so far (none if nothing was)."""
        fits = encode_fits(baseline)
        return {} if fits is None else {f"baseline-fit/{name}": fits}

    def _write_version(self, key: StreamKey, baseline: Baseline) -> None:
        bid = str(baseline.metadata["baseline_id"])
        name = _record_name(key, bid)
        if not self._restoring:
            # Written before it is held: a write that fails leaves this store as it was. Beside
            # it, what was fitted on it (a baseline built by a stream is saved once its monitor has
            # fitted its scan): a restart then takes the fit instead of redoing it.
            fits = self._fits_record(name, baseline)
            self.backend.write({f"baseline/{name}": encode_baseline(baseline), **fits})
            if fits:
                self._fitted[name] = set(baseline.mean_shift_fits())
        super()._write_version(key, baseline)
        self._names[name] = key, bid

    def _store_index(self, index: _Index) -> None:
        if not self._restoring:
            # Written before it is applied: a write that fails (a state-topic timeout) must leave
            # the index as the backend has it, or the API reported a version active that neither
            # the stream nor the stored state used, and a retried rollback went back two versions.
            doc = index.to_json()
            doc["stream"] = list(index.stream)
            self.backend.write({f"baseline-index/{safe_name(index.stream)}": json.dumps(doc).encode()})
            self._partial_indexes.pop(index.stream, None)  # superseded by this one
        super()._store_index(index)
        if not self._restoring:
            # The versions the index no longer lists (beyond MAX_HELD_VERSIONS) and no longer
            # held: this store writes the stream's index, so they are gone for good. Kept, every
            # promotion left a version (2.6 MB at 768-d) in the state topic for ever, read and
            # decoded by every replica at every restart only to be dropped as unlisted; those an
            # earlier version of embedwatch left, or a failed delete, go at the stream's next save.
            self._delete_records(index.stream, [bid for k, bid in list(self._names.values()) if k == index.stream
                                                and bid not in index.versions and (k, bid) not in self._baselines])


def _record_name(key: StreamKey, baseline_id: str) -> str:
    """What follows ``baseline/`` and ``baseline-fit/`` in the keys of a stored version."""
    return f"{safe_name(key)}/{baseline_id}"


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
