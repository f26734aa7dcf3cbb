"""Versioned baselines per stream: a directory store, an in-memory store, and their interface.

No pickle anywhere. A baseline is a pair of files:

``<name>.npz``
    its arrays (``Baseline.to_arrays()``), written with ``np.savez`` and read back with
    ``allow_pickle=False`` (object arrays are refused when saving);
``<name>.json``
    ``{"format": "embedwatch-baseline", "format_version": 1, "metadata": {...},
    "arrays": {name: {"dtype", "shape"}}, "arrays_sha256": ..., "metadata_sha256": ...}``.

Both hashes are checked on load: a file changed by hand (or truncated) is refused with
:class:`BaselineIntegrityError` naming the file, instead of silently feeding a wrong baseline
to the detectors.

:class:`BaselineStore` lays versions out per stream::

    <directory>/<stream-safe-name>/index.json          {"stream", "versions": [...], "active", "previous": [...]}
    <directory>/<stream-safe-name>/<baseline_id>.npz
    <directory>/<stream-safe-name>/<baseline_id>.json

``<stream-safe-name>`` is ``model+model_version+segment`` with each part percent-encoded
(``urllib.parse.quote(part, safe="")``), so any label maps to one safe directory name. Every file
is written to a temporary file in the same directory and moved in place with ``os.replace``
(atomic); ``index.json`` is written last, so a crash leaves either the old or the new state.

:class:`MemoryBaselineStore` has the same behaviour without files (the service's default,
``state.backend: none``); both satisfy :class:`BaselineRepository`, the interface a compacted
Kafka topic store can implement later (:func:`encode_baseline` / :func:`decode_baseline` turn a
baseline into one self-checking ``bytes`` value for such a record).
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import json
import math
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote

import numpy as np

from embedwatch.baseline import Baseline, MeanShiftKey, usability_problem
from embedwatch.detectors.mean_shift import MeanShiftTest
from embedwatch.events import DEFAULT_SEGMENT, StreamKey

FORMAT = "embedwatch-baseline"
FORMAT_VERSION = 1
_META_ARRAY = "__embedwatch_metadata__"
_MAX_PREVIOUS = 100
#: Versions of a stream the in-memory stores (:class:`MemoryBaselineStore` and the durable store
#: built on it) hold: the active one and the four a rollback reaches first. Each holds a
#: reference sample (``baseline_sample * dim * 4`` bytes, 243 KiB at 384-d), so every promotion
#: kept for the life of the process grew it without bound. Older versions become unknown (the
#: API answers 404 for their id). The directory store keeps every version on disk; the durable
#: store (state backends) deletes their records.
MAX_HELD_VERSIONS = 5

StreamLike = StreamKey | str


class BaselineNotFoundError(LookupError):
    """No such stream, no such baseline version, or no active baseline."""


class BaselineIntegrityError(ValueError):
    """A stored baseline does not match its recorded hashes (tampered, truncated or corrupt)."""


class BaselineHistoryError(ValueError):
    """A rollback has nothing to go back to."""


@runtime_checkable
class BaselineRepository(Protocol):
    """Versioned baselines per stream. Metadata dicts are ``Baseline.metadata`` plus ``"active": bool``
    and ``"stream": "model/model_version/segment"``."""

    def save(self, baseline: Baseline, activate: bool = True) -> dict[str, Any]:
        """Store a new version (idempotent for an identical one); optionally make it active."""
        ...

    def list(self, stream: StreamLike | None = None) -> builtins.list[dict[str, Any]]:
        """Metadata of every version (of one stream), streams sorted, versions oldest first."""
        ...

    def get(self, stream: StreamLike, baseline_id: str | None = None) -> Baseline:
        """One version, the active one by default; :class:`BaselineNotFoundError` if absent."""
        ...

    def promote(self, stream: StreamLike, baseline_id: str) -> dict[str, Any]:
        """Make an existing version active; returns its metadata."""
        ...

    def rollback(self, stream: StreamLike) -> dict[str, Any]:
        """Re-activate the version active before the current one; :class:`BaselineHistoryError` if none."""
        ...

    def hold(self, baseline: Baseline) -> None:
        """Keep ``baseline`` in memory in place of the stored version with its id (a copy without
        its sample, :meth:`Baseline.without_sample`); a store that keeps nothing in memory ignores it."""
        ...

    def forget(self, stream: StreamLike) -> builtins.list[str]:
        """Remove every version of a retired stream and its history; returns the ids removed, in
        save order. :class:`BaselineNotFoundError` if the stream has none."""
        ...


# -- helpers ------------------------------------------------------------------------------------


def stream_key(stream: StreamLike) -> StreamKey:
    return stream if isinstance(stream, StreamKey) else StreamKey.parse(stream)


def stream_of(metadata: Mapping[str, Any]) -> StreamKey:
    """The stream a baseline belongs to, from its metadata."""
    try:
        return StreamKey(
            str(metadata["model"]), str(metadata["model_version"]),
            str(metadata.get("segment") or DEFAULT_SEGMENT),
        )
    except KeyError as e:
        raise ValueError(f"baseline metadata lacks {e.args[0]!r}") from None


def safe_name(stream: StreamLike) -> str:
    """Directory name of a stream: the three labels percent-encoded, joined with '+'."""
    return "+".join(quote(part, safe="") for part in stream_key(stream))


def _file_stem(baseline_id: str) -> str:
    stem = quote(baseline_id, safe="")
    if not stem or stem.startswith(".") or stem == "index":
        stem = "_" + stem
    return stem


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True,
                      default=str).encode("utf-8")


def arrays_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """Hash of named arrays: names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(_canonical([name, a.dtype.str, list(a.shape)]))
        h.update(a.tobytes())
    return h.hexdigest()


