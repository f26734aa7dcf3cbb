"""Event schema and decoding: Kafka message bytes -> per-stream numpy blocks, or a reason to reject.

The schema contract (docs/architecture.md, "Event schema"): one JSON event per message, or a JSON
array of events. An embedding event carries ``model``, ``model_version``, optional ``segment``,
``ts``, ``id``, ``latency_ms`` and one of ``embedding`` (list of numbers) / ``embedding_b64``
(base64 of little-endian float32). A query event may add ``query_id``, ``results`` (best first,
``{"id", "score"}``) and ``relevant_ids``: the labels of the results in the same event (a
``relevant_ids`` without ``results`` is refused; nothing is joined by ``query_id``). A query event
with neither ``results``, an embedding nor ``latency_ms`` is refused too: it holds no measure.
The service tells a query event by its topic; ``embedwatch replay``, whose lines have none, by
its fields (``Decoder(kind_by_fields=True)``).

Decoding is per message. A batch's common b64 events (one JSON object of a known stream, every
field in its usual form) are taken first, in one loop: the C extension ``_b64scan`` parses, checks
and groups them (or, where it is not built, msgspec parses and types them and Python groups them);
then the base64 of each stream's rows is decoded in one pybase64 call. The common embedding
event (one JSON object whose only array is its ``embedding``) is parsed with simdjson, which
reads the number list straight into a C buffer: no Python float is made for it (2-3x faster than
orjson on a 384-d event). Every other message (event arrays, queries, anything these refuse, or
when pysimdjson is not installed) goes through orjson,
and a number list is converted to a float32 row as soon as its message is parsed, so the parsed
documents do not pile up. All paths reach the same field values and the same outcome (property
tests hold the fast ones to the orjson path).
The rows of one stream and one dimension are joined into one block and validity (finite,
non-zero) is checked on the whole block. Nothing here raises on bad input: every event ends up in
a block or in :attr:`DecodedBatch.rejections`.
"""

from __future__ import annotations

import binascii
import gc
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from itertools import pairwise
from typing import Any, NamedTuple

import msgspec
import numpy as np
import orjson

from embedwatch import rowsums

_simdjson: Any
try:
    import simdjson as _simdjson
except ImportError:  # pragma: no cover - an optional speed-up: orjson decodes everything without it
    _simdjson = None
_pybase64: Any
try:
    import pybase64 as _pybase64
except ImportError:  # pragma: no cover - an optional speed-up: the standard library decodes without it
    _pybase64 = None
_b64scan: Any
try:
    from embedwatch import _b64scan
except ImportError:  # pragma: no cover - built by pip where there is a C compiler; else the msgspec pass
    _b64scan = None

DEFAULT_SEGMENT = "default"


#: Largest component magnitude accepted: products and sums of a vector of up to a million
#: components with unit-scale random weights stay within float32 (3.4e38).
MAX_MAGNITUDE = 1e30
#: A vector whose components are all smaller is refused as zero: its pairwise distances would give
#: a kernel bandwidth whose inverse overflows float32.
MIN_MAGNITUDE = 1e-30
#: A group of at most this many rows is checked in Python (:meth:`Decoder._finish`): with many
#: streams a poll batch gives each a few events, and a numpy call's fixed cost is several times a
#: short list's comparisons.
_FEW_ROWS = 16


class Reason(StrEnum):
    """Why an event was dead-lettered: the value of the ``embedwatch-error`` header."""

    INVALID_JSON = "invalid_json"
    SCHEMA = "schema"
    NON_FINITE = "non_finite"
    ZERO_VECTOR = "zero_vector"
    DIMENSION_MISMATCH = "dimension_mismatch"
    STREAM_LIMIT = "stream_limit"
    TOO_LARGE = "too_large"
    PROCESSING_ERROR = "processing_error"  # the stream's update raised: see the service's log


#: Last part of the key of a stream's query embeddings (:meth:`StreamKey.query_side`).
QUERY_SIDE = "query"
_QUERY_SUFFIX = f"/{QUERY_SIDE}"


class Kind(StrEnum):
    EMBEDDING = "embedding"
    QUERY = "query"


class StreamKey(NamedTuple):
    model: str
    model_version: str
    segment: str = DEFAULT_SEGMENT

    def __str__(self) -> str:
        return f"{self.model}/{self.model_version}/{self.segment}"

    def query_side(self) -> StreamKey:
        """The key of the stream's query embeddings, ``model/model_version/segment/query``: their
        baselines are stored and addressed (API, baseline store) under it. A label never holds a
        ``/``, so it names no stream of events."""
        return StreamKey(self.model, self.model_version, self.segment + _QUERY_SUFFIX)

    @property
    def is_query_side(self) -> bool:
        return self.segment.endswith(_QUERY_SUFFIX)

    def document_side(self) -> StreamKey:
        """The stream a query-side key belongs to (itself for a stream's own key)."""
        return StreamKey(self.model, self.model_version, self.segment.removesuffix(_QUERY_SUFFIX))

    @classmethod
    def parse(cls, text: str) -> StreamKey:
        """``model/model_version/segment``, or ``model/model_version/segment/query`` for the
        stream's query embeddings (:meth:`query_side`)."""
        parts = text.split("/")
        if len(parts) == 4 and parts[3] == QUERY_SIDE and all(parts):
            return cls(*parts[:3]).query_side()
        if len(parts) != 3 or not all(parts):
            raise ValueError(f"stream key must be model/model_version/segment (or "
                             f"model/model_version/segment/{QUERY_SIDE}), got {text!r}")
        return cls(*parts)


class Message(msgspec.Struct, gc=False):
    """A source-agnostic message: what a Kafka record or a file line gives the decoder.

    Treat it as read-only. A msgspec struct, not a dataclass: one is made per Kafka record, and
    its constructor runs in C, 60 ns against 200 for a slotted dataclass's generated ``__init__``
    (a frozen one is three times that again): the difference is about 1.2% of the 11.5 µs a b64
    event costs end to end. The annotations are not checked when one is made. ``gc=False``: it
    holds only strings, bytes, numbers and tuples of them, so it can never be part of a reference
    cycle.
    """

    value: bytes
    topic: str = ""
    partition: int = 0
    offset: int = 0
    timestamp_ms: int | None = None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True, slots=True)
class Rejection:
    """One rejected event: the message it came from, the reason code and a human detail."""

    message_index: int
    reason: Reason
    detail: str
    # The bytes to dead-letter: the original message, or the one bad element of a JSON array.
    payload: bytes
    stream: StreamKey | None = None


