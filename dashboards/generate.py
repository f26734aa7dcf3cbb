"""Generate the embedwatch Grafana dashboards (dashboards/*.json) from code.

    python dashboards/generate.py           # (re)write the JSON files
    python dashboards/generate.py --check   # exit 1 if a committed file differs from the code

The output is deterministic (no timestamps, stable ids and uids), so the committed JSON can be
compared with the generator's output in a unit test. Every panel queries the Prometheus data
source chosen in the ``$datasource`` variable; no data source uid is hard-coded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES_PATH = HERE.parent / "alerts" / "embedwatch-rules.yml"

SCHEMA_VERSION = 39
DS: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}
STREAM = "model, model_version, segment"
SEL = 'model=~"$model", model_version=~"$model_version", segment=~"$segment"'
VERSION_SEL = 'model=~"$model", model_version=~"$model_version"'
STREAM_LEGEND = "{{model}}/{{model_version}}/{{segment}}"
RATE = "$__rate_interval"


# --------------------------------------------------------------------------------------------
# building blocks


def target(expr: str, legend: str = "", ref: str = "A", *, instant: bool = False,
           fmt: str = "time_series") -> dict[str, Any]:
    t: dict[str, Any] = {
        "datasource": dict(DS),
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend or "__auto",
        "range": not instant,
        "instant": instant,
        "refId": ref,
    }
    if fmt != "time_series":
        t["format"] = fmt
    return t


def targets(*specs: tuple[str, str], instant: bool = False, fmt: str = "time_series") -> list[dict[str, Any]]:
    return [target(expr, legend, chr(ord("A") + i), instant=instant, fmt=fmt)
            for i, (expr, legend) in enumerate(specs)]


def thresholds(*steps: tuple[float, str], base: str = "green") -> dict[str, Any]:
    return {"mode": "absolute",
            "steps": [{"color": base, "value": None}] + [{"color": c, "value": v} for v, c in steps]}


def timeseries(title: str, description: str, tgts: list[dict[str, Any]], unit: str, *,
               min_: float | None = None, max_: float | None = None, log: bool = False,
               steps: tuple[tuple[float, str], ...] = (), bars: bool = False,
               overrides: list[dict[str, Any]] | None = None, stack: bool = False) -> dict[str, Any]:
    custom: dict[str, Any] = {
        "drawStyle": "bars" if bars else "line",
        "lineWidth": 1,
        "fillOpacity": 60 if bars else 10,
        "gradientMode": "none",
        "showPoints": "never",
        "spanNulls": False,
        "axisPlacement": "auto",
        "axisBorderShow": False,
        "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        "thresholdsStyle": {"mode": "dashed" if steps else "off"},
    }
    if log:
        custom["scaleDistribution"] = {"type": "log", "log": 10}
    defaults: dict[str, Any] = {
        "unit": unit,
        "color": {"mode": "palette-classic"},
        "custom": custom,
        "thresholds": thresholds(*steps),
    }
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": dict(DS),
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "showLegend": True,
                       "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": tgts,
    }


def stat(title: str, description: str, tgts: list[dict[str, Any]], unit: str, *,
         steps: tuple[tuple[float, str], ...] = (), base: str = "green",
         mappings: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": dict(DS),
        "fieldConfig": {"defaults": {"unit": unit, "thresholds": thresholds(*steps, base=base),
                                     "color": {"mode": "thresholds"}, "mappings": mappings or []},
                        "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "background", "graphMode": "area", "justifyMode": "auto",
                    "orientation": "auto", "textMode": "auto"},
        "targets": tgts,
    }


def heatmap(title: str, description: str, expr: str, unit: str) -> dict[str, Any]:
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": dict(DS),
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"hideFrom": {"legend": False,
                                                                           "tooltip": False,
                                                                           "viz": False}}},
                        "overrides": []},
        "options": {
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "fill": "dark-orange", "scale": "exponential",
                      "exponent": 0.5, "steps": 64, "reverse": False},
            "exemplars": {"color": "rgba(255,0,255,0.7)"},
            "filterValues": {"le": 1e-09},
            "legend": {"show": True},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "yHistogram": True, "showColorScale": False},
            "yAxis": {"axisPlacement": "left", "unit": unit, "reverse": False},
        },
        "targets": [dict(target(expr, "{{le}}", fmt="heatmap"), interval="1m")],
    }


def table(title: str, description: str, tgts: list[dict[str, Any]], unit: str, *,
          columns: dict[str, dict[str, Any]] | None = None, hide: tuple[str, ...] = ("Time",),
          mappings: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An instant table. ``columns`` maps a field name ("Value #A") to display name and unit."""
    overrides = []
    for field, spec in (columns or {}).items():
        props = [{"id": "displayName", "value": spec["name"]}]
        if "unit" in spec:
            props.append({"id": "unit", "value": spec["unit"]})
        if "mappings" in spec:
            props.append({"id": "mappings", "value": spec["mappings"]})
            props.append({"id": "custom.cellOptions", "value": {"type": "color-background"}})
        if "decimals" in spec:
            props.append({"id": "decimals", "value": spec["decimals"]})
        overrides.append({"matcher": {"id": "byName", "options": field}, "properties": props})
    return {
        "type": "table",
        "title": title,
        "description": description,
        "datasource": dict(DS),
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"align": "auto", "filterable": True},
                                     "mappings": mappings or [], "thresholds": thresholds()},
                        "overrides": overrides},
        "options": {"showHeader": True, "cellHeight": "sm",
                    "footer": {"show": False, "reducer": ["sum"], "fields": ""}},
        "targets": tgts,
        "transformations": [
            {"id": "merge", "options": {}},
            {"id": "organize", "options": {"excludeByName": {h: True for h in hide},
                                           "indexByName": {}, "renameByName": {}}},
        ],
    }


