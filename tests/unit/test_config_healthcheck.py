"""The image's HEALTHCHECK probes the port the service is configured to listen on (http.port of
the mounted config file, or EMBEDWATCH_HTTP__PORT), not a fixed 9108."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from embedwatch.api import Backend, HttpServer

ROOT = Path(__file__).resolve().parents[2]
IMAGE_CONFIG = "/etc/embedwatch/config.yaml"


def healthcheck_command() -> list[str]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    m = re.search(r"^HEALTHCHECK\s.*?\bCMD\s+(\[.*\])\s*$", text, re.M)
    assert m, "the Dockerfile has no exec-form HEALTHCHECK"
    return list(json.loads(m.group(1)))


@pytest.fixture()
def service(request: pytest.FixtureRequest) -> Iterator[HttpServer]:
    healthy = bool(getattr(request, "param", True))
    backend = Backend(registry=CollectorRegistry(), healthy=lambda: healthy, ready=lambda: True,
                      streams=lambda: {}, baselines=lambda st: [], promote=lambda k, b, e: {},
                      rollback=lambda k: {}, admin_token=None)
    srv = HttpServer(backend, "127.0.0.1", 0)
    srv.start()
    yield srv
    srv.stop()


def run_healthcheck(config: Path, env: dict[str, str] | None = None) -> int:
    cmd = healthcheck_command()
    assert cmd[0] == "python" and any(IMAGE_CONFIG in part for part in cmd), cmd
    cmd = [sys.executable, *(part.replace(IMAGE_CONFIG, str(config)) for part in cmd[1:])]
    full = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDWATCH_")}
    full.update(env or {})
    return subprocess.run(cmd, env=full, capture_output=True, timeout=60).returncode


def test_healthcheck_probes_the_configured_port(service: HttpServer, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"http:\n  port: {service.port}\n", encoding="utf-8")
    assert run_healthcheck(config) == 0
    # EMBEDWATCH_HTTP__PORT wins over the file, as in the service (nothing listens on port 1)
    assert run_healthcheck(config, {"EMBEDWATCH_HTTP__PORT": "1"}) != 0
    config.write_text("http:\n  port: 1\n", encoding="utf-8")
    assert run_healthcheck(config) != 0
    assert run_healthcheck(config, {"EMBEDWATCH_HTTP__PORT": str(service.port)}) == 0


@pytest.mark.parametrize("service", [False], indirect=True)
def test_healthcheck_fails_when_the_service_is_unhealthy(service: HttpServer, tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"http:\n  port: {service.port}\n", encoding="utf-8")
    assert run_healthcheck(config) != 0


def test_healthcheck_without_the_config_file_takes_the_environment(service: HttpServer, tmp_path: Path) -> None:
    """A container started with another --config (nothing at the image's path) is not unhealthy
    for good: the check reads the port as the service would without a file."""
    missing = tmp_path / "absent.yaml"
    assert run_healthcheck(missing, {"EMBEDWATCH_HTTP__PORT": str(service.port)}) == 0
    assert run_healthcheck(missing, {"EMBEDWATCH_HTTP__PORT": "1"}) != 0
