"""scripts/demo (``make demo``) against fakes: signals, start-up failures, dead children, disk use.

The script runs in a copy of the repository layout whose broker (scripts/kafka-local), venv python
and ``embedwatch`` are small fakes that record what they were asked to do and their pids. Each run
is in its own session (as a terminal's foreground job is its own process group), so a "Ctrl-C" is
SIGINT to that group and SIGTERM goes to the script alone, as from ``kill``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

FAKE_KAFKA_LOCAL = r"""#!/usr/bin/env bash
# Fake kafka-local: the "broker" is a sleeping python; start takes $FAKE_START_DELAY s.
set -euo pipefail
cmd=$1; shift; dir=""
while (($#)); do case $1 in --dir) dir=$2; shift 2;; *) shift;; esac; done
echo "$cmd" >> "$FAKE_LOG/kafka-local.calls"
case $cmd in
  start)
    mkdir -p "$dir/data"
    python3 -c 'import time
while True: time.sleep(1)' FAKEBROKER </dev/null >/dev/null 2>&1 &
    echo $! > "$dir/pid"; echo $! >> "$FAKE_LOG/pids"
    sleep "${FAKE_START_DELAY:-0}"
    echo 127.0.0.1:19092 ;;
  stop)
    if [[ -f $dir/pid ]]; then kill "$(cat "$dir/pid")" 2>/dev/null || true; rm -f "$dir/pid"; fi
    echo stopped >> "$FAKE_LOG/stops" ;;
esac
"""

FAKE_PYTHON = r"""#!/usr/bin/env bash
# Fake venv python: only the demo's topic creation runs it (a script on stdin).
echo "$*" >> "$FAKE_LOG/python.args"
cat > "$FAKE_LOG/python.stdin"
exit "${FAKE_PYTHON_EXIT:-0}"
"""

FAKE_EMBEDWATCH = r"""#!/usr/bin/env python3
# Fake embedwatch: `run` serves /healthz on the config's port, `produce` loops, `watch` prints frames.
import http.server, os, re, signal, sys, threading, time
log = os.environ["FAKE_LOG"]
cmd = sys.argv[1]
with open(os.path.join(log, "pids"), "a") as f:
    f.write(f"{os.getpid()}\n")
with open(os.path.join(log, "embedwatch.calls"), "a") as f:
    f.write(cmd + "\n")
def term(*_):
    time.sleep(float(os.environ.get("FAKE_TERM_DELAY", "0")))
    sys.exit(0)
if cmd == "run":
    signal.signal(signal.SIGTERM, term)
    if "FAKE_RUN_EXIT" in os.environ:
        print("Traceback: the fake service failed", file=sys.stderr)
        sys.exit(int(os.environ["FAKE_RUN_EXIT"]))
    port = int(re.search(r"port: (\d+)", open(sys.argv[sys.argv.index("--config") + 1]).read()).group(1))
    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a): pass
        def do_GET(self):
            self.send_response(200 if self.path == "/healthz" else 404); self.end_headers()
    if not os.environ.get("FAKE_RUN_NO_HTTP"):
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), H)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
    while True:
        time.sleep(1)
elif cmd == "produce":
    signal.signal(signal.SIGTERM, term)
    t0 = time.monotonic()
    while True:
        after = os.environ.get("FAKE_PRODUCE_EXIT_AFTER")
        if after and time.monotonic() - t0 > float(after):
            print("embedwatch: the fake producer failed", file=sys.stderr)
            sys.exit(1)
        time.sleep(0.1)