def state_timeline(title: str, description: str, tgts: list[dict[str, Any]],
                   mappings: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "type": "state-timeline",
        "title": title,
        "description": description,
        "datasource": dict(DS),
        "fieldConfig": {"defaults": {"unit": "none", "mappings": mappings, "thresholds": thresholds(),
                                     "color": {"mode": "thresholds"},
                                     "custom": {"fillOpacity": 80, "lineWidth": 0}},
                        "overrides": []},
        "options": {"showValue": "never", "mergeValues": True, "alignValue": "left", "rowHeight": 0.9,
                    "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "single", "sort": "none"}},
        "targets": tgts,
    }


def value_map(*entries: tuple[str, str, str]) -> list[dict[str, Any]]:
    """Value mappings: (value, text, color)."""
    return [{"type": "value", "options": {v: {"text": text, "color": color, "index": i}}}
            for i, (v, text, color) in enumerate(entries)]


DRIFT_MAP = value_map(("0", "ok", "green"), ("1", "DRIFTING", "red"))
BOOL_MAP = value_map(("0", "no", "red"), ("1", "yes", "green"))


def dashed(regex: str) -> dict[str, Any]:
    """Override: series whose name matches ``regex`` drawn as a dashed reference line."""
    return {"matcher": {"id": "byRegexp", "options": regex},
            "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                           {"id": "custom.fillOpacity", "value": 0}]}


def layout(rows: list[list[tuple[dict[str, Any], int, int]]]) -> list[dict[str, Any]]:
    """Place ``(panel, width, height)`` rows top to bottom and number the panels."""
    out, y, pid = [], 0, 1
    for row in rows:
        x, height = 0, 0
        for panel, w, h in row:
            out.append({"id": pid, "gridPos": {"h": h, "w": w, "x": x, "y": y}, **panel})
            pid, x, height = pid + 1, x + w, max(height, h)
        if x > 24:
            raise ValueError(f"row wider than 24 columns: {[p['title'] for p, _, _ in row]}")
        y += height
    return out


def variables(*, instance: bool = False) -> list[dict[str, Any]]:
    def query_var(name: str, label: str, query: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": dict(DS),
            "definition": query,
            "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "refresh": 2,
            "regex": "",
            "sort": 1,
            "multi": True,
            "includeAll": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "options": [],
            "hide": 0,
            "skipUrlSync": False,
        }

    out = [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "regex": "", "current": {}, "options": [], "hide": 0, "includeAll": False, "multi": False,
         "refresh": 1, "skipUrlSync": False},
        query_var("model", "Model", "label_values(embedwatch_events_total, model)"),
        query_var("model_version", "Model version",
                  'label_values(embedwatch_events_total{model=~"$model"}, model_version)'),
        query_var("segment", "Segment",
                  'label_values(embedwatch_events_total{model=~"$model", model_version=~"$model_version"}, '
                  "segment)"),
    ]
    if instance:
        out.append(query_var("instance", "Replica", "label_values(embedwatch_up, instance)"))
    return out


def drift_alarm_annotation() -> dict[str, Any]:
    return {
        "name": "Drift alarms",
        "datasource": dict(DS),
        "enable": True,
        "hide": False,
        "iconColor": "red",
        "expr": f"sum by ({STREAM}) (increase(embedwatch_drift_alarms_total{{{SEL}}}[$__interval])) > 0",
        "step": "1m",
        "titleFormat": "Drift alarm",
        "textFormat": STREAM_LEGEND,
        "useValueForTime": False,
    }


def dashboard(uid: str, title: str, description: str, panels: list[dict[str, Any]], *,
              annotations: list[dict[str, Any]] | None = None, instance: bool = False) -> dict[str, Any]:
    return {
        "annotations": {"list": annotations or []},
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [{"type": "dashboards", "title": "embedwatch", "tags": ["embedwatch"], "asDropdown": True,
                   "includeVars": True, "keepTime": True, "icon": "external link", "targetBlank": False,
                   "tooltip": "", "url": ""}],
        "panels": panels,
        "refresh": "30s",
        "schemaVersion": SCHEMA_VERSION,
        "tags": ["embedwatch"],
        "templating": {"list": variables(instance=instance)},
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": title,
        "uid": uid,
        "version": 1,
        "weekStart": "",
    }


def alert_names() -> list[str]:
    """Alert names of the rules file, for the "alerts firing" panel."""
    rules = yaml.safe_load(RULES_PATH.read_text(encoding="utf-8"))
    return sorted({r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r})


def by_stream(fn: str, metric: str, extra: str = "") -> str:
    sel = SEL + (f", {extra}" if extra else "")
    return f"{fn} by ({STREAM}) ({metric}{{{sel}}})"


def quantiles(metric: str, sel: str, qs: tuple[float, ...] = (0.5, 0.9, 0.99),
              by: str = "le") -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{{{sel}}}[{RATE}])))",
             f"p{round(q * 100)}") for q in qs]


