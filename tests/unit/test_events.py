"""Decoder: schema contract, every event accounted for, vectors equal to a plain parse."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping

import numpy as np
import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from embedwatch.events import MAX_MAGNITUDE, MIN_MAGNITUDE, DecodeLimits, Decoder, Kind, Message, Reason, StreamKey


def ev(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"model": "m", "model_version": "1", "embedding": [0.5, -1.0, 2.0]}
    base.update(kw)
    return base


def msg(doc: object, topic: str = "embeddings", raw: bytes | None = None) -> Message:
    return Message(value=raw if raw is not None else json.dumps(doc).encode(), topic=topic,
                   timestamp_ms=1_700_000_000_000)


CLOCK = 1_700_000_100.0  # the time of decoding of the decoders that compare paths: the same for each


def _clock() -> float:
    return CLOCK


def test_list_and_b64_give_identical_float32_vectors() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 384)).astype(np.float32)
    msgs = [msg(ev(embedding=[float(v) for v in row])) for row in x[:25]]
    msgs += [msg(ev(embedding=None, embedding_b64=base64.b64encode(row.astype("<f4").tobytes()).decode()))
             for row in x[25:]]
    out = Decoder().decode(msgs)
    assert out.rejections == []
    got = np.concatenate([b.vectors for b in sorted(out.blocks, key=lambda b: int(b.message_index[0]))])
    np.testing.assert_array_equal(got, x)


def test_defaults_and_fields() -> None:
    out = Decoder().decode([msg(ev(latency_ms=12.5, id="doc-1", segment="web"))])
    (b,) = out.blocks
    assert b.stream == StreamKey("m", "1", "web")
    assert b.ts[0] == 1_700_000_000.0  # Kafka timestamp when the event has no ts
    assert b.latency_s[0] == pytest.approx(0.0125)
    assert b.ids == ["doc-1"]
    out = Decoder().decode([msg(ev(ts="2025-01-01T00:00:00Z"))])
    assert out.blocks[0].ts[0] == 1735689600.0
    assert out.blocks[0].stream.segment == "default"
    assert math.isnan(out.blocks[0].latency_s[0])


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", Reason.INVALID_JSON),
        (b"", Reason.INVALID_JSON),
        (b"[" * 100_000 + b"]" * 100_000, Reason.INVALID_JSON),
        (json.dumps({"model_version": "1", "embedding": [1.0]}).encode(), Reason.SCHEMA),
        (json.dumps(ev(model=3)).encode(), Reason.SCHEMA),
        (json.dumps(ev(embedding="abc")).encode(), Reason.SCHEMA),
        (json.dumps(ev(embedding=[])).encode(), Reason.SCHEMA),
        (json.dumps(ev(embedding=[1.0, "x"])).encode(), Reason.SCHEMA),
        (json.dumps(ev(embedding=None)).encode(), Reason.SCHEMA),
        (json.dumps(ev(embedding=None, embedding_b64="!!!")).encode(), Reason.SCHEMA),
        (json.dumps(ev(ts="yesterday")).encode(), Reason.SCHEMA),
        (json.dumps(ev(latency_ms=-1)).encode(), Reason.SCHEMA),
        (json.dumps(ev(model="a/b")).encode(), Reason.SCHEMA),
        (json.dumps(ev(model="x" * 500)).encode(), Reason.SCHEMA),
        (json.dumps(ev(embedding=[1.0, float("nan"), 0.0])).encode(), Reason.NON_FINITE),
        (json.dumps(ev(embedding=[1.0, float("inf"), 0.0])).encode(), Reason.NON_FINITE),
        (json.dumps(ev(embedding=[1e300, 0.0])).encode(), Reason.NON_FINITE),
        (json.dumps(ev(embedding=[0.0, 0.0, 0.0])).encode(), Reason.ZERO_VECTOR),
        (json.dumps(ev(embedding=[0.1] * 9000)).encode(), Reason.SCHEMA),
        (json.dumps([]).encode(), Reason.SCHEMA),
        (json.dumps(42).encode(), Reason.SCHEMA),
    ],
)
def test_bad_input_is_rejected_with_its_reason(raw: bytes, reason: Reason) -> None:
    out = Decoder().decode([msg(None, raw=raw)])
    assert out.blocks == []
    assert [r.reason for r in out.rejections] == [reason]
    assert out.rejections[0].payload == raw  # the original bytes go to the dead-letter topic


def test_too_large_message() -> None:
    d = Decoder(DecodeLimits(max_message_bytes=1024))
    raw = json.dumps(ev(embedding=[0.1] * 500)).encode()
    out = d.decode([msg(None, raw=raw)])
    assert [r.reason for r in out.rejections] == [Reason.TOO_LARGE]


def test_array_message_rejects_only_bad_elements() -> None:
    doc = [ev(), ev(embedding=[0, 0, 0]), "junk", ev(model_version="2")]
    out = Decoder().decode([msg(doc)])
    assert out.accepted == 2
    assert sorted(r.reason.value for r in out.rejections) == ["schema", "zero_vector"]
    bad = next(r for r in out.rejections if r.reason is Reason.ZERO_VECTOR)
    assert orjson.loads(bad.payload)["embedding"] == [0, 0, 0]


def test_a_malformed_vector_among_good_ones_is_rejected_alone() -> None:
    """Rows are converted as they are parsed; one that does not convert is judged on its own and
    the others keep their exact float32 values."""
    good = [[0.1, -0.2, 0.3], [1e-3, 2.5, -7.0], [3.0, 4.0, 5.0]]
    docs = [ev(embedding=good[0]), ev(embedding=[1.0, "x", 2.0]), ev(embedding=good[1]),
            ev(embedding=[1.0, [2.0], 3.0]), ev(embedding=good[2])]
    out = Decoder().decode([msg(d) for d in docs])
    assert [(r.message_index, r.reason) for r in out.rejections] == [(1, Reason.SCHEMA), (3, Reason.SCHEMA)]
    (block,) = out.blocks
    np.testing.assert_array_equal(block.vectors, np.array(good, dtype=np.float32))
    assert block.vectors.dtype == np.float32 and block.message_index.tolist() == [0, 2, 4]


def test_queries() -> None:
    q = {"model": "m", "model_version": "1", "results": [{"id": "a", "score": 0.9}, {"id": "b", "score": 0.5},
                                                       {"id": "c", "score": 0.1}],
         "relevant_ids": ["b", "z"], "latency_ms": 40}
    out = Decoder(DecodeLimits(precision_k=2), query_topics=frozenset({"queries"})).decode(
        [msg(q, topic="queries"), msg({**q, "relevant_ids": None}, topic="queries")])
    (b,) = out.blocks
    assert b.kind is Kind.QUERY and b.dim == 0
    assert b.top1.tolist() == [0.9, 0.9]  # type: ignore[union-attr]
    assert b.n_results.tolist() == [3, 3]  # type: ignore[union-attr]
    assert b.precision_at_k[0] == 0.5 and math.isnan(b.precision_at_k[1])  # type: ignore[index]
    assert b.recall_at_k[0] == 0.5  # type: ignore[index]


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                          st.builds(lambda e: json.dumps(e).encode(),
                                    st.fixed_dictionaries({"model": st.text(max_size=5), "model_version":
                                                           st.text(max_size=5)},
                                                          optional={"embedding": json_values,
                                                                    "embedding_b64": json_values,
                                                                    "ts": json_values}))),
                max_size=20))
def test_every_event_is_accounted_for(raws: list[bytes]) -> None:
    out = Decoder().decode([msg(None, raw=r) for r in raws])
    # Each message yields >= 1 outcome; single-event messages exactly one.
    per_message = np.zeros(len(raws), dtype=int)
    for b in out.blocks:
        np.add.at(per_message, b.message_index, 1)
        assert np.isfinite(b.vectors).all()
        if b.dim:
            assert (np.einsum("ij,ij->i", b.vectors, b.vectors) > 0).all()
    for r in out.rejections:
        per_message[r.message_index] += 1
    assert (per_message >= 1).all()
    for i, raw in enumerate(raws):
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, list):
            assert per_message[i] == 1
        elif doc:
            assert per_message[i] == len(doc)


def test_deeply_nested_array_elements_are_dead_lettered_without_crashing() -> None:
    depth = 1020  # orjson parses it (limit 1024); writing an element back exceeds both encoders
    raw = b"[" * depth + b"]" * depth
    out = Decoder().decode([msg(None, raw=raw)])
    assert out.blocks == []
    assert len(out.rejections) == 1
    assert out.rejections[0].reason is Reason.SCHEMA


def _orjson_only() -> Decoder:
    d = Decoder(clock=_clock)
    d._parser = None  # every message through the orjson path
    return d


def _outcome(out: object) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    blocks = sorted(out.blocks, key=lambda b: int(b.message_index[0]))  # type: ignore[attr-defined]
    return ([(b.stream, b.kind, b.vectors.dtype.str, b.vectors.tobytes(), b.vectors.shape, b.ts.tobytes(),
              b.latency_s.tobytes(), b.ids, b.message_index.tolist(), b.payloads) for b in blocks],
            [(r.message_index, r.reason, r.detail, r.payload, r.stream)
             for r in out.rejections])  # type: ignore[attr-defined]


def test_plain_embedding_events_take_the_simdjson_path() -> None:
    d = Decoder()
    assert d._parser is not None, "pysimdjson is a dependency"
    raw = json.dumps(ev(ts=1.7e9, latency_ms=3.5, id="a", embedding=[0.1, 3, -2.5e-3])).encode()
    fast = d._fast_event(raw)
    assert fast is not None
    fields, row = fast
    assert fields == {"model": "m", "model_version": "1", "ts": 1.7e9, "latency_ms": 3.5, "id": "a"}
    # The parsed doubles themselves; the block is converted to float32 once, when assembled.
    assert row.format == "d" and row.tolist() == [0.1, 3.0, -2.5e-3]
    block = d.decode([msg(None, raw=raw)]).blocks[0]
    assert block.vectors.dtype == np.float32
    np.testing.assert_array_equal(block.vectors[0], np.array([0.1, 3, -2.5e-3], dtype=np.float32))
    # Not taken: nested arrays (simdjson's buffer read would flatten them), non-number elements,
    # NaN tokens, other arrays, b64 events, event arrays; the orjson path judges those.
    for doc in (ev(embedding=[[1.0], [2.0]]), ev(embedding=[1.0, True]), ev(embedding=[1.0, None]),
                ev(tags=["x"]), ev(embedding_b64="AACAPw=="), [ev()], ev(embedding=[])):
        assert d._fast_event(json.dumps(doc).encode()) is None, doc
    assert d._fast_event(b'{"model":"m","model_version":"1","embedding":[NaN, 1]}') is None
    out = d.decode([msg(ev(embedding=[[1.0], [2.0]]))])
    assert out.blocks == [] and out.rejections[0].reason is Reason.SCHEMA


numbers = st.one_of(st.floats(allow_nan=False, width=64), st.integers(-(2**70), 2**70),
                    st.sampled_from([0, 0.0, -0.0, 1e-45, 3.5e38, 1e39, -1e308]))
scalars = st.none() | st.booleans() | numbers | st.text(max_size=8)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(
    st.fixed_dictionaries(
        {"model": st.sampled_from(["m", "n"]) | scalars, "model_version": st.sampled_from(["1", "2"]) | scalars},
        optional={"embedding": st.lists(numbers, min_size=0, max_size=6) | st.lists(scalars, max_size=4)
                  | json_values,
                  "segment": st.sampled_from(["a", "b/c", ""]) | scalars, "ts": scalars, "latency_ms": scalars,
                  "id": scalars, "extra": json_values, "embedding_b64": st.sampled_from(["AACAPw==", "!"])},
    ).map(lambda e: json.dumps(e).encode()),
    st.sampled_from([b'{"model":"m","model_version":"1","embedding":[1,2],"model":"x"}',
                     b'{"model":"m","model_version":"1","embedding":[1,2],"embedding":[3]}',
                     b'{"model":"m","model_version":"1","embedding":[NaN,2]}',
                     b'{"model":"m","model_version":"1","embedding":[1e400,2]}',
                     b'{"model":"m\\ud800","model_version":"1","embedding":[1,2]}',
                     b'{"model":"m","model_version":"1","embedding":[18446744073709551616,2]}',
                     b'{"model":"m","model_version":"1","embedding":[1,2]} ',
                     b'{"model":"m","model_version":"1","embedding":[1,2]}x',
                     b'{"model":"m","model_version":"1","\\u0000":1,"embedding":[1,2]}',
                     b'{"model":"m","model_version":"1","embedding":[[1],[2.5]]}',
                     b'{"model":"m","model_version":"1","segment":null,"embedding":[1,2]}',
                     b'{"model":"m","model_version":"1","embedding":[1,2],"ts":1.7e12}',
                     b'{"model":"m","model_version":"1","embedding":[1,2],"ts":1700000400}',
                     b'{"model":"m","model_version":"1","embedding":[1,2],"ts":1700000400.5}',
                     b'{"model":"m","model_version":"1","embedding":[1,2],"ts":"2023-11-14T22:13:20"}',
                     b'{"model":"m","model_version":"1","embedding":[1,2],"ts":"1969-12-31T23:59:59Z"}'])),
                max_size=12))
def test_simdjson_path_decodes_exactly_like_the_orjson_path(raws: list[bytes]) -> None:
    msgs = [msg(None, raw=r) for r in raws]
    assert _outcome(Decoder(clock=_clock).decode(msgs)) == _outcome(_orjson_only().decode(msgs))


@settings(max_examples=500, deadline=None)
@example("AACAPwAAAEAAAEBA====")  # [1, 2, 3] + excess padding: Python accepts it, pybase64 alone would not
@example("AAAAAAA=")
@example("AAAAAAAAAA=A")  # a "=" before the last character is not padding
@example("AACA\nPw==")  # 1.0f with a newline, a blank, a URL-safe character: all refused
@example("AACA Pw==")
@example("AACA-Pw==")
@example("AAAAAAAA")
@given(st.one_of(st.text(alphabet="AQgw+/=", max_size=16), st.text(alphabet="AQgw+/= \n-_é", max_size=12),
                 st.binary(min_size=4, max_size=12).map(lambda b: base64.b64encode(b).decode())))
def test_b64_fields_are_judged_exactly_like_b64decode_validate(s: str) -> None:
    try:
        want: bytes | None = base64.b64decode(s, validate=True)
    except ValueError:  # binascii.Error is one
        want = None
    primed = Decoder()
    primed.decode(_PRIME)  # a known stream: its b64 events go through the msgspec pass
    for d in (Decoder(), primed):
        out = d.decode([msg(ev(embedding=None, embedding_b64=s))])
        if want is None or len(want) % 4 or not want:
            assert out.blocks == [] and out.rejections[0].reason is Reason.SCHEMA, (s, want)
        else:
            peak = np.abs(np.frombuffer(want, "<f4")).max()
            if MIN_MAGNITUDE <= peak <= MAX_MAGNITUDE:  # the values' own range check
                assert out.rejections == [], s
                assert out.blocks[0].vectors.tobytes() == want
            else:
                assert [r.reason for r in out.rejections] in ([Reason.NON_FINITE], [Reason.ZERO_VECTOR]), s


def _general_only() -> Decoder:
    d = Decoder(clock=_clock)
    d._b64_event = None  # every b64 event through the general path (orjson, pybase64, the checks)
    return d


# The b64 pass in C (embedwatch._b64scan, what the service runs) and the msgspec pass (where no C
# compiler built it): each is held to the general path.
B64_PASSES = ["c", "msgspec"]


def _with_pass(d: Decoder, which: str) -> Decoder:
    if which == "msgspec":
        d._b64_scan = None
    else:
        assert d._b64_scan is not None, "embedwatch._b64scan is not built (pip install -e . with a C compiler)"
    return d


def _b64(values: list[float]) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


_PRIME = [msg(ev(model=m, model_version=v, segment=s, embedding=[1.0]))
          for m in ("m", "n") for v in ("1", "2") for s in ("a", "default")]


@pytest.mark.parametrize("which", B64_PASSES)
def test_common_b64_events_of_known_streams_take_the_b64_pass(which: str) -> None:
    d = _with_pass(Decoder(), which)
    assert d._b64_event is not None, "msgspec is a dependency"
    common = [msg(ev(embedding=None, embedding_b64=_b64([0.5, -1.0]), ts=1.7e9 + i, latency_ms=3.25, id=f"d{i}"))
              for i in range(3)]
    # A stream's first event goes through the general path, which validates its labels once.
    assert d._b64_pass(common, None, {}) == [0, 1, 2]
    d.decode(_PRIME)
    groups: dict = {}
    assert d._b64_pass(common, None, groups) == []
    (g,) = groups.values()
    assert g.ts == [1.7e9, 1.7e9 + 1, 1.7e9 + 2] and g.lat == [0.00325] * 3 and g.ids == ["d0", "d1", "d2"]
    # Left to the general path: a string ts, a non-ASCII message, an unknown stream, an empty or
    # ragged vector, an id too long, a negative latency, a query topic, a list embedding.
    others = [ev(embedding=None, embedding_b64=_b64([1.0]), ts="2025-01-01T00:00:00Z"),
              ev(embedding=None, embedding_b64=_b64([1.0]), id="é"),
              ev(model="z", embedding=None, embedding_b64=_b64([1.0])),
              ev(embedding=None, embedding_b64=""), ev(embedding=None, embedding_b64="AAAA"),
              ev(embedding=None, embedding_b64=_b64([1.0]), id="x" * 513),
              ev(embedding=None, embedding_b64=_b64([1.0]), latency_ms=-1)]
    msgs = [msg(None, raw=json.dumps(o, ensure_ascii=False).encode()) for o in others]
    msgs += [msg(ev(embedding=None, embedding_b64=_b64([1.0])), topic="q"), msg(ev())]
    d.query_topics = frozenset({"q"})
    assert d._b64_pass(msgs, None, {}) == list(range(len(msgs)))


b64_values = st.sampled_from([_b64([1.0, 2.0]), _b64([0.0, 0.0]), _b64([float("nan"), 1.0]), _b64([3.0]),
                              "AACAPw==", "AACAPx==", "AACAPwAAAEAAAEBA====", "AACA Pw==", "", "!", "AAA",
                              # Unpadded, three float32s' length: decoded with the group's other rows.
                              _b64([1.0, 2.0, 3.0]), "AACAPwAAAEAAAE!A", "AACAPw==AACAPwAA", "AACAPwAAAEAA",
                              "AACAPwAAAEAAAEBAAACAPwAAAEAAAEBA", "\u00e9ACAPwAAAEAAAEB"])


vectors_b64 = st.lists(st.floats(width=32) | st.sampled_from([0.0, 1e-45]), min_size=1, max_size=4).map(_b64)
# Events of the known streams whose fields are mostly well formed: the msgspec pass takes most of them.
plausible_b64_events = st.fixed_dictionaries(
    {"model": st.sampled_from(["m", "n"]), "model_version": st.sampled_from(["1", "2"]),
     "embedding_b64": vectors_b64 | b64_values},
    optional={"segment": st.sampled_from(["a", "default"]),
              "ts": st.floats(min_value=0, allow_infinity=False) | st.integers(0, 2**70) | scalars,
              "latency_ms": st.floats(min_value=0, allow_infinity=False) | st.integers(0, 2**70) | scalars,
              "id": st.text(max_size=8) | st.integers(-(2**65), 2**65) | scalars, "extra": json_values},
).map(lambda e: json.dumps(e, ensure_ascii=False).encode())


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(
    plausible_b64_events,
    st.fixed_dictionaries(
        {"model": st.sampled_from(["m", "n"]) | scalars, "model_version": st.sampled_from(["1", "2"]) | scalars,
         "embedding_b64": b64_values | scalars},
        optional={"segment": st.sampled_from(["a", "default", "b/c", ""]) | scalars,
                  "ts": scalars | st.sampled_from(["2025-01-01T00:00:00Z", 2**1100, -1, 1.7e12, CLOCK + 300,
                                                   CLOCK + 300.5, "2023-11-14T22:13:20",
                                                   "1900-01-01T00:00:00Z"]),
                  "latency_ms": scalars | st.sampled_from([2**1100, -0.0]), "id": scalars | st.integers(),
                  "embedding": json_values, "extra": json_values},
    ).map(lambda e: json.dumps(e).encode()),
    # A well-formed b64 event followed by an edge case: a duplicate key, bad UTF-8 or a lone
    # surrogate in a skipped field, numbers orjson refuses, trailing bytes; and as an array.
    st.sampled_from([b'{"model":"m","model_version":"1","embedding_b64":"AACAPw=="' + tail for tail in (
        b',"model":"n"}', b',"embedding_b64":"!"}', b',"x":"\xff"}', b',"x":"\\ud800"}', b',"x":1e400}',
        b',"x":NaN}', b',"ts":1e400}', b',"id":18446744073709551617}', b'}x')]
        + [b'[{"model":"m","model_version":"1","embedding_b64":"AACAPw=="}]',
           # Unpadded base64 with a JSON escape: a plain letter, a non-ASCII one, a slash.
           b'{"model":"m","model_version":"1","embedding_b64":"AACAPwAAAEAAAEB\\u0041"}',
           b'{"model":"m","model_version":"1","embedding_b64":"AACAPwAAAEAAAEB\\u00e9"}',
           b'{"model":"m","model_version":"1","embedding_b64":"AACAPwAAAEAAAE\\/A"}'])), max_size=12))
@pytest.mark.parametrize("which", B64_PASSES)
def test_b64_pass_decodes_exactly_like_the_general_path(which: str, raws: list[bytes]) -> None:
    msgs = [msg(None, raw=r) for r in raws]
    fast, general = _with_pass(Decoder(clock=_clock), which), _general_only()
    fast.decode(_PRIME)
    general.decode(_PRIME)
    assert _outcome(fast.decode(msgs)) == _outcome(general.decode(msgs))


def test_the_c_pass_takes_every_common_spelling_of_a_b64_event() -> None:
    # Whitespace anywhere JSON allows it, any key order, segment null, an integer id, no ts (the
    # Kafka timestamp), null fields, fields the checks ignore: all taken, with the general path's values.
    d = _with_pass(Decoder(clock=_clock), "c")
    d.decode([*_PRIME, msg(ev(model="n", model_version="2", segment=None))])
    text = _b64([0.5, -1.0])
    raws = [b' \t{ "model" :\n"m" ,\r"model_version":"1","embedding_b64" : "%s" } \n' % text.encode(),
            b'{"embedding_b64":"%s","segment":null,"model_version":"2","model":"n","id":-42,"ts":1700000000}'
            % text.encode(),
            b'{"model":"m","model_version":"1","embedding_b64":"%s","segment":"a","id":null,"ts":null,'
            b'"latency_ms":0,"query_id":null,"results":null,"relevant_ids":null,"embedding":null}' % text.encode(),
            b'{"model":"m","model_version":"1","embedding_b64":"%s","note":"x y","n":-1.5e-3,"ok":true,'
            b'"no":false,"id":"d-1","latency_ms":2.5E+1,"ts":1.7e9}' % text.encode()]
    msgs = [msg(None, raw=r) for r in raws]
    assert d._b64_pass(msgs, None, {}) == []
    assert _outcome(d.decode(msgs)) == _outcome(_general_only().decode(msgs))


def test_a_stream_spelled_two_ways_keeps_message_order_in_the_c_pass() -> None:
    # segment null and "default" (or none) name one stream: two classes of the scan. The first
    # makes the stream's group, the second is left to the general path, which adds its rows to
    # that group; the block comes out in message order.
    d = _with_pass(Decoder(clock=_clock), "c")
    d.decode([*_PRIME, msg(ev(segment=None))])
    rows = np.arange(12, dtype="<f4").reshape(6, 2) + 1
    msgs = [msg({"model": "m", "model_version": "1", "embedding_b64": _b64(r.tolist()), "id": f"i{k}",
                 **({"segment": None} if k in (1, 2, 4) else {"segment": "default"} if k == 5 else {})})
            for k, r in enumerate(rows)]
    groups: dict = {}
    assert d._b64_pass(msgs, None, groups) == [1, 2, 4]
    (g,) = groups.values()
    assert g.msg == [0, 3, 5] and g.ids == ["i0", "i3", "i5"]
    (b,) = d.decode(msgs).blocks
    assert b.message_index.tolist() == list(range(6)) and b.ids == [f"i{k}" for k in range(6)]
    np.testing.assert_array_equal(b.vectors, rows)
    assert _outcome(d.decode(msgs)) == _outcome(_general_only().decode(msgs))


def test_the_c_pass_looks_for_the_base64_end_where_the_last_one_was_and_is_not_fooled() -> None:
    # The scan looks for a text's closing quote first where the last message's was (16 characters
    # in). The second event's text is 8, and a quote of a later field stands at 16: the span it
    # then reads holds quotes, which no base64 is, so the event goes to the general path, which
    # takes it. A third with the first one's length is taken again by the pass.
    d = _with_pass(Decoder(clock=_clock), "c")
    d.decode(_PRIME)
    three, one = _b64([1.0, 2.0, 3.0]), _b64([4.0])
    assert (len(three), len(one)) == (16, 8)
    raws = [b'{"model":"m","model_version":"1","embedding_b64":"%s"}' % three.encode(),
            b'{"model":"m","model_version":"1","embedding_b64":"%s","i":"x"}' % one.encode(),
            b'{"model":"m","model_version":"1","embedding_b64":"%s","i":"xyzw"}' % three.encode()]
    assert raws[1][raws[1].index(b"AAC") + 16 : raws[1].index(b"AAC") + 17] == b'"'
    msgs = [msg(None, raw=r) for r in raws]
    assert d._b64_pass(msgs, None, {}) == [1]
    out = d.decode(msgs)
    assert out.rejections == []
    assert [(b.message_index.tolist(), b.vectors.tolist()) for b in out.blocks] == [
        ([0, 2], [[1.0, 2.0, 3.0]] * 2), ([1], [[4.0]])]
    assert _outcome(out) == _outcome(_general_only().decode(msgs))


# JSON whitespace, JSON escapes and the bytes of its grammar: what a hand-written parser can get wrong.
_JSON_BYTES = b' \t\n\r{}[]":,\\/-+.0123456789eEtrufalsnAQ=\x00\x1f\x7f\xc3\xa9'


def _spelled(fields: dict[str, object], seps: list[str], escaped: set[str], again: tuple[str, object] | None) -> bytes:
    """``fields`` as one JSON object, with ``seps`` (cycled) as its whitespace, the letters of the
    string values of the ``escaped`` fields written as \\u escapes, and ``again`` a key given twice."""
    def value(v: object, escape: bool = False) -> str:
        out = json.dumps(v)
        return "".join(f"\\u{ord(c):04x}" if c.isalpha() and escape else c for c in out) if isinstance(v, str) else out
    ws = (seps[i % len(seps)] for i in range(10**6))
    items = [*fields.items(), *([again] if again is not None else [])]
    body = ",".join(f"{next(ws)}{value(k)}{next(ws)}:{next(ws)}{value(v, k in escaped)}{next(ws)}" for k, v in items)
    return f"{next(ws)}{{{body}}}{next(ws)}".encode()


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(
    st.fixed_dictionaries(
        {"model": st.sampled_from(["m", "n"]), "model_version": st.sampled_from(["1", "2"]),
         "embedding_b64": vectors_b64 | b64_values},
        optional={"segment": st.sampled_from(["a", "default", None]),
                  "ts": st.sampled_from([1.7e9, 1_700_000_000, 0, -0.0, None, CLOCK + 300, 1e-320]),
                  "latency_ms": st.sampled_from([0, 2.5, None, -0.0, 1e308]),
                  "id": st.sampled_from(["a", "", None, 0, -7, 10**17, 10**18, 2**63, "x" * 600]),
                  "query_id": st.sampled_from([None, "q"]), "extra": st.sampled_from([None, True, 1.5, "s"])}),
    st.lists(st.sampled_from(["", " ", "\n", "\t", "\r", "  "]), min_size=1, max_size=3),
    st.sets(st.sampled_from(["model", "segment", "id", "extra"])),
    st.none() | st.tuples(st.sampled_from(["model", "segment", "ts", "id", "latency_ms", "embedding_b64"]),
                          st.sampled_from([None, 5, "a", "n"])),
    # A byte of the JSON grammar put in, or one taken out, at some place: the parser must leave
    # whatever is no longer a well-formed event to the general path.
    st.none() | st.tuples(st.integers(0, 2**16), st.sampled_from([bytes([b]) for b in _JSON_BYTES] + [b""]))),
    max_size=8))
@example([({"model": "m", "model_version": "1", "embedding_b64": "AACAPw==", "id": 0}, [""], set(), None, (65, b"-"))])
@pytest.mark.parametrize("by_fields", [False, True])  # the service tells a query by topic, replay by its fields
def test_the_c_pass_decodes_any_spelling_exactly_like_the_general_path(
        by_fields: bool, events: list[tuple[dict[str, object], list[str], set[str], tuple[str, object] | None,
                                            tuple[int, bytes] | None]]) -> None:
    raws = []
    for fields, seps, escaped, again, edit in events:
        raw = _spelled(fields, seps, escaped, again)
        if edit is not None:
            at, put = edit[0] % (len(raw) + 1), edit[1]
            raw = raw[:at] + put + raw[at + (not put):]
        raws.append(raw)
    msgs = [msg(None, raw=r) for r in raws]
    fast, general = _with_pass(Decoder(clock=_clock), "c"), _general_only()
    fast.kind_by_fields = general.kind_by_fields = by_fields
    fast.decode(_PRIME + [msg(ev(model=m, segment=None)) for m in ("m", "n")])
    general.decode(_PRIME + [msg(ev(model=m, segment=None)) for m in ("m", "n")])
    assert _outcome(fast.decode(msgs)) == _outcome(general.decode(msgs))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=80) | st.binary(max_size=40).map(
    lambda b: b'{"model":"m","model_version":"1","embedding_b64":"AACAPw=="' + b), max_size=10))
def test_the_c_pass_takes_arbitrary_bytes_like_the_general_path(raws: list[bytes]) -> None:
    # Whatever the bytes, the C pass neither raises nor crashes, and the outcome is the general path's.
    msgs = [msg(None, raw=r) for r in raws]
    fast, general = _with_pass(Decoder(clock=_clock), "c"), _general_only()
    fast.decode(_PRIME)
    general.decode(_PRIME)
    assert _outcome(fast.decode(msgs)) == _outcome(general.decode(msgs))


@pytest.mark.parametrize("which", B64_PASSES)
@pytest.mark.parametrize("n", [6, 40])  # a few rows (checked in Python) and many (with numpy)
def test_a_group_fed_by_both_paths_comes_out_in_message_order(n: int, which: str) -> None:
    # Every other event holds an array field, so the general path takes it after the b64 pass
    # took the rest: the stream's one group gets its rows out of order and must sort them.
    rows = np.arange(n * 3, dtype="<f4").reshape(n, 3) + 1
    msgs = [msg(ev(embedding=None, embedding_b64=_b64(r.tolist()), id=f"i{k}", **({"extra": [k]} if k % 2 else {})))
            for k, r in enumerate(rows)]
    d = _with_pass(Decoder(clock=_clock), which)
    d.decode(_PRIME)
    groups: dict = {}
    assert d._b64_pass(msgs, None, groups) == list(range(1, n, 2))
    out = d.decode(msgs)
    (b,) = out.blocks
    assert b.message_index.tolist() == list(range(n)) and b.ids == [f"i{k}" for k in range(n)]
    np.testing.assert_array_equal(b.vectors, rows)
    assert _outcome(out) == _outcome(_general_only().decode(msgs))


@pytest.mark.parametrize("which", B64_PASSES)
@pytest.mark.parametrize(("width", "pad"), [(3, 0), (2, 1), (1, 2), (6, 0), (5, 1), (4, 2)])
def test_b64_rows_are_decoded_together_and_a_bad_one_is_judged_alone(width: int, pad: int, which: str) -> None:
    d = _with_pass(Decoder(), which)
    d.decode(_PRIME)
    rows = np.arange(4 * width, dtype="<f4").reshape(4, width) + 1
    texts = [_b64(r.tolist()) for r in rows]
    assert all(len(t) - len(t.rstrip("=")) == pad for t in texts)
    good = [msg(ev(embedding=None, embedding_b64=t, id=f"i{k}")) for k, t in enumerate(texts)]
    groups: dict = {}
    assert d._b64_pass(good, None, groups) == []
    (g,) = groups.values()
    # One block; the msgspec pass keeps its rows' text, the C pass has them joined and keeps none.
    assert g.block.tobytes() == rows.tobytes() and g.raw == (texts if which == "msgspec" else [])
    (b,) = d.decode(good).blocks
    np.testing.assert_array_equal(b.vectors, rows)
    assert b.vectors.flags.writeable and b.ids == ["i0", "i1", "i2", "i3"]
    # One bad row among them: the joined text does not decode, so its run is judged row by row;
    # the bad one is left to the general path, in message order, and the others keep their rows.
    # Bad: a character outside the alphabet, a "=" inside (both judged alone), one "=" too many
    # (left to the general path by its length, unless it is a third one).
    for wrong in (texts[0][:5] + "!" + texts[0][6:], texts[0][:4] + "=" + texts[0][5:],
                  texts[0][: -pad - 1] + "=" * (pad + 1)):
        bad = [*good[:2], msg(ev(embedding=None, embedding_b64=wrong)), *good[2:]]
        groups = {}
        assert d._b64_pass(bad, None, groups) == [2], wrong
        (g,) = groups.values()
        # The C pass keeps the rows' text only when the bad row was among them (its length the
        # rows'), and so decoded row by row.
        with_bad = 3 * len(wrong) // 4 - (2 if wrong.endswith("==") else wrong.endswith("=")) == 4 * width
        kept = texts if which == "msgspec" or with_bad else []
        assert g.msg == [0, 1, 3, 4] and g.raw == kept and g.block.tobytes() == rows.tobytes()
        out = d.decode(bad)
        assert _outcome(out) == _outcome(_general_only().decode(bad))
        assert [r.message_index for r in out.rejections] == [2]
        np.testing.assert_array_equal(out.blocks[0].vectors, rows)
        # Every row bad: the group is gone.
        groups = {}
        assert d._b64_pass(bad[2:3] * 2, None, groups) == [0, 1] and groups == {}


def test_rows_decoded_together_must_all_have_the_group_length() -> None:
    from embedwatch.events import _decode_rows

    ok = _decode_rows(["AACAPw==", "AAAAQA=="], 8, 2)
    assert ok.view("<f4").tolist() == [[1.0], [2.0]]
    for texts in (["AACAPw==", "AAAAQAAAAEA="], ["AACAPw==", "AAA="], ["AACAPw==", "AACA\x00w=="]):
        with pytest.raises(ValueError):
            _decode_rows(texts, 8, 2)
    with pytest.raises(ValueError):
        _decode_rows(["AACAPwAAAEAAAEBA", "AACAPwAAAEAAAEBAAAAA"], 16, 0)


def test_a_bad_row_costs_single_decodes_for_its_run_only(monkeypatch: pytest.MonkeyPatch) -> None:
    from embedwatch import events

    d = Decoder()
    d.decode(_PRIME)
    rows = np.arange(600, dtype="<f4").reshape(200, 3)
    texts = [_b64(r.tolist()) for r in rows]
    texts[150] = texts[150][:3] + "!" + texts[150][4:]
    single: list[str] = []
    real = events._b64decode
    monkeypatch.setattr(events, "_b64decode", lambda t: single.append(t) or real(t))
    groups: dict = {}
    assert d._b64_pass([msg(ev(embedding=None, embedding_b64=t)) for t in texts], None, groups) == [150]
    # The run of rows 144..159 holds the bad row: its rows are judged one by one, no other row.
    assert events._RUN_ROWS == 16 and single == texts[144:160]
    (g,) = groups.values()
    keep = [i for i in range(200) if i != 150]
    assert g.msg == keep and g.block.tobytes() == rows[keep].tobytes()


def test_a_block_decoded_together_is_split_when_the_general_path_adds_a_row() -> None:
    d = Decoder()
    d.decode(_PRIME)
    rows = np.arange(9, dtype="<f4").reshape(3, 3) + 1
    docs = [ev(embedding=None, embedding_b64=_b64(rows[0].tolist()), ts=5.0),
            ev(embedding=None, embedding_b64=_b64(rows[1].tolist()), ts="1970-01-01T00:00:06Z"),  # general
            ev(embedding=None, embedding_b64=_b64(rows[2].tolist()), ts=7.0)]
    out = d.decode([msg(x) for x in docs])
    (b,) = out.blocks
    np.testing.assert_array_equal(b.vectors, rows)
    assert b.ts.tolist() == [5.0, 6.0, 7.0] and b.message_index.tolist() == [0, 1, 2]
    assert _outcome(out) == _outcome(_general_only().decode([msg(x) for x in docs]))


def test_a_stream_fed_by_both_paths_keeps_its_rows_in_message_order() -> None:
    d = Decoder()
    d.decode(_PRIME)
    docs = [ev(embedding=None, embedding_b64=_b64([1.0, 0.0]), ts=5.0),
            ev(embedding=None, embedding_b64=_b64([2.0, 0.0]), ts="1970-01-01T00:00:06Z"),  # general path
            ev(embedding=None, embedding_b64=_b64([3.0, 0.0]), ts=7.0),
            [ev(embedding=None, embedding_b64=_b64([4.0, 0.0]), id="x"),
             ev(embedding=None, embedding_b64=_b64([5.0, 0.0]), id="y")],  # an array: general path
            ev(embedding=None, embedding_b64=_b64([6.0, 0.0]), ts=9.0, id="z")]
    (b,) = d.decode([msg(x) for x in docs]).blocks
    assert b.message_index.tolist() == [0, 1, 2, 3, 3, 4]
    assert b.vectors[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert b.ts.tolist()[:3] == [5.0, 6.0, 7.0] and b.ids[3:] == ["x", "y", "z"]
    assert b.payloads[0] == json.dumps(docs[0]).encode() and b.payloads[3] == orjson.dumps(docs[3][0])


@pytest.mark.parametrize("raw", [
    b'{"model":"m","model_version":"1","embedding":[1],"ts":1' + b"0" * 400 + b"}",
    b'{"model":"m","model_version":"1","embedding":[1],"latency_ms":1' + b"0" * 400 + b"}",
    b'{"model":"m","model_version":"1","results":[{"id":"a","score":1' + b"0" * 400 + b"}]}",
])
def test_integers_beyond_float_range_are_schema_errors_not_crashes(raw: bytes) -> None:
    out = Decoder(query_topics=frozenset({"queries"})).decode(
        [msg(None, raw=raw, topic="queries" if b"results" in raw else "embeddings")])
    assert out.blocks == [] and [r.reason for r in out.rejections] == [Reason.SCHEMA]


def test_result_ids_that_are_lists_or_objects_match_no_relevant_id() -> None:
    q = {"model": "m", "model_version": "1", "relevant_ids": ["a", 1],
         "results": [{"id": ["a"], "score": 0.9}, {"id": {"a": 1}, "score": 0.5}, {"id": "a", "score": 0.1}]}
    out = Decoder(DecodeLimits(precision_k=3), query_topics=frozenset({"queries"})).decode([msg(q, topic="queries")])
    (b,) = out.blocks
    assert b.precision_at_k.tolist() == [1 / 3] and b.recall_at_k.tolist() == [0.5]  # type: ignore[union-attr]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.fixed_dictionaries(
    {"model": st.just("m"), "model_version": st.just("1")},
    optional={"results": json_values | st.lists(st.fixed_dictionaries({"id": json_values, "score": json_values})),
              "relevant_ids": json_values | st.lists(st.text(max_size=3) | st.integers()),
              "ts": json_values, "latency_ms": json_values, "query_id": json_values, "embedding": json_values},
).map(lambda e: json.dumps(e).encode()), max_size=10))
def test_every_query_event_is_accounted_for(raws: list[bytes]) -> None:
    out = Decoder(query_topics=frozenset({"queries"})).decode([msg(None, raw=r, topic="queries") for r in raws])
    seen = sorted([int(i) for b in out.blocks for i in b.message_index] + [r.message_index for r in out.rejections])
    assert seen == list(range(len(raws)))


# -- the decoder's paths, for the checks every one of them must apply -------------------------------

def _paths() -> dict[str, Decoder]:
    """A decoder per path an event can take, all at the time of decoding CLOCK: simdjson (a plain
    JSON event) with the msgspec pass of known streams (a b64 event), orjson alone, and the general
    path for b64 events."""
    primed = Decoder(clock=_clock)
    primed.decode(_PRIME)
    return {"default": primed, "orjson": _orjson_only(), "general": _general_only()}


def _all_forms(doc: dict[str, object]) -> list[Message]:
    """``doc`` with a JSON list, with base64, and as the second element of an event array (after
    a good event: see :func:`_others`)."""
    emb = doc.get("embedding", [0.5, -1.0, 2.0])
    b64 = {k: v for k, v in doc.items() if k != "embedding"}
    b64["embedding_b64"] = _b64(emb)  # type: ignore[arg-type]
    return [msg(doc), msg(b64), msg([ev(), doc])]


def _others(m: Message) -> int:
    """The good events :func:`_all_forms` put in ``m`` beside the one under test."""
    return 1 if m.value.startswith(b"[") else 0


@pytest.mark.parametrize("ts", [1.7e12, 1_700_000_000_000, CLOCK + 300.001, "2100-01-01T00:00:00Z",
                                "9999-12-31T23:59:59"])
def test_an_event_time_beyond_the_allowed_clock_skew_is_dead_lettered_on_every_path(ts: object) -> None:
    """A time far ahead (here mostly ms sent as seconds) would become the window's newest time
    for good, evicting every later event; it is refused, with its time and the allowance."""
    for name, d in _paths().items():
        for m in _all_forms(ev(ts=ts)):
            out = d.decode([m])
            assert out.accepted == _others(m), (name, m)
            (r,) = out.rejections
            assert r.reason is Reason.SCHEMA and r.stream == StreamKey("m", "1"), (name, m)
            assert "ahead of this service's clock (allowed 300 s)" in r.detail, r.detail
    detail = _paths()["default"].decode([msg(ev(ts=1.7e12))]).rejections[0].detail
    assert detail == "ts 1.7e+12 is 1.7e+12 s ahead of this service's clock (allowed 300 s): " \
                     "milliseconds sent as seconds?"


def test_an_event_time_within_the_allowed_skew_is_accepted_on_every_path() -> None:
    for name, d in _paths().items():
        for ts in (CLOCK + 300, CLOCK, 0.0, "2023-11-14T22:20:00Z"):  # the last is CLOCK + 300
            for m in _all_forms(ev(ts=ts)):
                out = d.decode([m])
                assert out.rejections == [], (name, ts, out.rejections)


def test_the_allowed_skew_is_a_limit_and_the_time_of_decoding_the_later_of_clock_and_now() -> None:
    d = Decoder(DecodeLimits(max_future_skew_s=10.0), clock=_clock)
    assert [r.detail for r in d.decode([msg(ev(ts=CLOCK + 11))]).rejections] == [
        "ts 1.7e+09 is 11 s ahead of this service's clock (allowed 10 s): a producer clock ahead?"]
    # The hint names the unit slip the time fits.
    for ts, hint in ((CLOCK * 1e3, "milliseconds"), (CLOCK * 1e6, "microseconds"), (CLOCK * 1e9, "nanoseconds")):
        assert d.decode([msg(ev(ts=ts))]).rejections[0].detail.endswith(f"{hint} sent as seconds?")
    assert [r.detail for r in d.decode([msg(ev(ts="2100-01-01T00:00:00"))]).rejections] == [
        "ts '2100-01-01T00:00:00' is 2.4e+09 s ahead of this service's clock (allowed 10 s): a producer clock ahead?"]
    assert d.decode([msg(ev(ts=CLOCK + 10))]).rejections == []
    # A caller's ``now`` ahead of the clock (a simulation) does not refuse its own events.
    assert d.decode([msg(ev(ts=CLOCK + 1000))], now=CLOCK + 995).rejections == []
    # Without a ts, the Kafka timestamp stands for it and is held to the same bound.
    late = Message(json.dumps(ev()).encode(), topic="embeddings", timestamp_ms=int((CLOCK + 60) * 1000))
    (r,) = d.decode([late]).rejections
    assert r.reason is Reason.SCHEMA and "Kafka timestamp" in r.detail and "allowed 10 s" in r.detail
    assert Decoder(DecodeLimits(max_future_skew_s=60.0), clock=_clock).decode([late]).rejections == []
    # An infinite allowance still refuses an infinite time.
    inf = Decoder(DecodeLimits(max_future_skew_s=math.inf), clock=_clock)
    assert inf.decode([msg(ev(ts=1e300))]).rejections == []
    assert [r.reason for r in inf.decode([msg(None, raw=json.dumps(ev(ts=1)).encode()[:-1] + b',"ts":1e400}')])
            .rejections] == [Reason.SCHEMA]


def test_by_default_the_decoder_refuses_milliseconds_sent_as_seconds_against_the_wall_clock() -> None:
    import time

    out = Decoder().decode([msg(ev(ts=time.time() * 1000)), msg(ev(ts=time.time()))])
    assert [(r.message_index, r.reason) for r in out.rejections] == [(0, Reason.SCHEMA)]
    assert out.accepted == 1


def test_the_service_passes_its_allowed_skew_to_the_decoder() -> None:
    from embedwatch.app import Service
    from embedwatch.config import Settings

    assert Settings().limits.max_future_skew_s == 300.0
    svc = Service(Settings(limits={"max_future_skew_s": 5.0}))  # type: ignore[arg-type]
    assert svc.decoder.limits.max_future_skew_s == 5.0
    _, rejections = svc.process([msg(ev(ts=1.7e12))])
    assert [r.reason for r in rejections] == [Reason.SCHEMA]


@pytest.mark.parametrize(("embedding", "element"), [
    ([1.0, True], "element 1 is a boolean"), ([True, False], "element 0 is a boolean"),
    ([0.0, 1.0, False], "element 2 is a boolean"), ([1, True], "element 1 is a boolean"),
    ([1.0, "2.5"], "element 1 is a string"), (["1e3", " 7 "], "element 0 is a string"),
    ([1.0, "nan"], "element 1 is a string"), ([1.0, None], "element 1 is null"),
])
def test_embedding_elements_that_are_not_numbers_are_schema_errors_on_every_path(
        embedding: list[object], element: str) -> None:
    """np.fromiter read true as 1, "2.5" as 2.5 and null as NaN (a non_finite rejection)."""
    want = f"field 'embedding' must be a list of numbers, {element}"
    good = ev(embedding=[0.25, -1.0, 3.0][: len(embedding)])
    for name, d in _paths().items():
        for m in (msg(ev(embedding=embedding)), msg([good, ev(embedding=embedding)]),
                  msg(ev(embedding=embedding), topic="queries")):
            d.query_topics = frozenset({"queries"})
            out = d.decode([msg(good), m])
            assert [(r.message_index, r.reason, r.detail) for r in out.rejections] == [(1, Reason.SCHEMA, want)], \
                (name, m)
            (b,) = [b for b in out.blocks if b.kind is Kind.EMBEDDING]
            np.testing.assert_array_equal(b.vectors[0], np.array(good["embedding"], dtype=np.float32))


def test_the_row_by_row_path_refuses_what_is_not_a_number() -> None:
    """A malformed row sends its group row by row: there too, only numbers pass."""
    docs = [ev(embedding=[3, 4]), ev(embedding=["3", "4"]), ev(embedding=[1.0, True]),
            ev(embedding=[1.0, None]), ev(embedding=[1.0, [2.0]]), ev(embedding=[0.5, 2.0])]
    for d in _paths().values():
        out = d.decode([msg(x) for x in docs])
        assert [(r.message_index, r.reason) for r in out.rejections] == [(i, Reason.SCHEMA) for i in (1, 2, 3, 4)]
        (b,) = out.blocks
        assert b.message_index.tolist() == [0, 5] and b.vectors.tolist() == [[3.0, 4.0], [0.5, 2.0]]


def _query_block(q: Mapping[str, object], k: int = 3) -> object:
    out = Decoder(DecodeLimits(precision_k=k), query_topics=frozenset({"queries"})).decode([msg(q, topic="queries")])
    assert out.rejections == []
    (b,) = out.blocks
    return b


def test_repeated_result_ids_count_once_in_precision_and_recall() -> None:
    q = {"model": "m", "model_version": "1", "relevant_ids": ["a"],
         "results": [{"id": "a", "score": 0.9}, {"id": "a", "score": 0.8}, {"id": "a", "score": 0.7}]}
    b = _query_block(q)
    assert b.recall_at_k.tolist() == [1.0] and b.precision_at_k.tolist() == [1 / 3]  # type: ignore[attr-defined]
    q2 = {**q, "relevant_ids": ["a", "b", "b", 7],
          "results": [{"id": "b", "score": 0.9}, {"id": 7, "score": 0.5}, {"id": "b", "score": 0.4},
                      {"id": "a", "score": 0.1}]}  # "a" beyond k
    b = _query_block(q2)
    assert b.recall_at_k.tolist() == [2 / 3] and b.precision_at_k.tolist() == [2 / 3]  # type: ignore[attr-defined]


def test_bools_are_not_ids() -> None:
    q = {"model": "m", "model_version": "1", "results": [{"id": 1, "score": 0.9}], "relevant_ids": [True]}
    out = Decoder(query_topics=frozenset({"queries"})).decode([msg(q, topic="queries")])
    assert out.blocks == [] and [r.reason for r in out.rejections] == [Reason.SCHEMA]
    assert "strings or integers" in out.rejections[0].detail
    # A result id true does not match the relevant id 1 (nor a float 1.0).
    b = _query_block({**q, "relevant_ids": [1], "results": [{"id": True, "score": 0.9}, {"id": 1.0, "score": 0.5}]})
    assert b.recall_at_k.tolist() == [0.0] and b.precision_at_k.tolist() == [0.0]  # type: ignore[attr-defined]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", 1, 2, True, 1.0, None]), max_size=8),
       st.lists(st.sampled_from(["a", "b", 1, 2]), max_size=4), st.integers(1, 5))
def test_precision_and_recall_at_k_are_distinct_relevant_hits_over_k_and_over_relevant(
        result_ids: list[object], relevant: list[object], k: int) -> None:
    q = {"model": "m", "model_version": "1", "relevant_ids": relevant,
         "results": [{"id": x, "score": 1.0} for x in result_ids]}
    b = _query_block(q, k)
    hits = {x for x in result_ids[:k] if type(x) in (str, int) and x in relevant}
    assert b.precision_at_k.tolist() == [len(hits) / k]  # type: ignore[attr-defined]
    if relevant:
        assert b.recall_at_k.tolist() == [len(hits) / len(set(relevant))]  # type: ignore[attr-defined]
        assert 0.0 <= b.recall_at_k[0] <= 1.0  # type: ignore[attr-defined]


def test_dead_letters_of_array_elements_keep_their_nan_and_infinity() -> None:
    """orjson writes NaN and Infinity as null: the dead letter would not show its fault."""
    raw = (b'[{"model":"m","model_version":"1","embedding":[1.0,2.0]},'
           b'{"model":"m","model_version":"1","embedding":[NaN,1.0]},'
           b'{"model":"m","model_version":"1","embedding":[1e400,-Infinity]},'
           b'{"model":"m","model_version":"1","embedding":[1.0,2.0],"ts":Infinity}]')
    for name, d in _paths().items():
        out = d.decode([msg(None, raw=raw)])
        assert out.accepted == 1, name
        got = {r.reason: r.payload for r in out.rejections}
        assert [r.payload for r in out.rejections if r.reason is Reason.SCHEMA] == [
            b'{"model":"m","model_version":"1","embedding":[1.0,2.0],"ts":Infinity}']
        assert sorted(r.payload for r in out.rejections if r.reason is Reason.NON_FINITE) == [
            b'{"model":"m","model_version":"1","embedding":[Infinity,-Infinity]}',
            b'{"model":"m","model_version":"1","embedding":[NaN,1.0]}'], (name, got)
        assert all(json.loads(r.payload) for r in out.rejections)  # each still JSON (the Python dialect)


def test_offset_less_time_strings_are_utc_whatever_the_host_time_zone(monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    try:
        for tz in ("UTC", "Asia/Tokyo", "America/Los_Angeles"):
            monkeypatch.setenv("TZ", tz)
            time.tzset()
            for name, d in _paths().items():
                for ts, want in (("2023-11-14T22:13:20", 1_700_000_000.0), ("2023-11-14 22:13:20.5", 1_700_000_000.5),
                                 ("2023-11-14", 1_699_920_000.0), ("2023-11-14T22:13:20+01:00", 1_699_996_400.0)):
                    for m in _all_forms(ev(ts=ts)):
                        out = d.decode([m])
                        assert out.rejections == [] and out.blocks[0].ts[-1] == want, (tz, name, ts)
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("ts", ["1969-12-31T23:59:59Z", "1900-01-01T00:00:00", "0001-01-01",
                                "1970-01-01T00:30:00+01:00"])
def test_time_strings_before_1970_are_refused_like_negative_numbers(ts: str) -> None:
    for name, d in _paths().items():
        for m in _all_forms(ev(ts=ts)):
            out = d.decode([m])
            assert out.accepted == _others(m) and [r.reason for r in out.rejections] == [Reason.SCHEMA], (name, m)
            assert out.rejections[0].detail == f"field 'ts' {ts!r} is before 1970-01-01T00:00:00Z"
    assert _paths()["default"].decode([msg(ev(ts="1970-01-01T00:00:00"))]).blocks[0].ts.tolist() == [0.0]


def test_null_optional_fields_are_absent_on_every_path() -> None:
    for name, d in _paths().items():
        for m in _all_forms(ev(segment=None, ts=None, id=None, latency_ms=None)):
            out = d.decode([m])
            assert out.rejections == [] and out.accepted == 1 + _others(m), (name, m, out.rejections)
            assert [b.stream for b in out.blocks] == [StreamKey("m", "1", "default")]
            assert out.blocks[0].ts[-1] == 1_700_000_000.0  # the Kafka timestamp
    # A known stream's b64 events with a null segment take the msgspec pass once the general path
    # has seen the labels.
    d = _paths()["default"]
    m = msg(ev(segment=None, embedding=None, embedding_b64=_b64([1.0, 2.0])))
    assert d.decode([m]).accepted == 1
    assert d._b64_pass([m], None, {}) == []


def test_a_null_required_field_is_named_as_null_and_a_missing_one_as_missing() -> None:
    out = Decoder().decode([msg(ev(model=None)), msg({"model_version": "1", "embedding": [1.0]})])
    assert [(r.reason, r.detail) for r in out.rejections] == [
        (Reason.SCHEMA, "required field 'model' is null"), (Reason.SCHEMA, "missing required field 'model'")]


@pytest.mark.parametrize(("embedding", "reason", "detail"), [
    ([1e31, 1.0, 0.5], Reason.NON_FINITE, "embedding holds a value beyond 1e+30 in magnitude"),
    ([-3e38, 1.0, 0.5], Reason.NON_FINITE, "embedding holds a value beyond 1e+30 in magnitude"),
    ([1e-31, -5e-31, 0.0], Reason.ZERO_VECTOR, "embedding has no component of magnitude 1e-30 or more"),
    ([8e-40, 0.0, 0.0], Reason.ZERO_VECTOR, "embedding has no component of magnitude 1e-30 or more"),
    ([0.0, 0.0, 0.0], Reason.ZERO_VECTOR, "embedding has zero norm"),
])
def test_vectors_beyond_the_range_of_float32_statistics_are_refused_on_every_path(
        embedding: list[float], reason: Reason, detail: str) -> None:
    """Finite float32 values of 1e38 overflowed a baseline fit's random features and a vector of
    components near 1e-39 its kernel bandwidth: the fit raised at every later batch of the stream."""
    for name, d in _paths().items():
        for m in _all_forms(ev(embedding=embedding)):
            out = d.decode([m])
            assert out.accepted == _others(m), (name, m)
            (r,) = out.rejections
            assert (r.reason, r.detail) == (reason, detail), (name, m)


def test_vectors_at_the_bounds_of_the_range_are_accepted() -> None:
    for name, d in _paths().items():
        for emb in ([1e30, -1e30, 0.0], [1e-30, 0.0, 0.0], [-1e-30, 1e-31, 0.0]):
            for m in _all_forms(ev(embedding=emb)):
                assert d.decode([m]).rejections == [], (name, emb)


def test_a_stream_fed_an_extreme_vector_keeps_running() -> None:
    """In the service: the stream's baseline is built from the other events, and no batch raises."""
    from embedwatch.app import Service
    from embedwatch.config import Settings

    svc = Service(Settings(detection={"reference_size": 100, "window_events": 100, "min_window_events": 91,
                           "baseline_sample": 100}))
    rng = np.random.default_rng(0)
    for k in range(4):
        rows = rng.normal(size=(60, 8)).astype(np.float32)
        if k == 0:
            rows[5] = 3e38
            rows[6] = 8e-40
        docs = [ev(embedding=r.tolist(), ts=1.7e9 + 60 * k + i) for i, r in enumerate(rows)]
        svc.process([msg(doc) for doc in docs], now=1.7e9 + 300)
    mon = svc.router.monitors[StreamKey("m", "1")]
    assert mon.baseline is not None and mon.events == 238


