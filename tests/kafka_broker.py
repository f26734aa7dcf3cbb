"""A real Kafka broker for the test-suite.

Importable without pytest. ``bootstrap_servers_for_tests()`` picks, in order:

1. ``KAFKA_BOOTSTRAP_SERVERS`` from the environment (an already running broker);
2. a throw-away container via testcontainers, if a Docker daemon answers;
3. a local single-node KRaft broker started by ``scripts/kafka-local``.

``EMBEDWATCH_TEST_KAFKA=local|docker`` skips the auto-detection.

``LocalKafka`` can also be used directly, e.g. for outage tests: ``stop()`` and
``start()`` again reuse the same directory (data, committed offsets) and ports,
so clients configured with the old bootstrap address reconnect on their own.
With ``sasl_ssl_dir`` it also opens a SASL_SSL (SCRAM-SHA-512) listener; see
``scripts/kafka-local`` for what that directory holds.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
KAFKA_LOCAL = REPO_ROOT / "scripts" / "kafka-local"

# First start may download the jars with mvn; later starts take ~6 s.
_START_TIMEOUT_S = 300.0
_STOP_TIMEOUT_S = 60.0


class LocalKafkaError(RuntimeError):
    pass


class LocalKafka:
    """One broker run by ``scripts/kafka-local`` in its own directory.

    Without ``workdir`` a temporary directory is created and removed by ``close()``.
    With ``sasl_ssl_dir`` (keystore, password, SCRAM users: see ``scripts/kafka-local``) the
    broker has a second, SASL_SSL listener: ``sasl_bootstrap_servers``.
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        sasl_ssl_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self._owns_dir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="embedwatch-kafka-"))
        self.port = port
        self.controller_port: int | None = None
        self.bootstrap_servers: str | None = None
        self.sasl_ssl_dir = Path(sasl_ssl_dir) if sasl_ssl_dir is not None else None
        self.sasl_port: int | None = None
        self.sasl_bootstrap_servers: str | None = None
        self._atexit_registered = False

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> str:
        """Start (or restart) the broker; returns ``127.0.0.1:PORT`` once it serves metadata."""
        args = ["start"]
        # After the first start, pin both ports so a restart is indistinguishable
        # from the same broker coming back.
        if self.port is not None:
            args += ["--port", str(self.port)]
        if self.controller_port is not None:
            args += ["--controller-port", str(self.controller_port)]
        if self.sasl_ssl_dir is not None:
            args += ["--sasl-ssl", str(self.sasl_ssl_dir)]
            if self.sasl_port is not None:
                args += ["--sasl-port", str(self.sasl_port)]
        result = self._run(*args, timeout=_START_TIMEOUT_S)
        lines = result.stdout.strip().splitlines()
        if not lines:
            raise LocalKafkaError(f"kafka-local start printed no bootstrap address:\n{result.stderr}")
        self.bootstrap_servers = lines[-1].strip()
        self.port = int(self.bootstrap_servers.rsplit(":", 1)[1])
        self.controller_port = self._read_controller_port()
        if self.sasl_ssl_dir is not None:
            self.sasl_bootstrap_servers = (self.workdir / "bootstrap_sasl").read_text().strip()
            self.sasl_port = int(self.sasl_bootstrap_servers.rsplit(":", 1)[1])
        if not self._atexit_registered:
            # Safety net for runs that end without fixture teardown (e.g. sys.exit in a plugin).
            atexit.register(self._stop_quietly)
            self._atexit_registered = True
        return self.bootstrap_servers

    def stop(self) -> None:
        """SIGTERM the broker (SIGKILL after 20 s); data and ports are kept for ``start()``."""
        self._run("stop", timeout=_STOP_TIMEOUT_S)

    def restart(self, downtime_s: float = 0.0) -> str:
        self.stop()
        if downtime_s > 0:
            time.sleep(downtime_s)
        return self.start()

    def is_running(self) -> bool:
        return self._run("status", timeout=30, check=False).returncode == 0

    def close(self) -> None:
        """Stop the broker and, if the directory was ours, delete it."""
        self._stop_quietly()
        if self._owns_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalKafka:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- introspection -----------------------------------------------------

    @property
    def log_path(self) -> Path:
        return self.workdir / "kafka.log"

    @property
    def pid(self) -> int | None:
        try:
            return int((self.workdir / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def tail_log(self, lines: int = 50) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- internals ---------------------------------------------------------

    def _run(self, *args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = os.environ.copy()
        # The readiness probe needs kafka-python: the interpreter running the tests has it.
        env.setdefault("EMBEDWATCH_PYTHON", sys.executable)
        cmd = [str(KAFKA_LOCAL), args[0], "--dir", str(self.workdir), *args[1:]]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        if check and result.returncode != 0:
            raise LocalKafkaError(
                f"{' '.join(cmd)} failed with exit code {result.returncode}:\n{result.stderr}"
            )
        return result

    def _read_controller_port(self) -> int | None:
        with contextlib.suppress(OSError):
            for line in (self.workdir / "server.properties").read_text().splitlines():
                if line.startswith("controller.quorum.voters="):
                    return int(line.rsplit(":", 1)[1])
        return None

    def _stop_quietly(self) -> None:
        if (self.workdir / "pid").exists():
            with contextlib.suppress(Exception):
                self.stop()


def docker_available(timeout_s: float = 2.0) -> bool:
    """True if a Docker daemon answers a ping; fails fast when there is none."""
    try:
        import docker  # type: ignore[import-untyped]
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=int(max(1, timeout_s)))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@contextlib.contextmanager
def _docker_kafka() -> Iterator[str]:
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:  # older testcontainers releases
        from testcontainers.kafka import KafkaContainer  # type: ignore[no-redef]

    # cp-kafka 8.1 ships Kafka 4.1, matching the local broker.
    image = os.environ.get("EMBEDWATCH_KAFKA_IMAGE", "confluentinc/cp-kafka:8.1.0")
    with KafkaContainer(image).with_kraft() as container:
        yield container.get_bootstrap_server()


@contextlib.contextmanager
def bootstrap_servers_for_tests() -> Iterator[str]:
    """Yields a bootstrap address for the test session and cleans up afterwards."""
    from_env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if from_env:
        yield from_env
        return

    mode = os.environ.get("EMBEDWATCH_TEST_KAFKA", "auto").strip().lower()
    if mode not in {"auto", "docker", "local"}:
        raise ValueError(f"EMBEDWATCH_TEST_KAFKA must be auto, docker or local, not {mode!r}")
    if mode == "docker" or (mode == "auto" and docker_available()):
        with _docker_kafka() as bootstrap:
            yield bootstrap
        return

    broker = LocalKafka()
    try:
        yield broker.start()
    finally:
        broker.close()


def create_topics(
    admin: Any, names: Iterable[str], *, partitions: int = 3, timeout_s: float = 30.0
) -> list[str]:
    """Creates topics and waits until every partition has a leader.

    The broker acknowledges a CreateTopics request before the new partitions
    are in its metadata cache; producing right away can race with that.
    """
    names = list(names)
    if hasattr(admin, "wait_for_topics"):  # kafka-python >= 3
        admin.create_topics(
            {name: {"num_partitions": partitions, "replication_factor": 1} for name in names},
            timeout_ms=int(timeout_s * 1000),
        )
        admin.wait_for_topics(names, timeout_ms=int(timeout_s * 1000))
        return names

    from kafka.admin import NewTopic

    admin.create_topics([NewTopic(name, partitions, 1) for name in names], timeout_ms=int(timeout_s * 1000))
    deadline = time.monotonic() + timeout_s
    while True:
        topics = {t["topic"]: t for t in admin.describe_topics(names)}
        if all(
            name in topics
            and topics[name]["error_code"] == 0
            and topics[name]["partitions"]
            and all(p["leader"] >= 0 for p in topics[name]["partitions"])
            for name in names
        ):
            return names
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics not ready after {timeout_s}s: {names}")
        time.sleep(0.1)


def produce_messages(bootstrap: str, topic: str, messages: Iterable[tuple[bytes | None, bytes]]) -> None:
    """Writes ``(key, value)`` messages with acks=all and waits until every one is acknowledged."""
    from kafka import KafkaProducer

    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20, batch_size=1 << 20)
    for k, v in messages:
        p.send(topic, key=k, value=v)
    p.flush(timeout=120)
    p.close()


def live_keys(bootstrap: str, topic: str) -> set[str]:
    """Keys of partition 0 of ``topic`` whose newest record is not a tombstone (e.g. the state topic)."""
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    c.assign([tp])
    c.seek_to_beginning(tp)
    end = c.end_offsets([tp])[tp]
    live: dict[str, bool] = {}
    while c.position(tp) < end:
        for recs in c.poll(timeout_ms=1000).values():
            for r in recs:
                live[r.key.decode()] = r.value is not None
    c.close()
    return {k for k, v in live.items() if v}
