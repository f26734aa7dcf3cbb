"""``make soak``: a steady load for a long time; the service's RSS must stay flat.

Starts a local broker, the service (durable state in a compacted topic, checkpoints every 30 s)
and the producer at a steady rate with periodic drift, samples the service's RSS from /proc every
10 s, and writes benchmarks/soak.json plus the "Soak" section of docs/benchmarks.md. The figure
that matters: RSS at the end vs RSS once warm (after the first 20% of the run), which should be
within 10%.

    python benchmarks/soak.py [--minutes 30] [--rate 2000] [--streams 20] [--dim 384]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from _util import Broker  # benchmarks/ is the script's directory, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).with_name("embedwatch")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape_total(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(r"^embedwatch_consumed_events_total\{[^}]*\} (\S+)$",
                                                      text, re.M))


def update_docs(result: dict[str, object]) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    start, end = "<!-- soak:start -->", "<!-- soak:end -->"
    body = (f"{start}\n"
            f"Command: `make soak` (`python benchmarks/soak.py --minutes {result['minutes']} "
            f"--rate {result['rate']} --streams {result['streams']} --dim {result['dim']}`), "
            "state in a compacted topic, checkpoints every 30 s.\n\n"
            f"Per-stream buffers are full after {result['buffers_full_after_s']:.0f} s; 'warm' is "
            f"{result['warm_after_s']:.0f} s into the run.\n\n"
            "| minutes | events | events/s | RSS at 20% (MB) | RSS warm (MB) | RSS end (MB) | RSS max (MB) "
            "| end vs 20% | end vs warm |\n"
            "|---|---|---|---|---|---|---|---|---|\n"
            f"| {result['minutes']} | {result['events']:,.0f} | {result['events_per_s']:,.0f} | "
            f"{result['rss_at_20pct_mb']:.1f} | {result['rss_warm_mb']:.1f} | {result['rss_end_mb']:.1f} | "
            f"{result['rss_max_mb']:.1f} | {result['rss_change_from_20pct_pct']:+.1f}% | "
            f"{result['rss_change_pct']:+.1f}% |\n{end}")
    if start in text:
        text = text[: text.index(start)] + body + text[text.index(end) + len(end):]
    elif "## Soak" in text:
        text = text.replace("## Soak", "## Soak\n\n" + body, 1)
    else:
        text += "\n## Soak\n\n" + body + "\n"
    doc.write_text(text)


#: How long the broker keeps the soak's events. The service reads them within seconds; kept for
#: the broker's default day, a run at 2,000 events/s wrote about 0.5 GB a minute and a 2-hour run
#: would have filled this machine's disk.
RETENTION_MS = 10 * 60 * 1000


def create_event_topic(bootstrap: str, directory: Path, name: str = "embeddings", partitions: int = 3) -> None:
    """The events topic (the broker's default partitions), keeping only its last ``RETENTION_MS``."""
    Broker(bootstrap, directory, owned=False).create_topic(name, partitions, {"retention.ms": str(RETENTION_MS)})


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--dim", type=int, default=384)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="embedwatch-soak-"))
    kafka_dir = work / "kafka"
    bootstrap = subprocess.run([str(ROOT / "scripts" / "kafka-local"), "start", "--dir", str(kafka_dir)],
                               check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    create_event_topic(bootstrap, kafka_dir)
    port = free_port()
    cfg = work / "config.yaml"
    cfg.write_text(json.dumps({
        "kafka": {"bootstrap_servers": bootstrap, "group_id": "soak"},
        "http": {"host": "127.0.0.1", "port": port},
        "state": {"backend": "kafka", "topic": "soak-state", "checkpoint_interval_s": 30},
    }))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBEDWATCH_")}
    svc = subprocess.Popen([str(BIN), "run", "--config", str(cfg)], stdout=(work / "service.log").open("w"),
                           stderr=subprocess.STDOUT, env=env)
    # A shift every ~5 minutes of a stream's events, so alarms start and end during the soak.
    per_stream = args.rate / args.streams
    faults = [f"--fault=shift@{int(per_stream * 300 * k)}:{int(per_stream * 300 * (k + 1))},stream={k % args.streams},"
              "magnitude=0.5" for k in range(1, int(args.minutes / 5) + 1)]
    prod = subprocess.Popen([str(BIN), "produce", "--bootstrap", bootstrap, "--streams", str(args.streams),
                             "--dim", str(args.dim), "--rate", str(args.rate), "--total", "0", "--quiet", *faults],
                            stdout=(work / "producer.log").open("w"), stderr=subprocess.STDOUT, env=env)
    samples: list[tuple[float, float]] = []
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < args.minutes * 60:
            time.sleep(10)
            if svc.poll() is not None:
                raise RuntimeError(f"service exited: see {work / 'service.log'}")
            samples.append((time.monotonic() - t0, rss_mb(svc.pid)))
            print(f"{samples[-1][0] / 60:5.1f} min  RSS {samples[-1][1]:7.1f} MB", file=sys.stderr)
        events = scrape_total(port)
    finally:
        prod.send_signal(signal.SIGINT)
        svc.send_signal(signal.SIGTERM)
        for p in (prod, svc):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run([str(ROOT / "scripts" / "kafka-local"), "stop", "--dir", str(kafka_dir)], check=False)
        # The broker's log of a 30-minute run is 15-30 GB of JSON events: a soak left behind filled
        # the disk of the next one. The service's and the producer's logs stay in `work`.
        shutil.rmtree(kafka_dir, ignore_errors=True)
    from embedwatch.config import DetectionSettings

    fill_s = DetectionSettings().duplicate_window / (args.rate / args.streams)
    warm_s = max(0.2 * args.minutes * 60, fill_s + 60)
    if warm_s > 0.8 * args.minutes * 60:
        print(f"warning: buffers fill after {fill_s:.0f}s; the run is too short to show a plateau", file=sys.stderr)
    early = [r for t, r in samples if t >= 0.2 * args.minutes * 60]
    warm = [r for t, r in samples if t >= warm_s] or early
    result = {
        "minutes": args.minutes, "rate": args.rate, "streams": args.streams, "dim": args.dim,
        "events": events, "events_per_s": events / (args.minutes * 60),
        "buffers_full_after_s": fill_s, "warm_after_s": warm_s,
        "rss_at_20pct_mb": early[0], "rss_change_from_20pct_pct": 100.0 * (samples[-1][1] - early[0]) / early[0],
        "rss_warm_mb": warm[0], "rss_end_mb": samples[-1][1], "rss_max_mb": max(r for _, r in samples),
        "rss_change_pct": 100.0 * (samples[-1][1] - warm[0]) / warm[0],
        "samples": samples,
    }
    (ROOT / "benchmarks" / "soak.json").write_text(json.dumps(result, indent=2))
    update_docs(result)
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    return 0 if abs(result["rss_change_pct"]) <= 10 else 1  # type: ignore[arg-type]


if __name__ == "__main__":
    raise SystemExit(main())
