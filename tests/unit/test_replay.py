"""`embedwatch replay` over a generated file: report layout, alarms, rejections, CLI."""

from __future__ import annotations

import io
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from threadpoolctl import threadpool_limits

from embedwatch.baseline_store import load_file
from embedwatch.config import Settings
from embedwatch.events import StreamKey
from embedwatch.replay import build_baseline, run_replay

DIM = 32
CHANGE = 1500
N = 3000
DRIFTED = "enc/1/web"
CONTROL = "enc/1/default"

STREAM_KEYS = {"events", "query_events", "rejected", "reference_size", "alarms", "summary"}
OPTIONAL_STREAM_KEYS = {"changepoints"}
ALARM_KEYS = {"index", "ts", "detector", "score", "p_value"}


def _line(model: str, version: str, segment: str | None, vec: Any, ts: float, ident: str | None = None) -> bytes:
    ev: dict[str, Any] = {"model": model, "model_version": version, "ts": ts, "embedding": vec}
    if segment is not None:
        ev["segment"] = segment
    if ident is not None:
        ev["id"] = ident
    return orjson.dumps(ev, option=orjson.OPT_SERIALIZE_NUMPY)


def write_events(path: Path, seed: int = 0) -> dict[str, int]:
    """Two interleaved streams of N events (one shifted from CHANGE on), bad lines, a dual-write
    pair of versions. Returns the expected rejection counts per reason."""
    rng = np.random.default_rng(seed)
    center = rng.normal(size=DIM)
    center *= 3.0 / np.linalg.norm(center)
    shift = rng.normal(size=DIM)
    shift *= 1.5 / np.linalg.norm(shift)
    drifted = rng.normal(size=(N, DIM)) + center
    drifted[CHANGE:] += shift
    control = rng.normal(size=(N, DIM)) + center
    lines: list[bytes] = []
    t0 = 1_763_762_400.0
    for i in range(N):
        lines.append(_line("enc", "1", "web", np.round(drifted[i], 6), t0 + i))
        lines.append(_line("enc", "1", None, np.round(control[i], 6), t0 + i))
        if i == 100:
            lines.append(b'{"model": "enc", "model_version": "1", "embedding": [1, 2')  # invalid_json
            lines.append(b"not json at all")  # invalid_json
        if i == 200:  # NaN token: parsed by the fallback, rejected as non_finite
            nan_vec = ", ".join(["NaN"] + ["0.5"] * (DIM - 1))
            lines.append(f'{{"model": "enc", "model_version": "1", "segment": "web", "embedding": [{nan_vec}]}}'
                         .encode())
        if i == 300:
            lines.append(_line("enc", "1", "web", np.zeros(DIM), t0 + i))  # zero_vector
        if i in (400, 2400):
            lines.append(_line("enc", "1", "web", rng.normal(size=DIM + 8), t0 + i))  # dimension_mismatch
        if i == 500:
            lines.append(b'{"model_version": "1", "embedding": [1.0, 2.0]}')  # schema
            lines.append(b"   ")  # blank: skipped, not counted
    # dual write: version 2 of model "dual" is a rotation of version 1, same ids
    q, _ = np.linalg.qr(rng.normal(size=(DIM, DIM)))
    base = rng.normal(size=(120, DIM))
    for i in range(120):
        lines.append(_line("dual", "v1", None, base[i], t0 + i, ident=f"doc-{i}"))
        lines.append(_line("dual", "v2", None, base[i] @ q, t0 + i, ident=f"doc-{i}"))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return {"invalid_json": 2, "non_finite": 1, "zero_vector": 1, "dimension_mismatch": 2, "schema": 1}


@pytest.fixture(scope="module")
def events_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    path = tmp_path_factory.mktemp("replay") / "events.jsonl"
    expected = write_events(path)
    return path, expected