# --------------------------------------------------------------------------------------------
# dashboards


def overview() -> dict[str, Any]:
    streams_table = table(
        "Streams",
        "One row per stream: drift state, how far the multivariate score is above its calibrated "
        "threshold (> 1 rejects), centroid distance, similarity KS statistic, accepted events/s, "
        "baseline state and the age of the newest event.",
        targets(
            (by_stream("max", "embedwatch_drift_detected"), ""),
            (f"{by_stream('max', 'embedwatch_drift_score')} / {by_stream('max', 'embedwatch_drift_threshold')}",
             ""),
            (by_stream("max", "embedwatch_centroid_cosine_distance"), ""),
            (by_stream("max", "embedwatch_similarity_ks_statistic"), ""),
            (f"sum by ({STREAM}) (rate(embedwatch_events_total{{{SEL}}}[{RATE}]))", ""),
            (by_stream("max", "embedwatch_baseline_ready"), ""),
            (f"time() - {by_stream('max', 'embedwatch_last_event_timestamp_seconds')}", ""),
            instant=True, fmt="table"),
        "none",
        columns={
            "Value #A": {"name": "Drift", "mappings": DRIFT_MAP},
            "Value #B": {"name": "Score / threshold", "decimals": 2},
            "Value #C": {"name": "Centroid cos distance", "decimals": 4},
            "Value #D": {"name": "Similarity KS", "decimals": 3},
            "Value #E": {"name": "Events/s", "unit": "eps"},
            "Value #F": {"name": "Baseline", "mappings": value_map(("0", "collecting", "orange"),
                                                                    ("1", "ready", "green"))},
            "Value #G": {"name": "Last event age", "unit": "s"},
        },
    )
    alerts_firing = table(
        "embedwatch alerts firing / pending",
        "Active embedwatch alerts from Prometheus' ALERTS series. Open the runbook from the "
        "notification or docs/runbooks/<alertname>.md.",
        targets((f'ALERTS{{alertname=~"{"|".join(alert_names())}"}}', ""), instant=True, fmt="table"),
        "none",
        hide=("Time", "Value", "__name__"),
    )
    drifting = stat("Drifting streams", "Streams whose drift_detected gauge is 1.",
                    targets((f"sum({by_stream('max', 'embedwatch_drift_detected')}) or vector(0)", "")),
                    "none", steps=((1, "red"),))
    live = stat("Live streams", "Streams currently tracked (capped by limits.max_streams).",
                targets(("sum(embedwatch_streams)", "")), "none", base="blue")
    eps = stat("Accepted events/s", "Accepted events per second for the selected streams.",
               targets((f"sum(rate(embedwatch_events_total{{{SEL}}}[{RATE}]))", "")), "eps", base="blue")
    dlq = stat("Dead-lettered share", "Rejected / processed events over all topics (alert: 5%).",
               targets((f"sum(rate(embedwatch_events_rejected_total[{RATE}])) / "
                        f"sum(rate(embedwatch_processed_events_total[{RATE}]))", "")),
               "percentunit", steps=((0.01, "orange"), (0.05, "red")))
    lag = stat("Consumer lag", "Messages behind the log end, all topics (alert: 10k per topic).",
               targets(("sum(max by (topic, partition) (embedwatch_consumer_lag_messages))", "")),
               "short", steps=((1000, "orange"), (10000, "red")))
    score = timeseries(
        "Drift score / calibrated threshold",
        "MMD² drift score divided by its calibrated threshold; above 1 the test rejects the baseline "
        "(a drift alarm also needs the effect above the floor).",
        targets((f"{by_stream('max', 'embedwatch_drift_score')} / "
                 f"{by_stream('max', 'embedwatch_drift_threshold')}", STREAM_LEGEND)),
        "none", min_=0, steps=((1, "red"),))
    centroid = timeseries(
        "Centroid cosine distance",
        "1 - cosine(window centroid, baseline centroid). EmbeddingDriftSevere: > 0.1 while drifting, "
        "or > 0.3 alone.",
        targets((by_stream("max", "embedwatch_centroid_cosine_distance"), STREAM_LEGEND)),
        "none", min_=0, steps=((0.1, "orange"), (0.3, "red")))
    events = timeseries(
        "Accepted events/s by stream", "Accepted events per second, per stream and kind.",
        targets((f"sum by ({STREAM}, kind) (rate(embedwatch_events_total{{{SEL}}}[{RATE}]))",
                 STREAM_LEGEND + " {{kind}}")),
        "eps", min_=0)
    rejects = timeseries(
        "Dead-lettered events/s by reason",
        "Rejected events per second by topic and reason (all streams: rejects of unparseable events "
        "have no stream).",
        targets((f"sum by (topic, reason) (rate(embedwatch_events_rejected_total[{RATE}]))",
                 "{{topic}} {{reason}}")),
        "eps", min_=0, bars=True, stack=True)
    stream_rejects = timeseries(
        "Rejected events/s of the selected streams by reason",
        "Dead-lettered events of live streams by reason (non_finite, zero_vector, dimension_mismatch...).",
        targets((f"sum by ({STREAM}, reason) (rate(embedwatch_stream_rejected_total{{{SEL}}}[{RATE}]))",
                 STREAM_LEGEND + " {{reason}}")),
        "eps", min_=0, bars=True, stack=True)
    consumer_lag = timeseries(
        "Consumer lag by topic", "Messages between the log end and the group's position, per topic.",
        targets(("sum by (topic) (max by (topic, partition) (embedwatch_consumer_lag_messages))", "{{topic}}")),
        "short", min_=0, steps=((10000, "red"),))
    panels = layout([
        [(drifting, 4, 4), (live, 4, 4), (eps, 5, 4), (dlq, 5, 4), (lag, 6, 4)],
        [(streams_table, 24, 9)],
        [(alerts_firing, 24, 6)],
        [(score, 12, 8), (centroid, 12, 8)],
        [(events, 12, 8), (consumer_lag, 12, 8)],
        [(rejects, 12, 8), (stream_rejects, 12, 8)],
    ])
    return dashboard("embedwatch-overview", "embedwatch / Overview",
                     "Every monitored embedding stream at a glance: drift, traffic, rejects, lag, alerts.",
                     panels, annotations=[drift_alarm_annotation()])


