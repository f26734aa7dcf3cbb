"""Alerts end to end: embedwatch -> Prometheus (rendered rules) -> Alertmanager -> Slack / PagerDuty.

The scenario (e2e_stack.py): a mean shift on ``model-1`` must reach the Slack receiver as the
warning ``EmbeddingDriftDetected``; a dimension change on ``model-2`` must page through the
PagerDuty receiver as the critical ``EmbeddingDimensionMismatch``; the undrifted control stream
``model-0`` must not raise anything, in Prometheus, in Alertmanager or at the receivers.
"""

from __future__ import annotations

import json
import math
import time
from datetime import datetime
from typing import Any

import pytest
from e2e_stack import (
    CONTROL,
    DIMENSION,
    DRIFT,
    GRAFANA_URL,
    E2ERun,
    Notification,
    wait_until,
)

pytestmark = pytest.mark.e2e

ALERT_TIMEOUT_S = 180.0   # from fault injection to the notification at the receiver
QUIET_AFTER_S = 30.0      # the control stream is judged at least this long after the injection
RUNBOOKS = "https://github.com/embedwatch/embedwatch/blob/main/docs/runbooks/"
ROUTING_KEY = "embedwatch-e2e-routing-key"


def _stream(labels: dict[str, str]) -> str:
    return f"{labels['model']}/{labels['model_version']}"


def _slack_match(n: Notification, alertname: str, labels: dict[str, str]) -> bool:
    if not isinstance(n.body, dict):
        return False
    return any(str(a.get("title", "")).startswith("[FIRING")
               and str(a.get("title", "")).split("] ", 1)[-1] == f"{alertname} {_stream(labels)}"
               for a in n.body.get("attachments", []))


def _pagerduty_match(n: Notification, alertname: str, labels: dict[str, str]) -> bool:
    if not isinstance(n.body, dict) or n.body.get("event_action") != "trigger":
        return False
    summary = str(n.body.get("payload", {}).get("summary", ""))
    return summary.startswith("[FIRING") and summary.split("] ", 1)[-1] == f"{alertname} {_stream(labels)}"


def _wait_notification(run: E2ERun, path: str, alertname: str, labels: dict[str, str]) -> Notification:
    """The first notification for ``alertname`` of the stream at ``path`` (bounded wait)."""
    match = _slack_match if path == "/slack" else _pagerduty_match
    key = f"{path} {alertname} {_stream(labels)}"
    deadline = run.t_inject + ALERT_TIMEOUT_S

    def found() -> Notification | None:
        return next((n for n in run.receiver.notifications(path) if match(n, alertname, labels)), None)

    note: Notification = wait_until(found, max(1.0, deadline - time.monotonic()),
                                    f"{alertname} for {_stream(labels)} at the {path} receiver",
                                    interval=0.5, diagnostics=run.diagnostics)
    run.timeline.setdefault(f"{key} (s after injection)", run.since_inject(note.at))
    print(f"\n{key}: received {run.since_inject(note.at):.1f}s after the faults were injected")
    for a in run.prometheus.alerts():
        if a["labels"].get("alertname") == alertname and a["labels"].get("model") == labels["model"]:
            active = datetime.fromisoformat(a["activeAt"][:26].rstrip("Z") + "+00:00").timestamp()
            assert run.producer.t_inject_wall is not None
            run.timeline.setdefault(f"{alertname} {_stream(labels)} active in Prometheus (s after injection)",
                                    active - run.producer.t_inject_wall)
    return note


def _am_alert(run: E2ERun, alertname: str, labels: dict[str, str], absent: tuple[str, ...] = ()) -> dict[str, Any]:
    for a in run.alertmanager.alerts():
        lab = a["labels"]
        if (lab.get("alertname") == alertname and all(lab.get(k) == v for k, v in labels.items())
                and not any(k in lab for k in absent)):
            return a
    pytest.fail(f"{alertname} {labels} not in Alertmanager's alerts{run.diagnostics()}", pytrace=False)


