"""PromQL of the Grafana dashboards: extract it, make it concrete, name the metrics it reads.

Used by the dashboard lint (tests/unit/test_dashboards.py) and by the end-to-end test that runs
every panel query against a real Prometheus::

    import sys; sys.path.insert(0, str(REPO_ROOT))
    from dashboards.exprs import load_dashboards, panel_queries, substitute

    for name, dash in load_dashboards().items():
        for title, expr in panel_queries(dash):
            query(substitute(expr))        # Grafana variables -> concrete values
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

DASHBOARDS_DIR = Path(__file__).resolve().parent
REPO_ROOT = DASHBOARDS_DIR.parent
CATALOG_PATH = REPO_ROOT / "service" / "embedwatch" / "metrics_catalog.py"

# Values used for Grafana variables by substitute(): the "All" value of the multi-value stream
# variables (".*" matches every stream) and fixed intervals for Grafana's built-ins.
DEFAULT_VALUES: dict[str, str] = {
    "model": ".*",
    "model_version": ".*",
    "segment": ".*",
    "instance": ".*",
    "topic": ".*",
    "__rate_interval": "1m",
    "__interval": "30s",
    "__interval_ms": "30000",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
}

# Series that are not embedwatch's own but may appear in a query.
EXTERNAL_SERIES = frozenset({"up", "ALERTS", "ALERTS_FOR_STATE"})
EXTERNAL_PREFIXES = ("process_",)

_VAR = re.compile(r"\$\{(\w+)(?::[\w]+)?\}|\$\[\[(\w+)(?::[\w]+)?\]\]|\$(\w+)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.I)
_IDENT = re.compile(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_KEYWORDS = frozenset({
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan", "start", "end", "atan2",
})


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels nested in collapsed rows


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel of a dashboard, including those nested in rows."""
    yield from _panels(list(dashboard.get("panels", [])))


def panel_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(panel_title, expr)`` for every Prometheus query target of every panel, in order."""
    out: list[tuple[str, str]] = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            expr = target.get("expr")
            if expr:
                out.append((str(panel.get("title", "")), str(expr)))
    return out


def annotation_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(annotation_name, expr)`` for every Prometheus annotation query."""
    return [(str(a.get("name", "")), str(a["expr"]))
            for a in dashboard.get("annotations", {}).get("list", []) if a.get("expr")]


def variable_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(variable_name, query)`` of every query-type template variable (label_values(...))."""
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        q = var.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        out.append((str(var["name"]), str(q)))
    return out


def label_values_selector(query: str) -> str:
    """The series selector of ``label_values(selector, label)`` (a plain PromQL expression)."""
    m = re.fullmatch(r"\s*label_values\(\s*(.*?)\s*,\s*\w+\s*\)\s*", query, re.S)
    if not m:
        raise ValueError(f"not a label_values(selector, label) query: {query!r}")
    return m.group(1)


def substitute(expr: str, values: Mapping[str, str] | None = None) -> str:
    """Replace Grafana variables (``$model``, ``${model}``, ``${model:regex}``, ``$__rate_interval``...)
    by concrete values: :data:`DEFAULT_VALUES` updated with ``values``. An unknown variable
    raises ``KeyError`` so a new variable cannot silently produce an unparseable query."""
    table = {**DEFAULT_VALUES, **(values or {})}

    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in table:
            raise KeyError(f"no value for Grafana variable ${name} in {expr!r}")
        return table[name]

    return _VAR.sub(repl, expr)


def metric_names(expr: str) -> set[str]:
    """Names of the series a PromQL expression reads (functions, keywords, labels excluded)."""
    text = _STRING.sub('""', expr)
    # metric{...} with a name inside the braces: {__name__="x"} is not used by embedwatch.
    prev = None
    while prev != text:
        prev = text
        text = _BRACES.sub(" ", text)
        text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    return {m.group(1) for m in _IDENT.finditer(text)
            if not m.group(2) and m.group(1).lower() not in _KEYWORDS}


_SELECTOR = re.compile(r'([A-Za-z_:][\w:]*)\s*\{((?:[^{}"]|"(?:[^"\\]|\\.)*")*)\}')
_MATCHER = re.compile(r'(\w+)\s*(?:=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"')


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """``(metric, {label names matched})`` for every ``metric{...}`` selector of ``expr``."""
    return [(m.group(1), set(_MATCHER.findall(m.group(2)))) for m in _SELECTOR.finditer(expr)]


def load_catalog() -> Any:
    """The ``embedwatch.metrics_catalog`` module (imported, or loaded from its file)."""
    try:
        import embedwatch.metrics_catalog as catalog

        return catalog
    except ImportError:
        spec = importlib.util.spec_from_file_location("embedwatch_metrics_catalog", CATALOG_PATH)
        if spec is None or spec.loader is None:
            raise
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module


def known_series_names() -> set[str]:
    """Every series name embedwatch exposes according to the metrics catalog: counters as
    ``<name>`` and ``<name>_total`` style names as listed, histograms with ``_bucket``/``_sum``/
    ``_count`` (``_bucket`` only for one with a negative bucket bound: the exposition leaves its
    ``_sum``/``_count`` out, as prometheus_client does), plus ``_created`` for counters and
    histograms."""
    names: set[str] = set()
    for m in load_catalog().METRICS:
        names.add(m.name)
        if m.type == "histogram":
            names.update({f"{m.name}_bucket", f"{m.name}_created"})
            if not m.buckets or m.buckets[0] >= 0:
                names.update({f"{m.name}_sum", f"{m.name}_count"})
        elif m.type == "counter":
            names.add(f"{m.name.removesuffix('_total')}_created")
        elif m.type == "info":
            names.add(f"{m.name}_info")
    return names


def unknown_metrics(expr: str, known: set[str] | None = None) -> set[str]:
    """Series names of ``expr`` that neither the catalog nor the allowed externals list."""
    known = known_series_names() if known is None else known
    return {n for n in metric_names(expr)
            if n not in known and n not in EXTERNAL_SERIES and not n.startswith(EXTERNAL_PREFIXES)}


def load_dashboards(directory: Path = DASHBOARDS_DIR) -> dict[str, dict[str, Any]]:
    """``{file name: dashboard}`` of every committed dashboard JSON."""
    return {p.name: json.loads(p.read_text(encoding="utf-8")) for p in sorted(directory.glob("*.json"))}
