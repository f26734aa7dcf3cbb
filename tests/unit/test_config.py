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
    d = DetectionSettings(window_events=100, buckets=10, min_window_events=100, evaluate_every=10,
                          alarm_end_evaluations=2, scan_every=20)
    assert (d.window_events, d.min_window_events) == (100, 100)
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
