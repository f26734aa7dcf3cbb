"""The Prometheus alerting rules: valid, unit-tested with promtool, documented, on catalog metrics.

promtool is required: CI installs it (Debian package ``prometheus``). Without it these tests
fail instead of skipping, so a missing tool cannot turn the rule checks green by omission.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from alerts.render import (
    GRAFANA_PLACEHOLDER,
    RULES_PATH,
    RUNBOOK_BASE,
    dump_rules,
    iter_alert_rules,
    load_rules,
    parse_duration,
    render_rules,
)
from dashboards.exprs import (
    EXTERNAL_PREFIXES,
    EXTERNAL_SERIES,
    known_series_names,
    load_catalog,
    metric_names,
    selectors,
    unknown_metrics,
)

ROOT = Path(__file__).resolve().parents[2]

TESTS_DIR = ROOT / "alerts" / "tests"
RUNBOOKS = ROOT / "docs" / "runbooks"
ALERTING_DOC = ROOT / "docs" / "alerting.md"
STREAM_LABELS = ("model", "model_version", "segment")

REQUIRED_ALERTS = {
    "EmbeddingDriftDetected": "warning",
    "EmbeddingDriftSevere": "critical",
    "SimilarityDistributionShift": "warning",
    "EmbeddingDimensionMismatch": "critical",
    "NonFiniteEmbeddings": None,
    "StreamSilent": None,
    "QueryNoMatchRateHigh": None,
    "InferenceLatencyHigh": None,
    "ConsumerLagHigh": None,
    "DeadLetterRateHigh": None,
    "BaselineMissing": None,
    "EmbedwatchDown": None,
}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found on PATH: install the Prometheus tools (Debian/Ubuntu: "
                    "`apt-get install prometheus`, or scripts/install-tools). The alert rule tests "
                    "do not skip without it.")
    return path


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


RULES = load_rules()
ALERTS = iter_alert_rules(RULES)
ALERT_NAMES = sorted({r["alert"] for r in ALERTS})


def rule_id(rule: dict[str, Any]) -> str:
    cause = rule.get("labels", {}).get("cause")
    return rule["alert"] + (f"[{cause}]" if cause else "")


def test_rules_file_passes_promtool_check() -> None:
    res = run(promtool(), "check", "rules", str(RULES_PATH))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_promtool_unit_tests_pass() -> None:
    files = sorted(TESTS_DIR.glob("*.yml"))
    assert files, "no promtool tests in alerts/tests/"
    res = run(promtool(), "test", "rules", *map(str, files))
    assert res.returncode == 0, res.stdout + res.stderr


def test_required_alerts_exist_with_their_severity() -> None:
    for name, severity in REQUIRED_ALERTS.items():
        rules = [r for r in ALERTS if r["alert"] == name]
        assert rules, f"missing alert {name}"
        if severity:
            assert {r["labels"]["severity"] for r in rules} == {severity}, name


def _unit_test_cases() -> list[tuple[str, dict[str, Any]]]:
    cases = []
    for path in sorted(TESTS_DIR.glob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert [str((path.parent / f).resolve()) for f in data["rule_files"]] == [str(RULES_PATH)], path
        for test in data["tests"]:
            for case in test.get("alert_rule_test", []):
                cases.append((path.name, case))
    return cases


@pytest.mark.parametrize("name", ALERT_NAMES)
def test_every_alert_is_unit_tested_firing_and_quiet(name: str) -> None:
    cases = [c for _, c in _unit_test_cases() if c["alertname"] == name]
    firing = [c for c in cases if c.get("exp_alerts")]
    quiet = [c for c in cases if not c.get("exp_alerts")]
    assert firing, f"no promtool test where {name} fires"
    assert quiet, f"no promtool test where {name} stays quiet"
    for case in firing:
        for exp in case["exp_alerts"]:
            assert exp.get("exp_labels", {}).get("severity") in {"warning", "critical"}, name
            assert set(exp.get("exp_annotations", {})) >= {"summary", "description", "runbook_url",
                                                           "dashboard_url"}, name
    # every rule of a name with several rules (e.g. two EmbeddingDimensionMismatch causes) fires
    causes = {r["labels"].get("cause") for r in ALERTS if r["alert"] == name} - {None}
    fired = {e["exp_labels"].get("cause") for c in firing for e in c["exp_alerts"]}
    assert causes <= fired, f"{name}: untested causes {causes - fired}"


@pytest.mark.parametrize("rule", ALERTS, ids=rule_id)
def test_alert_metadata(rule: dict[str, Any]) -> None:
    name = rule["alert"]
    labels, ann = rule.get("labels", {}), rule.get("annotations", {})
    assert labels.get("severity") in {"warning", "critical"}, name
    assert labels.get("service") == "embedwatch", f"{name}: service label used by routing/inhibition"
    for key in ("summary", "description", "runbook_url", "dashboard_url"):
        assert ann.get(key, "").strip(), f"{name}: annotation {key} missing"
    assert "$value" in ann["summary"] + ann["description"], f"{name}: annotations must carry $value"
    # production-sane `for:` that parses; instant only where the rule says so on purpose
    assert "for" in rule, f"{name}: set `for:` explicitly (0s for instant alerts)"
    parse_duration(rule["for"])


@pytest.mark.parametrize("rule", ALERTS, ids=rule_id)
def test_runbook_url_maps_to_runbook_file(rule: dict[str, Any]) -> None:
    url = rule["annotations"]["runbook_url"]
    assert url == f"{RUNBOOK_BASE}{rule['alert']}.md"
    path = ROOT / "docs" / "runbooks" / url.removeprefix(RUNBOOK_BASE)
    assert path.is_file(), f"missing runbook {path.relative_to(ROOT)}"


@pytest.mark.parametrize("rule", ALERTS, ids=rule_id)
def test_dashboard_url_points_at_a_generated_dashboard(rule: dict[str, Any]) -> None:
    from dashboards.generate import DASHBOARDS

    uids = {fn()["uid"] for fn in DASHBOARDS.values()}
    url = rule["annotations"]["dashboard_url"]
    m = re.match(re.escape(GRAFANA_PLACEHOLDER) + r"/d/([\w-]+)/", url)
    assert m and m.group(1) in uids, f"{rule['alert']}: {url}"


@pytest.mark.parametrize("rule", ALERTS, ids=rule_id)
def test_stream_alerts_name_the_stream(rule: dict[str, Any]) -> None:
    """An alert whose expression keeps stream labels says which stream in its annotations."""
    expr, ann = rule["expr"], rule["annotations"]
    kept = [lab for lab in STREAM_LABELS if re.search(rf"by \([^)]*\b{lab}\b", expr)]
    for lab in kept:
        assert f"$labels.{lab}" in ann["summary"] + ann["description"], f"{rule['alert']}: {lab}"
        assert f"$labels.{lab}" in ann["dashboard_url"], f"{rule['alert']}: {lab} in dashboard_url"


@pytest.mark.parametrize("rule", ALERTS, ids=rule_id)
def test_rule_uses_only_catalog_metrics_and_labels(rule: dict[str, Any]) -> None:
    expr = rule["expr"]
    assert metric_names(expr), f"{rule['alert']}: no metric found in expr"
    assert not unknown_metrics(expr), f"{rule['alert']}: not in metrics_catalog.py: {unknown_metrics(expr)}"
    catalog = {m.name: m for m in load_catalog().METRICS}
    for series, used in selectors(expr):
        if series in EXTERNAL_SERIES or series.startswith(EXTERNAL_PREFIXES):
            continue
        base = re.sub(r"_(bucket|sum|count)$", "", series) if series not in catalog else series
        allowed = set(catalog[base].labels) | {"job", "instance"} | ({"le"} if series.endswith("_bucket") else set())
        assert used <= allowed, f"{rule['alert']}: {series} has no label(s) {used - allowed}"


def test_known_series_names_cover_catalog_suffixes() -> None:
    known = known_series_names()
    assert "embedwatch_inference_latency_seconds_bucket" in known
    assert "embedwatch_events_total" in known
    assert "embedwatch_not_a_metric" not in known


def test_every_runbook_belongs_to_an_alert_and_has_the_sections() -> None:
    files = {p.stem for p in RUNBOOKS.glob("*.md")}
    assert set(ALERT_NAMES) <= files, f"missing runbooks: {set(ALERT_NAMES) - files}"
    assert files - {"README"} <= set(ALERT_NAMES), f"runbooks without an alert: {files - set(ALERT_NAMES)}"
    for name in ALERT_NAMES:
        text = (RUNBOOKS / f"{name}.md").read_text(encoding="utf-8").lower()
        assert text.startswith(f"# {name.lower()}"), name
        for section in ("## meaning", "## impact", "## first checks", "## promql", "## remedies",
                        "## escalation"):
            assert section in text, f"{name}.md lacks section {section!r}"
        assert "```promql" in text, f"{name}.md: no PromQL to run"


def test_alerting_doc_lists_every_alert_with_its_for() -> None:
    text = ALERTING_DOC.read_text(encoding="utf-8")
    for rule in ALERTS:
        row = next((line for line in text.splitlines()
                    if line.startswith("|") and f"`{rule['alert']}`" in line and
                    rule["labels"]["severity"] in line and f"`{rule['for']}`" in line), None)
        assert row, f"docs/alerting.md: no table row for {rule['alert']} ({rule['labels']['severity']}, " \
                    f"for `{rule['for']}`)"


# --- alerts/render.py ------------------------------------------------------------------------


def test_render_rules_unchanged_by_default() -> None:
    assert render_rules() == RULES


def test_render_rules_sets_every_for_to_the_floor(tmp_path: Path) -> None:
    rendered = render_rules(for_scale=0.0, min_for="5s")
    for before, after in zip(ALERTS, iter_alert_rules(rendered), strict=True):
        assert after["for"] == ("0s" if parse_duration(before["for"]) == 0 else "5s"), before["alert"]
        assert after["expr"] == before["expr"]
    assert load_rules() == RULES, "render_rules must not modify the loaded rules"
    path = tmp_path / "rules.yml"
    path.write_text(dump_rules(rendered), encoding="utf-8")
    res = run(promtool(), "check", "rules", str(path))
    assert res.returncode == 0, res.stdout + res.stderr


def test_render_rules_scales_and_rewrites_grafana_url() -> None:
    rendered = render_rules(for_scale=0.01, min_for="2s", grafana_url="http://localhost:3000/")
    by_name = {rule_id(r): r for r in iter_alert_rules(rendered)}
    assert by_name["EmbeddingDriftSevere"]["for"] == "18s"  # 30m * 0.01
    assert by_name["EmbedwatchDown"]["for"] == "3s"  # 5m * 0.01
    assert by_name["StreamSilent"]["for"] == "3s"
    assert all(r["annotations"]["dashboard_url"].startswith("http://localhost:3000/d/")
               for r in by_name.values())


def _runbook_queries() -> list[tuple[str, str]]:
    """Every PromQL expression of the runbooks' ```promql blocks: one per line, a line starting
    with whitespace continues the previous one, ``#`` lines are comments, ``<x>`` placeholders."""
    out: list[tuple[str, str]] = []
    for path in sorted(RUNBOOKS.glob("*.md")):
        for block in re.findall(r"```promql\n(.*?)```", path.read_text(encoding="utf-8"), re.S):
            current: str | None = None
            for line in block.splitlines():
                if not line.strip() or line.lstrip().startswith("#"):
                    if current:
                        out.append((path.name, current))
                    current = None
                elif line[0].isspace() and current:
                    current += " " + line.strip()
                else:
                    if current:
                        out.append((path.name, current))
                    current = line.strip()
            if current:
                out.append((path.name, current))
    return out