@dataclass(slots=True)
class Block:
    """Decoded events of one stream, one kind and one dimension, in message order.

    ``vectors`` is ``(n, dim)`` float32; query events without an embedding have ``dim == 0``.
    ``latency_s`` and the query columns hold NaN where an event did not carry the field.
    """

    stream: StreamKey
    kind: Kind
    vectors: np.ndarray
    ts: np.ndarray
    latency_s: np.ndarray
    ids: list[str | None]
    message_index: np.ndarray
    payloads: list[bytes]
    top1: np.ndarray | None = None
    n_results: np.ndarray | None = None
    precision_at_k: np.ndarray | None = None
    recall_at_k: np.ndarray | None = None

    @property
    def n(self) -> int:
        return int(self.ts.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def take(self, mask: np.ndarray) -> Block:
        """The rows where ``mask`` is true (a new block)."""
        idx = np.flatnonzero(mask)
        return Block(
            stream=self.stream,
            kind=self.kind,
            vectors=self.vectors[idx],
            ts=self.ts[idx],
            latency_s=self.latency_s[idx],
            ids=[self.ids[i] for i in idx],
            message_index=self.message_index[idx],
            payloads=[self.payloads[i] for i in idx],
            top1=None if self.top1 is None else self.top1[idx],
            n_results=None if self.n_results is None else self.n_results[idx],
            precision_at_k=None if self.precision_at_k is None else self.precision_at_k[idx],
            recall_at_k=None if self.recall_at_k is None else self.recall_at_k[idx],
        )


@dataclass(slots=True)
class DecodedBatch:
    blocks: list[Block] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)

    @property
    def accepted(self) -> int:
        return sum(b.n for b in self.blocks)


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    max_message_bytes: int = 4 * 1024 * 1024
    max_dim: int = 8192
    max_events_per_message: int = 10_000
    max_label_length: int = 128
    precision_k: int = 10
    # An event time later than the decoding time plus this is dead-lettered: the window keeps its
    # newest time as a running max, so one such event would evict every later, correct one.
    max_future_skew_s: float = 300.0


class _Bad(Exception):
    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _loads(raw: bytes) -> tuple[Any, bool]:
    """The parsed document, and whether the standard library's parser read it (see there)."""
    try:
        return orjson.loads(raw), False
    except orjson.JSONDecodeError:
        pass
    # orjson refuses the NaN/Infinity tokens many producers emit (Python's json does); parse those
    # with the standard library so they are reported as non_finite, the real problem.
    try:
        return json.loads(raw), True
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise _Bad(Reason.INVALID_JSON, f"not valid JSON: {str(e)[:200]}") from None


def _label(ev: dict[str, Any], name: str, limits: DecodeLimits, default: str | None = None) -> str:
    """Field ``name``, checked; a field with a ``default`` is optional: absent or null gives it."""
    v = ev.get(name)
    if v is None:
        if default is not None:
            return default  # null means absent, as for every optional field
        raise _Bad(Reason.SCHEMA, f"required field {name!r} is null" if name in ev
                   else f"missing required field {name!r}")
    if not isinstance(v, str):
        raise _Bad(Reason.SCHEMA, f"field {name!r} must be a string, got {type(v).__name__}")
    if not v or len(v) > limits.max_label_length:
        raise _Bad(Reason.SCHEMA, f"field {name!r} must be 1..{limits.max_label_length} characters")
    if not v.isprintable() or "/" in v:
        # Labels end up in Prometheus series and in the stream key model/version/segment.
        raise _Bad(Reason.SCHEMA, f"field {name!r} holds a control character or '/'")
    return v


def _number(ev: dict[str, Any], name: str) -> float:
    v = ev.get(name)
    if v is None:
        return math.nan
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _Bad(Reason.SCHEMA, f"field {name!r} must be a number")
    f = _float_or_inf(v)
    if not math.isfinite(f) or f < 0:
        raise _Bad(Reason.SCHEMA, f"field {name!r} must be a finite non-negative number")
    return f


def _float_or_inf(v: float) -> float:
    """``float(v)``, or ``inf`` for an integer beyond float range (the standard library's parser,
    the fallback for what orjson refuses, makes Python ints of any size)."""
    try:
        return float(v)
    except OverflowError:
        return math.inf


def _timestamp(ev: dict[str, Any], default: float, clock: float, skew: float) -> float:
    """The event's time: its ``ts`` (epoch seconds, or an ISO 8601 / RFC 3339 string, UTC when it
    has no offset), else ``default``; never before 1970, nor more than ``skew`` seconds after
    ``clock``, the time of decoding."""
    v = ev.get("ts")
    if v is None:
        if default > clock + skew:  # the Kafka timestamp: a producer clock ahead harms alike
            raise _Bad(Reason.SCHEMA, f"the event has no 'ts' and its Kafka timestamp {default:.6g} is "
                       f"{default - clock:.3g} s ahead of this service's clock (allowed {skew:g} s)")
        return default
    if isinstance(v, bool):
        raise _Bad(Reason.SCHEMA, "field 'ts' must be epoch seconds or an RFC 3339 string")
    if isinstance(v, int | float):
        f = _float_or_inf(v)
        if not math.isfinite(f) or f < 0:
            raise _Bad(Reason.SCHEMA, "field 'ts' must be finite epoch seconds")
    elif isinstance(v, str) and len(v) <= 64:
        try:
            dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
            # No offset: UTC (docs/architecture.md), not the host's zone, which would make one
            # event's time depend on where the service runs.
            f = (dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)).timestamp()
        except (ValueError, OverflowError, OSError):
            raise _Bad(Reason.SCHEMA, "field 'ts' must be epoch seconds or an RFC 3339 string") from None
        if f < 0:  # the range numbers have
            raise _Bad(Reason.SCHEMA, f"field 'ts' {v!r} is before 1970-01-01T00:00:00Z")
    else:
        raise _Bad(Reason.SCHEMA, "field 'ts' must be epoch seconds or an RFC 3339 string")
    if f > clock + skew:
        raise _Bad(Reason.SCHEMA, _ahead_detail(v, f, clock, skew))
    return f


def _ahead_detail(v: str | float, ts: float, clock: float, skew: float) -> str:
    """Why ``ts`` (the value ``v`` given) is refused, with the likely cause."""
    hint = "a producer clock ahead?"
    if not isinstance(v, str):
        # A unit slip when the time read in that unit is after 1973 and not ahead: the usual cause.
        for unit, scale in (("milli", 1e3), ("micro", 1e6), ("nano", 1e9)):
            if ts >= 1e8 * scale and ts / scale <= clock + skew:
                hint = f"{unit}seconds sent as seconds?"
                break
    shown = repr(v) if isinstance(v, str) else f"{ts:.6g}"
    return (f"ts {shown} is {ts - clock:.3g} s ahead of this service's clock "
            f"(allowed {skew:g} s): {hint}")


