"""`embedwatch replay` over a generated file: report layout, alarms, rejections, CLI."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from embedwatch.baseline_store import load_file
from embedwatch.config import Settings
from embedwatch.events import StreamKey
from embedwatch.replay import build_baseline, run_replay

DIM = 32
CHANGE = 1500
N = 3000
DRIFTED = "enc/1/web"
CONTROL = "enc/1/default"

STREAM_KEYS = {"events", "rejected", "reference_size", "alarms", "summary"}
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