def test_runbook_promql_parses_and_uses_catalog_metrics(tmp_path: Path) -> None:
    queries = _runbook_queries()
    assert len(queries) >= len(ALERT_NAMES)
    exe = promtool()
    for name, expr in queries:
        concrete = re.sub(r"<\w+>", "x", expr)
        assert not unknown_metrics(concrete), f"{name}: {sorted(unknown_metrics(concrete))} in {expr}"
        path = tmp_path / "q.yml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "q", "rules": [
            {"record": "runbook:query", "expr": concrete}]}]}), encoding="utf-8")
        res = run(exe, "check", "rules", str(path))
        assert res.returncode == 0, f"{name}: promtool rejects {expr}\n{res.stdout}{res.stderr}"


def test_known_series_names_are_what_the_exposition_holds_for_histograms() -> None:
    """A histogram with a negative bucket bound has no _sum/_count series (prometheus_client's
    rule): a panel or rule over them passed the name check and was always empty."""
    import numpy as np

    from embedwatch.exporter import Exporter, make_registry

    ex = Exporter()
    labels = ("m", "1", "default")
    for name in ("embedwatch_similarity_to_baseline", "embedwatch_embedding_norm"):
        ex.histograms.observe(name, labels, np.array([0.5, 0.9]))
    text = make_registry(ex, process_metrics=False).exposition().decode()
    exposed = {line.split("{")[0] for line in text.splitlines() if line and not line.startswith("#")}
    known = known_series_names()
    for name in ("embedwatch_similarity_to_baseline", "embedwatch_embedding_norm"):
        for suffix in ("_bucket", "_sum", "_count"):
            assert (name + suffix in exposed) == (name + suffix in known), name + suffix
    assert "embedwatch_similarity_to_baseline_sum" not in known