def _optional_id(ev: dict[str, Any], name: str, limits: DecodeLimits) -> str | None:
    v = ev.get(name)
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)
    if not isinstance(v, str) or len(v) > 4 * limits.max_label_length:
        raise _Bad(Reason.SCHEMA, f"field {name!r} must be a string of at most {4 * limits.max_label_length}")
    return v


def _vector_source(ev: dict[str, Any], limits: DecodeLimits, required: bool) -> list[Any] | bytes | None:
    """The embedding as a raw list (converted later, per block) or decoded b64 bytes."""
    if "embedding_b64" in ev and ev["embedding_b64"] is not None:
        s = ev["embedding_b64"]
        if not isinstance(s, str):
            raise _Bad(Reason.SCHEMA, "field 'embedding_b64' must be a base64 string")
        if len(s) > (limits.max_dim * 16) // 3 + 8:  # max_dim float32s in base64, and some slack
            raise _Bad(Reason.SCHEMA, f"embedding longer than max_dim={limits.max_dim}")
        try:
            # What base64.b64decode(s, validate=True) accepts (a property test holds it to that),
            # 6x faster on valid input (1.3 vs 8 µs on 2 KB).
            raw = _b64decode(s)
        except (binascii.Error, ValueError):
            raise _Bad(Reason.SCHEMA, "field 'embedding_b64' is not valid base64") from None
        if len(raw) % 4 or not raw:
            raise _Bad(Reason.SCHEMA, "field 'embedding_b64' must hold a whole number of float32s")
        return raw
    v = ev.get("embedding")
    if v is None:
        if required:
            raise _Bad(Reason.SCHEMA, "one of 'embedding' or 'embedding_b64' is required")
        return None
    if not isinstance(v, list) or not v:
        raise _Bad(Reason.SCHEMA, "field 'embedding' must be a non-empty list of numbers")
    if len(v) > limits.max_dim:
        raise _Bad(Reason.SCHEMA, f"embedding of {len(v)} dims is longer than max_dim={limits.max_dim}")
    return v


def _b64decode(s: str) -> bytes:
    """``base64.b64decode(s, validate=True)``: same answers, pybase64's SIMD speed on valid input.

    pybase64 is stricter than the standard library (it refuses excess padding such as ``...====``,
    which Python accepts), so what it refuses is judged again by the standard library.
    """
    if _pybase64 is not None:
        try:
            out: bytes = _pybase64.b64decode(s, validate=True)
            return out
        except (binascii.Error, ValueError):
            pass
    return binascii.a2b_base64(s, strict_mode=True)  # what base64.b64decode(validate=True) runs


class _B64Event(msgspec.Struct, gc=False):
    """The fields of an embedding event with ``embedding_b64``, typed as their common well-formed
    values: msgspec parses them in one C call (:meth:`Decoder._b64_pass`). The base64 stays text,
    decoded a batch at a time (see there). Other fields are skipped, as the checks ignore them."""

    model: str
    model_version: str
    embedding_b64: str
    segment: str | None = DEFAULT_SEGMENT  # null: the default, looked up as the general path keys it
    ts: float | None = None
    id: str | int | None = None
    latency_ms: float | None = None
    # Read only to tell a query event (Decoder's ``kind_by_fields``): any JSON value, null = absent.
    query_id: Any = None
    results: Any = None
    relevant_ids: Any = None


_B64_DECODE = msgspec.json.Decoder(_B64Event).decode

_SJ_OBJECT: Any = _simdjson.Object if _simdjson is not None else None
_SJ_ARRAY: Any = _simdjson.Array if _simdjson is not None else None
_fromiter = np.fromiter
_convert = msgspec.convert
_FLOATS = list[float]
_F32 = np.dtype(np.float32)
_INF = math.inf
_MAX_FLOAT = sys.float_info.max
_INT_MIN, _UINT_MAX = -(2**63), 2**64 - 1  # the integers orjson reads as integers
_NAN = math.nan


def _query_fields(ev: dict[str, Any], k: int) -> tuple[float, float, float, float]:
    """(top-1 score, result count, precision@k, recall@k); NaN where the event cannot say."""
    results = ev.get("results")
    if results is None:
        if ev.get("relevant_ids") is not None:
            # Labels score the results they come with: a later feedback event (query_id and
            # relevant_ids only) would otherwise count as a query that returned nothing to score.
            raise _Bad(Reason.SCHEMA, "relevant_ids need the query's results in the same event; "
                       "feedback is not joined by query_id")
        return math.nan, math.nan, math.nan, math.nan
    if not isinstance(results, list):
        raise _Bad(Reason.SCHEMA, "field 'results' must be a list")
    top1 = math.nan
    ids: list[Any] = []
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise _Bad(Reason.SCHEMA, "each result must be an object with 'id' and 'score'")
        s = r.get("score")
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(_float_or_inf(s)):
            raise _Bad(Reason.SCHEMA, "each result needs a finite numeric 'score'")
        if i == 0:
            top1 = float(s)
        x = r.get("id")
        # An integer id is its decimal string, as for an event's 'id' and 'query_id': 42 is "42".
        ids.append(str(x) if type(x) is int else x)
    rel = ev.get("relevant_ids")
    if rel is None:
        return top1, float(len(results)), math.nan, math.nan
    # Ids are strings or integers; a bool is neither (it would equal, and match, the id 1 or 0).
    if not isinstance(rel, list) or not all(type(x) is str or type(x) is int for x in rel):
        raise _Bad(Reason.SCHEMA, "field 'relevant_ids' must be a list of ids (strings or integers)")
    relevant = {str(x) if type(x) is int else x for x in rel}
    # Distinct relevant ids in the top k: a result list repeating a relevant id counts it once, so
    # recall stays <= 1 and precision@k = distinct relevant hits / k. A result id of another type
    # (a bool, a float, a list, an object) matches nothing.
    hits = len({x for x in ids[:k] if type(x) is str and x in relevant})
    precision = hits / k
    recall = hits / len(relevant) if relevant else math.nan
    return top1, float(len(results)), precision, recall


def _kind_of(ev: Any) -> Kind:
    """An event's kind from its fields (Decoder's ``kind_by_fields``): a query event carries a
    ``query_id``, ``results`` or ``relevant_ids`` (not null); anything else, including what is not
    a JSON object, is judged as an embedding event."""
    if type(ev) is dict:
        get = ev.get
        if get("query_id") is not None or get("results") is not None or get("relevant_ids") is not None:
            return Kind.QUERY
    return Kind.EMBEDDING