else:
    while True:
        print("frame", flush=True)
        time.sleep(0.3)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Demo:
    def __init__(self, tree: Path, env: dict[str, str]) -> None:
        self.tree = tree
        self.log = tree / "fakelog"
        self.out = tree / "demo.out"
        # A new session: its own process group, as the foreground job of a terminal would be.
        self.proc = subprocess.Popen(["bash", str(tree / "scripts" / "demo")], cwd=tree, env=env,
                                     stdout=self.out.open("wb"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{text!r} never appeared; output:\n{self.output()}")
            time.sleep(0.05)

    def finish(self, timeout: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the demo did not end within {timeout}s; output:\n{self.output()}") from None

    def calls(self, name: str) -> list[str]:
        p = self.log / name
        return p.read_text().split() if p.exists() else []

    def alive(self) -> list[int]:
        """Fake processes (broker, service, producer, view) still running."""
        left = []
        for pid in map(int, self.calls("pids")):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                continue
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                left.append(pid)
        return left

    def kill_all(self) -> None:
        for pid in self.alive():
            os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / "scripts").mkdir()
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / "fakelog").mkdir()
    shutil.copy(ROOT / "scripts" / "demo", tmp_path / "scripts" / "demo")
    for path, text in ((tmp_path / "scripts" / "kafka-local", FAKE_KAFKA_LOCAL),
                       (tmp_path / ".venv" / "bin" / "python", FAKE_PYTHON),
                       (tmp_path / ".venv" / "bin" / "embedwatch", FAKE_EMBEDWATCH)):
        path.write_text(text)
        path.chmod(0o755)
    return tmp_path


@pytest.fixture
def demo(tree: Path) -> Iterator[Demo | None]:
    started: list[Demo] = []

    def start(**env: str) -> Demo:
        full = {**os.environ, "FAKE_LOG": str(tree / "fakelog"), "EMBEDWATCH_DEMO_PORT": str(_free_port()),
                "PYTHON": sys.executable, **env}
        d = Demo(tree, full)
        started.append(d)
        return d

    yield start  # type: ignore[misc]
    for d in started:
        d.kill_all()


def test_sigterm_while_the_view_runs_stops_everything(demo) -> None:  # type: ignore[no-untyped-def]
    d = demo()
    d.wait_for("frame")
    d.proc.send_signal(signal.SIGTERM)  # to the script alone, as `kill PID` does
    assert d.finish(5) == 143, d.output()
    assert "demo: stopped" in d.output()
    assert d.calls("stops") == ["stopped", "stopped"]  # the leftover check at start, then the broker
    assert d.alive() == []


def test_ctrl_c_stops_everything(demo) -> None:  # type: ignore[no-untyped-def]
    d = demo()
    d.wait_for("frame")
    os.killpg(d.proc.pid, signal.SIGINT)  # what Ctrl-C does: SIGINT to the foreground group
    assert d.finish(5) == 130, d.output()
    assert "demo: stopped" in d.output() and d.alive() == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_broker_start_ends_the_demo(demo, sig: signal.Signals) -> None:  # type: ignore[no-untyped-def]
    d = demo(FAKE_START_DELAY="3")
    d.wait_for("starting a local Kafka broker")
    time.sleep(0.3)
    t0 = time.monotonic()
    os.killpg(d.proc.pid, sig) if sig == signal.SIGINT else d.proc.send_signal(sig)
    assert d.finish(8) == (130 if sig == signal.SIGINT else 143), d.output()
    time.sleep(3.5)  # the fake start has ended by now: nothing may have been started after it
    assert d.calls("embedwatch.calls") == [] and d.calls("python.args") == [], d.output()
    assert "demo: stopped" in d.output() and d.alive() == []
    assert time.monotonic() - t0 < 8


def test_a_second_ctrl_c_does_not_cut_the_cleanup_short(demo) -> None:  # type: ignore[no-untyped-def]
    d = demo(FAKE_TERM_DELAY="2")  # the service and producer take 2 s to stop
    d.wait_for("frame")
    os.killpg(d.proc.pid, signal.SIGINT)
    d.wait_for("demo: stopping")
    time.sleep(0.3)
    os.killpg(d.proc.pid, signal.SIGINT)
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish(10) == 130, d.output()
    assert "demo: stopped" in d.output()
    assert d.calls("stops") == ["stopped", "stopped"] and d.alive() == []


def test_a_busy_port_is_refused_before_anything_starts(demo) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        d = demo(EMBEDWATCH_DEMO_PORT=str(port))
        assert d.finish(5) == 1
    out = d.output()
    assert f"demo: port {port} is in use" in out and "EMBEDWATCH_DEMO_PORT" in out, out
    assert d.calls("kafka-local.calls") == [] and d.calls("embedwatch.calls") == [] and "stopping" not in out


def test_a_service_that_dies_at_start_is_reported_with_its_log(demo) -> None:  # type: ignore[no-untyped-def]
    d = demo(FAKE_RUN_EXIT="3")
    assert d.finish(10) == 1, d.output()
    out = d.output()
    assert "demo: the service exited (status 3)" in out and "the fake service failed" in out, out
    assert "frame" not in out and "demo: stopped" in out and d.alive() == []


def test_a_service_that_never_gets_healthy_times_out(demo) -> None:  # type: ignore[no-untyped-def]
    d = demo(FAKE_RUN_NO_HTTP="1", EMBEDWATCH_DEMO_START_TIMEOUT="2")
    assert d.finish(10) == 1, d.output()
    assert "did not answer /healthz" in d.output() and "within 2s" in d.output()
    assert "demo: stopped" in d.output() and d.alive() == []


def test_a_producer_that_dies_while_the_view_runs_ends_the_demo(demo) -> None:  # type: ignore[no-untyped-def]
    d = demo(FAKE_PRODUCE_EXIT_AFTER="1.5")
    d.wait_for("frame")
    assert d.finish(10) == 1, d.output()
    out = d.output()
    assert "demo: the producer exited (status 1)" in out and "the fake producer failed" in out, out
    assert "demo: stopped" in out and d.alive() == []


def test_topics_get_a_bounded_retention_and_old_data_is_wiped(demo, tree: Path) -> None:  # type: ignore[no-untyped-def]
    old = tree / ".cache" / "demo" / "kafka" / "data" / "embeddings-0"
    old.mkdir(parents=True)
    (old / "00000000000000000000.log").write_bytes(b"x" * 1000)
    d = demo()
    d.wait_for("frame")
    assert not old.exists()
    retention_ms, retention_bytes, segment_bytes = map(int, d.calls("python.args")[2:5])
    assert retention_ms <= 30 * 60 * 1000 and retention_bytes <= 256 << 20 and segment_bytes < retention_bytes
    script = (d.log / "python.stdin").read_text()
    assert "retention.ms" in script and "retention.bytes" in script and "topic_configs" in script
    d.proc.send_signal(signal.SIGTERM)
    assert d.finish(5) == 143


def test_failed_topic_creation_stops_the_demo(demo) -> None:  # type: ignore[no-untyped-def]
    d = demo(FAKE_PYTHON_EXIT="1")
    assert d.finish(10) == 1
    assert "demo: creating the demo topics failed" in d.output()
    assert d.calls("embedwatch.calls") == [] and d.alive() == []
