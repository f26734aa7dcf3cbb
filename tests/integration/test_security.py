"""Issue acceptance for security: Kafka over SASL_SSL (SCRAM-SHA-512, verified TLS) with both client
backends, failures that are visible (not ready, logged), the admin token on every mutation, and no
secret in /metrics, /api/*, /healthz, /readyz or the log, even at DEBUG.

The module starts its own broker (scripts/kafka-local --sasl-ssl) with certificates made here by
openssl (a throw-away CA, a broker certificate for IP:127.0.0.1 and DNS:localhost) and keytool (the
PKCS12 truststore); the session broker is not involved.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaProducer

from embedwatch.produce import EventGenerator, GeneratorConfig
from kafka_broker import LocalKafka, create_topics
from service_proc import BIN, ServiceProcess, metric_sum

pytestmark = pytest.mark.integration

BACKENDS = ["kafka-python", "confluent"]
USER = "embedwatch"
# Random per run, so finding one in an output can only mean a leak.
PASSWORD = "pw-" + secrets.token_urlsafe(24)
WRONG_PASSWORD = "wrong-" + secrets.token_urlsafe(24)
ADMIN_TOKEN = "tok-" + secrets.token_urlsafe(32)
WRONG_TOKEN = "bad-" + secrets.token_urlsafe(32)
SECRETS = (PASSWORD, WRONG_PASSWORD, ADMIN_TOKEN, WRONG_TOKEN)
EVENTS = 600
DIM = 16


@dataclass
class SecureKafka:
    plaintext: str  # admin / test tooling only
    sasl_ssl: str
    cafile: Path
    other_cafile: Path  # a CA that did not sign the broker's certificate
    broker: LocalKafka


def _run(*cmd: str | Path, cwd: Path) -> None:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({r.returncode}): {r.stderr[-2000:]}")


def _make_ca(d: Path, name: str) -> None:
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
         "-subj", f"/CN=embedwatch test {name}", "-keyout", f"{name}.key", "-out", f"{name}.pem",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         cwd=d)


def make_certificates(d: Path, store_password: str) -> None:
    """CA, broker key + certificate (SAN IP:127.0.0.1, DNS:localhost) as broker.p12, CA truststore."""
    _make_ca(d, "ca")
    _make_ca(d, "other-ca")
    _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-sha256", "-subj", "/CN=localhost",
         "-keyout", "broker.key", "-out", "broker.csr", cwd=d)
    (d / "broker.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _run("openssl", "x509", "-req", "-sha256", "-days", "2", "-in", "broker.csr", "-CA", "ca.pem",
         "-CAkey", "ca.key", "-CAcreateserial", "-extfile", "broker.ext", "-out", "broker.pem", cwd=d)
    (d / "store.password").write_text(store_password + "\n")
    _run("openssl", "pkcs12", "-export", "-name", "broker", "-in", "broker.pem", "-inkey", "broker.key",
         "-certfile", "ca.pem", "-passout", "file:store.password", "-out", "broker.p12", cwd=d)
    _run("keytool", "-importcert", "-noprompt", "-alias", "ca", "-file", "ca.pem", "-storetype", "PKCS12",
         "-keystore", "truststore.p12", "-storepass", store_password, cwd=d)


@pytest.fixture(scope="module")
def secure_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureKafka]:
    for tool in ("openssl", "keytool", "java"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found")
    root = tmp_path_factory.mktemp("secure-kafka")
    certs = root / "certs"
    certs.mkdir()
    t0 = time.monotonic()
    make_certificates(certs, secrets.token_urlsafe(16))
    (certs / "scram-users").write_text(f"{USER}={PASSWORD}\n")
    broker = LocalKafka(root / "kafka", sasl_ssl_dir=certs)
    try:
        plaintext = broker.start()
        assert broker.sasl_bootstrap_servers and broker.sasl_bootstrap_servers != plaintext
        print(f"secure broker up in {time.monotonic() - t0:.1f}s: {broker.sasl_bootstrap_servers}")
        yield SecureKafka(plaintext, broker.sasl_bootstrap_servers, certs / "ca.pem",
                          certs / "other-ca.pem", broker)
    finally:
        broker.close()


def _producer(kafka: SecureKafka) -> KafkaProducer:
    """A producer that itself goes through SASL_SSL, verifying the broker's certificate and name."""
    return KafkaProducer(bootstrap_servers=kafka.sasl_ssl, security_protocol="SASL_SSL",
                         sasl_mechanism="SCRAM-SHA-512", sasl_plain_username=USER,
                         sasl_plain_password=PASSWORD, ssl_cafile=str(kafka.cafile),
                         ssl_check_hostname=True, acks="all", linger_ms=10)