#: Rows decoded together when a group's rows joined do not all decode (:meth:`Decoder._decode_texts`).
_RUN_ROWS = 16


def _decode_rows(texts: Sequence[str], n: int, pad: int) -> np.ndarray:
    """``(rows, bytes)`` array of what base64 texts of length ``n`` ending in ``pad`` ``=`` decode
    to, in one pybase64 call; ``ValueError`` (or ``binascii.Error``) if any of them does not decode.

    >>> _decode_rows(["AACAPw==", "AAAAQA=="], 8, 2).view("<f4").tolist()
    [[1.0], [2.0]]
    """
    if not pad:
        return _decode_joined("".join(texts), len(texts), n, pad)
    # One (rows, n) array of the texts' characters (ASCII, or UnicodeEncodeError). Its width is
    # the longest text's: a longer one is refused here, a shorter one fails on its NUL filler.
    chars = np.array(texts, dtype="S")
    if chars.itemsize != n:
        raise ValueError("base64 texts of different lengths")
    return _decode_joined(chars, len(texts), n, pad)


def _decode_joined(text: Any, k: int, n: int, pad: int) -> np.ndarray:
    """``(k, bytes)`` array of what ``text``, ``k`` base64 rows of ``n`` characters joined (a str,
    bytes or array of them), decodes to, each row ending in ``pad`` ``=``; ``ValueError`` (or
    ``binascii.Error``) if any row does not decode.

    Base64 decodes each four characters on their own, three bytes each, so joined rows decode
    exactly when every row does, to the rows' bytes one after the other. Padded rows (``xx==`` or
    ``xxx=`` last) cannot be joined as they are: their trailing ``=`` become ``A``, zero bits, and
    the surplus bytes this decodes to are cut off each row; what remains is what the row decodes
    to, as b64decode ignores the unused bits of a padded group. Any other ``=`` is still there and
    fails the decoding.

    >>> _decode_joined(b"AACAPw==AAAAQA==", 2, 8, 2).view("<f4").tolist()
    [[1.0], [2.0]]
    """
    if _pybase64 is None:
        raise ValueError("no pybase64: row by row")
    if pad:
        chars = np.frombuffer(text, dtype=np.uint8).reshape(k, n)
        if not chars.flags.writeable:
            chars = chars.copy()
        chars[:, n - pad :] = ord("A")
        text = chars
    # A bytearray: the block's array is then writable without a copy.
    rows = np.frombuffer(_pybase64.b64decode_as_bytearray(text, validate=True), dtype=np.uint8).reshape(k, -1)
    return np.ascontiguousarray(rows[:, : (3 * n >> 2) - pad]) if pad else rows


class _Group:
    """Accumulates the events of one (stream, kind, dim-or-list) before the block conversion."""

    __slots__ = ("block", "ids", "lat", "lists", "msg", "payloads", "q", "raw", "ts")

    def __init__(self) -> None:
        self.raw: list[Any] = []  # float32 rows, or b64 bytes, or None; a list if it did not convert
        # The b64 pass's rows decoded together: (rows, bytes) of little-endian float32s; ``raw``
        # then holds their base64 text, one per row (the msgspec pass), or nothing (the C one),
        # until :meth:`split_block`.
        self.block: np.ndarray | None = None
        self.lists = False  # some row is still a list
        self.ts: list[float] = []
        self.lat: list[float] = []
        self.ids: list[str | None] = []
        self.msg: list[int] = []
        self.payloads: list[bytes] = []
        self.q: list[tuple[float, float, float, float]] = []

    def split_block(self) -> None:
        """Turn :attr:`block` into one bytes row each (before the general path adds a row)."""
        if self.block is not None:
            self.raw = [row.tobytes() for row in self.block]
            self.block = None

    def take(self, rows: Sequence[int]) -> None:
        """Keep only ``rows``, in that order, in every per-row column."""
        for name in ("raw", "ts", "lat", "ids", "msg", "payloads", "q"):
            col = getattr(self, name)
            if col:
                setattr(self, name, [col[i] for i in rows])

    def in_message_order(self) -> np.ndarray:
        """The rows' message indices, after putting the rows in message order if they are not.

        The b64 pass adds its events before the general path adds the rest of the batch, so a
        group that both fed (a stream whose events are not all in the common form) is out of
        order; a stable sort keeps an event array's rows in their order.
        """
        rows = self.msg
        msg = np.array(rows, dtype=np.int64)
        # A few rows are seen in order without numpy's fixed costs; either way the check runs once.
        ordered = (all(a <= b for a, b in pairwise(rows)) if len(rows) <= _FEW_ROWS
                   else not (msg[1:] < msg[:-1]).any())
        if not ordered:
            order = np.argsort(msg, kind="stable")
            self.take(order.tolist())
            msg = msg[order]
        return msg