# -- query events: labels inline, integer ids, kind told by fields -----------------------------------

QDOC: dict[str, object] = {"model": "m", "model_version": "1", "query_id": "q-1"}


def _decode_queries(docs: list[object], k: int = 3) -> object:
    return Decoder(DecodeLimits(precision_k=k), query_topics=frozenset({"queries"})).decode(
        [msg(d, topic="queries") for d in docs])


def test_relevant_ids_without_results_are_refused_not_scored_as_a_query() -> None:
    """Feedback sent on its own (query_id + relevant_ids, later) is not joined to its query: it
    is dead-lettered, never counted as a query with nothing to score."""
    out = _decode_queries([{**QDOC, "relevant_ids": ["d1"]}, {**QDOC, "relevant_ids": ["d1"], "results": None},
                           {**QDOC, "relevant_ids": ["d1"], "embedding": [1.0, 2.0], "latency_ms": 3.0}])
    assert out.blocks == []  # type: ignore[attr-defined]
    want = "relevant_ids need the query's results in the same event; feedback is not joined by query_id"
    assert [(r.message_index, r.reason, r.detail, r.stream) for r in out.rejections] == [  # type: ignore[attr-defined]
        (i, Reason.SCHEMA, want, StreamKey("m", "1")) for i in range(3)]
    # With its results in the same event, the labels score them; an empty list is a query that
    # found nothing, so nothing relevant was retrieved.
    out = _decode_queries([{**QDOC, "relevant_ids": ["d1"], "results": [{"id": "d1", "score": 0.8}]},
                           {**QDOC, "relevant_ids": ["d1"], "results": []}])
    (b,) = out.blocks  # type: ignore[attr-defined]
    assert out.rejections == []  # type: ignore[attr-defined]
    assert b.n_results.tolist() == [1.0, 0.0]
    assert b.precision_at_k.tolist() == [1 / 3, 0.0] and b.recall_at_k.tolist() == [1.0, 0.0]


