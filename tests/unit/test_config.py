from __future__ import annotations

from pathlib import Path

import pytest

from embedwatch.config import ConfigError, load_settings, settings_reference_markdown

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
