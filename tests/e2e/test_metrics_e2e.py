"""Metrics end to end: a real scrape passes ``promtool check metrics``, and every PromQL query of
every Grafana dashboard parses and returns data from the real Prometheus of the e2e run."""

from __future__ import annotations

import math
import subprocess
import time
import urllib.request
from typing import Any

import pytest
from e2e_stack import (
    CONTROL,
    DIMENSION,
    DRIFT,
    VERSION_MODEL,
    E2ERun,
    require_binary,
    wait_until,
)

pytestmark = pytest.mark.e2e

# Panel queries that cannot return data in a short healthy run: (dashboard file, panel title,
# a substring of the raw expr) -> why. Keep it small and justified; it is asserted to be.
NO_DATA_ALLOWLIST: dict[tuple[str, str, str], str] = {}
MAX_ALLOWLIST = 2
PANELS_TIMEOUT_S = 120.0   # from fault injection until every panel query has data

# Series the scrape must hold before promtool judges it: histograms, per-stream gauges and
# counters of every kind of stream, and the version comparison.
SCRAPE_NEEDS = (
    "embedwatch_processing_seconds_bucket", "embedwatch_event_lag_seconds_bucket",
    "embedwatch_inference_latency_seconds_bucket", "embedwatch_embedding_norm_bucket",
    "embedwatch_similarity_to_baseline_bucket", "embedwatch_query_top1_score_bucket",
    "embedwatch_query_latency_seconds_bucket", "embedwatch_drift_score", "embedwatch_drift_p_value",
    "embedwatch_query_top1_ks_statistic", "embedwatch_stream_rejected_total",
    "embedwatch_version_paired_cosine", "embedwatch_consumer_lag_messages", "embedwatch_baseline_info",
)


def _dashboards() -> Any:
    from dashboards.exprs import load_dashboards

    return load_dashboards()


def _panel_queries() -> list[tuple[str, str, str, str]]:
    """(dashboard file, panel title, raw expr, concrete expr) of every panel target."""
    from dashboards.exprs import panel_queries, substitute

    return [(name, title, expr, substitute(expr))
            for name, dash in _dashboards().items() for title, expr in panel_queries(dash)]


def _allowlisted(name: str, title: str, expr: str) -> str | None:
    for (n, t, needle), why in NO_DATA_ALLOWLIST.items():
        if n == name and t == title and needle in expr:
            return why
    return None


def _has_data(result: list[dict[str, Any]]) -> bool:
    """At least one sample with a finite value (a NaN-only answer draws nothing in Grafana)."""
    return any(math.isfinite(float(s["value"][1])) for s in result)


def test_promtool_check_metrics_on_a_real_scrape(e2e: E2ERun) -> None:
    promtool = require_binary("promtool")
    e2e.t_inject  # noqa: B018  (waits until the faults, so rejects and query KS exist)

    missing: list[str] = list(SCRAPE_NEEDS)

    def complete() -> bool:
        m = e2e.svc.metrics()
        missing[:] = [n for n in SCRAPE_NEEDS if n not in m]
        if not any(dict(k).get("model") == DIMENSION["model"] for k in m.get("embedwatch_stream_rejected_total", {})):
            missing.append(f'embedwatch_stream_rejected_total{{model="{DIMENSION["model"]}"}}')
        return not missing

    wait_until(complete, 60, "a scrape with histograms, per-stream gauges, rejects and version comparison",
               diagnostics=lambda: f"missing from the scrape: {missing}{e2e.diagnostics()}")
    with urllib.request.urlopen(f"http://127.0.0.1:{e2e.svc.port}/metrics", timeout=5) as r:
        content_type = r.headers.get("Content-Type", "")
        text = r.read().decode()
    assert content_type.startswith("text/plain"), content_type
    for needle in (f'model="{CONTROL["model"]}"', f'model="{DRIFT["model"]}"', f'model="{VERSION_MODEL}"'):
        assert needle in text, needle
    res = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                         timeout=60, check=False)
    problems = (res.stdout + res.stderr).strip()
    flagged = {line.split()[0] for line in problems.splitlines() if line.strip()}
    context = [line for line in text.splitlines()
               if any(line.startswith((f"# HELP {n} ", f"# TYPE {n} ", f"{n}{{", f"{n} ")) for n in flagged)]
    assert res.returncode == 0 and not problems, (
        f"promtool check metrics (exit {res.returncode}) on a {len(text.splitlines())}-line scrape:\n{problems}\n"
        "--- the flagged families ---\n" + "\n".join(context[:30]))


def test_every_dashboard_query_parses_and_returns_data(e2e: E2ERun) -> None:
    queries = _panel_queries()
    assert len(queries) > 50, "expected every panel target of the four dashboards"

    # The allowlist is small, justified and not stale: each entry names an existing panel query.
    assert len(NO_DATA_ALLOWLIST) <= MAX_ALLOWLIST, NO_DATA_ALLOWLIST
    for (n, t, needle) in NO_DATA_ALLOWLIST:
        hits = [q for q in queries if q[0] == n and q[1] == t and needle in q[2]]
        assert len(hits) == 1, f"allowlist entry {(n, t, needle)} matches {len(hits)} panel queries"

    # Parse: Prometheus answers 400 bad_data to a query it cannot parse.
    bad = []
    for name, title, _raw, expr in queries:
        status, body = e2e.prometheus.query(expr)
        if status != 200 or body.get("status") != "success":
            bad.append(f"{name} / {title}: {expr}\n    -> {status} {body.get('errorType')}: {body.get('error')}")
    assert not bad, "panel queries Prometheus rejects:\n" + "\n".join(bad)

    # Data: poll until every (non-allowlisted) query has data; ALERTS needs an alert, the
    # rejected-events panels need the dimension change, rates need a few scrapes.
    deadline = e2e.t_inject + PANELS_TIMEOUT_S
    pending = [q for q in queries if not _allowlisted(*q[:3])]
    while True:
        pending = [q for q in pending if not _has_data(e2e.prometheus.vector(q[3]))]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    assert not pending, (
        f"{len(pending)} panel queries returned no data within {PANELS_TIMEOUT_S:.0f}s of the faults:\n"
        + "\n".join(f"  {n} / {t}: {expr}" for n, t, _, expr in pending) + e2e.diagnostics())
    e2e.timeline.setdefault("all panel queries have data (s after injection)",
                            e2e.since_inject(time.monotonic()))

    # The allowlisted ones parse (checked above) and are reported.
    for (n, t, needle), why in NO_DATA_ALLOWLIST.items():
        print(f"\nallowlisted (no data expected): {n} / {t} [{needle}]: {why}")


def test_dashboard_variables_and_annotations(e2e: E2ERun) -> None:
    """Template variables list the streams; annotation queries parse."""
    from dashboards.exprs import annotation_queries, label_values_selector, substitute, variable_queries

    for name, dash in _dashboards().items():
        for var, query in variable_queries(dash):
            expr = substitute(label_values_selector(query))
            wait_until(lambda expr=expr: e2e.prometheus.vector(expr), 30,
                       f"{name}: variable ${var} ({expr}) has values", diagnostics=e2e.diagnostics)
        for ann, expr in annotation_queries(dash):
            status, body = e2e.prometheus.query(substitute(expr))
            assert status == 200 and body.get("status") == "success", f"{name} annotation {ann}: {body}"
    # The stream variable offers every stream of the run.
    models = {s["metric"]["model"] for s in e2e.prometheus.vector("group by (model) (embedwatch_events_total)")}
    assert {CONTROL["model"], DRIFT["model"], DIMENSION["model"], VERSION_MODEL} <= models, models
