"""Shared helpers of the benchmarks: machine facts, timing, a local broker, the service subprocess.

Nothing here asserts a speed: benchmarks measure and report, tests never time anything.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = str(Path(sys.executable).with_name("embedwatch"))
KAFKA_LOCAL = ROOT / "scripts" / "kafka-local"
#: A settings file measured beside the defaults: its memory by `make bench`, its detection by
#: `make bench-quality`.
LOW_MEMORY_PROFILE = ROOT / "profiles" / "low-memory.yaml"
#: The environment of a subprocess with one BLAS thread (see run.py's docstring).
ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def profile_detection(path: Path) -> dict[str, Any]:
    """The detection keys a settings file sets, with the values the service's config gives them
    (the file is validated as ``embedwatch run --config`` validates it)."""
    import yaml

    from embedwatch.config import load_settings

    keys = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("detection") or {}
    detection = load_settings(path).detection
    return {k: getattr(detection, k) for k in keys}


# ------------------------------------------------------------------------------------- figures

def figure(value: float | None, unit: str, **extra: Any) -> dict[str, Any]:
    """One measured figure: value and unit, plus whatever context (target, method, ...)."""
    out: dict[str, Any] = {"value": None if value is None else round(float(value), 4), "unit": unit}
    out.update({k: v for k, v in extra.items() if v is not None})
    return out


def target_check(value: float | None, target: float, higher_is_better: bool = True) -> bool | None:
    if value is None:
        return None
    return value >= target if higher_is_better else value <= target


def best_rate(fn: Any, n_events: int, repeats: int = 3, min_time: float = 0.0) -> dict[str, float]:
    """Run ``fn()`` (which processes ``n_events``) ``repeats`` times; events/s of the best and median."""
    rates = []
    cpu = []
    for _ in range(repeats):
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        cpu.append((time.process_time() - c0) / dt if dt > 0 else 0.0)
        rates.append(n_events / dt)
    rates.sort()
    return {"best": rates[-1], "median": rates[len(rates) // 2], "cpu_cores": max(cpu)}


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# --------------------------------------------------------------------------------- machine info

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int | None:
    try:
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def blas_info() -> list[dict[str, Any]]:
    try:
        import numpy  # noqa: F401  (load the BLAS before asking threadpoolctl)
        from threadpoolctl import threadpool_info
    except ImportError:
        return [{"error": "threadpoolctl not installed"}]
    keep = ("user_api", "internal_api", "version", "architecture", "num_threads", "threading_layer")
    return [{k: i.get(k) for k in keep} for i in threadpool_info()]


def machine_info() -> dict[str, Any]:
    import numpy as np

    kafka_clients: dict[str, Any] = {"kafka-python": _version("kafka-python")}
    try:
        import confluent_kafka

        kafka_clients["confluent-kafka"] = _version("confluent-kafka") or confluent_kafka.version()[0]
        kafka_clients["librdkafka"] = confluent_kafka.libversion()[0]
    except ImportError:
        kafka_clients["confluent-kafka"] = None
    ram = _ram_bytes()
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(ram / 2**30, 1) if ram else None,
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "orjson": _version("orjson"),
        "scipy": _version("scipy"),
        "prometheus_client": _version("prometheus_client"),
        "embedwatch": _version("embedwatch"),
        "kafka_clients": kafka_clients,
        "kafka_broker": _broker_version(),
        "blas": blas_info(),
        "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                                               "OMP_NUM_THREADS")},
        "loadavg_at_start": loadavg(),
    }


def _broker_version() -> str | None:
    try:
        m = re.search(r"^KAFKA_VERSION=(\S+)", KAFKA_LOCAL.read_text(), re.M)
        return m.group(1) if m else None
    except OSError:
        return None


# -------------------------------------------------------------------------------------- broker

@dataclass
class Broker:
    bootstrap: str
    directory: Path
    owned: bool = True
    topics: list[str] = field(default_factory=list)

    def create_topic(self, name: str, partitions: int, config: dict[str, str] | None = None) -> None:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        for f in admin.create_topics([NewTopic(name, partitions, 1, config=config or {})],
                                     operation_timeout=30).values():
            f.result()
        self.topics.append(name)

    def delete_topics(self) -> None:
        """Delete the topics this run created (frees the disk: e2e topics are large)."""
        if not self.topics:
            return
        try:
            from confluent_kafka.admin import AdminClient

            admin = AdminClient({"bootstrap.servers": self.bootstrap})
            for f in admin.delete_topics(self.topics, operation_timeout=30).values():
                with contextlib.suppress(Exception):
                    f.result()
        except Exception:
            pass
        self.topics.clear()


@contextlib.contextmanager
def kafka_broker(bootstrap: str | None = None) -> Iterator[Broker]:
    """A fresh local broker (scripts/kafka-local) in a temporary directory, or an existing one."""
    if bootstrap:
        b = Broker(bootstrap, Path(tempfile.gettempdir()), owned=False)
        try:
            yield b
        finally:
            b.delete_topics()
        return
    d = Path(tempfile.mkdtemp(prefix="embedwatch-bench-kafka-"))
    out = subprocess.run([str(KAFKA_LOCAL), "start", "--dir", str(d)], check=True, capture_output=True, text=True)
    b = Broker(out.stdout.strip().splitlines()[-1].strip(), d)
    try:
        yield b
    finally:
        b.delete_topics()
        subprocess.run([str(KAFKA_LOCAL), "stop", "--dir", str(d)], check=False, capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


# ------------------------------------------------------------------------------------- service

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_text(port: int, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        return str(r.read().decode())


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def metric_values(text: str, name: str) -> list[tuple[str, float]]:
    """(label text, value) of every sample of ``name`` (a cheap parser: no full exposition parsing)."""
    out = []
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = _SAMPLE.match(line)
        if m and m.group(1) == name:
            out.append((m.group(2) or "", float(m.group(3))))
    return out


def metric_sum(text: str, name: str) -> float:
    return sum(v for _, v in metric_values(text, name))


class Service:
    """``embedwatch run`` as a subprocess with a YAML config; CPU time read through psutil."""

    def __init__(self, config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None) -> None:
        import yaml

        self.port = free_port()
        config = {**config, "http": {"host": "127.0.0.1", "port": self.port}, "log_level": "WARNING"}
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / f"svc-{self.port}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = workdir / f"svc-{self.port}.log"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDWATCH_")}
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([BIN, "run", "--config", str(self.config_path)], stdout=log,
                                         stderr=subprocess.STDOUT, env=self.env)
        return self

    def wait_http(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}: {self.tail()}")
            try:
                scrape_text(self.port, timeout=1.0)
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"service not serving /metrics after {timeout}s: {self.tail()}")

    def cpu_seconds(self) -> float:
        import psutil

        assert self.proc is not None
        t = psutil.Process(self.proc.pid).cpu_times()
        return float(t.user + t.system)

    def rss_bytes(self) -> int:
        import psutil

        assert self.proc is not None
        return int(psutil.Process(self.proc.pid).memory_info().rss)

    def tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def service_config(bootstrap: str, topic: str, group: str, backend: str, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "kafka": {"bootstrap_servers": bootstrap, "group_id": group, "client_id": group,
                  "embeddings_topic": topic, "queries_topic": None, "backend": backend,
                  "auto_offset_reset": "earliest"},
        "state": {"backend": "none"},
    }
    for k, v in extra.items():
        cfg.setdefault(k, {}).update(v)
    return cfg