def test_a_query_event_with_nothing_to_monitor_is_refused() -> None:
    out = _decode_queries([QDOC, {**QDOC, "results": None, "latency_ms": None}, {**QDOC, "latency_ms": 12.0},
                           {**QDOC, "embedding": [1.0, 2.0]}, {**QDOC, "results": []}])
    assert [(r.message_index, r.reason) for r in out.rejections] == [  # type: ignore[attr-defined]
        (0, Reason.SCHEMA), (1, Reason.SCHEMA)]
    assert "carries nothing to monitor" in out.rejections[0].detail  # type: ignore[attr-defined]
    assert sorted(int(i) for b in out.blocks for i in b.message_index) == [2, 3, 4]  # type: ignore[attr-defined]


def test_integer_ids_match_their_decimal_strings_in_precision_and_recall() -> None:
    """The decoder reads an integer 'id' or 'query_id' as its string: result and relevant ids too."""
    docs = [{**QDOC, "relevant_ids": ["42", 7], "results": [{"id": 42, "score": 0.9}, {"id": "7", "score": 0.8},
                                                           {"id": "x", "score": 0.1}]},
            {**QDOC, "relevant_ids": [42, "42", "9"], "results": [{"id": "42", "score": 0.9}, {"id": 9, "score": 0.5}]},
            {**QDOC, "relevant_ids": [-3], "results": [{"id": "x", "score": 0.9}, {"id": "-3", "score": 0.5}]},
            # Not an integer: a float, a bool and a numeric string with a sign or padding stay apart.
            {**QDOC, "relevant_ids": [1, 2], "results": [{"id": 1.0, "score": 0.9}, {"id": True, "score": 0.5},
                                                         {"id": "+2", "score": 0.4}]}]
    (b,) = _decode_queries(docs, k=2).blocks  # type: ignore[attr-defined]
    # The batch computation: ids as strings, distinct relevant hits in the first k over k and
    # over the distinct relevant ids.
    hits = np.array([2, 2, 1, 0], dtype=np.float64)
    n_relevant = np.array([2, 2, 1, 2], dtype=np.float64)
    np.testing.assert_array_equal(b.precision_at_k, hits / 2)
    np.testing.assert_array_equal(b.recall_at_k, hits / n_relevant)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", 1, "1", 2, "2", 10, True, 1.0, None]), max_size=8),
       st.lists(st.sampled_from(["a", 1, "1", 2, "2", 10, "10"]), max_size=4), st.integers(1, 5))