def _check_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, a in arrays.items():
        arr = np.asarray(a)
        if arr.dtype.hasobject:
            raise TypeError(f"baseline array {name!r} has dtype object; it cannot be stored without pickle")
        if name == _META_ARRAY:
            raise ValueError(f"baseline array name {name!r} is reserved")
        out[name] = arr
    return out


def _header(metadata: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
    md = dict(metadata)
    md.pop("active", None)
    md.pop("stream", None)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "metadata": md,
        "arrays": {n: {"dtype": a.dtype.str, "shape": list(a.shape)} for n, a in sorted(arrays.items())},
        "arrays_sha256": arrays_sha256(arrays),
        "metadata_sha256": hashlib.sha256(_canonical(md)).hexdigest(),
    }


def _npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _read_npz(data: bytes, origin: str, max_unpacked: int | None = None) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            if max_unpacked is not None:
                # Sizes the archive declares, checked before anything is unpacked: a small
                # compressed upload could otherwise unpack into gigabytes.
                unpacked = sum(info.file_size for info in z.zip.infolist())
                if unpacked > max_unpacked:
                    raise ValueError(f"its arrays unpack to {unpacked} bytes, more than {max_unpacked}")
            return {name: z[name] for name in z.files}
    except Exception as e:  # ValueError, BadZipFile, zlib errors: a corrupt file, never a crash
        raise BaselineIntegrityError(f"{origin}: unreadable baseline arrays: {e}") from e


def _verify(header: Any, arrays: dict[str, np.ndarray], origin: str) -> Baseline:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise BaselineIntegrityError(f"{origin}: not an embedwatch baseline header")
    if header.get("format_version") != FORMAT_VERSION:
        raise BaselineIntegrityError(f"{origin}: unsupported format_version {header.get('format_version')!r}")
    md = header.get("metadata")
    if not isinstance(md, dict):
        raise BaselineIntegrityError(f"{origin}: header has no metadata object")
    if hashlib.sha256(_canonical(md)).hexdigest() != header.get("metadata_sha256"):
        raise BaselineIntegrityError(f"{origin}: metadata does not match its hash (file modified?)")
    if arrays_sha256(arrays) != header.get("arrays_sha256"):
        raise BaselineIntegrityError(f"{origin}: arrays do not match their content hash (file modified?)")
    try:
        baseline = Baseline.from_arrays(md, arrays)
    except (KeyError, ValueError, TypeError) as e:
        raise BaselineIntegrityError(f"{origin}: invalid baseline: {e}") from e
    # Every baseline read from bytes (a restore, a file given to replay, an upload): its hashes
    # prove it is the one written, not that a monitor can use it.
    problem = usability_problem(baseline)
    if problem is not None:
        raise BaselineIntegrityError(f"{origin}: unusable baseline: {problem}")
    return baseline