def stream_detail() -> dict[str, Any]:
    state = state_timeline(
        "Drift state", "1 while the stream is drifting (test rejects AND effect above floor).",
        targets((by_stream("max", "embedwatch_drift_detected"), STREAM_LEGEND)), DRIFT_MAP)
    score = timeseries(
        "Drift score vs calibrated threshold",
        "MMD² (random Fourier features) of window vs baseline, with the threshold calibrated at the "
        "configured false-alarm rate (dashed). Score above threshold = test rejects.",
        targets((by_stream("max", "embedwatch_drift_score"), "score " + STREAM_LEGEND),
                (by_stream("max", "embedwatch_drift_threshold"), "threshold " + STREAM_LEGEND)),
        "none", min_=0, overrides=[dashed("^threshold .*")])
    mshift = timeseries(
        "Recent-window mean shift / calibrated threshold",
        "Mean-shift scan (every 20 events over the last 100-1000 events): whitened distance of the "
        "recent window mean to the baseline mean, divided by its calibrated threshold, for the most "
        "significant window. Above 1 the scan rejects (an alarm also needs its effect above "
        "scan_effect_floor); an abrupt change shows here first.",
        targets((by_stream("max", "embedwatch_mean_shift_threshold_ratio"), STREAM_LEGEND)),
        "none", min_=0, steps=((1, "red"),))
    pvalue = timeseries(
        "Drift test p-value", "p-value of the multivariate test (log scale); small = significant.",
        targets((by_stream("max", "embedwatch_drift_p_value"), STREAM_LEGEND)), "none", log=True)
    effect = timeseries(
        "Effect floor", "Configured minimum effect size for a drift alarm.",
        targets((by_stream("max", "embedwatch_drift_effect_floor"), STREAM_LEGEND)), "none", min_=0)
    cos = timeseries(
        "Centroid cosine distance", "1 - cosine(window centroid, baseline centroid). Severe: > 0.1 "
        "while drifting, > 0.3 alone.",
        targets((by_stream("max", "embedwatch_centroid_cosine_distance"), STREAM_LEGEND)),
        "none", min_=0, steps=((0.1, "orange"), (0.3, "red")))
    euc = timeseries(
        "Centroid euclidean distance", "Euclidean distance between the window and baseline centroids.",
        targets((by_stream("max", "embedwatch_centroid_euclidean_distance"), STREAM_LEGEND)), "none", min_=0)
    sim_heat = heatmap(
        "Similarity to baseline centroid (distribution)",
        "Cosine similarity of each accepted vector to the baseline centroid, per time bucket. "
        "A band moving down = the stream moves away from its baseline.",
        f"sum by (le) (increase(embedwatch_similarity_to_baseline_bucket{{{SEL}}}[$__interval]))", "none")
    ks = timeseries(
        "Similarity KS statistic", "KS statistic of similarity-to-baseline, window vs baseline "
        "(SimilarityDistributionShift: > 0.2 with p < 0.001).",
        targets((by_stream("max", "embedwatch_similarity_ks_statistic"), STREAM_LEGEND)),
        "none", min_=0, max_=1, steps=((0.2, "red"),))
    ks_p = timeseries(
        "Similarity KS p-value", "p-value of the similarity KS test (log scale).",
        targets((by_stream("max", "embedwatch_similarity_ks_p_value"), STREAM_LEGEND)), "none", log=True)
    divergences = timeseries(
        "Similarity distribution distances", "Wasserstein-1, PSI and Jensen-Shannon divergence of the "
        "similarity distributions, window vs baseline.",
        targets((by_stream("max", "embedwatch_similarity_wasserstein"), "wasserstein " + STREAM_LEGEND),
                (by_stream("max", "embedwatch_similarity_psi"), "psi " + STREAM_LEGEND),
                (by_stream("max", "embedwatch_similarity_js_divergence"), "js " + STREAM_LEGEND)),
        "none", min_=0)
    norm_heat = heatmap(
        "Embedding norm distribution", "L2 norm of accepted vectors per time bucket. A normalised "
        "model sits in the 0.99-1.01 band.",
        f"sum by (le) (increase(embedwatch_embedding_norm_bucket{{{SEL}}}[$__interval]))", "none")
    norm_ks = timeseries(
        "Norm KS statistic", "KS statistic of vector norms, window vs baseline.",
        targets((by_stream("max", "embedwatch_norm_ks_statistic"), STREAM_LEGEND)), "none", min_=0, max_=1)
    norm_change = timeseries(
        "Mean norm relative change", "(window mean norm - baseline mean norm) / baseline mean norm.",
        targets((by_stream("max", "embedwatch_norm_mean_relative_change"), STREAM_LEGEND)), "percentunit")
    dims = timeseries(
        "Drifted dimensions share", "Share of dimensions whose mean moved (Welch t-test, BH corrected). "
        "EmbeddingDriftSevere: > 50% while drifting.",
        targets((by_stream("max", "embedwatch_dimensions_drifted_ratio"), STREAM_LEGEND)),
        "percentunit", min_=0, max_=1, steps=((0.5, "red"),))
    changepoint = timeseries(
        "Change-point score", "Page-Hinkley statistic over the per-event similarity score; bars: "
        "change points detected.",
        targets((by_stream("max", "embedwatch_changepoint_score"), "score " + STREAM_LEGEND),
                (f"sum by ({STREAM}) (increase(embedwatch_changepoints_total{{{SEL}}}[{RATE}]))",
                 "change points " + STREAM_LEGEND)),
        "none", min_=0,
        overrides=[{"matcher": {"id": "byRegexp", "options": "^change points .*"},
                    "properties": [{"id": "custom.drawStyle", "value": "bars"},
                                   {"id": "custom.axisPlacement", "value": "right"},
                                   {"id": "unit", "value": "short"}]}])
    version_legend = "{{model}} {{model_version}} vs {{reference_version}}"
    paired = timeseries(
        "Version comparison: paired cosine", "Mean cosine similarity of the same ids embedded by two "
        "versions (same dimension only). 1 = identical embeddings.",
        targets((f"max by (model, model_version, reference_version) "
                 f"(embedwatch_version_paired_cosine{{{VERSION_SEL}}})", version_legend)),
        "none", max_=1)
    knn = timeseries(
        "Version comparison: k-NN overlap", "Mean overlap@k of the neighbourhoods of shared ids under "
        "two versions (any dimension). Low = retrieval results will change.",
        targets((f"max by (model, model_version, reference_version) "
                 f"(embedwatch_version_knn_overlap{{{VERSION_SEL}}})", version_legend)),
        "percentunit", min_=0, max_=1)
    shared = timeseries(
        "Version comparison: shared ids / dimension changed", "Ids seen under both versions (probe "
        "set size) and whether the versions' dimensions differ (right axis, 1 = changed).",
        targets((f"max by (model, model_version, reference_version) "
                 f"(embedwatch_version_shared_ids{{{VERSION_SEL}}})", "shared ids " + version_legend),
                (f"max by (model, model_version, reference_version) "
                 f"(embedwatch_version_dimension_changed{{{VERSION_SEL}}})", "dim changed " + version_legend)),
        "short", min_=0,
        overrides=[{"matcher": {"id": "byRegexp", "options": "^dim changed .*"},
                    "properties": [{"id": "custom.axisPlacement", "value": "right"},
                                   {"id": "unit", "value": "none"}, {"id": "max", "value": 1}]}])
    latency = timeseries(
        "Inference latency percentiles", "Model inference latency reported by the events "
        "(InferenceLatencyHigh: per-stream p99 > 500ms).",
        targets(*quantiles("embedwatch_inference_latency_seconds", SEL)), "s", min_=0, steps=((0.5, "red"),))
    event_lag = timeseries(
        "Event lag percentiles", "Processing time minus event timestamp: how old events are when "
        "embedwatch sees them.",
        targets(*quantiles("embedwatch_event_lag_seconds", SEL, (0.5, 0.99))), "s", min_=0)
    baseline = table(
        "Active baselines", "The active baseline of each stream (id, source), its size and age. "
        "Promote or roll back through /api/baselines or the CLI.",
        targets((f"max by ({STREAM}, baseline_id, source) (embedwatch_baseline_info{{{SEL}}})", ""),
                (by_stream("max", "embedwatch_baseline_events"), ""),
                (by_stream("max", "embedwatch_baseline_age_seconds"), ""),
                (by_stream("max", "embedwatch_embedding_dimension"), ""),
                (by_stream("max", "embedwatch_window_events"), ""),
                instant=True, fmt="table"),
        "none",
        columns={"Value #B": {"name": "Baseline events", "unit": "short"},
                 "Value #C": {"name": "Baseline age", "unit": "s"},
                 "Value #D": {"name": "Dimension", "unit": "none"},
                 "Value #E": {"name": "Window events", "unit": "short"}},
        hide=("Time", "Value #A"))
    rejected = timeseries(
        "Rejected events/s by reason", "Dead-lettered events of the selected streams by reason.",
        targets((f"sum by ({STREAM}, reason) (rate(embedwatch_stream_rejected_total{{{SEL}}}[{RATE}]))",
                 STREAM_LEGEND + " {{reason}}")),
        "eps", min_=0, bars=True, stack=True)
    dupes = timeseries(
        "Duplicate ids/s", "Events whose id repeated within the window (producer retries, replays).",
        targets((f"sum by ({STREAM}) (rate(embedwatch_duplicate_ids_total{{{SEL}}}[{RATE}]))", STREAM_LEGEND)),
        "eps", min_=0)
    panels = layout([
        [(state, 24, 5)],
        [(score, 8, 8), (mshift, 8, 8), (pvalue, 4, 8), (effect, 4, 8)],
        [(cos, 12, 8), (euc, 12, 8)],
        [(sim_heat, 12, 9), (ks, 6, 9), (ks_p, 6, 9)],
        [(divergences, 12, 8), (dims, 12, 8)],
        [(norm_heat, 12, 9), (norm_ks, 6, 9), (norm_change, 6, 9)],
        [(changepoint, 12, 8), (rejected, 12, 8)],
        [(paired, 8, 8), (knn, 8, 8), (shared, 8, 8)],
        [(latency, 12, 8), (event_lag, 12, 8)],
        [(baseline, 16, 7), (dupes, 8, 7)],
    ])
    return dashboard("embedwatch-stream-detail", "embedwatch / Stream detail",
                     "Every drift measure of the selected streams against its baseline and threshold.",
                     panels, annotations=[drift_alarm_annotation()])