def test_precision_and_recall_at_k_compare_integer_ids_as_strings(
        result_ids: list[object], relevant: list[object], k: int) -> None:
    q = {"model": "m", "model_version": "1", "relevant_ids": relevant,
         "results": [{"id": x, "score": 1.0} for x in result_ids]}
    (b,) = _decode_queries([q], k).blocks  # type: ignore[attr-defined]

    def norm(x: object) -> object:
        return str(x) if type(x) is int else x

    rel = {norm(x) for x in relevant}
    hits = {norm(x) for x in result_ids[:k] if type(x) in (str, int)} & rel
    assert b.precision_at_k.tolist() == [len(hits) / k]
    if rel:
        assert b.recall_at_k.tolist() == [len(hits) / len(rel)]
    else:
        assert math.isnan(b.recall_at_k[0])


def _query_outcome(out: object) -> tuple[object, ...]:
    """:func:`_outcome` with each block's kind and query columns."""
    blocks = sorted(out.blocks, key=lambda b: int(b.message_index[0]))  # type: ignore[attr-defined]
    cols = [(b.kind, *(None if c is None else c.tobytes()
                       for c in (b.top1, b.n_results, b.precision_at_k, b.recall_at_k))) for b in blocks]
    return (*_outcome(out), cols)


def _is_query(raw: bytes) -> bool:
    """The documented rule of ``kind_by_fields``, written out: a JSON object with a non-null
    query_id, results or relevant_ids."""
    try:
        doc = json.loads(raw)
    except ValueError:
        return False
    return isinstance(doc, dict) and any(doc.get(f) is not None for f in ("query_id", "results", "relevant_ids"))