class Decoder:
    """Turns a batch of :class:`Message` into :class:`DecodedBatch`.

    >>> d = Decoder()
    >>> b = d.decode([Message(b'{"model":"m","model_version":"1","embedding":[3,4]}', timestamp_ms=0)], )
    >>> b.blocks[0].vectors.tolist(), b.rejections
    ([[3.0, 4.0]], [])
    >>> d.decode([Message(b'nope')]).rejections[0].reason.value
    'invalid_json'
    """

    def __init__(self, limits: DecodeLimits | None = None, query_topics: frozenset[str] = frozenset(),
                 clock: Callable[[], float] = time.time, kind_by_fields: bool = False) -> None:
        self.limits = limits or DecodeLimits()
        # How an event's kind is told: by its message's topic (the service: a message of one of
        # ``query_topics`` holds query events), or, when ``kind_by_fields``, by its own fields
        # (:func:`_kind_of`; ``embedwatch replay``: a file's lines have no topic).
        self.kind_by_fields = kind_by_fields
        # The time of decoding, read once a batch, against which an event time too far ahead is
        # refused (DecodeLimits.max_future_skew_s); replaceable for tests.
        self.clock = clock
        self._now = 0.0  # this batch's time of decoding, and the latest event time it accepts
        self._ts_max = _MAX_FLOAT
        self.query_topics = query_topics
        # (model, model_version, segment) values already validated -> their StreamKey. Labels repeat
        # on almost every event, so validating each distinct triple once saves three checks per event.
        self._keys: dict[tuple[Any, Any, Any], StreamKey] = {}
        self._parser: Any = _simdjson.Parser() if _simdjson is not None else None
        self._b64_event: Callable[[bytes], _B64Event] | None = _B64_DECODE  # None: no b64 pass (tests)
        # The b64 pass in C (:meth:`_scan_pass`); None: the msgspec pass (no compiler; tests).
        self._b64_scan: Callable[..., tuple[list[int], list[tuple[Any, ...]]]] | None = (
            _b64scan.scan if _b64scan is not None else None)

    def _fast_event(self, value: bytes) -> tuple[dict[str, Any], memoryview[float]] | None:
        """``(fields, float64 numbers)`` of a plain embedding event via simdjson, or ``None``: use orjson.

        The numbers stay a float64 buffer (a ``memoryview`` of format ``d``) until the block is
        assembled: one join and one float32 conversion per block cost 0.5 µs a row, a conversion
        per row 2.8 µs.

        Taken only when the message holds exactly one ``[`` (so the embedding is the only array and
        holds no nested one: simdjson's buffer read would flatten those) and every other field is a
        scalar; the fields are what orjson would give (last duplicate key wins), so the checks and
        their error details are those of the orjson path. Anything else, including every document
        simdjson refuses (NaN tokens, numbers beyond float64, bad UTF-8), returns ``None``.
        """
        if self._parser is None:
            return None
        first = value.find(b"[")  # two memchr scans: a third of the cost of bytes.count
        if first < 0 or value.find(b"[", first + 1) >= 0:
            return None
        doc: Any = None
        emb: Any = None
        v: Any = None
        try:
            doc = self._parser.parse(value)
            if type(doc) is not _SJ_OBJECT:
                return None
            ev: dict[str, Any] = {}
            keys = list(doc.keys())
            for k in keys:
                v = doc[k]  # lazily: an array stays a proxy (``items()`` would build its list)
                if type(v) is _SJ_ARRAY:
                    if k != "embedding":
                        return None
                    emb = v
                elif type(v) is _SJ_OBJECT:
                    return None
                else:
                    ev[k] = v
            if emb is None or "embedding_b64" in ev or len(ev) + 1 != len(keys):
                return None  # a b64 event, or a duplicate key (orjson keeps the last one)
            n = len(emb)
            if n == 0 or n > self.limits.max_dim:
                return None  # the orjson path words the error
            row = memoryview(emb.as_buffer(of_type="d")).cast("d")
            return (ev, row) if len(row) == n else None
        except (ValueError, TypeError, KeyError, RuntimeError):
            return None  # e.g. a key holding NUL, which simdjson lists but cannot look up
        finally:
            # simdjson refuses to parse again while a proxy of the last document is alive.
            del doc, emb, v

    def _b64_pass(self, messages: Sequence[Message], now: float | None,
                  groups: dict[tuple[StreamKey, Kind, int | str], _Group], ts_max: float | None = None) -> list[int]:
        """Add the batch's well-formed b64 embedding events to their groups, one msgspec decode
        each; return the indices of the other messages, for the general path to judge in order.
        Where the C extension is built, :meth:`_scan_pass` does this instead.

        msgspec parses the JSON and types the fields in C. An event is taken only when the
        general path would reach the same values: the stream's labels already passed their checks
        (a known key), the base64 is what ``b64decode(validate=True)`` decodes to a whole number of
        float32s, and every value is in range (a property test holds the two paths to the same
        outcome). Everything else, including all msgspec refuses, goes to the general path and
        its checks and wording. So do non-ASCII messages (msgspec does not check the UTF-8 of the
        fields it skips, orjson does) and messages holding a ``[``: JSON number lists are the
        simdjson path's, and a b64 event with an array field is rare. One tight loop for the
        batch, not a call per event: b64 decoding 149-155k -> 199-207k events/s in alternating
        runs, JSON within 2% of what it was.

        Every taken event's base64 stays text until the loop ends; then each group's rows are
        decoded together, in one call (:meth:`_decode_texts`). msgspec's own base64 decoding was
        more than half of its 1.6 µs per 384-d event; decoding a batch's worth at once costs 0.1
        µs an event. Decoder alone, alternating runs: 384-d 222-249k -> 265-315k events/s,
        768-d 90-114k -> 110-131k; padded base64 (dimensions not divisible by 3) pays two more
        copies: 128-d 354-361k -> 362-399k, 1024-d 87-90k -> 78-84k.

        ``ts_max``: the latest event time accepted (:meth:`_clock_at`); ``None``: from the clock now.
        """
        decode = self._b64_event
        if decode is None:
            return list(range(len(messages)))
        if ts_max is None:
            ts_max = self._clock_at(now)[1]
        if self._b64_scan is not None:
            return self._scan_pass(messages, now, groups, ts_max)
        rest: list[int] = []
        keys = self._keys
        lim = self.limits
        max_bytes, max_id, max_message = 4 * lim.max_dim, 4 * lim.max_label_length, lim.max_message_bytes
        query_topics = self.query_topics
        by_fields = self.kind_by_fields
        embedding = Kind.EMBEDDING
        # Per stream: (size, the appends of its group's columns). Six list appends per event
        # looked up through the group, and a (stream, kind, dim) key built and hashed per event,
        # cost about 0.2 µs of an event's 3.7 here; the key is built once per stream and size.
        appends: dict[StreamKey, tuple[Any, ...]] = {}
        for mi, msg in enumerate(messages):
            value = msg.value
            # "[": a number list (or some other array), left to the simdjson path; memchr stops at
            # the first one, where a search for "embedding_b64" would read a JSON event to its end.
            # find, not ``in``: 0.15 against 0.25 µs on a 2 KB message (``in`` takes another path).
            if (not value or len(value) > max_message or msg.topic in query_topics
                    or value.find(b"[") >= 0 or not value.isascii()):
                rest.append(mi)
                continue
            try:
                ev = decode(value)
            except (msgspec.DecodeError, RecursionError):
                rest.append(mi)
                continue
            if by_fields and (ev.query_id is not None or ev.results is not None or ev.relevant_ids is not None):
                rest.append(mi)  # a query event: the general path takes those
                continue
            stream = keys.get((ev.model, ev.model_version, ev.segment))
            text = ev.embedding_b64
            n = len(text)
            ts, lat, ident = ev.ts, ev.latency_ms, ev.id
            if ts is None:
                ts = _default_ts(msg, now)
            # A time ahead of ts_max (finite) too: the general path words it.
            if (stream is None or n == 0 or n & 3 or not 0.0 <= ts <= ts_max
                    or (lat is not None and not 0.0 <= lat < _INF)):
                rest.append(mi)
                continue
            # Bytes it decodes to, if valid: 3 per 4 characters, less one per trailing "=".
            size = 3 * n >> 2
            if text[-1] == "=":
                size -= 2 if text[-2] == "=" else 1
            if size & 3 or size > max_bytes:
                rest.append(mi)  # not whole float32s, or too long: the general path words it
                continue
            if isinstance(ident, int):  # never a bool: msgspec refuses one for ``str | int``
                if not _INT_MIN <= ident <= _UINT_MAX:
                    rest.append(mi)  # orjson reads it as a float, which the checks refuse
                    continue
                ident = str(ident)
            elif ident is not None and len(ident) > max_id:
                rest.append(mi)
                continue
            at = appends.get(stream)
            if at is None or at[0] != size:
                gkey = (stream, embedding, -(size >> 2))
                g = groups.get(gkey)
                if g is None:
                    g = groups[gkey] = _Group()
                at = appends[stream] = (size, g.raw.append, g.ts.append, g.lat.append, g.ids.append,
                                        g.msg.append, g.payloads.append)
            _, add_raw, add_ts, add_lat, add_id, add_msg, add_payload = at
            add_raw(text)
            add_ts(ts)
            add_lat(_NAN if lat is None else lat / 1000.0)
            add_id(ident)
            add_msg(mi)
            add_payload(value)
        bad: list[int] = []
        for group_key, g in list(groups.items()):
            bad += self._decode_texts(g)
            if not g.msg:
                del groups[group_key]
        if bad:
            rest = sorted(rest + bad)
        return rest

    def _scan_pass(self, messages: Sequence[Message], now: float | None,
                   groups: dict[tuple[StreamKey, Kind, int | str], _Group], ts_max: float) -> list[int]:
        """:meth:`_b64_pass` with its per-message loop in C (``_b64scan.scan``), which returns the
        taken messages grouped by labels and base64 length: Python then works per group, not per
        event. It takes an event only in the forms its comment in ``_b64scan.c`` lists, with the
        values the general path reads; anything else goes to the general path. Decoder alone,
        384-d, alternating runs of 40,000 events: 3 streams 3.52-3.77 -> 1.51-1.57 µs per event,
        1,000 streams 9.53-10.2 -> 7.76-8.18."""
        lim = self.limits
        assert self._b64_scan is not None
        rest, classes = self._b64_scan(
            messages if type(messages) is list else list(messages), self.query_topics, DEFAULT_SEGMENT,
            lim.max_message_bytes, 4 * lim.max_dim, 4 * lim.max_label_length, ts_max, now, _default_ts)
        keys = self._keys
        embedding = Kind.EMBEDDING
        bad: list[int] = []
        unsorted = False
        for labels, n, pad, text, *cols in classes:
            stream = keys.get(labels)
            # Labels not yet validated (the general path checks them once), or a stream's second
            # spelling in this batch (segment null and "default"): left to the general path, which
            # adds to the group the first made, in message order.
            if stream is None or (gkey := (stream, embedding, -(((3 * n >> 2) - pad) >> 2))) in groups:
                rest += cols[0]
                unsorted = True
                continue
            g = groups[gkey] = _Group()
            g.msg, g.ts, g.lat, g.ids, g.payloads = cols
            try:
                g.block = _decode_joined(text, len(g.msg), n, pad)
                continue
            except (binascii.Error, ValueError):
                pass
            g.raw = [text[i : i + n].decode("latin-1") for i in range(0, len(text), n)]
            bad += self._decode_texts(g, joined_failed=True)
            if not g.msg:
                del groups[gkey]
        if unsorted or bad:
            rest = sorted(rest + bad)
        return rest

    @staticmethod
    def _decode_texts(g: _Group, joined_failed: bool = False) -> list[int]:
        """Decode the base64 rows of ``g`` (texts of one length) into :attr:`_Group.block`, in
        one call (:func:`_decode_rows`); return the message indices of rows that are not valid
        base64 (dropped from ``g``, which may be left empty).

        When the joined rows do not decode (a bad row; ``joined_failed``: the caller tried them),
        the group is decoded again in runs of :data:`_RUN_ROWS` rows, and only the rows of a run
        that does not decode are judged one by one; the bad ones are left to the general path. A
        stream whose producer sends a bad row in every batch then pays about a run of single
        decodes per bad row, not one per row.
        """
        texts = g.raw
        k, n = len(texts), len(texts[0])
        pad = 0 if texts[0][-1] != "=" else 2 if texts[0][-2] == "=" else 1
        if not joined_failed:
            try:
                g.block = _decode_rows(texts, n, pad)
                return []
            except (binascii.Error, ValueError):
                pass
        size = (3 * n >> 2) - pad
        parts: list[np.ndarray] = []
        keep: list[int] = []
        bad: list[int] = []
        for lo in range(0, k, _RUN_ROWS):
            hi = min(k, lo + _RUN_ROWS)
            try:
                parts.append(_decode_rows(texts[lo:hi], n, pad))
                keep.extend(range(lo, hi))
                continue
            except (binascii.Error, ValueError):
                pass
            for i in range(lo, hi):
                try:
                    raw = _b64decode(texts[i])
                except (binascii.Error, ValueError):
                    raw = b""
                if len(raw) == size:
                    parts.append(np.frombuffer(raw, dtype=np.uint8).reshape(1, size))
                    keep.append(i)
                else:
                    bad.append(g.msg[i])
        g.take(keep)
        if keep:
            g.block = np.concatenate(parts)
        return bad

    def decode(self, messages: Sequence[Message], now: float | None = None) -> DecodedBatch:
        """Decode ``messages``. ``now``: the time of an event that carries neither a ``ts`` nor a
        Kafka timestamp (``None``: 0), and the time of decoding when later than :attr:`clock`."""
        # The batch's parsed documents (thousands of dicts and number lists) stay alive until the
        # block conversion; the cyclic GC would walk them again and again while they pile up (they
        # hold no cycles), so it is paused for the batch. Nothing is lost: it runs afterwards.
        paused = gc.isenabled()
        if paused:
            gc.disable()
        try:
            # A value beyond float32 range becomes inf (rejected later as non_finite), silently.
            with np.errstate(over="ignore", invalid="ignore"):
                return self._decode(messages, now)
        finally:
            if paused:
                gc.enable()

    def _clock_at(self, now: float | None) -> tuple[float, float]:
        """(time of decoding, latest event time accepted). The time of decoding is the clock's, or
        the caller's ``now`` when later: a caller's time ahead of the clock (a simulation, a test)
        must not refuse its own events. ``replay`` passes 0, which leaves the clock's."""
        clock = self.clock()
        if now is not None and now > clock:
            clock = now
        # Finite even when the skew is not, so that one comparison also refuses an infinite time.
        return clock, min(clock + self.limits.max_future_skew_s, _MAX_FLOAT)

    def _decode(self, messages: Sequence[Message], now: float | None) -> DecodedBatch:
        out = DecodedBatch()
        groups: dict[tuple[StreamKey, Kind, int | str], _Group] = {}
        lim = self.limits
        self._now, self._ts_max = self._clock_at(now)
        by_fields = self.kind_by_fields
        for mi in self._b64_pass(messages, now, groups, self._ts_max):
            msg = messages[mi]
            value = msg.value
            if value is None or len(value) == 0:
                out.rejections.append(Rejection(mi, Reason.INVALID_JSON, "empty message", value or b""))
                continue
            if len(value) > lim.max_message_bytes:
                out.rejections.append(
                    Rejection(mi, Reason.TOO_LARGE, f"{len(value)} bytes > max_message_bytes", value)
                )
                continue
            default_ts = _default_ts(msg, now)
            kind = Kind.QUERY if not by_fields and msg.topic in self.query_topics else Kind.EMBEDDING
            fast = self._fast_event(value) if kind is Kind.EMBEDDING else None
            if fast is not None:
                try:
                    self._one(fast[0], _kind_of(fast[0]) if by_fields else kind, default_ts, mi, value,
                              groups, fast[1])
                except _Bad as e:
                    out.rejections.append(Rejection(mi, e.reason, e.detail, value, _stream_or_none(fast[0], lim)))
                continue
            try:
                doc, lenient = _loads(value)
            except _Bad as e:
                out.rejections.append(Rejection(mi, e.reason, e.detail, value))
                continue
            if isinstance(doc, list):
                if len(doc) > lim.max_events_per_message:
                    out.rejections.append(Rejection(
                        mi, Reason.TOO_LARGE, f"array of {len(doc)} events > max_events_per_message", value
                    ))
                    continue
                if not doc:
                    out.rejections.append(Rejection(mi, Reason.SCHEMA, "empty event array", value))
                    continue
                elements = doc
                single = False
            else:
                elements = [doc]
                single = True
            for ev in elements:
                # A bad element of an array is dead-lettered alone, re-serialised.
                payload = value if single else _dumps_element(ev, value, lenient)
                try:
                    self._one(ev, _kind_of(ev) if by_fields else kind, default_ts, mi, payload, groups)
                except _Bad as e:
                    out.rejections.append(Rejection(mi, e.reason, e.detail, payload, _stream_or_none(ev, lim)))
        # Groups in the order of their first message, as the general path alone creates them (the
        # b64 pass creates its groups first): blocks and dead letters come out in the same order.
        for (stream, kind, _shape), g in sorted(groups.items(), key=lambda kv: min(kv[1].msg)):
            self._finish(stream, kind, g, out)
        return out

    def _one(
        self,
        ev: Any,
        kind: Kind,
        default_ts: float,
        mi: int,
        payload: bytes,
        groups: dict[tuple[StreamKey, Kind, int | str], _Group],
        row: memoryview[float] | None = None,
    ) -> None:
        """Check one event and add it to its group; ``row``: its embedding, already numbers (the
        simdjson path's float64 buffer; ``ev`` then holds every other field)."""
        # Common, well-formed values are checked inline; anything else goes through the same
        # helpers (and so the same checks, order and error details) as before.
        lim = self.limits
        if not isinstance(ev, dict):
            raise _Bad(Reason.SCHEMA, f"an event must be a JSON object, got {type(ev).__name__}")
        get = ev.get
        labels = (get("model"), get("model_version"), get("segment", DEFAULT_SEGMENT))
        try:
            stream = self._keys[labels]
        except (KeyError, TypeError):
            stream = StreamKey(
                _label(ev, "model", lim),
                _label(ev, "model_version", lim),
                _label(ev, "segment", lim, DEFAULT_SEGMENT),
            )
            if len(self._keys) >= 4096:
                self._keys.clear()
            self._keys[labels] = stream
        # The common b64 events of known streams never get here: the b64 pass takes them.
        src: Any = row if row is not None else _vector_source(ev, lim, required=kind is Kind.EMBEDDING)
        v = get("ts")
        ts = (v if type(v) is float and 0.0 <= v <= self._ts_max
              else _timestamp(ev, default_ts, self._now, lim.max_future_skew_s))
        v = get("latency_ms")
        if v is None:
            lat = _NAN
        elif type(v) is float and 0.0 <= v < _INF:
            lat = v / 1000.0
        else:
            lat = _number(ev, "latency_ms") / 1000.0
        id_field = "id" if kind is Kind.EMBEDDING else "query_id"
        v = get(id_field)
        if v is None or (type(v) is str and len(v) <= 4 * lim.max_label_length):
            ident = v
        else:
            ident = _optional_id(ev, id_field, lim)
        q = _query_fields(ev, lim.precision_k) if kind is Kind.QUERY else None
        if q is not None and src is None and math.isnan(lat) and math.isnan(q[1]):
            # The schema's query event has results (docs/architecture.md); one with neither them,
            # an embedding nor a latency holds no measure and would only inflate the query count.
            raise _Bad(Reason.SCHEMA, "a query event needs 'results', an embedding or 'latency_ms'; "
                       "this one carries nothing to monitor")
        shape: int | str
        if src is None:
            shape = 0
        elif type(src) is bytes:
            d = len(src) >> 2
            if d > lim.max_dim:
                raise _Bad(Reason.SCHEMA, f"embedding longer than max_dim={lim.max_dim}")
            shape = -d  # b64 rows: negative, so never grouped with number lists of the same length
        else:
            shape = len(src)
        gkey = (stream, kind, shape)
        g = groups.get(gkey)
        if g is None:
            g = groups[gkey] = _Group()
        elif g.block is not None:
            g.split_block()
        if shape > 0 and row is None:
            try:
                # Numbers only (ints or floats): np.fromiter alone reads true as 1, "2.5" as 2.5
                # and null as NaN. msgspec's strict check refuses those, in 2 µs on 384-d (a
                # type scan in Python took 7).
                _convert(src, _FLOATS)
                # Now, while the list is hot, and so that the parsed document can be freed.
                src = _fromiter(src, _F32, shape)
            except (msgspec.ValidationError, TypeError, ValueError, OverflowError):
                g.lists = True  # kept as a list: judged row by row in _list_block
        g.raw.append(src)
        g.ts.append(ts)
        g.lat.append(lat)
        g.ids.append(ident)
        g.msg.append(mi)
        g.payloads.append(payload)
        if q is not None:
            g.q.append(q)

    def _finish(self, stream: StreamKey, kind: Kind, g: _Group, out: DecodedBatch) -> None:
        msg = g.in_message_order()
        n = len(g.msg)
        bad = np.zeros(n, dtype=bool)
        reasons: dict[int, tuple[Reason, str]] = {}
        first = g.raw[0] if g.block is None else None
        if g.block is not None:
            # The b64 pass's rows, decoded together: a reinterpretation, no copy.
            vectors = g.block.view("<f4").astype(np.float32, copy=False)
        elif first is None:
            vectors = np.zeros((n, 0), dtype=np.float32)
        elif isinstance(first, bytes):
            # One copy of all payloads, one reinterpretation: the b64 fast path.
            vectors = np.frombuffer(b"".join(g.raw), dtype="<f4").reshape(n, -1).astype(np.float32)
        else:
            vectors = _list_block(g.raw, g.lists, bad, reasons)
        if vectors.shape[1]:
            # Each row's largest magnitude (NaN if it holds one): finite and within the range the
            # statistics' float32 arithmetic resolves. Beyond it, one vector overflowed the random
            # features of a baseline fit (every later batch of the stream raised) or underflowed
            # its kernel bandwidth.
            peak = rowsums.row_peaks(vectors)
            if n <= _FEW_ROWS:  # NaN fails both comparisons, as it does the array's below
                ok = all(MIN_MAGNITUDE <= p <= MAX_MAGNITUDE for p in peak.tolist())
            else:
                ok = bool(((peak >= MIN_MAGNITUDE) & (peak <= MAX_MAGNITUDE)).all())
            if not ok:  # rare: name each bad row's reason
                finite = peak <= MAX_MAGNITUDE
                nonzero = peak >= MIN_MAGNITUDE
                for i in np.flatnonzero(~finite & ~bad):
                    reasons[int(i)] = (Reason.NON_FINITE, "embedding holds NaN or Inf" if not np.isfinite(
                        peak[i]) else f"embedding holds a value beyond {MAX_MAGNITUDE:g} in magnitude")
                bad |= ~finite
                for i in np.flatnonzero(~nonzero & ~bad):
                    reasons[int(i)] = (Reason.ZERO_VECTOR, "embedding has zero norm" if peak[i] == 0 else
                                       f"embedding has no component of magnitude {MIN_MAGNITUDE:g} or more")
                bad |= ~nonzero
        for row, (reason, detail) in sorted(reasons.items()):
            out.rejections.append(Rejection(g.msg[row], reason, detail, g.payloads[row], stream))
        block = Block(
            stream=stream,
            kind=kind,
            vectors=vectors,
            ts=np.asarray(g.ts, dtype=np.float64),
            latency_s=np.asarray(g.lat, dtype=np.float64),
            ids=g.ids,
            message_index=msg,
            payloads=g.payloads,
        )
        if kind is Kind.QUERY:
            qa = np.asarray(g.q, dtype=np.float64).reshape(n, 4)
            block.top1, block.n_results, block.precision_at_k, block.recall_at_k = (
                qa[:, 0], qa[:, 1], qa[:, 2], qa[:, 3]
            )
        if reasons:  # every bad row has its reason (here or in _list_block)
            block = block.take(~bad)
        if block.n:
            out.blocks.append(block)


