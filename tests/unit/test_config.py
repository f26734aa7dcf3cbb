from __future__ import annotations

from pathlib import Path

import pytest

from embedwatch.config import ConfigError, DetectionSettings, load_settings, settings_reference_markdown

ROOT = Path(__file__).resolve().parents[2]


def test_file_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("kafka:\n  group_id: g1\n  bootstrap_servers: a:1\ndetection:\n  reference_size: 500\n")
    monkeypatch.setenv("EMBEDWATCH_KAFKA__BOOTSTRAP_SERVERS", "b:2")
    s = load_settings(f)
    assert s.kafka.group_id == "g1"
    assert s.kafka.bootstrap_servers == "b:2"  # env wins over the file
    assert s.detection.reference_size == 500


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("kafka:\n  max_poll_records: -5\n", "kafka.max_poll_records"),
        ("kafka:\n  bootstrap_server: x\n", "kafka.bootstrap_server"),
        ("limits:\n  max_streams: lots\n", "limits.max_streams"),
        ("detection:\n  false_alarm_rate: 2\n", "detection.false_alarm_rate"),
        ("nonsense: 1\n", "nonsense"),
        ("kafka:\n  security_protocol: SASL_SSL\n", "kafka"),
    ],
)
def test_bad_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_settings(f)
    assert key in str(e.value)


