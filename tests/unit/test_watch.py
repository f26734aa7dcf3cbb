"""``embedwatch watch``: bad responses, pipes, terminal height, --interval."""

from __future__ import annotations

import http.server
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from embedwatch import watch

NORMAL = ('embedwatch_events_total{model="m",model_version="v1",segment="default"} 10\n'
          'embedwatch_baseline_ready{model="m",model_version="v1",segment="default"} 1\n')
MANY = "".join(f'embedwatch_events_total{{model="m{i:04d}",model_version="v1",segment="default"}} {i}\n'
               for i in range(500))


class _Server:
    def __init__(self, body: bytes) -> None:
        self.body = body
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server(NORMAL.encode())
    yield s
    s.httpd.shutdown()


@pytest.fixture
def not_http() -> Iterator[str]:
    """A port that answers anything with bytes that are not HTTP."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()

    def serve() -> None:
        while True:
            try:
                c, _ = sock.accept()
            except OSError:
                return
            c.recv(1000)
            c.sendall(b"\x00\x00\x00\x10garbage-not-http\r\n\r\n")
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.mark.parametrize("body, words", [
    (b"{not: prometheus at all]]\n<html>", "not Prometheus metrics (ValueError"),
    (b"\xff\xfe\x00garbage", "not Prometheus metrics (UnicodeDecodeError"),
])
def test_a_bad_response_is_a_waiting_line(server: _Server, body: bytes, words: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    server.body = body
    assert watch.watch(server.url, once=True) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"waiting for {server.url}: ") and words in err and "Traceback" not in err
    assert len(err.splitlines()) == 1


def test_a_reply_that_is_not_http_is_a_waiting_line(not_http: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert watch.watch(not_http, once=True) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"waiting for {not_http}: not an HTTP response") and len(err.splitlines()) == 1, err


def test_a_bad_response_then_a_good_one_keeps_watching(server: _Server, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    server.body = b"garbage garbage"
    sleeps = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        if len(sleeps) == 1:
            server.body = NORMAL.encode()
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(watch.time, "sleep", sleep)
    assert watch.watch(server.url, interval=0.5) == 0
    out, err = capsys.readouterr()
    assert "waiting for" in err and "m/v1/default" in out and sleeps == [0.5, 0.5]


def test_rejected_events_without_a_reason_label() -> None:
    cur = watch.Series()
    cur["embedwatch_events_rejected_total"] = {(("model", "m"),): 3.0, (("reason", "nan"),): 2.0}
    text = watch.render(cur, None, 1.0)
    assert "rejected  ?=3  nan=2" in text


def test_piped_output_has_no_escape_codes(server: _Server, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    calls = []

    def sleep(s: float) -> None:
        calls.append(s)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(watch.time, "sleep", sleep)
    assert watch.watch(server.url, interval=1) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and out.count("embedwatch  events 10") == 2


def test_a_frame_is_cut_to_the_terminal_height() -> None:
    cur = watch.Series()
    cur["embedwatch_events_total"] = {(("model", f"m{i}"), ("model_version", "v1"), ("segment", "s")): 1.0
                                      for i in range(100)}
    lines = watch.render(cur, None, 1.0, max_lines=20).splitlines()
    assert len(lines) == 20
    assert lines[-1].startswith("... 84 more streams not shown"), lines[-1]
    assert len(watch.render(cur, None, 1.0).splitlines()) == 103  # piped: every stream


def _embedwatch() -> list[str]:
    exe = Path(sys.executable).parent / "embedwatch"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "embedwatch.cli"]


def test_a_closed_pipe_ends_quietly(server: _Server) -> None:
    server.body = MANY.encode()
    watch_p = subprocess.Popen([*_embedwatch(), "watch", "--url", server.url, "--interval", "0.05"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert watch_p.stdout is not None and watch_p.stderr is not None
    watch_p.stdout.readline()
    watch_p.stdout.close()  # what `| head -1` does
    rc = watch_p.wait(20)
    err = watch_p.stderr.read().decode()
    assert rc == 0 and err == "", err


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pty")
def test_on_a_terminal_frames_redraw_and_fit(server: _Server) -> None:
    server.body = MANY.encode()
    master, slave = os.openpty()
    env = {**os.environ, "LINES": "15", "COLUMNS": "120"}
    p = subprocess.Popen([*_embedwatch(), "watch", "--url", server.url, "--interval", "5"],
                         stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    data = b""
    deadline = time.monotonic() + 15
    try:
        while b"more streams not shown" not in data and time.monotonic() < deadline:
            if not select.select([master], [], [], 0.5)[0]:
                continue
            chunk = os.read(master, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        p.kill()
        p.wait()
        os.close(master)
    frame = data.decode().split("\x1b[2J\x1b[H")[-1].strip().splitlines()
    assert data.startswith(b"\x1b[2J\x1b[H")
    assert len(frame) == 14 and "490 more streams not shown" in frame[-1], frame


@pytest.mark.parametrize("value", ["-1", "0", "nan", "soon"])
def test_bad_interval_is_a_usage_error(value: str) -> None:
    # A subprocess: without the check, --interval 0 scrapes in a busy loop forever.
    proc = subprocess.run([*_embedwatch(), "watch", "--url", "http://127.0.0.1:9", "--interval", value],
                          capture_output=True, text=True, timeout=20)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "argument --interval" in proc.stderr.splitlines()[-1], proc.stderr
    with pytest.raises(ValueError, match="interval"):
        watch.watch("http://127.0.0.1:9", interval=-1)
