"""The example Alertmanager configuration: valid, routes by severity, inhibits, templates render.

amtool is required (Debian package ``prometheus-alertmanager``): without it these tests fail
with a clear message instead of skipping.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from alerts.render import (
    ALERTMANAGER_PATH,
    TEMPLATES_GLOB,
    iter_alert_rules,
    load_alertmanager,
    load_rules,
    render_alertmanager,
)

ROOT = Path(__file__).resolve().parents[2]

PAGERDUTY = "pagerduty-embedwatch"
SLACK = "slack-embedwatch"
RECEIVER_BY_SEVERITY = {"critical": PAGERDUTY, "warning": SLACK}
CONFIG = load_alertmanager()
ALERTS = iter_alert_rules(load_rules())


def amtool() -> str:
    path = shutil.which("amtool")
    if path is None:
        pytest.fail("amtool not found on PATH: install Alertmanager's tools (Debian/Ubuntu: "
                    "`apt-get install prometheus-alertmanager`). The Alertmanager tests do not skip "
                    "without it.")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)


def routes_test(config: Path, labels: dict[str, str], expect: str | None = None) -> str:
    """Receiver(s) ``amtool config routes test`` picks for ``labels`` (verified if ``expect``)."""
    args = [amtool(), "config", "routes", "test", f"--config.file={config}"]
    if expect:
        args.append(f"--verify.receivers={expect}")
    res = run(*args, *(f"{k}={v}" for k, v in sorted(labels.items())))
    assert res.returncode == 0, f"{labels} -> {res.stdout.strip()} (expected {expect}) {res.stderr}"
    return res.stdout.strip()


def test_check_config() -> None:
    res = run(amtool(), "check-config", str(ALERTMANAGER_PATH))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout
    assert "1 templates" in res.stdout


@pytest.mark.parametrize(("severity", "receiver"), sorted(RECEIVER_BY_SEVERITY.items()))
def test_routes_by_severity(severity: str, receiver: str) -> None:
    labels = {"alertname": "Anything", "service": "embedwatch", "severity": severity,
              "model": "all-MiniLM-L6-v2", "model_version": "2024-05-01", "segment": "web-search"}
    assert routes_test(ALERTMANAGER_PATH, labels, receiver) == receiver


@pytest.mark.parametrize("rule", ALERTS, ids=lambda r: r["alert"] + "/" + r["labels"].get("cause", ""))
def test_every_alert_reaches_the_receiver_of_its_severity(rule: dict[str, Any]) -> None:
    labels = {"alertname": rule["alert"], **rule["labels"], "model": "m", "model_version": "v1"}
    expect = RECEIVER_BY_SEVERITY[rule["labels"]["severity"]]
    assert routes_test(ALERTMANAGER_PATH, labels, expect) == expect


def test_unlabelled_alert_falls_back_to_slack() -> None:
    assert routes_test(ALERTMANAGER_PATH, {"alertname": "Other"}, SLACK) == SLACK


def test_grouping() -> None:
    assert CONFIG["route"]["group_by"] == ["alertname", "model", "model_version"]


def _inhibit(source: str) -> list[dict[str, Any]]:
    return [r for r in CONFIG["inhibit_rules"] if f'alertname="{source}"' in r["source_matchers"]]


def test_severe_drift_inhibits_drift_warning_of_the_same_stream() -> None:
    (rule,) = _inhibit("EmbeddingDriftSevere")
    assert rule["target_matchers"] == ['alertname="EmbeddingDriftDetected"']
    assert sorted(rule["equal"]) == ["model", "model_version", "segment"]


def test_down_inhibits_every_other_embedwatch_alert() -> None:
    (rule,) = _inhibit("EmbedwatchDown")
    assert sorted(rule["target_matchers"]) == ['alertname!="EmbedwatchDown"', 'service="embedwatch"']
    assert not rule.get("equal")
    assert all(r["labels"]["service"] == "embedwatch" for r in ALERTS), \
        "inhibition relies on the service label of every alert"


def _receiver(name: str) -> dict[str, Any]:
    return next(r for r in CONFIG["receivers"] if r["name"] == name)


def test_pagerduty_receiver() -> None:
    (pd,) = _receiver(PAGERDUTY)["pagerduty_configs"]
    assert pd.get("routing_key") or pd.get("routing_key_file")
    assert pd["url"].startswith("https://events.pagerduty.com/v2/enqueue")
    links = " ".join(link["href"] for link in pd["links"])
    assert "embedwatch.runbook_url" in links and "embedwatch.dashboard_url" in links


def test_slack_receiver() -> None:
    (slack,) = _receiver(SLACK)["slack_configs"]
    assert slack["api_url"].startswith("https://hooks.slack.com/")
    assert slack["channel"].startswith("#")
    assert "embedwatch.title" in slack["title"]
    assert "embedwatch.text" in slack["text"]
    assert slack["send_resolved"] is True


SAMPLE = {
    "receiver": SLACK,
    "status": "firing",
    "alerts": [
        {"status": status,
         "labels": {"alertname": "EmbeddingDriftDetected", "model": "m", "model_version": "v1",
                    "segment": seg, "severity": "warning", "service": "embedwatch"},
         "annotations": {"summary": f"Embedding drift on stream m/v1/{seg}", "description": f"desc {seg}",
                         "runbook_url": "https://github.com/embedwatch/embedwatch/blob/main/docs/runbooks/"
                                        "EmbeddingDriftDetected.md",
                         "dashboard_url": f"https://grafana.example.com/d/embedwatch-stream-detail/x?seg={seg}"},
         "startsAt": "2025-01-01T00:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
         "generatorURL": "http://prometheus/graph", "fingerprint": seg}
        for seg, status in (("a", "firing"), ("b", "resolved"))
    ],
    "groupLabels": {"alertname": "EmbeddingDriftDetected", "model": "m", "model_version": "v1"},
    "commonLabels": {"alertname": "EmbeddingDriftDetected", "model": "m", "model_version": "v1",
                     "severity": "warning", "service": "embedwatch"},
    "commonAnnotations": {},
    "externalURL": "http://alertmanager:9093",
}


def render_template(name: str, tmp_path: Path) -> str:
    data = tmp_path / "data.json"
    data.write_text(json.dumps(SAMPLE), encoding="utf-8")
    res = run(amtool(), "template", "render", f"--template.glob={TEMPLATES_GLOB}",
              f"--template.data={data}", f'--template.text={{{{ template "{name}" . }}}}')
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def test_templates_render_links(tmp_path: Path) -> None:
    title = render_template("embedwatch.title", tmp_path)
    assert title.startswith("[FIRING:1] EmbeddingDriftDetected m/v1")
    text = render_template("embedwatch.text", tmp_path)
    for seg in ("a", "b"):
        assert f"Embedding drift on stream m/v1/{seg}" in text
        assert f"<https://grafana.example.com/d/embedwatch-stream-detail/x?seg={seg}|Dashboard>" in text
    assert text.count("/docs/runbooks/EmbeddingDriftDetected.md|Runbook>") == 2
    plain = render_template("embedwatch.plain", tmp_path)
    assert "[FIRING] Embedding drift on stream m/v1/a: desc a" in plain
    assert "[RESOLVED] Embedding drift on stream m/v1/b: desc b" in plain
    assert "dashboard: https://grafana.example.com/d/embedwatch-stream-detail/x?seg=b" in plain
    assert render_template("embedwatch.runbook_url", tmp_path).strip().endswith("EmbeddingDriftDetected.md")
    assert render_template("embedwatch.dashboard_url", tmp_path).strip().endswith("seg=a")
    assert render_template("embedwatch.pagerduty.severity", tmp_path).strip() == "warning"
    assert render_template("embedwatch.slack.color", tmp_path).strip() == "warning"


def test_render_alertmanager_points_receivers_at_test_endpoints(tmp_path: Path) -> None:
    text = render_alertmanager("http://127.0.0.1:18080/slack", "http://127.0.0.1:18080/pagerduty",
                               group_wait="1s", group_interval="2s", repeat_interval="1h")
    cfg = yaml.safe_load(text)
    assert cfg["route"]["group_wait"] == "1s" and cfg["route"]["group_interval"] == "2s"
    (pd,) = next(r for r in cfg["receivers"] if r["name"] == PAGERDUTY)["pagerduty_configs"]
    assert pd["url"] == "http://127.0.0.1:18080/pagerduty" and pd["routing_key"]
    assert "routing_key_file" not in pd
    (slack,) = next(r for r in cfg["receivers"] if r["name"] == SLACK)["slack_configs"]
    assert slack["api_url"] == "http://127.0.0.1:18080/slack"
    assert cfg["inhibit_rules"] == CONFIG["inhibit_rules"]
    path = tmp_path / "am.yml"  # written elsewhere: the template glob must be absolute
    path.write_text(text, encoding="utf-8")
    res = run(amtool(), "check-config", str(path))
    assert res.returncode == 0 and "1 templates" in res.stdout, res.stdout + res.stderr
    for severity, receiver in RECEIVER_BY_SEVERITY.items():
        routes_test(path, {"alertname": "X", "service": "embedwatch", "severity": severity}, receiver)