def queries() -> dict[str, Any]:
    qsel = SEL + ', kind="query"'
    qps = timeseries(
        "Queries/s", "Query events accepted per second.",
        targets((f"sum by ({STREAM}) (rate(embedwatch_events_total{{{qsel}}}[{RATE}]))", STREAM_LEGEND)),
        "eps", min_=0)
    top1_heat = heatmap(
        "Top-1 score distribution", "Top-1 retrieval score of query events per time bucket.",
        f"sum by (le) (increase(embedwatch_query_top1_score_bucket{{{SEL}}}[$__interval]))", "none")
    top1_q = timeseries(
        "Top-1 score percentiles", "p10 / p50 / p90 of the top-1 score, and the mean.",
        targets(*quantiles("embedwatch_query_top1_score", SEL, (0.1, 0.5, 0.9)),
                (f"sum(rate(embedwatch_query_top1_score_sum{{{SEL}}}[{RATE}])) / "
                 f"sum(rate(embedwatch_query_top1_score_count{{{SEL}}}[{RATE}]))", "mean")),
        "none", min_=0, max_=1)
    top1_ks = timeseries(
        "Top-1 score KS statistic vs baseline", "KS statistic (left) and p-value (right, log) of the "
        "top-1 score distribution, window vs baseline.",
        targets((by_stream("max", "embedwatch_query_top1_ks_statistic"), "KS " + STREAM_LEGEND),
                (by_stream("max", "embedwatch_query_top1_ks_p_value"), "p-value " + STREAM_LEGEND)),
        "none", min_=0,
        overrides=[{"matcher": {"id": "byRegexp", "options": "^p-value .*"},
                    "properties": [{"id": "custom.axisPlacement", "value": "right"},
                                   {"id": "custom.scaleDistribution", "value": {"type": "log", "log": 10}}]}])
    no_match = timeseries(
        "No-match ratio", "Share of window queries whose top-1 score is below "
        "detection.no_match_threshold (QueryNoMatchRateHigh: > 20% for 15m).",
        targets((by_stream("max", "embedwatch_query_no_match_ratio"), STREAM_LEGEND)),
        "percentunit", min_=0, max_=1, steps=((0.2, "red"),))
    results = timeseries(
        "Results per query", "Mean number of results per query in the window.",
        targets((by_stream("max", "embedwatch_query_results_mean"), STREAM_LEGEND)), "short", min_=0)
    precision = timeseries(
        "Precision@k", "Mean precision@k over labelled window queries (needs relevant_ids).",
        targets((by_stream("max", "embedwatch_query_precision_at_k"), STREAM_LEGEND)),
        "percentunit", min_=0, max_=1)
    recall = timeseries(
        "Recall@k", "Mean recall@k over labelled window queries (needs relevant_ids).",
        targets((by_stream("max", "embedwatch_query_recall_at_k"), STREAM_LEGEND)),
        "percentunit", min_=0, max_=1)
    query_drift = timeseries(
        "Query embedding drift score", "MMD² drift score of the query embeddings (query events that "
        "carry an embedding) against their own baseline, and 1 while they are drifting "
        "(EmbeddingDriftDetected with cause=query_embeddings after 15m).",
        targets((by_stream("max", "embedwatch_query_drift_score"), "score " + STREAM_LEGEND),
                (by_stream("max", "embedwatch_query_drift_detected"), "drifting " + STREAM_LEGEND)),
        "none", min_=0)
    latency = timeseries(
        "Retrieval latency percentiles", "End-to-end retrieval latency reported by query events.",
        targets(*quantiles("embedwatch_query_latency_seconds", SEL)), "s", min_=0)
    latency_stream = timeseries(
        "Retrieval latency p99 by stream", "p99 retrieval latency per stream.",
        targets(*[(e, STREAM_LEGEND) for e, _ in
                  quantiles("embedwatch_query_latency_seconds", SEL, (0.99,), by=f"{STREAM}, le")]),
        "s", min_=0)
    panels = layout([
        [(qps, 12, 8), (no_match, 12, 8)],
        [(top1_heat, 12, 9), (top1_q, 12, 9)],
        [(top1_ks, 12, 8), (results, 12, 8)],
        [(precision, 12, 8), (recall, 12, 8)],
        [(latency, 12, 8), (latency_stream, 12, 8)],
        [(query_drift, 24, 8)],
    ])
    return dashboard("embedwatch-queries", "embedwatch / Queries",
                     "Retrieval quality seen through query events: top-1 scores, no-match rate, "
                     "precision/recall@k, latency.", panels)