def _metadata(baseline: Baseline) -> dict[str, Any]:
    md = dict(baseline.metadata)
    if not md.get("baseline_id"):
        raise ValueError("baseline metadata has no baseline_id")
    return md


def encode_baseline(baseline: Baseline) -> bytes:
    """One self-checking bytes value (an npz holding the arrays and the JSON header); no pickle."""
    arrays = _check_arrays(baseline.to_arrays())
    header = _canonical(_header(_metadata(baseline), arrays))
    return _npz_bytes({**arrays, _META_ARRAY: np.frombuffer(header, dtype=np.uint8)})


def _read_record(data: bytes, origin: str, max_unpacked: int | None = None) -> tuple[Any, dict[str, np.ndarray]]:
    """The embedded JSON header and the arrays of an npz value (a baseline or its fits)."""
    arrays = _read_npz(data, origin, max_unpacked)
    raw = arrays.pop(_META_ARRAY, None)
    if raw is None:
        raise BaselineIntegrityError(f"{origin}: no embedded header")
    try:
        return json.loads(raw.tobytes().decode("utf-8")), arrays
    except (UnicodeDecodeError, ValueError) as e:
        raise BaselineIntegrityError(f"{origin}: header is not JSON: {e}") from e


def decode_baseline(data: bytes, origin: str = "<bytes>", max_unpacked: int | None = None) -> Baseline:
    """Inverse of :func:`encode_baseline`; :class:`BaselineIntegrityError` on any mismatch, or
    when its arrays would unpack to more than ``max_unpacked`` bytes."""
    header, arrays = _read_record(data, origin, max_unpacked)
    return _verify(header, arrays, origin)


FITS_FORMAT = "embedwatch-baseline-fits"


def encode_fits(baseline: Baseline) -> bytes | None:
    """The mean-shift tests fitted on ``baseline`` so far, as one self-checking value (None if
    there is none). Derived data: a store keeps it beside the baseline so that a restart does not
    fit them again (70 ms a 768-d stream, 92% of restoring one); without it they are refitted."""
    fits = baseline.mean_shift_fits()
    if not fits:
        return None
    arrays: dict[str, np.ndarray] = {}
    for i, test in enumerate(fits.values()):
        arrays.update({f"{i}/{name}": a for name, a in test.to_arrays().items()})
    header = _canonical({"format": FITS_FORMAT, "format_version": 1,
                         "baseline_id": str(baseline.metadata["baseline_id"]),
                         "settings": [list(k) for k in fits], "arrays_sha256": arrays_sha256(arrays)})
    return _npz_bytes({**arrays, _META_ARRAY: np.frombuffer(header, dtype=np.uint8)})


def attach_fits(data: bytes, baseline: Baseline, origin: str = "<bytes>") -> list[MeanShiftKey]:
    """Give ``baseline`` the fitted tests of :func:`encode_fits` output; returns their keys
    (:func:`embedwatch.baseline.mean_shift_key`).
    :class:`BaselineIntegrityError` if they are damaged or belong to another baseline."""
    header, arrays = _read_record(data, origin)
    if not isinstance(header, dict) or header.get("format") != FITS_FORMAT or header.get("format_version") != 1:
        raise BaselineIntegrityError(f"{origin}: not an embedwatch baseline fits record")
    if header.get("baseline_id") != baseline.metadata.get("baseline_id"):
        raise BaselineIntegrityError(f"{origin}: fitted for baseline {header.get('baseline_id')}, "
                                     f"not {baseline.metadata.get('baseline_id')}")
    if arrays_sha256(arrays) != header.get("arrays_sha256"):
        raise BaselineIntegrityError(f"{origin}: arrays do not match their content hash")
    tests = []
    try:
        for i, key in enumerate(header["settings"]):
            part = {name.split("/", 1)[1]: a for name, a in arrays.items() if name.split("/", 1)[0] == str(i)}
            tests.append(((int(key[0]), float(key[1]), int(key[2])),
                          MeanShiftTest.from_arrays(baseline.mean, baseline.count, part)))
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise BaselineIntegrityError(f"{origin}: invalid fitted test: {e}") from e
    for key, test in tests:
        baseline.keep_mean_shift(key, test)
    return [key for key, _ in tests]


