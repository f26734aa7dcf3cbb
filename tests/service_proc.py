"""Run ``embedwatch run`` as a real subprocess for integration tests, and read its metrics."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

BIN = str(Path(sys.executable).with_name("embedwatch"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name][tuple(sorted(s.labels.items()))] = s.value
    return out


def metric_sum(m: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **match: str) -> float:
    return sum(v for labels, v in m.get(name, {}).items()
               if all(dict(labels).get(k) == val for k, val in match.items()))


class ServiceProcess:
    """``embedwatch run`` with a generated config; stop with SIGTERM or kill -9.

    The service sees none of the caller's ``EMBEDWATCH_*`` variables, only those in ``env``
    (e.g. ``{"EMBEDWATCH_KAFKA__SASL_PASSWORD": ...}``: secrets kept out of the config file).
    """

    def __init__(self, workdir: Path, config: dict[str, Any], name: str = "svc",
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.env = dict(env or {})
        config = {**config, "http": {**config.get("http", {}), "port": self.port, "host": "127.0.0.1"}}
        self.config_path = workdir / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True, timeout: float = 60.0) -> ServiceProcess:
        log = self.log_path.open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDWATCH_")}
        env.update(self.env)
        self.proc = subprocess.Popen([BIN, "run", "--config", str(self.config_path)], stdout=log,
                                     stderr=subprocess.STDOUT, env=env)
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def get(self, path: str) -> tuple[int, bytes]:
        return self.request("GET", path)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=body, method=method,
                                     headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if self.get("/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"service not ready in {timeout}s:\n{self.tail()}")

    def metrics(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        return scrape(self.port)

    def wait_for(self, predicate: Any, timeout: float = 120.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.metrics()
                if predicate(last):
                    return last
            except OSError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{what} not reached in {timeout}s; last metrics: "
                           f"{ {k: v for k, v in (last or {}).items() if k.startswith('embedwatch_consumed')} }\n"
                           f"{self.tail()}")

    def terminate(self, timeout: float = 15.0) -> tuple[int, float]:
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        return code, time.monotonic() - t0

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def until(get: Callable[[], Any], ok: Callable[[Any], bool], what: str, svc: ServiceProcess,
          timeout: float = 120.0) -> Any:
    """``get()`` once ``ok`` holds for it (polled every 0.3 s; a failed request or a stream not
    listed yet is tried again); TimeoutError naming ``what``, the last value and the log's tail."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = get()
            if ok(last):
                return last
        except (OSError, KeyError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{what} not reached in {timeout}s; last: {last}\n{svc.tail()}")
