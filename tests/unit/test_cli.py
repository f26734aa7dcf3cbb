"""The ``embedwatch`` command's handling of bad input: one line ``embedwatch: <message>`` on stderr
and a nonzero exit status, never a traceback (config and usage errors exit 2)."""

from __future__ import annotations

import http.server
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from embedwatch import cli

DIM = 16


def _events(path: Path, n: int, seed: int, shift: float = 0.0, stream: tuple[str, str] = ("enc", "1"),
            dim: int = DIM) -> Path:
    rng = np.random.default_rng(seed)
    center = np.random.default_rng(0).normal(size=dim)
    center *= 3.0 / np.linalg.norm(center)
    direction = np.random.default_rng(1).normal(size=dim)
    direction *= shift / np.linalg.norm(direction)
    x = rng.normal(size=(n, dim)) + center + direction
    path.write_bytes(b"\n".join(
        orjson.dumps({"model": stream[0], "model_version": stream[1], "ts": 1.7e9 + i,
                      "embedding": np.round(v, 6).tolist()}) for i, v in enumerate(x)) + b"\n")
    return path


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # how the commands stop on a bad --config
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(err: str, *words: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("embedwatch: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], err


@pytest.fixture()
def small(tmp_path: Path) -> Path:
    return _events(tmp_path / "small.jsonl", 60, seed=2)


def test_bad_paths(tmp_path: Path, small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "adir").mkdir()
    report = str(tmp_path / "r.json")
    for argv, words in [
        (["replay", str(tmp_path / "missing.jsonl"), "--report", report], ("cannot read", "No such file")),
        (["replay", str(tmp_path / "adir"), "--report", report], ("cannot read", "Is a directory")),
        (["replay", str(small), "--report", str(tmp_path / "adir")], ("cannot write", "Is a directory")),
        (["baseline", "build", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "b")], ("cannot read",)),
        (["replay", str(small), "--report", report, "--baseline", str(tmp_path / "nope.npz")],
         ("nope", "missing")),
    ]:
        rc, out, err = _run(argv, capsys)
        assert rc == 2, (argv, err)
        _one_line_error(err, *words)
        assert out == ""
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("size", ["0", "1", "10", "-5"])
def test_reference_size_out_of_range(tmp_path: Path, small: Path, size: str,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["replay", str(small), "--report", str(tmp_path / "r.json"), "--reference-size", size],
                 ["baseline", "build", str(small), "-o", str(tmp_path / "b"), "--reference-size", size]):
        rc, _, err = _run(argv, capsys)
        assert rc == 2
        assert err.startswith(f"embedwatch: invalid --reference-size {size}: detection.reference_size: ")
        assert "greater than or equal to 50" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.jsonl"]


def test_baseline_build_errors_and_short_streams(tmp_path: Path, small: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out" / "b")
    for argv, words in [
        (["baseline", "build", str(small), "-o", out, "--stream", "bogus"], ("--stream", "bogus")),
        (["baseline", "build", str(small), "-o", out, "--stream", "enc/1/zzz"], ("no accepted events", "enc/1/zzz")),
    ]:
        rc, _, err = _run(argv, capsys)
        assert rc == 2
        _one_line_error(err, *words)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    rc, _, err = _run(["baseline", "build", str(empty), "-o", out], capsys)
    assert rc == 2
    _one_line_error(err, "no accepted events")
    assert not (tmp_path / "out").exists()
    # A stream of one event beside a stream of 60: the second is built, the first named.
    mixed = tmp_path / "mixed.jsonl"
    lone = _events(tmp_path / "one.jsonl", 1, seed=3, stream=("lone", "1"))
    mixed.write_bytes(small.read_bytes() + lone.read_bytes())
    rc, stdout, err = _run(["baseline", "build", str(mixed), "-o", out], capsys)
    assert rc == 0
    _one_line_error(err, "warning", "lone/1/default", "1 accepted")
    assert "enc/1/default" in stdout and "count=60" in stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.enc+1+default.json", "b.enc+1+default.npz"]


@pytest.mark.parametrize(
    ("name", "value", "words"),
    [
        ("EMBEDWATCH_DETECTION__SCAN_WINDOWS", "abc", ("EMBEDWATCH_DETECTION__SCAN_WINDOWS", "cannot parse")),
        ("EMBEDWATCH_DETECTION", '{"reference_size":', ("EMBEDWATCH_DETECTION:", "cannot parse")),
        ("EMBEDWATCH_BLAS_THREADS", "abc", ("EMBEDWATCH_BLAS_THREADS", "valid integer")),
        ("EMBEDWATCH_BLAS_THREADS", "0", ("EMBEDWATCH_BLAS_THREADS", "greater than or equal to 1")),
    ],
)
def test_bad_environment_is_a_config_error(tmp_path: Path, small: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str], name: str, value: str,
                                           words: tuple[str, ...]) -> None:
    monkeypatch.setenv(name, value)
    for argv in (["replay", str(small), "--report", str(tmp_path / "r.json")], ["config", "check"]):
        rc, _, err = _run(argv, capsys)
        assert rc == 2
        assert err.startswith("embedwatch: invalid configuration (environment): ") and "Traceback" not in err
        assert all(w in err for w in words), err


def test_config_file_not_utf8(tmp_path: Path, small: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "binary.yaml"
    cfg.write_bytes(b"\xff\xfe\x00d\x00e")
    rc, _, err = _run(["replay", str(small), "--report", str(tmp_path / "r.json"), "--config", str(cfg)], capsys)
    assert rc == 2
    _one_line_error(err, "binary.yaml is not UTF-8 text")


def test_replay_with_built_baseline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The documented workflow: build from a good period, replay later files against it."""
    good = _events(tmp_path / "good.jsonl", 1000, seed=4)
    later = _events(tmp_path / "later.jsonl", 1200, seed=5)
    incident = _events(tmp_path / "incident.jsonl", 1200, seed=6, shift=1.5)
    rc, out, _ = _run(["baseline", "build", str(good), "-o", str(tmp_path / "baseline.npz")], capsys)
    assert rc == 0 and "enc/1/default" in out
    reports = {}
    for name, events in (("ok", later), ("bad", incident)):
        rc, out, err = _run(["replay", str(events), "--report", str(tmp_path / f"{name}.json"), "--quiet",
                             "--baseline", str(tmp_path / "baseline.npz")], capsys)
        assert rc == 0, err
        reports[name] = orjson.loads((tmp_path / f"{name}.json").read_bytes())["streams"]["enc/1/default"]
    md = orjson.loads((tmp_path / "baseline.json").read_bytes())
    assert reports["ok"]["baseline_id"] == reports["bad"]["baseline_id"] == md["metadata"]["baseline_id"]
    assert reports["ok"]["alarms"] == [] and reports["ok"]["reference_size"] == 0
    assert reports["bad"]["alarms"] and reports["bad"]["alarms"][0]["index"] < 500
    # Two files of one stream: a usage error, before anything is replayed.
    rc, _, err = _run(["replay", str(later), "--report", str(tmp_path / "x.json"), "--baseline",
                       str(tmp_path / "baseline.npz"), "--baseline", str(tmp_path / "baseline.json")], capsys)
    assert rc == 2
    _one_line_error(err, "both of stream enc/1/default")
    assert not (tmp_path / "x.json").exists()


class _Api(http.server.BaseHTTPRequestHandler):
    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer(404, b'{"error": "no such path"}')

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._answer(401, b'{"error": "admin token required"}\n')

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture()
def api() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_remote_baseline_errors(api: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _run(["baseline", "list", "--url", api], capsys)
    assert rc == 1 and out == ""
    _one_line_error(err, "HTTP 404", '{"error": "no such path"}')
    rc, out, err = _run(["baseline", "promote", "enc/1/default", "--url", api], capsys)
    assert rc == 1
    _one_line_error(err, "POST", "/api/baselines/enc/1/default/promote", "HTTP 401", "admin token required")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    rc, _, err = _run(["baseline", "list", "--url", f"http://127.0.0.1:{closed}"], capsys)
    assert rc == 1
    _one_line_error(err, "cannot reach the service", "refused")
    rc, _, err = _run(["baseline", "list", "--url", "127.0.0.1:9108"], capsys)
    assert rc == 2
    _one_line_error(err, "bad --url")


def test_open_state_does_not_retry_a_failing_count(monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The count of restored versions is informational: its failure is a warning, not an
    unreachable backend retried forever."""
    import embedwatch.state as state
    from embedwatch.config import Settings

    class Backend:
        def read_all(self, *_a: Any) -> dict[str, bytes]:
            return {}

    class Store:
        def __init__(self, *_a: Any) -> None:
            pass

        def read(self, *_a: Any) -> dict[str, bytes]:
            return {"checkpoint/x": b"1"}

        def list(self) -> list[dict[str, Any]]:
            raise RuntimeError("index damaged")

    def no_retry(_s: float) -> None:
        raise AssertionError("retried")

    monkeypatch.setattr(state, "open_state_backend", lambda _s: Backend())
    monkeypatch.setattr(state, "DurableBaselineStore", Store)
    monkeypatch.setattr("time.sleep", no_retry)  # the backoff between attempts
    settings = Settings(state={"backend": "file"})  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="embedwatch"):
        backend, store, records = cli._open_state(settings)
    assert isinstance(backend, Backend) and isinstance(store, Store) and records == {"checkpoint/x": b"1"}
    assert any("index damaged" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert not any(r.levelno >= logging.ERROR for r in caplog.records)


def test_no_traceback_from_the_installed_command(tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "embedwatch"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "embedwatch.cli"]
    proc = subprocess.run([*cmd, "replay", str(tmp_path / "missing.jsonl"), "--report", str(tmp_path / "r.json")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("embedwatch: cannot read") and "Traceback" not in proc.stderr