#: What :func:`atomic_write`'s temporary file name adds to the name of the file it replaces
#: ("." before it, then "." + 8 random characters + ".tmp" after it).
ATOMIC_WRITE_EXTRA_NAME_BYTES = 14


def atomic_write(path: Path, data: bytes | bytearray, head: bytes = b"") -> None:
    """Write ``head`` then ``data`` to ``path`` so a reader sees the old or the new content, never
    a mix (``head`` apart, so a large ``data`` is not copied to prefix it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(head)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _pair(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix in (".npz", ".json"):
        p = p.with_suffix("")
    return p.with_name(p.name + ".npz"), p.with_name(p.name + ".json")


def save_file(baseline: Baseline, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``<stem>.npz`` + ``<stem>.json`` (``path`` may name either, or the stem); atomic per file."""
    npz, js = _pair(path)
    arrays = _check_arrays(baseline.to_arrays())
    header = _header(_metadata(baseline), arrays)
    atomic_write(npz, _npz_bytes(arrays))
    atomic_write(js, json.dumps(header, indent=2, sort_keys=True, default=str).encode("utf-8") + b"\n")
    return npz, js


def load_file(path: str | os.PathLike[str]) -> Baseline:
    """Read a pair written by :func:`save_file`, verifying both hashes."""
    npz, js = _pair(path)
    try:
        header_bytes = js.read_bytes()
        npz_bytes = npz.read_bytes()
    except FileNotFoundError as e:
        raise BaselineNotFoundError(f"baseline file missing: {e.filename}") from e
    try:
        header = json.loads(header_bytes)
    except ValueError as e:
        raise BaselineIntegrityError(f"{js}: not valid JSON: {e}") from e
    return _verify(header, _read_npz(npz_bytes, str(npz)), str(npz))


# -- stores -------------------------------------------------------------------------------------


class _Index:
    __slots__ = ("active", "previous", "stream", "versions")

    def __init__(self, stream: StreamKey, versions: builtins.list[str] | None = None,
                 active: str | None = None, previous: builtins.list[str] | None = None) -> None:
        self.stream = stream
        self.versions: builtins.list[str] = versions or []
        self.active = active
        self.previous: builtins.list[str] = previous or []  # earlier active ids, most recent last

    def to_json(self) -> dict[str, Any]:
        return {"stream": str(self.stream), "versions": self.versions, "active": self.active,
                "previous": self.previous}

    def activate(self, baseline_id: str) -> None:
        if self.active is not None and self.active != baseline_id:
            self.previous.append(self.active)
            del self.previous[:-_MAX_PREVIOUS]
        self.active = baseline_id

    def trim(self, limit: int) -> builtins.list[str]:
        """Keep at most ``limit`` versions: the active one, the newest saved, then those a rollback
        reaches first (the activation history, most recent first), then the newest saved. Returns
        the versions dropped, in save order."""
        keep: dict[str, None] = {}
        for bid in (self.active, *self.versions[-1:], *reversed(self.previous), *reversed(self.versions)):
            if len(keep) >= limit:
                break
            if bid is not None and bid in self.versions:
                keep[bid] = None
        dropped = [bid for bid in self.versions if bid not in keep]
        if dropped:
            self.versions = [bid for bid in self.versions if bid in keep]
            self.previous = [bid for bid in self.previous if bid in keep]
        return dropped

    def rollback(self) -> str:
        while self.previous:
            candidate = self.previous.pop()
            if candidate in self.versions and candidate != self.active:
                self.active = candidate
                return candidate
        # No activation history: the version saved before the active one.
        if self.active in self.versions:
            pos = self.versions.index(self.active)
            if pos > 0:
                self.active = self.versions[pos - 1]
                return self.active
        raise BaselineHistoryError(f"stream {self.stream}: no previous baseline version to roll back to")