def _topics(kafka: SecureKafka, prefix: str) -> tuple[str, str]:
    names = [f"{prefix}-embeddings", f"{prefix}-queries", f"{prefix}-embeddings.dlq", f"{prefix}-queries.dlq"]
    admin = KafkaAdminClient(bootstrap_servers=kafka.plaintext, client_id="test-security-admin")
    try:
        create_topics(admin, names, partitions=2)
    finally:
        admin.close()
    return names[0], names[1]


def _config(kafka: SecureKafka, backend: str, prefix: str, cafile: Path | None = None) -> dict[str, Any]:
    """No secret in here: the password and the token come from the environment."""
    emb, qry = f"{prefix}-embeddings", f"{prefix}-queries"
    return {
        "kafka": {"bootstrap_servers": kafka.sasl_ssl, "backend": backend, "group_id": f"{prefix}-group",
                  "embeddings_topic": emb, "queries_topic": qry, "max_poll_records": 200,
                  "session_timeout_ms": 6000, "security_protocol": "SASL_SSL",
                  "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": USER,
                  "ssl_cafile": str(cafile or kafka.cafile), "ssl_check_hostname": True},
        "detection": {"reference_size": 100, "window_events": 100, "min_window_events": 91, "evaluate_every": 50},
        "state": {"backend": "none"},
        "log_level": "DEBUG",
    }


def _env(password: str) -> dict[str, str]:
    return {"EMBEDWATCH_KAFKA__SASL_PASSWORD": password, "EMBEDWATCH_HTTP__ADMIN_TOKEN": ADMIN_TOKEN}


def _assert_no_secret(where: str, data: bytes | str) -> None:
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    for s in SECRETS:
        assert s not in text, f"a secret leaked into {where}"


def _prefix(name: str) -> str:
    return f"sec-{re.sub(r'[^a-z0-9]+', '-', name.lower())}-{secrets.token_hex(4)}"


@dataclass
class Running:
    svc: ServiceProcess
    backend: str
    streams: list[str]
    bodies: dict[str, bytes]  # every response the tests saw, checked for secrets at the end