def test_confluent_backend_without_its_package_is_a_config_error(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``kafka.backend: confluent`` where confluent-kafka is not installed fails at load time (so
    ``config check`` and start-up say what to install), not with an ImportError once running."""
    import importlib.util

    f = tmp_path / "c.yaml"
    f.write_text("kafka:\n  backend: confluent\n")
    assert load_settings(f).kafka.backend == "confluent"  # installed here (dev extras)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "confluent_kafka" else real(name, *a))
    with pytest.raises(ConfigError, match=r"kafka.*embedwatch\[confluent\]"):
        load_settings(f)
    f.write_text("kafka:\n  backend: kafka-python\n")
    assert load_settings(f).kafka.backend == "kafka-python"


def test_unknown_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDWATCH_KAFKA__GROUPID", "x")
    with pytest.raises(ConfigError, match="EMBEDWATCH_KAFKA__GROUPID"):
        load_settings(None)


def test_bad_env_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDWATCH_HTTP__PORT", "99999")
    with pytest.raises(ConfigError, match=r"http\.port"):
        load_settings(None)


def test_secrets_are_not_printed(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("http:\n  admin_token: s3cret-token\n")
    s = load_settings(f)
    assert "s3cret-token" not in repr(s) and "s3cret-token" not in s.model_dump_json()


def test_configuration_doc_is_current() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == settings_reference_markdown(), "run `make docs` to regenerate docs/configuration.md"


def test_low_memory_profile_keeps_the_default_windows() -> None:
    """profiles/low-memory.yaml loads, changes only the detection keys its comments describe (each
    one lower than its default), and leaves the windows and every other section at their defaults:
    docs/benchmarks.md measures its memory and its detection against those defaults."""
    from embedwatch.config import DetectionSettings, Settings

    s = load_settings(ROOT / "profiles" / "low-memory.yaml")
    d, default = s.detection, DetectionSettings()
    lowered = {"scan_components", "scan_windows", "version_solo_probe_size", "duplicate_window"}
    changed = {k for k in DetectionSettings.model_fields if getattr(d, k) != getattr(default, k)}
    assert changed == lowered
    assert d.scan_components < default.scan_components
    assert max(d.scan_windows) < max(default.scan_windows) and set(d.scan_windows) < set(default.scan_windows)
    assert d.version_solo_probe_size < default.version_solo_probe_size
    assert d.duplicate_window < default.duplicate_window
    assert s.model_dump(exclude={"detection"}) == Settings().model_dump(exclude={"detection"})


@pytest.mark.parametrize(
    ("detection", "words"),
    [
        # A ring of 100 buckets of 1 event held 100 events for a bound of 50; 95 / 10 held 82-90.
        ({"window_events": 50, "buckets": 100}, ["window_events (50)", "multiple of buckets (100)"]),
        ({"window_events": 95, "buckets": 10}, ["window_events (95)", "multiple of buckets (10)"]),
        # The multivariate test would never run: detection silently off.
        ({"window_events": 50, "buckets": 10}, ["min_window_events (100)", "window_events (50)"]),
        # A full window holds 901 events after it drops a bucket for a new one: with reference_size
        # 1050 every evaluation came right after, and no MMD test ever ran.
        ({"reference_size": 1050, "window_events": 1000, "min_window_events": 1000},
         ["min_window_events (1000)", "window_events (1000)", "buckets (10)", "= 901"]),
        ({"window_events": 100, "buckets": 10, "min_window_events": 92}, ["min_window_events (92)", "= 91"]),
        # Quiet evaluations with no scan point between them ended a loud alarm, which then restarted.
        ({"evaluate_every": 5, "alarm_end_evaluations": 2}, ["evaluate_every * alarm_end_evaluations (5 * 2)",
                                                             "scan_every (20)"]),
    ],
)
def test_settings_that_break_the_window_or_the_alarm_policy_are_refused(
        tmp_path: Path, detection: dict[str, int], words: list[str]) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("detection:\n" + "".join(f"  {k}: {v}\n" for k, v in detection.items()))
    with pytest.raises(ConfigError) as e:
        load_settings(f)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_the_checks_of_combined_settings_accept_their_bounds() -> None:
    d = DetectionSettings(window_events=100, buckets=10, min_window_events=91, evaluate_every=10,
                          alarm_end_evaluations=2, scan_every=20)
    assert (d.window_events, d.min_window_events) == (100, 91)
    assert DetectionSettings(evaluate_every=1, alarm_end_evaluations=2, scan_windows=[]).scan_windows == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("EMBEDWATCH_DETECTION__SCAN_WINDOWS", "abc"),  # a list is JSON
        ("EMBEDWATCH_DETECTION", '{"reference_size":'),  # a section as truncated JSON
    ],
)
def test_unparseable_env_value_is_a_config_error_naming_the_variable(
        monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=rf"\(environment\): {name}: cannot parse") as e:
        load_settings(None)
    assert value not in str(e.value)  # values are not echoed: a section may hold a secret


def test_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_bytes(b"\xff\xfe\x00k\x00a\x00f\x00k\x00a")
    with pytest.raises(ConfigError, match=r"c\.yaml is not UTF-8 text"):
        load_settings(f)


def _monitor_evaluations(min_window_events: int, validate: bool = True) -> list[int]:
    """The events after which a stream's MMD test ran: a 400-event window of 4 buckets, reference
    499 events, an evaluation every 100, so each evaluation comes one event after a bucket opens."""
    import numpy as np

    from embedwatch.events import StreamKey
    from embedwatch.monitor import StreamMonitor

    kw = dict(reference_size=499, window_events=400, buckets=4, reservoir_per_bucket=50, evaluate_every=100,
              min_window_events=min_window_events, baseline_sample=400, rff_features=32, histogram_bins=16,
              scan_windows=[])
    d = DetectionSettings(**kw) if validate else DetectionSettings.model_construct(**kw)  # type: ignore[arg-type]
    m = StreamMonitor(StreamKey("m", "v1"), d)
    x = np.random.default_rng(3).normal(size=(1700, 8)).astype(np.float32)
    ran = []
    for a in range(0, x.shape[0], 50):  # at most one evaluation per batch
        before = m._last_eval
        m.update_embeddings(x[a : a + 50], np.arange(a, a + 50, dtype=np.float64), np.full(50, np.nan), None)
        if a + 50 >= 900 and (a + 50) % 100 == 0:
            assert m.measures()["window_events"] == 301  # 3 full buckets and the first event of a new one
        if m._last_eval != before:
            assert m._last_eval is not None
            ran.append(m._last_eval[0])
    return ran


def test_min_window_events_up_to_the_fewest_a_full_window_holds_runs_the_drift_test() -> None:
    # window_events - window_events / buckets + 1 = 301: every evaluation once 301 events are in
    assert _monitor_evaluations(301) == list(range(799, 1700, 100))
    assert _monitor_evaluations(302, validate=False) == []  # one more and the test never runs
    with pytest.raises(ValueError, match=r"min_window_events \(302\).*= 301"):
        _monitor_evaluations(302)


def test_default_and_profile_settings_satisfy_the_combined_checks() -> None:
    from embedwatch.config import Settings

    for s in (Settings(), load_settings(ROOT / "profiles" / "low-memory.yaml")):
        d = s.detection
        assert d.min_window_events <= d.window_events - d.window_events // d.buckets + 1


@pytest.mark.parametrize("source", ["file", "env"])
def test_queries_topic_equal_to_embeddings_topic_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("kafka:\n  embeddings_topic: events\n" + ("  queries_topic: events\n" if source == "file" else ""))
    if source == "env":
        monkeypatch.setenv("EMBEDWATCH_KAFKA__QUERIES_TOPIC", "events")
    with pytest.raises(ConfigError, match=r"kafka: .*queries_topic must differ from embeddings_topic \('events'\)"):
        load_settings(f)


def test_empty_queries_topic_disables_queries(monkeypatch: pytest.MonkeyPatch) -> None:
    """"" is the way to disable queries that Helm values and env vars can express (not null)."""
    from embedwatch.app import Service

    monkeypatch.setenv("EMBEDWATCH_KAFKA__QUERIES_TOPIC", "")
    s = load_settings(None)
    assert s.kafka.queries_topic == ""
    assert Service(s).decoder.query_topics == frozenset()


@pytest.mark.parametrize(
    ("kafka", "words"),
    [
        ({"ssl_cafile": "/tls/ca.crt"}, "ssl_cafile set, but security_protocol PLAINTEXT does not use TLS"),
        ({"ssl_certfile": "/c", "ssl_keyfile": "/k"}, "ssl_certfile, ssl_keyfile set"),
        ({"ssl_check_hostname": False}, "ssl_check_hostname set"),
        ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "sasl_username": "u",
          "sasl_password": "p", "ssl_cafile": "/tls/ca.crt"}, "security_protocol SASL_PLAINTEXT does not use TLS"),
        ({"sasl_username": "u"}, "sasl_username set, but security_protocol PLAINTEXT does not use SASL"),
        ({"security_protocol": "SSL", "sasl_mechanism": "PLAIN", "sasl_password": "p"},
         "sasl_mechanism, sasl_password set, but security_protocol SSL does not use SASL"),
    ],
)
def test_security_settings_the_protocol_would_ignore_are_refused(
        tmp_path: Path, kafka: dict[str, object], words: str) -> None:
    import yaml

    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"kafka": kafka}))
    with pytest.raises(ConfigError, match="kafka: ") as e:
        load_settings(f)
    assert words in str(e.value)
    assert "\n  kafka: " in str(e.value) and "'p'" not in str(e.value)  # the password is masked


def test_security_settings_of_their_protocol_are_accepted() -> None:
    from embedwatch.config import KafkaSettings

    k = KafkaSettings(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="u",
                      sasl_password="p", ssl_cafile="/ca", ssl_certfile="/c", ssl_keyfile="/k",
                      ssl_check_hostname=False)  # type: ignore[arg-type]
    assert (k.ssl_cafile, k.sasl_username, k.ssl_check_hostname) == ("/ca", "u", False)
    assert KafkaSettings(security_protocol="SSL", ssl_cafile="/ca").ssl_cafile == "/ca"
    assert KafkaSettings(ssl_cafile=None, sasl_username=None).security_protocol == "PLAINTEXT"


@pytest.mark.parametrize("name", ["EMBEDWATCH_LOG_LEVEL__DEBUG", "EMBEDWATCH_SHUTDOWN_TIMEOUT_S__X",
                                  "EMBEDWATCH_KAFKA__GROUP_ID__X"])
def test_env_key_nested_under_a_scalar_is_refused(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "1")
    with pytest.raises(ConfigError, match=rf"\(environment\): {name}: unknown key .* is not a section"):
        load_settings(None)


def test_variables_of_the_project_scripts_do_not_stop_the_service(monkeypatch: pytest.MonkeyPatch) -> None:
    """scripts/kafka-local and the demo document EMBEDWATCH_* variables that are not settings; a
    shell that exported one must still start the service, while a misspelt setting stays an error."""
    import re

    from embedwatch.config import TOOLING_ENV

    root = Path(__file__).resolve().parents[2]
    used = set()
    for path in [*(root / "scripts").iterdir(), root / "Makefile", root / "tests" / "conftest.py"]:
        if path.is_file():
            used |= set(re.findall(r"\bEMBEDWATCH_[A-Z0-9_]*[A-Z0-9]\b", path.read_text(errors="replace")))
    tooling = {n for n in used if "__" not in n}
    assert tooling, "expected the scripts to document EMBEDWATCH_* variables"
    assert tooling <= TOOLING_ENV, sorted(tooling - TOOLING_ENV)
    for name in sorted(tooling):
        monkeypatch.setenv(name, "x")
    assert load_settings(None).kafka.embeddings_topic == "embeddings"
    monkeypatch.setenv("EMBEDWATCH_KAFKA_BOOTSTRAP_SERVERS", "b:9092")  # one underscore: a typo
    with pytest.raises(ConfigError, match="EMBEDWATCH_KAFKA_BOOTSTRAP_SERVERS: unknown key"):
        load_settings(None)


def test_http_port_zero_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod's container port and probes need a fixed port; 0 would bind a random one."""
    monkeypatch.setenv("EMBEDWATCH_HTTP__PORT", "0")
    with pytest.raises(ConfigError, match=r"http\.port: Input should be greater than or equal to 1"):
        load_settings(None)
    monkeypatch.setenv("EMBEDWATCH_HTTP__PORT", "1")
    assert load_settings(None).http.port == 1


def test_kafka_backend_description_names_the_accepted_values() -> None:
    import typing

    from embedwatch.config import KafkaSettings

    field = KafkaSettings.model_fields["backend"]
    values = typing.get_args(field.annotation)
    assert values == ("kafka-python", "confluent")
    assert all(f"`{v}`" in (field.description or "") for v in values), field.description


def _post_status(port: int, authorization: str | None) -> int:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        req = "POST /api/baselines/m/1/default/rollback HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
        if authorization is not None:
            req += f"Authorization: {authorization}\r\n"
        c.sendall((req + "Connection: close\r\n\r\n").encode())
        resp = b""
        while chunk := c.recv(4096):
            resp += chunk
    return int(resp.split(b" ", 2)[1])


@pytest.mark.parametrize(("raw", "token"), [("\n", None), ("  \t\n", None), (" s3cret\n", "s3cret")])
def test_blank_admin_token_refuses_mutations_through_the_api(
        monkeypatch: pytest.MonkeyPatch, raw: str, token: str | None) -> None:
    """A Secret holding only a newline is no token: `Authorization: Bearer ` is refused."""
    from prometheus_client import CollectorRegistry

    from embedwatch.api import Backend, HttpServer

    monkeypatch.setenv("EMBEDWATCH_HTTP__ADMIN_TOKEN", raw)
    s = load_settings(None)
    got = s.http.admin_token.get_secret_value() if s.http.admin_token else None  # as `embedwatch run`
    assert got == token
    calls: list[object] = []
    backend = Backend(registry=CollectorRegistry(), healthy=lambda: True, ready=lambda: True,
                      streams=lambda: {}, baselines=lambda st: [],
                      promote=lambda k, b, e: calls.append(k) or {},
                      rollback=lambda k: calls.append(k) or {"ok": True}, admin_token=got)
    srv = HttpServer(backend, "127.0.0.1", 0)
    srv.start()
    try:
        assert _post_status(srv.port, None) == 401
        assert _post_status(srv.port, "Bearer ") == 403
        assert _post_status(srv.port, "Bearer x") == 403
        assert calls == []
        if token is not None:
            assert _post_status(srv.port, f"Bearer {token}") == 200 and len(calls) == 1
    finally:
        srv.stop()