def _by_fields(d: Decoder) -> Decoder:
    d.kind_by_fields = True
    return d


@settings(max_examples=300, deadline=None)
@given(st.lists(st.fixed_dictionaries(
    {"model": st.sampled_from(["m", "n"]), "model_version": st.just("1")},
    optional={"embedding": st.lists(st.floats(-4, 4) | st.integers(-4, 4), min_size=1, max_size=3),
              "embedding_b64": st.sampled_from([_b64([1.0, 2.0]), _b64([0.5]), "!"]),
              "query_id": st.none() | st.text(max_size=3) | st.integers() | st.booleans(),
              "results": st.none() | st.just([]) | st.just([{"id": 42, "score": 0.5}]) | st.integers(),
              "relevant_ids": st.none() | st.just(["42"]) | st.just([True]) | st.text(max_size=2),
              "latency_ms": st.none() | st.floats(0, 100), "id": st.none() | st.text(max_size=3)},
).map(lambda e: json.dumps(e).encode()), max_size=10))
def test_kind_by_fields_decodes_each_event_as_the_service_does_on_its_topic(raws: list[bytes]) -> None:
    """A file line has no topic: with kind_by_fields, a line is decoded exactly as the service
    decodes it from the queries topic when it carries query fields, else from the embeddings topic."""
    limits = DecodeLimits(precision_k=2)
    service = Decoder(limits, query_topics=frozenset({"queries"}), clock=_clock)
    want = _query_outcome(service.decode(
        [msg(None, raw=r, topic="queries" if _is_query(r) else "embeddings") for r in raws]))
    paths = {"default": Decoder(limits, clock=_clock), "orjson": _orjson_only(), "general": _general_only()}
    for name, d in paths.items():
        d.limits = limits
        d.decode(_PRIME)  # known streams: their b64 events reach the msgspec pass
        assert _query_outcome(_by_fields(d).decode([msg(None, raw=r) for r in raws])) == want, name