class _IndexedStore:
    """The version/active/rollback logic shared by the directory and the memory store."""

    #: Versions kept per stream (None: all); see :data:`MAX_HELD_VERSIONS`.
    max_versions: int | None = None

    def __init__(self) -> None:
        self._lock = threading.RLock()

    # storage primitives
    def _load_index(self, key: StreamKey) -> _Index | None:
        raise NotImplementedError

    def _store_index(self, index: _Index) -> None:
        raise NotImplementedError

    def _streams(self) -> builtins.list[StreamKey]:
        raise NotImplementedError

    def _write_version(self, key: StreamKey, baseline: Baseline) -> None:
        raise NotImplementedError

    def _read_version(self, key: StreamKey, baseline_id: str) -> Baseline:
        raise NotImplementedError

    def _version_metadata(self, key: StreamKey, baseline_id: str) -> dict[str, Any]:
        raise NotImplementedError

    def _forget_version(self, key: StreamKey, baseline_id: str) -> None:
        """A version :meth:`save` dropped from the stream's index (beyond :attr:`max_versions`)."""

    def _forget_stream(self, index: _Index) -> builtins.list[str]:
        """Remove the stream of ``index`` and every version of it; the ids removed."""
        raise NotImplementedError

    # public API
    def hold(self, baseline: Baseline) -> None:
        """Nothing is held in memory by default (the directory store reads each version back)."""

    def save(self, baseline: Baseline, activate: bool = True) -> dict[str, Any]:
        md = _metadata(baseline)
        key = stream_of(md)
        bid = str(md["baseline_id"])
        with self._lock:
            index = self._load_index(key) or _Index(key)
            if bid in index.versions:
                old = self._version_metadata(key, bid)
                if old.get("content_hash") != md.get("content_hash"):
                    raise ValueError(f"stream {key}: baseline {bid} exists with different content")
            else:
                self._write_version(key, baseline)
                index.versions.append(bid)
            if activate:
                index.activate(bid)
            dropped = index.trim(self.max_versions) if self.max_versions is not None else []
            self._store_index(index)
            for old_bid in dropped:  # once the index without them is stored
                self._forget_version(key, old_bid)
            return self._describe(index, bid)

    def list(self, stream: StreamLike | None = None) -> builtins.list[dict[str, Any]]:
        with self._lock:
            keys = [stream_key(stream)] if stream is not None else sorted(self._streams(), key=str)
            out: builtins.list[dict[str, Any]] = []
            for key in keys:
                index = self._load_index(key)
                if index is None:
                    continue
                out.extend(self._describe(index, bid) for bid in index.versions)
            return out

    def get(self, stream: StreamLike, baseline_id: str | None = None) -> Baseline:
        key = stream_key(stream)
        with self._lock:
            index = self._require(key)
            bid = baseline_id if baseline_id is not None else index.active
            if bid is None:
                raise BaselineNotFoundError(f"stream {key} has no active baseline")
            if bid not in index.versions:
                raise BaselineNotFoundError(f"stream {key} has no baseline {bid!r}")
            return self._read_version(key, bid)

    def active_id(self, stream: StreamLike) -> str | None:
        with self._lock:
            index = self._load_index(stream_key(stream))
            return None if index is None else index.active

    def promote(self, stream: StreamLike, baseline_id: str) -> dict[str, Any]:
        key = stream_key(stream)
        with self._lock:
            index = self._require(key)
            if baseline_id not in index.versions:
                raise BaselineNotFoundError(f"stream {key} has no baseline {baseline_id!r}")
            # Refuse to activate a version that does not load (tampered file): fail before switching.
            self._read_version(key, baseline_id)
            index.activate(baseline_id)
            self._store_index(index)
            return self._describe(index, baseline_id)

    def rollback(self, stream: StreamLike) -> dict[str, Any]:
        key = stream_key(stream)
        with self._lock:
            index = self._require(key)
            bid = index.rollback()
            self._read_version(key, bid)
            self._store_index(index)
            return self._describe(index, bid)

    def forget(self, stream: StreamLike) -> builtins.list[str]:
        with self._lock:
            return self._forget_stream(self._require(stream_key(stream)))

    def _require(self, key: StreamKey) -> _Index:
        index = self._load_index(key)
        if index is None:
            raise BaselineNotFoundError(f"no baselines for stream {key}")
        return index

    def _describe(self, index: _Index, bid: str) -> dict[str, Any]:
        md = dict(self._version_metadata(index.stream, bid))
        md["stream"] = str(index.stream)
        md["active"] = bid == index.active
        return md