def _list_block(raw: list[Any], lists: bool, bad: np.ndarray,
                reasons: dict[int, tuple[Reason, str]]) -> np.ndarray:
    """Join same-length rows into one float32 block. Rows are float32 arrays (converted when
    parsed), float64 buffers (the simdjson path) or, for a list that did not convert or holds
    something else than numbers (``lists``), the list itself: only then is each such row checked
    on its own, and the bad ones marked."""
    n, dim = len(raw), len(raw[0])
    if not lists:
        if all(type(r) is memoryview for r in raw):  # every row from simdjson: one join, one cast
            return _to_f32(np.frombuffer(b"".join(raw), dtype=np.float64).reshape(n, dim))
        return np.concatenate([_to_f32(np.frombuffer(r, dtype=np.float64)) if type(r) is memoryview else r
                               for r in raw]).reshape(n, dim)
    # Slow path, only for batches holding a malformed vector: find the culprits row by row.
    rows = np.zeros((n, dim), dtype=np.float64)
    for i, r in enumerate(raw):
        if type(r) is np.ndarray or type(r) is memoryview:
            rows[i] = r
            continue
        # Numbers only: numpy would also read a bool as 1 or 0, a numeric string as its number,
        # and null as NaN (a non_finite rejection, when the event's fault is its schema).
        j = next((j for j, x in enumerate(r) if type(x) is not float and type(x) is not int), -1)
        if j >= 0:
            bad[i] = True
            reasons[i] = (Reason.SCHEMA, "field 'embedding' must be a list of numbers, "
                          f"element {j} is {_json_type(r[j])}")
            continue
        try:
            rows[i] = r
        except OverflowError:  # an integer beyond float64, from the standard library's parser
            bad[i] = True
            reasons[i] = (Reason.SCHEMA, "field 'embedding' must be a list of numbers within float range")
    return _to_f32(rows)