@pytest.fixture(scope="module")
def report(events_file: tuple[Path, dict[str, int]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path, _ = events_file
    out = tmp_path_factory.mktemp("report") / "report.json"
    buf = io.StringIO()
    # Under the BLAS threads the CLI applies (blas_threads): test_cli_replay compares its report
    # with this one to the bit, and a product's rounding depends on how many threads summed it.
    with threadpool_limits(Settings().blas_threads):
        rep: dict[str, Any] = run_replay(path, out, Settings(), progress=False, out=buf)
    assert orjson.loads(out.read_bytes()) == rep
    assert DRIFTED in buf.getvalue() and "rejected:" in buf.getvalue()
    return rep


def test_report_layout(report: dict[str, Any]) -> None:
    assert set(report) == {"streams", "rejected", "version_comparisons"}
    assert set(report["streams"]) == {DRIFTED, CONTROL, "dual/v1/default", "dual/v2/default"}
    for name, s in report["streams"].items():
        StreamKey.parse(name)
        assert STREAM_KEYS <= set(s) <= STREAM_KEYS | OPTIONAL_STREAM_KEYS, name
        assert isinstance(s["events"], int) and isinstance(s["rejected"], int)
        assert s["reference_size"] == 1000
        assert isinstance(s["summary"], dict)
        for a in s["alarms"]:
            assert set(a) == ALARM_KEYS
            assert isinstance(a["index"], int) and isinstance(a["detector"], str)
            assert isinstance(a["score"], float) and isinstance(a["ts"], float)
            assert a["p_value"] is None or 0.0 <= a["p_value"] <= 1.0
    assert all(isinstance(v, int) for v in report["rejected"].values())


def test_counts(report: dict[str, Any], events_file: tuple[Path, dict[str, int]]) -> None:
    _, expected = events_file
    assert report["rejected"] == expected
    s = report["streams"]
    assert s[DRIFTED]["events"] == N and s[CONTROL]["events"] == N
    # non_finite + zero_vector + 2 x dimension_mismatch belong to the drifted stream
    assert s[DRIFTED]["rejected"] == 4
    assert s[CONTROL]["rejected"] == 0
    assert s["dual/v1/default"]["events"] == 120


def test_alarms(report: dict[str, Any]) -> None:
    s = report["streams"]
    for name, stream in s.items():
        assert all(a["index"] >= stream["reference_size"] for a in stream["alarms"]), name
    drifted = s[DRIFTED]["alarms"]
    assert drifted, "the mean shift was not detected"
    assert all(a["index"] >= CHANGE for a in drifted)
    assert drifted[0]["index"] < CHANGE + 1000
    # ts of the alarm is the ts of the event at that index (t0 + index)
    assert drifted[0]["ts"] == pytest.approx(1_763_762_400.0 + drifted[0]["index"])
    assert s[CONTROL]["alarms"] == []
    assert s[DRIFTED]["summary"]["drift_detected"] == 1.0
    assert s[CONTROL]["summary"]["drift_detected"] == 0.0


def test_version_comparison(report: dict[str, Any]) -> None:
    [c] = report["version_comparisons"]
    assert (c["model"], c["model_version"], c["reference_version"]) == ("dual", "v2", "v1")
    assert c["shared_ids"] == 120 and c["dimension_changed"] is False
    assert c["knn_overlap"] == pytest.approx(1.0)
    assert c["paired_cosine"] < 0.9


def test_versions_one_after_the_other_pair_in_full(tmp_path: Path) -> None:
    """``cat old.jsonl new.jsonl``: the old version spans many read chunks before the new one
    appears, and still every shared id is compared (the service's single-version ring would keep
    only the last detection.version_solo_probe_size of them)."""
    rng = np.random.default_rng(5)
    n = 3000  # over CHUNK_LINES: the first chunk holds the old version alone
    x = rng.normal(size=(n, 16))
    lines = [_line("m", "old", None, x[i], 1.7e9 + i, ident=f"doc-{i}") for i in range(n)]
    lines += [_line("m", "new", None, x[i] * 2.0, 1.7e9 + n + i, ident=f"doc-{i}") for i in range(n)]
    path = tmp_path / "both.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    settings = Settings(detection={"version_probe_size": 1200, "version_solo_probe_size": 10})  # type: ignore[arg-type]
    [c] = run_replay(path, None, settings, progress=False, out=io.StringIO())["version_comparisons"]
    assert c["shared_ids"] == 1200  # the probe size, not the solo ring's 10
    assert c["paired_cosine"] == pytest.approx(1.0) and c["knn_overlap"] == pytest.approx(1.0)


def test_reference_size_override(events_file: tuple[Path, dict[str, int]]) -> None:
    path, _ = events_file
    rep = run_replay(path, None, Settings(), reference_size=1400, progress=False, out=io.StringIO())
    for stream in rep["streams"].values():
        assert stream["reference_size"] == 1400
        assert all(a["index"] >= 1400 for a in stream["alarms"])


def test_build_baseline(events_file: tuple[Path, dict[str, int]], tmp_path: Path) -> None:
    path, _ = events_file
    metas = build_baseline(path, tmp_path / "base.npz", Settings(), stream=DRIFTED)
    [md] = metas
    assert md["count"] == 1000 and md["dim"] == DIM
    assert (md["model"], md["model_version"], md["segment"]) == ("enc", "1", "web")
    b = load_file(md["path"])
    assert b.metadata["baseline_id"] == md["baseline_id"]
    many = build_baseline(path, tmp_path / "all.npz", Settings())
    assert len(many) == 4
    names = sorted(Path(m["path"]).name for m in many)
    assert names == sorted([
        "all.dual+v1+default.npz", "all.dual+v2+default.npz", "all.enc+1+default.npz", "all.enc+1+web.npz",
    ])
    small = {m["model_version"]: m["count"] for m in many if m["model"] == "dual"}
    assert small == {"v1": 120, "v2": 120}  # fewer than reference_size: all events


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "embedwatch"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "embedwatch.cli"]


def test_cli_replay(events_file: tuple[Path, dict[str, int]], tmp_path: Path, report: dict[str, Any]) -> None:
    path, _ = events_file
    out = tmp_path / "cli-report.json"
    proc = subprocess.run([*_cli(), "replay", str(path), "--report", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert DRIFTED in proc.stdout
    assert orjson.loads(out.read_bytes()) == report


# -- bad input, per-stream accounting, change points, given baselines -------------------------------


def _gaussian_lines(key: tuple[str, str, str | None], x: np.ndarray, t0: float = 1.7e9) -> list[bytes]:
    return [_line(*key, np.round(v, 6), t0 + i) for i, v in enumerate(x)]


def _write(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_unreadable_events_and_unwritable_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  events_file: tuple[Path, dict[str, int]]) -> None:
    from embedwatch import replay

    with pytest.raises(replay.ReplayError, match=r"cannot read .*missing\.jsonl: No such file"):
        run_replay(tmp_path / "missing.jsonl", None, Settings(), progress=False, out=io.StringIO())
    with pytest.raises(replay.ReplayError, match="Is a directory"):
        run_replay(tmp_path, None, Settings(), progress=False, out=io.StringIO())
    with pytest.raises(replay.ReplayError, match="cannot read"):
        build_baseline(tmp_path / "missing.jsonl", tmp_path / "b", Settings())

    # An unwritable report is found before the replay, not after it.
    def no_replay(*_a: Any, **_k: Any) -> int:
        raise AssertionError("replayed before checking the report path")

    monkeypatch.setattr(replay, "_drive", no_replay)
    path, _ = events_file
    (tmp_path / "adir").mkdir()
    with pytest.raises(replay.ReplayError, match=r"cannot write .*adir: Is a directory"):
        run_replay(path, tmp_path / "adir", Settings(), progress=False, out=io.StringIO())
    assert not (tmp_path / "new" / "r.json").exists()
    with pytest.raises(AssertionError, match="replayed"):  # a writable one passes, and is not created
        run_replay(path, tmp_path / "new" / "r.json", Settings(), progress=False, out=io.StringIO())
    assert not (tmp_path / "new" / "r.json").exists()


@pytest.mark.parametrize("size", [0, 1, 10, -5])
def test_reference_size_is_validated_as_the_config_is(size: int, events_file: tuple[Path, dict[str, int]],
                                                       tmp_path: Path) -> None:
    from embedwatch.config import ConfigError

    path, _ = events_file
    with pytest.raises(ConfigError,
                       match=r"--reference-size .*detection\.reference_size: .*greater than or equal to 50"):
        run_replay(path, None, Settings(), reference_size=size, progress=False, out=io.StringIO())
    with pytest.raises(ConfigError, match=r"detection\.reference_size"):
        build_baseline(path, tmp_path / "b.npz", Settings(), stream=DRIFTED, reference_size=size)
    assert not list(tmp_path.iterdir())


def test_build_baseline_skips_short_streams_and_writes_nothing_on_error(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    lines = _gaussian_lines(("a", "1", None), rng.normal(size=(120, 8)))
    lines += _gaussian_lines(("b", "1", None), rng.normal(size=(49, 8)))  # one short of the minimum
    lines += _gaussian_lines(("c", "1", None), rng.normal(size=(1, 8)))  # Baseline needs 2: crashed
    path = _write(tmp_path / "ev.jsonl", lines)
    warnings: list[str] = []
    metas = build_baseline(path, tmp_path / "out" / "base.npz", Settings(), warn=warnings.append)
    assert [(m["model"], m["count"]) for m in metas] == [("a", 120)]
    # named as one of several streams: the file's streams decide, not which were skipped
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["base.a+1+default.json", "base.a+1+default.npz"]
    assert len(warnings) == 2
    assert "b/1/default" in warnings[0] and "49" in warnings[0] and "50" in warnings[0]
    assert "c/1/default" in warnings[1] and "1 accepted" in warnings[1]

    from embedwatch.replay import ReplayError

    short = _write(tmp_path / "short.jsonl", lines[120:])
    with pytest.raises(ReplayError, match=r"too few .*b/1/default \(49\).*c/1/default \(1\)"):
        build_baseline(short, tmp_path / "none" / "x.npz", Settings(), warn=warnings.append)
    with pytest.raises(ReplayError, match="too few"):
        build_baseline(path, tmp_path / "none" / "x.npz", Settings(), stream="b/1/default")
    with pytest.raises(ReplayError, match="--stream: stream key must be"):
        build_baseline(path, tmp_path / "none" / "x.npz", Settings(), stream="bogus")
    with pytest.raises(ReplayError, match="no accepted events of stream a/1/zzz"):
        build_baseline(path, tmp_path / "none" / "x.npz", Settings(), stream="a/1/zzz")
    empty = _write(tmp_path / "empty.jsonl", [b"not json", b"\xff\xfe garbage"])
    with pytest.raises(ReplayError, match="no accepted events in"):
        build_baseline(empty, tmp_path / "none" / "x.npz", Settings())
    assert not (tmp_path / "none").exists() or not list((tmp_path / "none").iterdir())


def test_rejections_per_stream_do_not_depend_on_chunks(tmp_path: Path) -> None:
    from embedwatch.replay import CHUNK_LINES

    rng = np.random.default_rng(4)
    nan = b'{"model": "m", "model_version": "1", "embedding": [NaN, 1.0, 2.0, 3.0]}'
    filler = _gaussian_lines(("f", "1", None), rng.normal(size=(CHUNK_LINES + 10, 4)))
    own = _gaussian_lines(("m", "1", None), rng.normal(size=(100, 4)))
    reports = []
    # m's events open the second chunk; its NaN line is in the chunk before them, or in theirs
    for at in (5, CHUNK_LINES + 5):
        lines = filler + own
        lines.insert(at, nan)
        reports.append(run_replay(_write(tmp_path / f"{at}.jsonl", lines), None, Settings(), progress=False,
                                  out=io.StringIO()))
    for rep in reports:
        assert rep["streams"]["m/1/default"]["rejected"] == 1
        assert rep["streams"]["m/1/default"]["events"] == 100
        assert rep["rejected"] == {"non_finite": 1}


def test_stream_with_only_rejected_events_is_listed(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    nan = b'{"model": "bad", "model_version": "1", "embedding": [NaN, 1.0, 2.0, 3.0]}'
    lines = _gaussian_lines(("ok", "1", None), rng.normal(size=(20, 4))) + [nan] * 5
    buf = io.StringIO()
    rep = run_replay(_write(tmp_path / "ev.jsonl", lines), None, Settings(), progress=False, out=buf)
    bad = rep["streams"]["bad/1/default"]
    assert bad["events"] == 0 and bad["rejected"] == 5 and bad["alarms"] == []
    assert STREAM_KEYS <= set(bad) <= STREAM_KEYS | OPTIONAL_STREAM_KEYS
    assert set(bad["summary"]) == set(rep["streams"]["ok/1/default"]["summary"])
    assert bad["summary"]["drift_score"] is None
    assert "bad/1/default" in buf.getvalue()


def _flapping_file(tmp_path: Path) -> tuple[Path, Settings]:
    """One chunk (under CHUNK_LINES lines) of a stream whose similarity flips every 3 events: with
    the settings returned, hundreds of change points, far over the monitor's 100 recent ones."""
    rng = np.random.default_rng(1)
    c = rng.normal(size=16)
    c *= 3 / np.linalg.norm(c)
    x = rng.normal(size=(1900, 16)) + c
    for i in range(50, len(x)):
        if (i // 3) % 2:
            x[i] = -x[i]
    path = _write(tmp_path / "flap.jsonl", _gaussian_lines(("cp", "1", None), x))
    settings = Settings(detection={"reference_size": 50, "changepoint_min_instances": 1,  # type: ignore[arg-type]
                                   "changepoint_threshold": 1.0, "changepoint_delta": 0.0})
    return path, settings


def test_every_changepoint_is_listed(tmp_path: Path) -> None:
    path, settings = _flapping_file(tmp_path)
    s = run_replay(path, None, settings, progress=False, out=io.StringIO())["streams"]["cp/1/default"]
    total = s["summary"]["changepoints"]
    assert total > 200
    assert len(s["changepoints"]) == total and "changepoints_omitted" not in s
    idx = [c["index"] for c in s["changepoints"]]
    assert idx == sorted(idx) and len(set(idx)) == total and idx[0] >= 50


def test_changepoints_over_the_cap_are_counted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from embedwatch import replay

    monkeypatch.setattr(replay, "MAX_REPORT_CHANGEPOINTS", 150)
    path, settings = _flapping_file(tmp_path)
    s = run_replay(path, None, settings, progress=False, out=io.StringIO())["streams"]["cp/1/default"]
    assert len(s["changepoints"]) == 150
    assert s["changepoints_omitted"] == s["summary"]["changepoints"] - 150 > 0


def _baseline_files(tmp_path: Path) -> tuple[Path, Path, Path, list[dict[str, Any]]]:
    """A baseline built from a good period of enc/1/web, then a later file of the same behaviour
    and one shifted from its first event on."""
    rng = np.random.default_rng(11)
    center = rng.normal(size=DIM)
    center *= 3.0 / np.linalg.norm(center)
    shift = rng.normal(size=DIM)
    shift *= 1.5 / np.linalg.norm(shift)
    key = ("enc", "1", "web")
    good = _write(tmp_path / "good.jsonl", _gaussian_lines(key, rng.normal(size=(1000, DIM)) + center))
    later = _write(tmp_path / "later.jsonl", _gaussian_lines(key, rng.normal(size=(1500, DIM)) + center))
    bad = _write(tmp_path / "bad.jsonl", _gaussian_lines(key, rng.normal(size=(1500, DIM)) + center + shift))
    metas = build_baseline(good, tmp_path / "baseline.npz", Settings())
    return later, bad, tmp_path / "baseline.npz", metas


def test_replay_against_a_built_baseline(tmp_path: Path) -> None:
    from embedwatch.replay import load_baselines

    later, bad, base, [md] = _baseline_files(tmp_path)
    given = load_baselines([base])
    ok = run_replay(later, None, Settings(), progress=False, out=io.StringIO(), baselines=given)
    s = ok["streams"][DRIFTED]
    assert s["events"] == 1500 and s["alarms"] == [] and s["reference_size"] == 0
    assert s["baseline_id"] == md["baseline_id"]
    assert s["summary"]["baseline_ready"] == 1.0 and s["summary"]["drift_detected"] == 0.0
    # Shifted from its first event: against the given baseline it alarms within the first
    # reference_size events; building its own baseline from them, it never could.
    found = run_replay(bad, None, Settings(), progress=False, out=io.StringIO(), baselines=given)
    alarms = found["streams"][DRIFTED]["alarms"]
    assert alarms and alarms[0]["index"] < 500
    assert found["streams"][DRIFTED]["summary"]["drift_detected"] == 1.0
    blind = run_replay(bad, None, Settings(), progress=False, out=io.StringIO())
    assert blind["streams"][DRIFTED]["alarms"] == []


def test_given_baseline_of_another_dimension_rejects_as_the_service_does(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from embedwatch.replay import load_baselines

    _, _, base, _ = _baseline_files(tmp_path)
    rng = np.random.default_rng(12)
    other = _write(tmp_path / "other.jsonl", _gaussian_lines(("enc", "1", "web"), rng.normal(size=(100, DIM // 2))))
    rep = run_replay(other, None, Settings(), progress=False, out=io.StringIO(), baselines=load_baselines([base]))
    s = rep["streams"][DRIFTED]
    assert s["events"] == 0 and s["rejected"] == 100
    assert rep["rejected"] == {"dimension_mismatch": 100}
    assert f"{DRIFTED}: 100 events rejected as dimension_mismatch" in capsys.readouterr().err


def test_load_baselines_errors(tmp_path: Path) -> None:
    from embedwatch.replay import ReplayError, load_baselines

    _, _, base, [md] = _baseline_files(tmp_path)
    with pytest.raises(ReplayError, match="missing"):
        load_baselines([tmp_path / "nope.npz"])
    with pytest.raises(ReplayError, match="both of stream enc/1/web"):
        load_baselines([base, tmp_path / "baseline.json"])
    js = tmp_path / "baseline.json"
    js.write_text(js.read_text().replace(md["baseline_id"], "0" * 16))
    with pytest.raises(ReplayError, match=r"baseline .*baseline\.npz"):
        load_baselines([base])


# -- query events, and the decoder's limits from the configuration ----------------------------------


def _query_file(tmp_path: Path, ts0: float = 1.7e9) -> tuple[Path, np.ndarray, np.ndarray]:
    """300 document embeddings, then 100 labelled query lines without an embedding, then 100
    query lines whose embeddings are far from the documents (a query stream of another
    distribution: no document drift). Returns the file, the top-1 scores and the labels' hits."""
    rng = np.random.default_rng(21)
    lines = _gaussian_lines(("m", "1", None), rng.normal(size=(300, 8)), ts0)
    top1 = np.round(rng.uniform(0.2, 0.9, size=200), 4)
    hit = rng.random(100) < 0.3
    for i in range(100):
        results = [{"id": f"d{j}", "score": float(top1[i]) - 0.01 * j} for j in range(5)]
        lines.append(orjson.dumps({"model": "m", "model_version": "1", "ts": ts0 + 300 + i, "query_id": f"q{i}",
                                   "results": results, "relevant_ids": ["d2" if hit[i] else "zz", "yy"]}))
    for i in range(100):
        lines.append(orjson.dumps({"model": "m", "model_version": "1", "ts": ts0 + 400 + i, "query_id": i,
                                   "embedding": np.round(rng.normal(size=8) + 5.0, 6).tolist(),
                                   "results": [{"id": "a", "score": float(top1[100 + i])}]}))
    return _write(tmp_path / "mixed.jsonl", lines), top1, hit


def test_replay_monitors_query_lines_as_the_service_monitors_its_queries_topic(tmp_path: Path) -> None:
    from embedwatch.events import Message
    from embedwatch.metrics_catalog import METRICS

    path, top1, hit = _query_file(tmp_path)
    settings = Settings(detection={"reference_size": 100})  # type: ignore[arg-type]
    buf = io.StringIO()
    rep = run_replay(path, None, settings, progress=False, out=buf)
    s = rep["streams"]["m/1/default"]
    assert rep["rejected"] == {} and s["rejected"] == 0
    # The query lines are neither rejected nor counted (and tested) as document embeddings.
    assert s["events"] == 300 and s["query_events"] == 200 and s["alarms"] == []
    q = s["summary"]
    # Batch values: precision@10 = hits / 10 and recall@10 = hits / 2 over the labelled queries;
    # no-match = top-1 below detection.no_match_threshold over all of them.
    k, threshold = settings.detection.precision_k, settings.detection.no_match_threshold
    assert q["query_precision_at_k"] == pytest.approx(hit.mean() / k)
    assert q["query_recall_at_k"] == pytest.approx(hit.mean() / 2)
    assert q["query_no_match_ratio"] == pytest.approx(float((top1 < threshold).mean()))
    assert q["query_result_count"] == pytest.approx(3.0)  # 5 results, then 1
    assert q["query_top1_ks_statistic"] is not None
    # The same lines from the service's two topics, through its decoder and router: the same
    # values, each the gauge of the metric catalog's query metrics.
    from embedwatch.events import DecodeLimits, Decoder, StreamKey
    from embedwatch.router import StreamRouter

    emb_topic, q_topic = settings.kafka.embeddings_topic, settings.kafka.queries_topic
    assert q_topic is not None
    decoder = Decoder(DecodeLimits(precision_k=k), query_topics=frozenset([q_topic]))
    router = StreamRouter(settings)
    lines = path.read_bytes().splitlines()
    router.route(decoder.decode([Message(value=line, topic=q_topic if b"query_id" in line else emb_topic)
                                 for line in lines], now=0.0))
    service = router.monitors[StreamKey("m", "1")].measures()
    measures = {m.measure for m in METRICS if m.measure and m.measure.startswith("query_")}
    assert {"query_top1_ks_statistic", "query_top1_ks_p_value", "query_no_match_ratio", "query_result_count",
            "query_precision_at_k", "query_recall_at_k"} <= measures
    for measure in measures:
        want = service[measure]
        assert q[measure] == (None if math.isnan(want) else pytest.approx(want)), measure
    table = buf.getvalue().splitlines()
    assert table[0].split()[-4:] == ["queries", "no-match", "precision@k", "recall@k"]
    assert table[2].split()[-4:-2] == ["200", f"{q['query_no_match_ratio']:.4g}"]


def test_summary_table_has_query_columns_only_with_queries(report: dict[str, Any]) -> None:
    from embedwatch.replay import print_summary

    buf = io.StringIO()
    print_summary(report, 1, 1.0, buf)
    assert buf.getvalue().splitlines()[0].split()[-1] == "drifting"
    assert all(s["query_events"] == 0 for s in report["streams"].values())


def test_baseline_build_leaves_query_embeddings_out(tmp_path: Path) -> None:
    path, _, _ = _query_file(tmp_path)
    [md] = build_baseline(path, tmp_path / "b.npz", Settings())
    assert md["count"] == 300  # the documents alone: the 100 query embeddings are no part of it
    b = load_file(md["path"])
    rng = np.random.default_rng(21)
    docs = np.round(rng.normal(size=(300, 8)), 6).astype(np.float32)
    np.testing.assert_allclose(b.mean, docs.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_replay_applies_the_configured_future_skew(tmp_path: Path) -> None:
    """Events 20 minutes ahead: refused under the default 300 s, accepted with 3600 s as the
    service's decoder accepts them."""
    import time

    rng = np.random.default_rng(22)
    path = _write(tmp_path / "ahead.jsonl", _gaussian_lines(("m", "1", None), rng.normal(size=(60, 4)),
                                                             time.time() + 1200))
    default = run_replay(path, None, Settings(), progress=False, out=io.StringIO())
    assert default["rejected"] == {"schema": 60}
    lenient = Settings(limits={"max_future_skew_s": 3600})  # type: ignore[arg-type]
    rep = run_replay(path, None, lenient, progress=False, out=io.StringIO())
    assert rep["rejected"] == {} and rep["streams"]["m/1/default"]["events"] == 60


def _query_lines(x: np.ndarray, t0: float) -> list[bytes]:
    return [orjson.dumps({"model": "m", "model_version": "1", "ts": t0 + i, "embedding": np.round(v, 6).tolist(),
                          "results": [{"id": "a", "score": 0.7}]}) for i, v in enumerate(x)]


def test_a_query_embeddings_baseline_is_built_and_replayed_against(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """``baseline build --stream <stream>/query`` builds the baseline of a stream's query
    embeddings (the one the service stores under that key); replay compares the query
    embeddings with it from their first event, as the service does once it has one."""
    from embedwatch.replay import ReplayError, load_baselines

    rng = np.random.default_rng(23)
    docs = _gaussian_lines(("m", "1", None), rng.normal(size=(300, 8)))
    normal = _write(tmp_path / "normal.jsonl", docs + _query_lines(rng.normal(size=(400, 8)) + 1.0, 1.7e9 + 1e4))
    [md] = build_baseline(normal, tmp_path / "q.npz", Settings(), stream="m/1/default/query")
    assert (md["segment"], md["count"]) == ("default/query", 400)
    b = load_file(md["path"])
    assert b.key == StreamKey("m", "1").query_side()
    with pytest.raises(ReplayError, match="no accepted events of stream m/1/default/query"):
        build_baseline(_write(tmp_path / "docs.jsonl", docs), tmp_path / "none.npz", Settings(),
                       stream="m/1/default/query")
    shifted = _write(tmp_path / "shifted.jsonl", _query_lines(rng.normal(size=(600, 8)) + 2.5, 1.7e9 + 2e4))
    given = load_baselines([md["path"]])
    rep = run_replay(shifted, None, Settings(), progress=False, out=io.StringIO(), baselines=given)
    s = rep["streams"]["m/1/default"]
    assert s["query_baseline_id"] == md["baseline_id"] and "baseline_id" not in s
    # Against the given baseline from their first event: an alarm within the first
    # reference_size (1000) query embeddings, which would otherwise have become their baseline.
    assert [(a["detector"], a["index"] < 600) for a in s["alarms"]][:1] == [("mmd_query", True)]
    assert s["summary"]["query_drift_detected"] == 1.0
    assert run_replay(shifted, None, Settings(), progress=False, out=io.StringIO())["streams"][
        "m/1/default"]["alarms"] == []
    assert "warning" not in capsys.readouterr().err
    # A file without the stream's query embeddings is named.
    run_replay(_write(tmp_path / "d.jsonl", docs), None, Settings(), progress=False, out=io.StringIO(),
               baselines=given)
    assert "which has no query embeddings" in capsys.readouterr().err