def test_kind_by_fields_splits_an_event_array_and_ignores_the_topic() -> None:
    d = Decoder(query_topics=frozenset({"queries"}), kind_by_fields=True)
    d.decode(_PRIME)
    docs = [ev(id="d1"), {**QDOC, "results": [{"id": "d1", "score": 0.5}]},
            {**QDOC, "embedding_b64": _b64([0.5, 1.0, 2.0])}, ev(embedding=None, embedding_b64=_b64([1.0, 2.0, 3.0])),
            ev(results=None, relevant_ids=None, query_id=None)]
    for topic in ("embeddings", "queries"):
        out = d.decode([msg(docs, topic=topic), *(msg(x, topic=topic) for x in docs)])
        assert out.rejections == []
        kinds = sorted((int(i), b.kind.value) for b in out.blocks for i in b.message_index)
        assert kinds.count((0, "query")) == 2 and kinds.count((0, "embedding")) == 3
        assert kinds[5:] == [(1, "embedding"), (2, "query"), (3, "query"), (4, "embedding"), (5, "embedding")]


def test_the_query_side_key_parses_back_and_names_no_stream_of_events() -> None:
    key = StreamKey("m", "v1", "web")
    q = key.query_side()
    assert str(q) == "m/v1/web/query" and StreamKey.parse(str(q)) == q and q.is_query_side
    assert q.document_side() == key == key.document_side() and not key.is_query_side
    for bad in ("m/v1/web/other", "m/v1//query", "m/v1/web/query/query", "m/v1"):
        with pytest.raises(ValueError, match="model/model_version/segment"):
            StreamKey.parse(bad)
    # A label may not hold "/": no event's stream key can be a query-side key.
    ev = {"model": "m", "model_version": "v1", "segment": "web/query", "embedding": [1.0, 2.0]}
    batch = Decoder().decode([Message(orjson.dumps(ev))])
    assert [r.reason for r in batch.rejections] == [Reason.SCHEMA]