class BaselineStore(_IndexedStore):
    """Baselines in a directory (e.g. a persistent volume); see the module docstring for the layout."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        super().__init__()
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def stream_dir(self, stream: StreamLike) -> Path:
        return self.directory / safe_name(stream)

    def path(self, stream: StreamLike, baseline_id: str) -> Path:
        """The ``.npz`` file of a version."""
        return self.stream_dir(stream) / (_file_stem(baseline_id) + ".npz")

    def _load_index(self, key: StreamKey) -> _Index | None:
        p = self.stream_dir(key) / "index.json"
        try:
            doc = json.loads(p.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as e:
            raise BaselineIntegrityError(f"{p}: not valid JSON: {e}") from e
        if not isinstance(doc, dict) or doc.get("stream") != str(key):
            raise BaselineIntegrityError(f"{p}: index does not belong to stream {key}")
        return _Index(key, list(doc.get("versions") or []), doc.get("active"), list(doc.get("previous") or []))

    def _store_index(self, index: _Index) -> None:
        p = self.stream_dir(index.stream) / "index.json"
        atomic_write(p, json.dumps(index.to_json(), indent=2).encode("utf-8") + b"\n")

    def _streams(self) -> builtins.list[StreamKey]:
        out = []
        for p in self.directory.glob("*/index.json"):
            try:
                doc = json.loads(p.read_bytes())
                out.append(StreamKey.parse(str(doc["stream"])))
            except (ValueError, KeyError, TypeError):
                continue  # not ours
        return out

    def _write_version(self, key: StreamKey, baseline: Baseline) -> None:
        save_file(baseline, self.path(key, str(baseline.metadata["baseline_id"])))

    def _read_version(self, key: StreamKey, baseline_id: str) -> Baseline:
        return load_file(self.path(key, baseline_id))

    def _forget_stream(self, index: _Index) -> builtins.list[str]:
        # The index first: a removal cut short leaves unlisted files, not an index naming lost ones.
        d = self.stream_dir(index.stream)
        (d / "index.json").unlink(missing_ok=True)
        for bid in index.versions:
            for p in _pair(self.path(index.stream, bid)):
                p.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: files of someone else's
            d.rmdir()
        return list(index.versions)

    def _version_metadata(self, key: StreamKey, baseline_id: str) -> dict[str, Any]:
        p = self.path(key, baseline_id).with_suffix(".json")
        try:
            header = json.loads(p.read_bytes())
        except FileNotFoundError as e:
            raise BaselineNotFoundError(f"baseline file missing: {p}") from e
        except ValueError as e:
            raise BaselineIntegrityError(f"{p}: not valid JSON: {e}") from e
        md = header.get("metadata") if isinstance(header, dict) else None
        if not isinstance(md, dict):
            raise BaselineIntegrityError(f"{p}: header has no metadata object")
        return dict(md)


class MemoryBaselineStore(_IndexedStore):
    """The same store in memory (nothing survives a restart). Versions are kept by reference:
    a :class:`Baseline` is immutable (read-only arrays, checked content hash), so the object a
    monitor uses and the stored version share their arrays instead of holding a second, encoded
    copy of every baseline (about ``baseline_sample * dim * 4`` bytes per stream).

    At most :data:`MAX_HELD_VERSIONS` versions per stream are held: a save beyond it drops the
    oldest of those a rollback would reach last, and their ids become unknown. An index stored
    (e.g. read back by the durable store at a restart) drops the held versions of its stream that
    it no longer lists, except any newer than every listed one (saved just before its index)."""

    max_versions: int | None = MAX_HELD_VERSIONS

    def __init__(self) -> None:
        super().__init__()
        self._indexes: dict[StreamKey, _Index] = {}
        self._baselines: dict[tuple[StreamKey, str], Baseline] = {}
        self._meta: dict[tuple[StreamKey, str], dict[str, Any]] = {}
        self._held: dict[StreamKey, dict[str, None]] = {}  # ids in _baselines per stream, save order
        self._changes = 0  # of _baselines: held() counts again after one
        self._held_count: tuple[int, float, tuple[int, int]] | None = None

    def _load_index(self, key: StreamKey) -> _Index | None:
        idx = self._indexes.get(key)
        if idx is None:
            return None
        return _Index(key, list(idx.versions), idx.active, list(idx.previous))

    def _store_index(self, index: _Index) -> None:
        if self.max_versions is not None:
            # An index written before versions were bounded (read back at a restart).
            for bid in index.trim(self.max_versions):
                self._forget_version(index.stream, bid)
        self._indexes[index.stream] = index
        self._forget_unlisted(index)

    def _forget_unlisted(self, index: _Index) -> None:
        """Drop the held versions ``index`` no longer lists: a durable store reads every version
        ever written back at a restart, the ones a save dropped included. One newer than every
        listed version is kept: written just before its index, which comes in a later read."""
        held = self._held.get(index.stream)
        if not held or len(held) <= len(index.versions):
            return
        listed = set(index.versions)
        newest = max((float(self._meta[(index.stream, b)].get("created_at", math.inf))
                      for b in listed if (index.stream, b) in self._meta), default=None)
        if newest is None:
            return
        for bid in [b for b in held if b not in listed]:
            if float(self._meta[(index.stream, bid)].get("created_at", math.inf)) <= newest:
                self._forget_version(index.stream, bid)

    def _forget_version(self, key: StreamKey, baseline_id: str) -> None:
        self._changes += 1
        self._baselines.pop((key, baseline_id), None)
        self._meta.pop((key, baseline_id), None)
        held = self._held.get(key)
        if held is not None:
            held.pop(baseline_id, None)
            if not held:
                del self._held[key]

    def _streams(self) -> builtins.list[StreamKey]:
        return list(self._indexes)

    def _forget_stream(self, index: _Index) -> builtins.list[str]:
        held = list(self._held.get(index.stream, {}))
        self._indexes.pop(index.stream, None)
        for bid in held:
            self._forget_version(index.stream, bid)
        return list(index.versions) + [bid for bid in held if bid not in index.versions]

    def held(self, max_age_s: float = 60.0) -> tuple[int, int]:
        """Versions held in memory and the bytes of their arrays (:meth:`Baseline.held_arrays`),
        an array shared by several counted once: a 768-d version without its sample holds about
        0.4 MiB, its mean-shift scan fit most of it. Counted again after a change of the held
        versions, or after ``max_age_s`` (a scan fitted on a held version adds bytes unseen): 5 ms
        for 200 versions, every scrape at thousands of them held the exporter's lock too long."""
        with self._lock:
            now, last = time.monotonic(), self._held_count
            if last is None or last[0] != self._changes or now - last[1] > max_age_s:
                arrays = {(a.__array_interface__["data"][0], a.nbytes): a.nbytes
                          for b in self._baselines.values() for a in b.held_arrays()}
                last = self._held_count = self._changes, now, (len(self._baselines), sum(arrays.values()))
            return last[2]

    def _write_version(self, key: StreamKey, baseline: Baseline) -> None:
        bid = str(baseline.metadata["baseline_id"])
        self._changes += 1
        self._baselines[(key, bid)] = baseline
        self._meta[(key, bid)] = _metadata(baseline)
        self._held.setdefault(key, {})[bid] = None

    def _read_version(self, key: StreamKey, baseline_id: str) -> Baseline:
        try:
            return self._baselines[(key, baseline_id)]
        except KeyError:
            # An index naming a version that is not held (e.g. its record was damaged): a lookup
            # error the callers handle, not a KeyError that stops the service loop.
            raise BaselineNotFoundError(f"stream {key}: baseline {baseline_id!r} is not in the store") from None

    def hold(self, baseline: Baseline) -> None:
        """Replace the stored version with the same id by ``baseline`` (written through stores
        persisted the full one already)."""
        with self._lock:
            version = (stream_of(_metadata(baseline)), str(baseline.metadata["baseline_id"]))
            if version in self._baselines:
                self._changes += 1
                self._baselines[version] = baseline

    def _version_metadata(self, key: StreamKey, baseline_id: str) -> dict[str, Any]:
        try:
            return dict(self._meta[(key, baseline_id)])
        except KeyError:
            raise BaselineNotFoundError(f"stream {key}: baseline {baseline_id!r} is not in the store") from None