def _prom_alert(run: E2ERun, alertname: str, labels: dict[str, str], absent: tuple[str, ...] = ()) -> dict[str, Any]:
    for a in run.prometheus.alerts():
        lab = a["labels"]
        if (lab.get("alertname") == alertname and all(lab.get(k) == v for k, v in labels.items())
                and not any(k in lab for k in absent)):
            return a
    pytest.fail(f"{alertname} {labels} not in Prometheus' alerts{run.diagnostics()}", pytrace=False)


def test_drift_warning_reaches_slack(e2e: E2ERun) -> None:
    note = _wait_notification(e2e, "/slack", "EmbeddingDriftDetected", DRIFT)
    diag = e2e.diagnostics
    body = note.body
    att = body["attachments"][0]
    assert body.get("channel") == "#embedwatch-alerts", diag()
    assert att["color"] == "warning", f"warning severity is drawn in 'warning' colour: {att}{diag()}"
    # The shift moves the stream's query embeddings too: their alert (cause="query_embeddings")
    # joins the group (alertname, model, model_version) when it fires before the group is sent.
    assert att["title"] in (f"[FIRING:{n}] EmbeddingDriftDetected {_stream(DRIFT)}" for n in (1, 2)), diag()
    text = att["text"]
    for needle in (f"Embedding drift on stream {DRIFT['model']}/{DRIFT['model_version']}/{DRIFT['segment']}",
                   f"model={DRIFT['model']}", f"model_version={DRIFT['model_version']}",
                   f"segment={DRIFT['segment']}", f"<{RUNBOOKS}EmbeddingDriftDetected.md|Runbook>",
                   f"{GRAFANA_URL}/d/embedwatch-stream-detail/", f"var-model={DRIFT['model']}&"):
        assert needle in text, f"{needle!r} missing from the Slack text:\n{text}{diag()}"
    assert "unknown" not in text, f"the calibrated threshold must be rendered:\n{text}"
    assert att["title_link"].startswith(f"{GRAFANA_URL}/d/embedwatch-stream-detail/"), att

    # The alert's exact labels, as Prometheus fired it and Alertmanager routed it.
    want = {**DRIFT, "severity": "warning", "service": "embedwatch"}
    prom = _prom_alert(e2e, "EmbeddingDriftDetected", DRIFT, absent=("cause",))
    assert prom["state"] == "firing" and prom["labels"] == {"alertname": "EmbeddingDriftDetected", **want}, prom
    am = _am_alert(e2e, "EmbeddingDriftDetected", DRIFT, absent=("cause",))
    assert am["labels"] == {"alertname": "EmbeddingDriftDetected", **want}, am
    assert [r["name"] for r in am["receivers"]] == ["slack-embedwatch"], am
    assert float(prom["value"]) > 0, prom

    # A warning never pages.
    pages = [n for n in e2e.receiver.notifications("/pagerduty") if "EmbeddingDriftDetected" in json.dumps(n.body)]
    assert not pages, f"EmbeddingDriftDetected reached PagerDuty{diag()}"