def service_health() -> dict[str, Any]:
    inst = 'instance=~"$instance"'
    up = stat("Replicas running", "Replicas whose service loop runs (embedwatch_up).",
              targets((f"sum(embedwatch_up{{{inst}}})", "")), "none", base="red", steps=((1, "green"),))
    ready = stat("Replicas ready", "Replicas with partitions assigned and a reachable broker.",
                 targets((f"sum(embedwatch_ready{{{inst}}})", "")), "none", base="red", steps=((1, "green"),))
    kafka = stat("Kafka connected", "Replicas whose last poll reached the broker.",
                 targets((f"sum(embedwatch_kafka_connected{{{inst}}})", "")), "none", base="red",
                 steps=((1, "green"),))
    partitions = stat("Assigned partitions", "Partitions assigned over all selected replicas.",
                      targets((f"sum(embedwatch_assigned_partitions{{{inst}}})", "")), "none", base="blue")
    streams = stat("Live streams", "Streams tracked (capped by limits.max_streams; beyond it events are "
                   "dead-lettered with reason stream_limit).",
                   targets((f"sum(embedwatch_streams{{{inst}}})", "")), "none", base="blue")
    build = table("Build", "Version of every replica.",
                  targets((f"embedwatch_build_info{{{inst}}}", ""), instant=True, fmt="table"), "none",
                  hide=("Time", "Value", "__name__"))
    throughput = timeseries(
        "Consumed events/s by topic and outcome", "Events read from Kafka and processed: accepted or "
        "dead-lettered (embedwatch_processed_events_total, counted by each process from its start).",
        targets((f"sum by (topic, outcome) (rate(embedwatch_processed_events_total{{{inst}}}[{RATE}]))",
                 "{{topic}} {{outcome}}")),
        "eps", min_=0, stack=True)
    batches = timeseries(
        "Batches/s and commits/s", "Poll batches processed and offset commits by result.",
        targets((f"sum(rate(embedwatch_batches_total{{{inst}}}[{RATE}]))", "batches"),
                (f"sum by (result) (rate(embedwatch_commits_total{{{inst}}}[{RATE}]))", "commits {{result}}")),
        "ops", min_=0)
    processing = timeseries(
        "Batch processing time", "Time to decode and process one poll batch (p50 / p90 / p99).",
        targets(*quantiles("embedwatch_processing_seconds", inst)), "s", min_=0)
    batch_size = timeseries(
        "Events per batch and poll bound", "Events per poll batch, and the records a poll asks for at most "
        "(embedwatch_poll_max_records: kafka.max_poll_records, raised after a batch of many streams within "
        "kafka.max_poll_bytes). Batches as large as the bound: the replica is behind and reads as fast as it can.",
        targets((f"sum by (instance) (rate(embedwatch_processed_events_total{{{inst}}}[{RATE}])) / "
                 f"sum by (instance) (rate(embedwatch_batches_total{{{inst}}}[{RATE}]))",
                 "events per batch {{instance}}"),
                (f"embedwatch_poll_max_records{{{inst}}}", "poll bound {{instance}}")),
        "short", min_=0, overrides=[dashed("^poll bound .*")])
    lag = timeseries(
        "Consumer lag by partition", "Log end offset minus position, per topic and partition.",
        targets(("max by (topic, partition) (embedwatch_consumer_lag_messages)", "{{topic}}/{{partition}}")),
        "short", min_=0, steps=((10000, "red"),))
    event_lag = timeseries(
        "Event lag p99 by stream", "Processing time minus event timestamp, p99 per stream.",
        targets((f"histogram_quantile(0.99, sum by ({STREAM}, le) "
                 f"(rate(embedwatch_event_lag_seconds_bucket{{{SEL}}}[{RATE}])))", STREAM_LEGEND)),
        "s", min_=0)
    rebalances = timeseries(
        "Rebalances and replayed events", "Partition assignments/revocations (bars) and events "
        "processed again after a restart or rebalance (at-least-once replay, right axis).",
        targets((f"sum by (instance) (increase(embedwatch_rebalances_total{{{inst}}}[{RATE}]))",
                 "rebalances {{instance}}"),
                (f"sum by (topic) (rate(embedwatch_events_replayed_total{{{inst}}}[{RATE}]))",
                 "replayed/s {{topic}}")),
        "short", min_=0,
        overrides=[{"matcher": {"id": "byRegexp", "options": "^replayed/s .*"},
                    "properties": [{"id": "custom.axisPlacement", "value": "right"},
                                   {"id": "unit", "value": "eps"}]},
                   {"matcher": {"id": "byRegexp", "options": "^rebalances .*"},
                    "properties": [{"id": "custom.drawStyle", "value": "bars"}]}])
    dlq = timeseries(
        "Dead-letter rate", "Rejected / processed events per topic (DeadLetterRateHigh: > 5% for 10m).",
        targets((f"sum by (topic) (rate(embedwatch_events_rejected_total{{{inst}}}[{RATE}])) / "
                 f"sum by (topic) (rate(embedwatch_processed_events_total{{{inst}}}[{RATE}]))", "{{topic}}")),
        "percentunit", min_=0, steps=((0.05, "red"),))
    dlq_reason = timeseries(
        "Dead-lettered events/s by reason", "Rejected events per second by reason, and failures to "
        "write to the dead-letter topic (right axis; any is bad).",
        targets((f"sum by (reason) (rate(embedwatch_events_rejected_total{{{inst}}}[{RATE}]))", "{{reason}}"),
                (f"sum(increase(embedwatch_dead_letter_errors_total{{{inst}}}[{RATE}]))", "DLQ write errors")),
        "eps", min_=0,
        overrides=[{"matcher": {"id": "byName", "options": "DLQ write errors"},
                    "properties": [{"id": "custom.axisPlacement", "value": "right"},
                                   {"id": "unit", "value": "short"},
                                   {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}}]}])
    memory = timeseries(
        "Resident memory", "process_resident_memory_bytes of each embedwatch replica.",
        targets((f"process_resident_memory_bytes and on (job, instance) embedwatch_up{{{inst}}}", "{{instance}}")),
        "bytes", min_=0)
    stored = timeseries(
        "Stored baselines in memory",
        "Bytes of the stored baseline versions each replica holds (embedwatch_stored_baseline_bytes): with durable "
        "state every stored version of the group, of streams it monitors or not. It grows with every stream ever "
        "seen, retired model versions included: forget retired streams (docs/api.md, Retiring a stream).",
        targets((f"embedwatch_stored_baseline_bytes{{{inst}}}", "{{instance}}")),
        "bytes", min_=0)
    cpu = timeseries(
        "CPU", "CPU seconds per second of each replica (1 = one full core).",
        targets((f"rate(process_cpu_seconds_total[{RATE}]) and on (job, instance) embedwatch_up{{{inst}}}",
                 "{{instance}}")),
        "percentunit", min_=0)
    panels = layout([
        [(up, 4, 4), (ready, 4, 4), (kafka, 4, 4), (partitions, 4, 4), (streams, 4, 4), (build, 4, 4)],
        [(throughput, 12, 8), (batches, 12, 8)],
        [(processing, 8, 8), (batch_size, 8, 8), (lag, 8, 8)],
        [(event_lag, 12, 8), (rebalances, 12, 8)],
        [(dlq, 12, 8), (dlq_reason, 12, 8)],
        [(memory, 8, 8), (stored, 8, 8), (cpu, 8, 8)],
    ])
    return dashboard("embedwatch-service-health", "embedwatch / Service health",
                     "The embedwatch service itself: throughput, processing time, lag, rebalances, "
                     "dead letters, resources.", panels, instance=True)


DASHBOARDS = {
    "overview.json": overview,
    "stream-detail.json": stream_detail,
    "queries.json": queries,
    "service-health.json": service_health,
}


def render(dash: dict[str, Any]) -> str:
    return json.dumps(dash, indent=2, ensure_ascii=False) + "\n"


def build_all() -> dict[str, str]:
    """``{file name: JSON text}`` of every dashboard."""
    return {name: render(fn()) for name, fn in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if a committed file is out of date")
    parser.add_argument("--out", type=Path, default=HERE, help="output directory (default: dashboards/)")
    args = parser.parse_args(argv)
    stale = []
    for name, text in build_all().items():
        path = args.out / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
    if stale:
        print(f"out of date (run python dashboards/generate.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