@pytest.fixture(scope="module", params=BACKENDS)
def running(request: pytest.FixtureRequest, secure_kafka: SecureKafka,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """``embedwatch run`` over SASL_SSL at DEBUG log level, after it consumed EVENTS events."""
    backend = request.param
    prefix = _prefix(backend)
    emb, _ = _topics(secure_kafka, prefix)
    producer = _producer(secure_kafka)
    try:
        for key, value in EventGenerator(GeneratorConfig(streams=2, dim=DIM, seed=11)).messages(EVENTS):
            producer.send(emb, key=key, value=value)
        producer.flush(timeout=60)
    finally:
        producer.close()
    workdir = tmp_path_factory.mktemp(f"svc-{backend}")
    svc = ServiceProcess(workdir, _config(secure_kafka, backend, prefix), name=backend, env=_env(PASSWORD))
    t0 = time.monotonic()
    try:
        svc.start(timeout=90)
        svc.wait_for(lambda m: metric_sum(m, "embedwatch_consumed_events_total") >= EVENTS, timeout=120,
                     what=f"{EVENTS} events consumed over SASL_SSL")
        print(f"{backend}: ready and drained in {time.monotonic() - t0:.1f}s")
        status, body = svc.get("/api/streams")
        assert status == 200
        yield Running(svc, backend, sorted(json.loads(body)["streams"]), {})
    finally:
        svc.close()


def test_config_file_holds_no_secret(running: Running) -> None:
    _assert_no_secret("the generated config file", running.svc.config_path.read_text())


def test_consumes_over_sasl_ssl(running: Running) -> None:
    time.sleep(1.0)  # nothing more may arrive: exactly the produced events are accounted for
    m = running.svc.metrics()
    accepted = metric_sum(m, "embedwatch_consumed_events_total", outcome="accepted")
    dead = metric_sum(m, "embedwatch_consumed_events_total", outcome="dead_lettered")
    assert (accepted, dead) == (EVENTS, 0)
    assert metric_sum(m, "embedwatch_events_total") == EVENTS
    assert metric_sum(m, "embedwatch_kafka_connected") == 1
    assert len(running.streams) == 2
    assert running.svc.get("/readyz")[0] == 200


def test_mutations_need_the_admin_token(running: Running) -> None:
    svc, stream = running.svc, running.streams[0]
    for action in ("promote", "rollback"):
        path = f"/api/baselines/{stream}/{action}"
        no_token = svc.request("POST", path, b"{}", {"Content-Type": "application/json"})
        not_bearer = svc.request("POST", path, b"{}", {"Authorization": f"Basic {ADMIN_TOKEN}"})
        wrong = svc.request("POST", path, b"{}", {"Authorization": f"Bearer {WRONG_TOKEN}"})
        prefix = svc.request("POST", path, b"{}", {"Authorization": f"Bearer {ADMIN_TOKEN[:-1]}"})
        assert no_token[0] == 401, no_token
        assert not_bearer[0] == 401, not_bearer
        assert wrong[0] == 403, wrong
        assert prefix[0] == 403, prefix
        for name, (_, body) in (("no_token", no_token), ("not_bearer", not_bearer), ("wrong", wrong),
                                ("prefix", prefix)):
            running.bodies[f"POST {action} {name}"] = body
    # Refused requests changed nothing: the stream still has its first, automatic baseline.
    status, body = svc.get(f"/api/baselines/{stream}")
    assert status == 200
    running.bodies["GET /api/baselines/<stream> after refused"] = body
    before = body
    # The right token is accepted.
    status, body = svc.request("POST", f"/api/baselines/{stream}/promote", b"{}",
                               {"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"})
    running.bodies["POST promote with token"] = body
    # 202: the stream now collects the events of its new baseline (none arrive in this test).
    assert status == 202, body
    assert json.loads(body)["status"] == "collecting"
    status, streams = svc.get("/api/streams")
    assert status == 200
    promotion = json.loads(streams)["streams"][stream]["promotion"]
    assert promotion is not None and promotion["events"] == 0 and promotion["needed"] >= 50
    running.bodies["GET /api/streams after promote"] = streams
    status, after = svc.get(f"/api/baselines/{stream}")
    assert status == 200 and after == before  # the current baseline stays until the new one is built


def test_no_secret_in_endpoints_or_log(running: Running) -> None:
    svc = running.svc
    paths = ["/metrics", "/healthz", "/readyz", "/api/streams", "/api/baselines",
             *(f"/api/baselines/{s}" for s in running.streams)]
    for path in paths:
        status, body = svc.get(path)
        assert status == 200, (path, status)
        running.bodies[f"GET {path}"] = body
    for where, body in running.bodies.items():
        _assert_no_secret(where, body)
    log = svc.log_path.read_text(errors="replace")
    # The log really is a DEBUG log of a SASL_SSL session, not an empty file.
    assert " DEBUG " in log
    # The Kafka clients stay at WARNING even then: kafka-python's DEBUG output holds the SASL
    # exchange (with PLAIN: the password itself) and raw record bytes.
    assert " DEBUG kafka." not in log
    _assert_no_secret(f"the service log ({svc.log_path})", log)
    # Neither does the process list show a secret (it came in through the environment).
    _assert_no_secret("the command line", repr(svc.proc.args) if svc.proc else "")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("failure", ["wrong_password", "untrusted_ca"])
def test_refused_connection_is_not_ready_and_logged(failure: str, backend: str, secure_kafka: SecureKafka,
                                                     tmp_path: Path) -> None:
    """A wrong password or a broker certificate from another CA: the process stays up, /readyz says
    503, the log says why, and shows no password; SIGTERM still stops it cleanly."""
    prefix = _prefix(f"{failure}-{backend}")
    _topics(secure_kafka, prefix)
    cafile = secure_kafka.other_cafile if failure == "untrusted_ca" else None
    password = WRONG_PASSWORD if failure == "wrong_password" else PASSWORD
    svc = ServiceProcess(tmp_path, _config(secure_kafka, backend, prefix, cafile), name=failure,
                         env=_env(password))
    expected = {
        "wrong_password": re.compile(r"authentication (failed|error)", re.I),
        "untrusted_ca": re.compile(r"certificate verify failed", re.I),
    }[failure]
    try:
        svc.start(wait_ready=False)
        deadline = time.monotonic() + 60
        while not expected.search(svc.log_path.read_text(errors="replace")):
            assert svc.proc is not None and svc.proc.poll() is None, f"service exited:\n{svc.tail()}"
            assert time.monotonic() < deadline, f"no {failure} error logged:\n{svc.tail()}"
            time.sleep(0.3)
        # Keeps refusing readiness while it retries; for kafka-python, past the end of two bootstrap
        # attempts (5 s each), where the client constructor gives up and the service used to die.
        seen = []
        end = time.monotonic() + (12 if backend == "kafka-python" else 6)
        while time.monotonic() < end:
            assert svc.proc is not None and svc.proc.poll() is None, f"service exited:\n{svc.tail()}"
            try:
                status, body = svc.get("/readyz")
            except OSError:
                status, body = -1, b""  # HTTP port not open yet
            seen.append(status)
            _assert_no_secret("/readyz", body)
            time.sleep(0.5)
        assert 200 not in seen and 503 in seen, seen
        status, body = svc.get("/healthz")
        assert status == 200, "the loop keeps running while the broker refuses it"
        m = svc.metrics()
        assert metric_sum(m, "embedwatch_kafka_connected") == 0
        assert metric_sum(m, "embedwatch_ready") == 0
        _assert_no_secret("/metrics", svc.get("/metrics")[1])
        code, _ = svc.terminate(timeout=30)
        assert code == 0, svc.tail()
        log = svc.log_path.read_text(errors="replace")
        _assert_no_secret(f"the service log ({svc.log_path})", log)
        assert "Traceback" not in log, svc.tail(80)
    finally:
        svc.close()


def test_config_errors_mask_secrets(tmp_path: Path) -> None:
    """A config error echoes what it got; for a section-level error that is the whole section,
    which must not carry the password (the service log of a crash-looping pod is read by many)."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("kafka:\n  security_protocol: SASL_SSL\n  sasl_username: embedwatch\n"
                   "http:\n  port: 70000\n")
    r = subprocess.run([BIN, "run", "--config", str(cfg)], capture_output=True, text=True, timeout=60,
                       env={"PATH": "/usr/bin:/bin", **_env(PASSWORD)})
    assert r.returncode == 2
    assert "kafka:" in r.stderr and "sasl_mechanism" in r.stderr and "http.port" in r.stderr
    assert "'sasl_password': '**********'" in r.stderr
    _assert_no_secret("a configuration error", r.stdout + r.stderr)
