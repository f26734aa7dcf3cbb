"""Render test copies of the embedwatch alerting configuration.

The committed files are production configuration:

* ``alerts/embedwatch-rules.yml`` has production ``for:`` durations (minutes to an hour);
* ``alerts/alertmanager.yml`` points at PagerDuty and Slack with production group timings.

The end-to-end test (real Prometheus and Alertmanager) cannot wait an hour, and must deliver
notifications to a local HTTP receiver. It uses these helpers to write a copy instead of
editing the files::

    import sys; sys.path.insert(0, str(REPO_ROOT))
    from alerts.render import render_alertmanager, write_rules

    write_rules(tmp / "rules.yml", for_scale=0.0, min_for="5s")      # every `for:` -> 5s
    (tmp / "alertmanager.yml").write_text(
        render_alertmanager(slack_url=f"{recv}/slack", pagerduty_url=f"{recv}/pagerduty"))

Durations inside expressions (``rate(...[5m])``, StreamSilent's 900s) are unchanged: rates
work with any scrape interval, and StreamSilent fires at once for a stream whose events carry
an old ``ts`` (``embedwatch_last_event_timestamp_seconds`` is the event's own timestamp).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

ALERTS_DIR = Path(__file__).resolve().parent
RULES_PATH = ALERTS_DIR / "embedwatch-rules.yml"
ALERTMANAGER_PATH = ALERTS_DIR / "alertmanager.yml"
TEMPLATES_GLOB = ALERTS_DIR / "templates" / "*.tmpl"
GRAFANA_PLACEHOLDER = "https://grafana.example.com"
RUNBOOK_BASE = "https://github.com/embedwatch/embedwatch/blob/main/docs/runbooks/"

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000,
             "y": 31_536_000_000}
_DURATION = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")


def parse_duration(text: str) -> float:
    """Seconds of a Prometheus duration such as ``1h30m``, ``15m``, ``500ms`` or ``0s``."""
    text = str(text).strip()
    if text == "0":
        return 0.0
    pos, total_ms = 0, 0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total_ms += int(m.group(1)) * _UNITS_MS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return total_ms / 1000.0


def format_duration(seconds: float) -> str:
    """The shortest Prometheus duration string for ``seconds`` (rounded to milliseconds)."""
    ms = round(seconds * 1000)
    if ms <= 0:
        return "0s"
    out = []
    for unit in ("h", "m", "s", "ms"):
        n, ms = divmod(ms, _UNITS_MS[unit])
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)


def load_rules(path: Path = RULES_PATH) -> dict[str, Any]:
    """The rules file as a dict (``{"groups": [...]}``)."""
    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or "groups" not in data:
        raise ValueError(f"{path} is not a Prometheus rules file")
    return data


def iter_alert_rules(rules: dict[str, Any]) -> list[dict[str, Any]]:
    """Every alerting rule of a rules dict, in file order (an alert name may repeat)."""
    return [r for g in rules["groups"] for r in g.get("rules", []) if "alert" in r]


def render_rules(for_scale: float | None = None, min_for: str = "0s", *,
                 grafana_url: str | None = None, path: Path = RULES_PATH) -> dict[str, Any]:
    """Load the rules file and optionally shorten every alert's ``for:``.

    * ``for_scale=None``: ``for:`` durations are kept as they are.
    * ``for_scale=x``: each ``for:`` becomes ``max(for * x, min_for)``. ``for_scale=0.0,
      min_for="5s"`` sets every ``for:`` to 5s. Rules without ``for:`` (or ``for: 0s``) stay
      instant: they fire on the first evaluation in production too.
    * ``grafana_url``: replaces the placeholder Grafana base URL of the dashboard_url annotations.

    Returns a new dict; the file is not modified. Dump it with :func:`dump_rules`.
    """
    rules = copy.deepcopy(load_rules(path))
    floor = parse_duration(min_for)
    for rule in iter_alert_rules(rules):
        if grafana_url is not None:
            annotations = rule.get("annotations", {})
            for key, value in annotations.items():
                annotations[key] = value.replace(GRAFANA_PLACEHOLDER, grafana_url.rstrip("/"))
        if for_scale is None or "for" not in rule:
            continue
        current = parse_duration(rule["for"])
        if current == 0:
            continue
        rule["for"] = format_duration(max(current * for_scale, floor))
    return rules


def dump_rules(rules: dict[str, Any]) -> str:
    """YAML text of a rules dict, loadable by Prometheus and promtool."""
    return yaml.safe_dump(rules, sort_keys=False, allow_unicode=True, width=1_000_000)


def write_rules(dest: Path | str, for_scale: float | None = None, min_for: str = "0s", *,
                grafana_url: str | None = None) -> Path:
    """Write :func:`render_rules` output to ``dest`` and return its path."""
    dest = Path(dest)
    dest.write_text(dump_rules(render_rules(for_scale, min_for, grafana_url=grafana_url)),
                    encoding="utf-8")
    return dest


def load_alertmanager(path: Path = ALERTMANAGER_PATH) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data: dict[str, Any] = yaml.safe_load(f)
    return data


def render_alertmanager(slack_url: str, pagerduty_url: str, group_wait: str = "1s",
                        group_interval: str = "1s", repeat_interval: str = "1h") -> str:
    """The example Alertmanager config with receivers pointed at test endpoints.

    * every ``slack_configs`` entry posts to ``slack_url`` (``api_url``);
    * every ``pagerduty_configs`` entry posts to ``pagerduty_url`` (``url``) with an inline
      dummy routing key instead of ``routing_key_file``;
    * ``group_wait`` / ``group_interval`` / ``repeat_interval`` are set on the root route and
      removed from child routes so the test timing applies everywhere;
    * the template glob becomes absolute, so the result can be written to any directory.

    Routing, grouping and inhibition are unchanged. Returns YAML text.
    """
    cfg = load_alertmanager()
    cfg["templates"] = [str(TEMPLATES_GLOB)]
    for receiver in cfg.get("receivers", []):
        for slack in receiver.get("slack_configs", []):
            slack.pop("api_url_file", None)
            slack["api_url"] = slack_url
        for pd in receiver.get("pagerduty_configs", []):
            pd.pop("routing_key_file", None)
            pd.pop("service_key_file", None)
            pd.pop("service_key", None)
            pd["routing_key"] = "embedwatch-e2e-routing-key"
            pd["url"] = pagerduty_url

    timings = {"group_wait": group_wait, "group_interval": group_interval,
               "repeat_interval": repeat_interval}

    def strip_timings(route: dict[str, Any]) -> None:
        for child in route.get("routes", []):
            for key in timings:
                child.pop(key, None)
            strip_timings(child)

    cfg["route"].update(timings)
    strip_timings(cfg["route"])
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True, width=1_000_000)
