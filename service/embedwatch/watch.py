"""``embedwatch watch``: a live terminal summary of a running service, read from its /metrics."""

from __future__ import annotations

import http.client
import math
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

Series = dict[str, dict[tuple[tuple[str, str], ...], float]]


class ScrapeError(Exception):
    """/metrics could not be read or parsed (one line, shown as "waiting for ...")."""


def scrape(url: str) -> Series:
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/metrics", timeout=5) as r:
            text = r.read().decode()
        out: Series = defaultdict(dict)
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[s.name][tuple(sorted(s.labels.items()))] = s.value
    # URLError and timeouts are OSErrors; a non-HTTP reply is an HTTPException, a reply that is
    # not UTF-8 or not the Prometheus text format a ValueError (UnicodeDecodeError is one).
    except OSError as e:
        raise ScrapeError(str(e) or type(e).__name__) from None
    except http.client.HTTPException as e:
        raise ScrapeError(f"not an HTTP response ({type(e).__name__}: {str(e)[:100]!r})") from None
    except ValueError as e:
        raise ScrapeError(f"not Prometheus metrics ({type(e).__name__}: {str(e)[:200]})") from None
    return out


def _stream(labels: tuple[tuple[str, str], ...]) -> str:
    d = dict(labels)
    return f"{d.get('model', '?')}/{d.get('model_version', '?')}/{d.get('segment', '?')}"


def render(cur: Series, prev: Series | None, dt: float, max_lines: int | None = None) -> str:
    """The frame; with ``max_lines``, the stream table is cut to fit, saying how many are not shown."""
    def total(name: str, s: Series) -> float:
        return sum(s.get(name, {}).values())

    ev = total("embedwatch_events_total", cur)
    rate = (ev - total("embedwatch_events_total", prev)) / dt if prev and dt > 0 else math.nan
    lines = [
        f"embedwatch  events {ev:,.0f}  ({rate:,.0f}/s)   streams {total('embedwatch_streams', cur):.0f}   "
        f"kafka {'up' if total('embedwatch_kafka_connected', cur) else 'DOWN'}   "
        f"ready {'yes' if total('embedwatch_ready', cur) else 'no'}   "
        f"lag {total('embedwatch_consumer_lag_messages', cur):,.0f}",
    ]
    rej: dict[str, float] = defaultdict(float)
    for labels, v in cur.get("embedwatch_events_rejected_total", {}).items():
        rej[dict(labels).get("reason", "?")] += v
    lines.append("rejected  " + ("  ".join(f"{k}={v:,.0f}" for k, v in sorted(rej.items())) or "none"))
    per: dict[str, dict[str, float]] = defaultdict(dict)
    for labels, v in cur.get("embedwatch_events_total", {}).items():
        per[_stream(labels)]["events"] = per[_stream(labels)].get("events", 0) + v
    for metric, col in (("embedwatch_drift_detected", "drift"), ("embedwatch_drift_score", "mmd2"),
                        ("embedwatch_drift_p_value", "p"), ("embedwatch_centroid_cosine_distance", "cos_d"),
                        ("embedwatch_similarity_ks_statistic", "ks"), ("embedwatch_baseline_ready", "base"),
                        ("embedwatch_embedding_dimension", "dim")):
        for labels, v in cur.get(metric, {}).items():
            per[_stream(labels)][col] = v
    lines.append(f"{'stream':<36} {'events':>9} {'dim':>5} {'base':>5} {'cos_d':>7} {'ks':>6} "
                 f"{'mmd2':>8} {'p':>8}  state")
    names = sorted(per)
    if max_lines is not None and len(lines) + len(names) > max_lines:
        shown = max(0, max_lines - len(lines) - 1)
        hidden = len(names) - shown
        names = names[:shown]
    else:
        hidden = 0
    for name in names:
        d = per[name]
        state = "DRIFT" if d.get("drift") else ("learning" if not d.get("base") else "ok")
        lines.append(
            f"{name[:36]:<36} {d.get('events', 0):>9,.0f} {d.get('dim', math.nan):>5.0f} "
            f"{'yes' if d.get('base') else 'no':>5} {d.get('cos_d', math.nan):>7.4f} {d.get('ks', math.nan):>6.3f} "
            f"{d.get('mmd2', math.nan):>8.5f} {d.get('p', math.nan):>8.2g}  {state}"
        )
    if hidden:
        lines.append(f"... {hidden:,} more streams not shown (a taller terminal, or /api/streams)")
    return "\n".join(lines)


def watch(url: str, interval: float = 2.0, once: bool = False) -> int:
    if not (interval > 0 and math.isfinite(interval)):
        raise ValueError(f"interval must be a positive number of seconds (got {interval})")
    try:
        return _watch(url, interval, once)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader went away (`watch | head`): end quietly, and keep the interpreter from
        # reporting the pipe again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


def _watch(url: str, interval: float, once: bool) -> int:
    prev: Series | None = None
    t_prev = time.monotonic()
    # Redraw in place only on a terminal: piped, frames follow each other without escape codes.
    tty = sys.stdout.isatty()
    while True:
        try:
            cur = scrape(url)
        except ScrapeError as e:
            print(f"waiting for {url}: {e}", file=sys.stderr)
            if once:
                return 1
            time.sleep(interval)
            continue
        now = time.monotonic()
        # On a terminal a frame taller than the screen would scroll away: cut it to fit (the
        # last line stays free for the cursor).
        height = shutil.get_terminal_size().lines - 1 if tty and not once else None
        text = render(cur, prev, now - t_prev, max_lines=height)
        if once:
            print(text)
            sys.stdout.flush()
            return 0
        sys.stdout.write(("\x1b[2J\x1b[H" if tty else "") + text + "\n")
        sys.stdout.flush()
        prev, t_prev = cur, now
        time.sleep(interval)