def test_dimension_change_pages_through_pagerduty(e2e: E2ERun) -> None:
    note = _wait_notification(e2e, "/pagerduty", "EmbeddingDimensionMismatch", DIMENSION)
    diag = e2e.diagnostics
    body = note.body
    payload = body["payload"]
    details = payload["custom_details"]
    assert note.headers.get("Content-Type", "").startswith("application/json"), note.headers
    assert body["routing_key"] == ROUTING_KEY, body
    assert body["event_action"] == "trigger" and body.get("dedup_key"), body
    assert payload["severity"] == "critical", f"{payload}{diag()}"
    assert payload["summary"] == f"[FIRING:1] EmbeddingDimensionMismatch {_stream(DIMENSION)}", payload
    assert details["model"] == DIMENSION["model"], details
    assert details["model_version"] == DIMENSION["model_version"], details
    assert details["summary"] == (f"Embedding dimension mismatch on stream {DIMENSION['model']}/"
                                  f"{DIMENSION['model_version']}/{DIMENSION['segment']}"), details
    assert details["runbook_url"] == f"{RUNBOOKS}EmbeddingDimensionMismatch.md", details
    assert details["dashboard_url"].startswith(f"{GRAFANA_URL}/d/embedwatch-stream-detail/"), details
    assert f"var-model={DIMENSION['model']}&" in details["dashboard_url"], details
    assert body.get("client") == "embedwatch" and body["client_url"] == details["dashboard_url"], body
    assert {link["text"] for link in body.get("links", [])} >= {"Runbook", "Dashboard"}, body

    want = {**DIMENSION, "severity": "critical", "service": "embedwatch", "cause": "dimension_mismatch_rejects"}
    prom = _prom_alert(e2e, "EmbeddingDimensionMismatch", DIMENSION)
    assert prom["state"] == "firing", prom
    assert prom["labels"] == {"alertname": "EmbeddingDimensionMismatch", **want}, prom
    assert float(prom["value"]) > 0, "the value is the number of dimension-mismatch rejects"
    am = _am_alert(e2e, "EmbeddingDimensionMismatch", DIMENSION)
    assert am["labels"] == {"alertname": "EmbeddingDimensionMismatch", **want}, am
    assert [r["name"] for r in am["receivers"]] == ["pagerduty-embedwatch"], am

    # A page is not duplicated to Slack.
    chats = [n for n in e2e.receiver.notifications("/slack") if "EmbeddingDimensionMismatch" in json.dumps(n.body)]
    assert not chats, f"EmbeddingDimensionMismatch reached Slack{diag()}"


def test_control_stream_stays_quiet(e2e: E2ERun) -> None:
    # Judge the control stream only once the faulty streams have alerted, and not too early.
    _wait_notification(e2e, "/slack", "EmbeddingDriftDetected", DRIFT)
    _wait_notification(e2e, "/pagerduty", "EmbeddingDimensionMismatch", DIMENSION)
    time.sleep(max(0.0, e2e.t_inject + QUIET_AFTER_S - time.monotonic()))
    diag = e2e.diagnostics
    control = CONTROL["model"]

    # Prometheus now, and over the whole run (pending included: ALERTS has both states).
    now = [a for a in e2e.prometheus.alerts() if a["labels"].get("model") == control]
    assert not now, f"alerts for the control stream: {now}{diag()}"
    span = math.ceil(time.monotonic() - e2e.t_prometheus) + 5
    ever = e2e.prometheus.vector(f'count_over_time(ALERTS{{model="{control}"}}[{span}s])')
    assert not ever, f"ALERTS for the control stream during the run: {ever}{diag()}"
    drifting = e2e.prometheus.vector(
        f'max_over_time(embedwatch_drift_detected{{model="{control}"}}[{span}s])')
    assert drifting and all(float(s["value"][1]) == 0 for s in drifting), f"{drifting}{diag()}"
    # The drifted stream was seen drifting by the same Prometheus (the check above is not vacuous).
    drifted = e2e.prometheus.vector(
        f'max_over_time(embedwatch_drift_detected{{model="{DRIFT["model"]}"}}[{span}s])')
    assert drifted and float(drifted[0]["value"][1]) == 1, drifted

    # Alertmanager and the receivers.
    am = [a for a in e2e.alertmanager.alerts() if a["labels"].get("model") == control]
    assert not am, f"Alertmanager holds alerts for the control stream: {am}{diag()}"
    leaked = [n for n in e2e.receiver.notifications() if f'"{control}' in json.dumps(n.body)
              or f"{control}/" in json.dumps(n.body)]
    assert not leaked, f"notifications mention the control stream: {[n.body for n in leaked]}{diag()}"
    assert e2e.producer.error is None, e2e.producer.error