_JSON_TYPES: dict[type, str] = {type(None): "null", bool: "a boolean", str: "a string", list: "an array",
                                dict: "an object"}


def _json_type(x: object) -> str:
    """What ``x`` was in the JSON document, for error details."""
    return _JSON_TYPES.get(type(x), type(x).__name__)


def _to_f32(arr: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        # Values beyond float32 range become inf and are then rejected as non_finite.
        return arr.astype(np.float32)


def _dumps_element(ev: Any, original: bytes, lenient: bool = False) -> bytes:
    """One element of a JSON array message, re-serialised to be dead-lettered alone.

    ``lenient``: the standard library's parser read the message (orjson refused it), so it may
    hold NaN or an infinity, which orjson would write as null: the dead letter would no longer
    show what it was rejected for. The standard library writes them as the NaN / Infinity tokens
    (1e400 as Infinity). Falls back to the whole original message when the element cannot be
    written back (nesting deeper than the encoders allow): the dead letter then carries more than
    the bad event, never less.
    """
    if not lenient:
        try:
            return orjson.dumps(ev)
        except (TypeError, orjson.JSONEncodeError):
            pass
    try:
        return json.dumps(ev, allow_nan=True, separators=(",", ":")).encode()
    except (TypeError, ValueError, RecursionError):
        return original


def _default_ts(msg: Message, now: float | None) -> float:
    """An event's time when it carries no ``ts``: its Kafka timestamp, else ``now`` (else 0)."""
    return (msg.timestamp_ms / 1000.0) if msg.timestamp_ms is not None else (now or 0.0)


def _stream_or_none(ev: Any, lim: DecodeLimits) -> StreamKey | None:
    if not isinstance(ev, dict):
        return None
    try:
        return StreamKey(_label(ev, "model", lim), _label(ev, "model_version", lim),
                         _label(ev, "segment", lim, DEFAULT_SEGMENT))
    except _Bad:
        return None
