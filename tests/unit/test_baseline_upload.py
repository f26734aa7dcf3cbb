"""A baseline built offline (``embedwatch baseline build``) stored in a running service through
``POST /api/baselines/<stream>/upload`` (CLI ``embedwatch baseline upload``): checked, tried in a
monitor, stored, and with ``activate`` the stream's from its first event or at once."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from embedwatch.api import MAX_UPLOAD_BODY, ApiError, Backend, HttpServer
from embedwatch.app import Service, StreamNotHere
from embedwatch.baseline import Baseline, content_hash, usability_problem
from embedwatch.baseline_store import BaselineIntegrityError, decode_baseline, encode_baseline, safe_name, save_file
from embedwatch.config import DetectionSettings, Settings
from embedwatch.events import Message, StreamKey
from embedwatch.exporter import Exporter, make_registry
from embedwatch.state import DurableBaselineStore, FileStateBackend

KEY = StreamKey("enc", "v2", "web")
DIM = 16
DETECTION = {"reference_size": 200, "window_events": 200, "baseline_sample": 100}
TOKEN = "upload-test-token"


def _settings(tmp_path: Path | None = None, max_streams: int = 10_000) -> Settings:
    state = {"backend": "file", "directory": str(tmp_path)} if tmp_path is not None else {"backend": "none"}
    return Settings(detection=DETECTION, state=state, limits={"max_streams": max_streams})  # type: ignore[arg-type]


def _vectors(seed: int, n: int, shift: float = 0.0, dim: int = DIM) -> np.ndarray:
    # A fixed centre, the same for every seed: the events of one "model"; seeds draw new events.
    centre = np.random.default_rng(1234).standard_normal(dim) * 2.0
    return (centre + np.random.default_rng(seed).standard_normal((n, dim)) + shift).astype(np.float32)


def _baseline(seed: int = 0, key: StreamKey = KEY, dim: int = DIM) -> Baseline:
    return Baseline.from_vectors(key, _vectors(seed, 300, dim=dim), ts=1.7e9, source="file:good.jsonl",
                                 settings=DetectionSettings(**DETECTION))


def _events(x: np.ndarray, first: int = 0, key: StreamKey = KEY) -> list[Message]:
    return [Message(orjson.dumps({"model": key.model, "model_version": key.model_version, "segment": key.segment,
                                  "ts": 1.7e9 + first + i, "embedding": v.tolist()}), "embeddings", 0, first + i)
            for i, v in enumerate(x)]


def test_an_uploaded_baseline_is_a_new_stream_s_from_its_first_event() -> None:
    """Before its model version takes traffic: the stream compares its first events with the
    uploaded baseline instead of taking them as its reference (a drift from the start was its
    normal). Without the upload the same shifted events raise nothing."""
    for upload in (True, False):
        svc = Service(_settings())
        if upload:
            b = _baseline()
            out = svc.upload_baseline(KEY, encode_baseline(b), activate=True)
            assert out["status"] == "active" and out["baseline_id"] == b.baseline_id
            assert out["monitored_here"] is False and out["active"] is True
            # Its scan was fitted by the trial run: the stream's first batch does not fit it again,
            # and the store holds it without the sample only that fit reads.
            held = svc.baselines.get(KEY)
            assert held.mean_shift_fits() and held.released_sample_rows == b.sample_rows
        svc.process(_events(_vectors(7, 200, shift=0.8)), now=1.7e9 + 200)
        mon = svc.router.monitors[KEY]
        if upload:
            assert mon.baseline is not None and mon.baseline.baseline_id == b.baseline_id
            assert mon.drifting and [a.kind for a in svc.alarms] == ["start"]
        else:
            # Its first 200 events, shifted as they are, became its baseline: nothing to compare.
            assert mon.baseline is not None and mon.baseline.source == "first_events"
            assert not mon.drifting and svc.alarms == []


def test_an_upload_to_a_monitored_stream_is_stored_and_activated_only_when_asked() -> None:
    svc = Service(_settings())
    svc.process(_events(_vectors(1, 300)), now=1.7e9 + 300)
    mon = svc.router.monitors[KEY]
    assert mon.baseline is not None
    own = mon.baseline.baseline_id
    other = _baseline(seed=2)
    stored = svc.upload_baseline(KEY, encode_baseline(other), activate=False)
    assert stored["status"] == "stored" and stored["active"] is False and stored["monitored_here"] is True
    assert svc.baselines.get(KEY, other.baseline_id).released_sample_rows == other.sample_rows
    assert mon.baseline.baseline_id == own
    assert [(v["baseline_id"], v["active"]) for v in svc.list_baselines(str(KEY))] == [
        (own, True), (other.baseline_id, False)]

    changes = mon.changes
    active = svc.upload_baseline(KEY, encode_baseline(other), activate=True)  # the same version again
    assert active["status"] == "active" and mon.baseline.baseline_id == other.baseline_id
    assert mon.changes > changes  # a checkpoint is due
    assert len(svc.list_baselines(str(KEY))) == 2
    svc.process(_events(_vectors(3, 100), first=300), now=1.7e9 + 400)
    # Saved already: the stream's next batch only drops its sample from memory.
    assert len(svc.list_baselines(str(KEY))) == 2
    assert svc.router.monitors[KEY].baseline is not None
    assert svc.router.monitors[KEY].baseline.released_sample_rows == other.sample_rows


def test_an_upload_ends_the_alarm_of_the_baseline_it_replaces() -> None:
    svc = Service(_settings())
    svc.process(_events(_vectors(1, 300)), now=1.7e9 + 300)
    svc.process(_events(_vectors(2, 200, shift=0.8), first=300), now=1.7e9 + 500)
    assert svc.router.monitors[KEY].drifting
    moved = Baseline.from_vectors(KEY, _vectors(4, 300, shift=0.8), ts=1.7e9, source="file:new-normal.jsonl",
                                  settings=DetectionSettings(**DETECTION))
    svc.upload_baseline(KEY, encode_baseline(moved), activate=True)
    assert not svc.router.monitors[KEY].drifting
    assert [a.kind for a in svc.alarms] == ["start", "end"]


def test_the_query_embeddings_take_an_upload_under_their_own_key() -> None:
    svc = Service(_settings())
    qb = _baseline(key=KEY.query_side())
    out = svc.upload_baseline(KEY.query_side(), encode_baseline(qb), activate=True)
    assert out["stream"] == str(KEY.query_side()) and out["status"] == "active"
    assert svc.list_baselines(str(KEY)) == []
    queries = [Message(orjson.dumps({"model": KEY.model, "model_version": KEY.model_version, "segment": KEY.segment,
                                     "ts": 1.7e9 + i, "embedding": v.tolist(), "results": [{"id": "d", "score": 0.9}]}),
                       "queries", 0, i) for i, v in enumerate(_vectors(5, 50))]
    svc.process(queries, now=1.7e9 + 50)
    q = svc.router.monitors[KEY].query_monitor
    assert q is not None and q.baseline is not None and q.baseline.baseline_id == qb.baseline_id
    with pytest.raises(ApiError) as e:  # a stream's own baseline is not its query embeddings'
        svc.upload_baseline(KEY.query_side(), encode_baseline(_baseline()), activate=False)
    assert e.value.status == 400 and "not enc/v2/web/query" in e.value.message


def _forged_baseline(b: Baseline, **arrays: np.ndarray) -> Baseline:
    """``b`` with some arrays replaced and every hash made again: what other code could write."""
    frozen = {**b.arrays, **arrays}
    return Baseline(key=b.key, created_at=b.created_at, count=b.count, source=b.source, arrays=frozen,
                    content_hash=content_hash(frozen))


def _forged(b: Baseline, **arrays: np.ndarray) -> bytes:
    return encode_baseline(_forged_baseline(b, **arrays))


@pytest.mark.parametrize("change, why", [
    (lambda a: {"mean": np.where(np.arange(DIM) == 3, np.nan, a["mean"])}, "mean holds NaN"),
    (lambda a: {"var": a["var"][:-1]}, "var has shape (15,), expected (16,)"),
    (lambda a: {"sim_hist": a["sim_hist"][:-1]}, "sim_hist has shape"),
    (lambda a: {"rff_offsets": a["rff_offsets"][:-2]}, "rff_offsets has shape"),
    (lambda a: {"sample": a["sample"][:, :-1]}, "sample has shape"),
    (lambda a: {"rff_bandwidth": -a["rff_bandwidth"]}, "rff_bandwidth is not positive"),
])
def test_a_baseline_whose_arrays_do_not_fit_together_is_refused_wherever_it_is_read(
        change: Any, why: str, tmp_path: Path) -> None:
    """Hashes prove a baseline is the one written, not that a monitor can use it: one that does
    not fit would fail the stream's updates (its events dead-lettered) each time it is loaded. So
    every read of a baseline from bytes refuses it: an upload (a 400: a ValueError), a file given
    to replay, a stored record at a restore."""
    from embedwatch.replay import ReplayError, load_baselines

    forged = _forged_baseline(_baseline(), **change(_baseline().arrays))
    svc = Service(_settings())
    with pytest.raises(BaselineIntegrityError, match="unusable baseline: " + re.escape(why)):
        svc.upload_baseline(KEY, encode_baseline(forged), activate=True)
    assert svc.list_baselines(None) == []
    npz, _js = save_file(forged, tmp_path / "forged")
    with pytest.raises(ReplayError, match=re.escape(why)):
        load_baselines([npz])
    backend = FileStateBackend(tmp_path / "state")
    backend.write({f"baseline/{safe_name(KEY)}/{forged.baseline_id}": encode_baseline(forged)})
    assert DurableBaselineStore(backend, backend.read_all()).held()[0] == 0  # skipped, with an error


def test_a_built_baseline_is_usable_with_or_without_its_sample_and_one_of_a_single_vector_is_not() -> None:
    b = _baseline()
    assert usability_problem(b) is None
    assert usability_problem(b.without_sample(DetectionSettings(**DETECTION))) is None
    one = _forged(b, sample=b.arrays["sample"][:1], sample_sims=b.arrays["sample_sims"][:1],
                  sample_norms=b.arrays["sample_norms"][:1])
    with pytest.raises(BaselineIntegrityError, match=re.escape("its reference sample has 1 vectors (at least 2)")):
        decode_baseline(one)


def test_a_baseline_a_monitor_cannot_run_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the shape checks do not foresee fails the trial run, not the live stream."""
    from embedwatch import monitor

    def broken(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise FloatingPointError("eigen-decomposition did not converge")

    svc = Service(_settings())
    monkeypatch.setattr(monitor.StreamMonitor, "update_embeddings", broken)
    with pytest.raises(ApiError) as e:
        svc.upload_baseline(KEY, encode_baseline(_baseline()), activate=True)
    assert e.value.status == 400 and "did not converge" in e.value.message
    assert svc.list_baselines(None) == []


def test_refusals_name_what_is_wrong() -> None:
    svc = Service(_settings())
    with pytest.raises(ApiError) as e:
        svc.upload_baseline(StreamKey("enc", "v1", "web"), encode_baseline(_baseline()), activate=False)
    assert e.value.status == 400 and "/api/baselines/enc/v2/web/upload" in e.value.message
    with pytest.raises(BaselineIntegrityError):
        svc.upload_baseline(KEY, b"not a baseline", activate=False)
    svc.process(_events(_vectors(1, 300)), now=1.7e9 + 300)
    with pytest.raises(ApiError) as e:  # the stream's events are 16-d
        svc.upload_baseline(KEY, encode_baseline(_baseline(dim=24)), activate=True)
    assert e.value.status == 400 and "24-d" in e.value.message and "16-d vectors" in e.value.message
    assert len(svc.list_baselines(str(KEY))) == 1
    svc._forget_stream(KEY)  # let go as idle: its stored baseline stays
    with pytest.raises(StreamNotHere) as nh:
        svc.upload_baseline(KEY, encode_baseline(_baseline(seed=2)), activate=True)
    assert "has stored baselines" in str(nh.value)


def test_an_archive_that_would_unpack_too_large_is_refused_unread(monkeypatch: pytest.MonkeyPatch) -> None:
    from embedwatch import app

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("mean.npy", b"\0" * (8 << 20))  # 8 MiB of zeros: a few KiB compressed
    data = buf.getvalue()
    assert len(data) < 64 << 10
    with pytest.raises(BaselineIntegrityError, match="unpack to 8388608 bytes"):
        decode_baseline(data, max_unpacked=4 << 20)
    with pytest.raises(BaselineIntegrityError, match="no embedded header"):  # read when allowed
        decode_baseline(data, max_unpacked=16 << 20)
    monkeypatch.setattr(app, "MAX_UPLOAD_UNPACKED", 4 << 20)
    with pytest.raises(BaselineIntegrityError, match="unpack to 8388608 bytes"):
        Service(_settings()).upload_baseline(KEY, data, activate=False)


def test_an_uploaded_baseline_survives_a_restart_on_durable_state(tmp_path: Path) -> None:
    backend = FileStateBackend(tmp_path)
    first = Service(_settings(tmp_path), baselines=DurableBaselineStore(backend), state_backend=backend)
    b = _baseline()
    first.upload_baseline(KEY, encode_baseline(b), activate=True)
    again_backend = FileStateBackend(tmp_path)
    again = Service(_settings(tmp_path), baselines=DurableBaselineStore(again_backend, again_backend.read_all()),
                    state_backend=again_backend)
    assert [(v["baseline_id"], v["active"]) for v in again.list_baselines(str(KEY))] == [(b.baseline_id, True)]
    again.process(_events(_vectors(7, 200, shift=0.8)), now=1.7e9 + 200)
    mon = again.router.monitors[KEY]
    assert mon.baseline is not None and mon.baseline.baseline_id == b.baseline_id and mon.drifting


# ---------------------------------------------------------------------------------------- HTTP


@pytest.fixture
def server() -> Iterator[tuple[HttpServer, list[Any]]]:
    calls: list[Any] = []
    backend = Backend(
        registry=make_registry(Exporter(), process_metrics=False), healthy=lambda: True, ready=lambda: True,
        streams=dict, baselines=lambda s: [], promote=lambda k, b, n: {}, rollback=lambda k: {}, admin_token=TOKEN,
        upload=lambda k, data, activate: calls.append((k, data, activate)) or {"status": "stored"})
    srv = HttpServer(backend, "127.0.0.1", 0)
    srv.start()
    yield srv, calls
    srv.stop()


def _post(srv: HttpServer, path: str, body: bytes, token: str | None = TOKEN,
          length: int | None = None) -> tuple[int, Any]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
    try:
        conn.putrequest("POST", path)
        if token is not None:
            conn.putheader("Authorization", f"Bearer {token}")
        conn.putheader("Content-Length", str(len(body) if length is None else length))
        conn.endheaders()
        conn.send(body)
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def test_the_upload_route(server: tuple[HttpServer, list[Any]]) -> None:
    srv, calls = server
    path = "/api/baselines/enc/v2/web/upload"
    assert _post(srv, path, b"bytes", token=None)[0] == 401
    assert _post(srv, path, b"bytes", token="wrong")[0] == 403
    assert _post(srv, path, b"")[0] == 400
    big = 200 << 10  # beyond a JSON body's 64 KiB: an upload's bytes are not JSON
    assert _post(srv, path, b"\x93" * big) == (200, {"status": "stored"})
    assert _post(srv, path + "?activate=true", b"a")[0] == 200
    assert _post(srv, "/api/baselines/enc/v2/web/query/upload?activate=1", b"q")[0] == 200
    assert _post(srv, path + "?activate=false", b"b")[0] == 200
    status, doc = _post(srv, path + "?activate=yes", b"c")
    assert status == 400 and "activate must be true or false" in doc["error"]
    assert [(str(k), len(d), a) for k, d, a in calls] == [
        ("enc/v2/web", big, False), ("enc/v2/web", 1, True), ("enc/v2/web/query", 1, True), ("enc/v2/web", 1, False)]
    # Refused on its declared length, before a byte of it is read.
    status, doc = _post(srv, path, b"", length=MAX_UPLOAD_BODY + 1)
    assert status == 413 and str(MAX_UPLOAD_BODY) in doc["error"]
    assert _post(srv, "/api/baselines/enc/v2/web/promote", b"{}" + b" " * (64 << 10))[0] == 413


# ----------------------------------------------------------------------------------------- CLI


def _cli(*args: str, token: str = TOKEN) -> subprocess.CompletedProcess[str]:
    import os

    env = {**os.environ, "EMBEDWATCH_HTTP__ADMIN_TOKEN": token}
    return subprocess.run([sys.executable, "-m", "embedwatch.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_the_cli_sends_a_built_file_and_refuses_one_changed_since(tmp_path: Path) -> None:
    svc = Service(_settings())
    backend = Backend(registry=make_registry(Exporter(), process_metrics=False), healthy=lambda: True,
                      ready=lambda: True, streams=svc.streams_state, baselines=svc.list_baselines,
                      promote=svc.promote_baseline, rollback=svc.rollback_baseline, admin_token=TOKEN,
                      upload=svc.upload_baseline)
    srv = HttpServer(backend, "127.0.0.1", 0)
    srv.start()
    try:
        url = f"http://127.0.0.1:{srv.port}"
        b = _baseline()
        npz, js = save_file(b, tmp_path / "good")
        done = _cli("baseline", "upload", str(npz), "--activate", "--url", url)
        assert done.returncode == 0, done.stderr
        out = json.loads(done.stdout)
        assert out["status"] == "active" and out["baseline_id"] == b.baseline_id and out["stream"] == str(KEY)
        assert [v["baseline_id"] for v in svc.list_baselines(str(KEY))] == [b.baseline_id]

        refused = _cli("baseline", "upload", str(tmp_path / "good"), "--url", url, token="wrong")
        assert refused.returncode == 1 and "HTTP 403" in refused.stderr
        doc = json.loads(js.read_text())
        doc["metadata"]["count"] += 1
        js.write_text(json.dumps(doc))
        changed = _cli("baseline", "upload", str(js), "--url", url)
        assert changed.returncode == 2 and "cannot read baseline" in changed.stderr, changed.stderr
        missing = _cli("baseline", "upload", str(tmp_path / "nothing"), "--url", url)
        assert missing.returncode == 2 and "cannot read baseline" in missing.stderr
        assert len(svc.list_baselines(None)) == 1
    finally:
        srv.stop()


# ------------------------------------------------------------------------- several replicas


def _replica(tmp_path: Path, max_streams: int = 10_000) -> Service:
    """A replica on the state directory ``tmp_path`` shared with the others, having read it."""
    backend = FileStateBackend(tmp_path)
    return Service(_settings(tmp_path, max_streams), baselines=DurableBaselineStore(backend, backend.read_all()),
                   state_backend=backend)


def test_a_baseline_uploaded_through_another_replica_is_a_new_stream_s_from_its_first_event(tmp_path: Path) -> None:
    """The replica that gets a new stream's events reads the state before it monitors the stream:
    it read it only at an assignment or a restart, so an upload through another replica after
    that was missed, and the stream built its baseline from its first (shifted) events."""
    answering, owner = _replica(tmp_path), _replica(tmp_path)
    b = _baseline()
    assert answering.upload_baseline(KEY, encode_baseline(b), activate=True)["status"] == "active"
    owner.process(_events(_vectors(7, 200, shift=0.8)), now=1.7e9 + 200)
    mon = owner.router.monitors[KEY]
    assert mon.baseline is not None and mon.baseline.baseline_id == b.baseline_id and mon.drifting
    # Its own saves list the upload: the index it writes keeps the version.
    assert [v["baseline_id"] for v in owner.list_baselines(str(KEY))] == [b.baseline_id]


def test_new_streams_read_the_state_once_and_not_for_every_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                  ) -> None:
    owner = _replica(tmp_path, max_streams=2)
    reads: list[int] = []
    read_new = owner.state_backend.read_new
    monkeypatch.setattr(owner.state_backend, "read_new", lambda take=None: reads.append(1) or read_new(take))
    clock = [100.0]
    monkeypatch.setattr("embedwatch.app.time.monotonic", lambda: clock[0])
    owner.process(_events(_vectors(1, 50)), now=1.7e9 + 50)
    assert len(reads) == 1
    owner.process(_events(_vectors(2, 50), first=50), now=1.7e9 + 100)  # a stream it monitors now
    other = StreamKey("enc", "v3", "web")
    clock[0] += 0.5
    owner.process(_events(_vectors(3, 50), key=other), now=1.7e9 + 150)  # within the second: no read
    assert len(reads) == 1
    owner._forget_stream(KEY)  # let go as idle: new again when it comes back
    clock[0] += 1.0
    owner.process(_events(_vectors(4, 50), first=100), now=1.7e9 + 200)
    assert len(reads) == 2
    # Beyond limits.max_streams: refused a monitor at every batch, but the state is read once for it.
    capped = StreamKey("enc", "v4", "web")
    for i in range(3):
        clock[0] += 1.0
        owner.process(_events(_vectors(5 + i, 50), key=capped), now=1.7e9 + 300 + i)
    assert capped not in owner.router.monitors and len(reads) == 3


def test_a_replica_does_not_hold_its_own_checkpoints_read_back_and_reads_them_again_at_its_next_assignment(
        tmp_path: Path) -> None:
    """The read for new streams also brings back this replica's own checkpoints: not kept (its
    state is in memory; kept, a 768-d stream's state was held twice), so the next assignment
    reads the state whole, and a partition that comes back later, its checkpoint unchanged,
    is restored from it."""
    from test_state import _NoSink, _Source

    from embedwatch.sources.base import PartitionId

    owner = _replica(tmp_path)
    p0, p1 = PartitionId("embeddings", 0), PartitionId("embeddings", 1)
    source = _Source(owner, [])
    source.first = False
    owner.on_assigned([p0, p1])
    owner._load_assignment(source)
    owner._handle_batch(_events(_vectors(1, 300)), source, _NoSink())
    assert owner._checkpoint([p0, p1], commit=source)
    other = StreamKey("enc", "v3", "web")
    later = [Message(m.value, "embeddings", 1, m.offset) for m in _events(_vectors(2, 50), key=other)]
    owner._last_lookup -= 1.0  # a second later
    owner._handle_batch(later, source, _NoSink())  # a new stream: the state is read, own checkpoints too
    assert (p0.topic, p0.partition) not in owner._state_records and owner._reread_state
    owner.on_revoked([p0])  # unchanged since its checkpoint: not written again
    owner.on_assigned([])
    owner._load_assignment(source)  # a rebalance without it: its streams go
    assert KEY not in owner.router.monitors
    owner.on_assigned([p0])
    owner._load_assignment(source)
    assert owner.router.monitors[KEY].events == 300
