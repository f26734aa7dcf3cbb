"""`make bench`: run every throughput / latency / memory benchmark, write benchmarks/results.json and
regenerate the tables of docs/benchmarks.md (between the ``<!-- bench:... -->`` markers only, so
sections written by others, e.g. detection quality and soak, are preserved).

    .venv/bin/python benchmarks/run.py [--quick] [--only decode,core,scaling,memory,e2e,latency]
                                       [--bootstrap HOST:PORT] [--backends confluent,kafka-python]
    .venv/bin/python benchmarks/run.py --report-only   # tables again, after make bench-quality

Targets (from the performance issue) are recorded next to each figure with ``target_met``; nothing
here fails on a missed target: benchmarks report, they never assert.

BLAS threads: OpenBLAS's default (one thread per core) makes the small matrix products of the
detectors (e.g. 64x384 @ 384x256) 10-100x slower on this 2-core machine as soon as another process
wants a core (its threads spin-wait for each other). Core and end-to-end figures are therefore given
twice: as shipped (environment untouched) and with ``OPENBLAS_NUM_THREADS=1`` (in-process:
``threadpoolctl.threadpool_limits(1)``). The scaling tables use one BLAS thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _util import (  # noqa: E402
    LOW_MEMORY_PROFILE,
    ONE_THREAD,
    ROOT,
    figure,
    kafka_broker,
    loadavg,
    machine_info,
    profile_detection,
)
from embedwatch.config import Settings, load_settings  # noqa: E402

RESULTS = HERE / "results.json"
DOC = ROOT / "docs" / "benchmarks.md"
ALL = ("decode", "core", "scaling", "memory", "e2e", "latency")


def _sizes(quick: bool) -> dict[str, Any]:
    if quick:
        return {"decode_n": 6_000, "core_n": 20_000, "scale_n": 20_000, "streams": [1, 10, 100],
                "dims": [128, 384, 768, 1536], "e2e_json": 30_000, "e2e_b64": 60_000, "latency_s": 8.0,
                "mem_streams": 50, "mem_steady_streams": (2, 4), "min_per_stream": 120,
                "many_streams": 30, "many_per_stream": 3000, "many_rounds": 1}
    return {"decode_n": 20_000, "core_n": 40_000, "scale_n": 60_000, "streams": [1, 10, 100, 1000],
            "dims": [128, 384, 768, 1536, 3072], "e2e_json": 180_000, "e2e_b64": 360_000, "latency_s": 15.0,
            "mem_streams": 200, "mem_steady_streams": (4, 16), "min_per_stream": 60,
            "many_streams": 100, "many_per_stream": 3000, "many_rounds": 2}


def _timed(name: str, fn: Any, results: dict[str, Any]) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    t0 = time.perf_counter()
    la0 = loadavg()
    try:
        results[name] = fn()
    except Exception as e:
        traceback.print_exc()
        results[name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
    if isinstance(results[name], dict):
        results[name]["_meta"] = {"seconds": round(time.perf_counter() - t0, 1), "loadavg_before": la0,
                                  "loadavg_after": loadavg()}
    print(f"[{time.strftime('%H:%M:%S')}] {name} done in {time.perf_counter() - t0:.0f} s", flush=True)


# ----------------------------------------------------------------------------------- sections

def run_decode(sz: dict[str, Any]) -> dict[str, Any]:
    from threadpoolctl import threadpool_limits

    import micro

    with threadpool_limits(1):
        return micro.bench_decode(sz["decode_n"])


def run_core(sz: dict[str, Any]) -> dict[str, Any]:
    from threadpoolctl import threadpool_limits

    import micro

    out: dict[str, Any] = {"as_shipped": {}, "blas_1_thread": {}}
    out["as_shipped"].update(micro.bench_core_monitor(sz["core_n"]))
    out["as_shipped"]["router_3_streams"] = micro.bench_core_router(3, 384, sz["core_n"])
    with threadpool_limits(1):
        out["blas_1_thread"].update(micro.bench_core_monitor(sz["core_n"]))
        out["blas_1_thread"]["router_3_streams"] = micro.bench_core_router(3, 384, sz["core_n"])
    for v in out.values():
        print(f"  monitor.update_embeddings {v['update_embeddings']['value']:.0f}/s, "
              f"router {v['router_3_streams']['core']['value']:.0f}/s, "
              f"Service.process {v['router_3_streams']['decode_core']['value']:.0f}/s", flush=True)
    return out


def run_scaling(sz: dict[str, Any]) -> dict[str, Any]:
    from threadpoolctl import threadpool_limits

    import micro

    with threadpool_limits(1):
        r = micro.bench_scaling(sz["scale_n"], sz["streams"], sz["dims"], min_events_per_stream=sz["min_per_stream"])
    r["blas_threads"] = 1
    r["encoding"] = "b64"
    return r


def _memory_point(streams: int, dim: int, events: int | None = None, config: Path | None = None) -> dict[str, Any]:
    args = [sys.executable, str(HERE / "memory.py"), str(streams), str(dim)] + ([str(events)] if events else [])
    if config is not None:
        args += ["--config", str(config)]
    p = subprocess.run(args, capture_output=True, text=True, check=True, env={**os.environ, **ONE_THREAD}, cwd=HERE)
    r: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return r


def _limit(mib: float | None, config: Path | None) -> dict[str, Any]:
    """The memory target beside a 200-stream figure: the target's verdict for the defaults; for
    a settings file only whether it is within 300 (the target is the defaults')."""
    if config is None:
        return {"target": "<= 300 (200 streams x 768-d)", "target_met": None if mib is None else mib <= 300}
    return {"within_300": None if mib is None else mib <= 300,
            "note": "a settings file, not the defaults: the target is the defaults'"}


def _memory_set(sz: dict[str, Any], config: Path | None = None) -> dict[str, Any]:
    """Full windows at ``mem_streams`` x 768-d, and the steady state projected to 200 streams."""
    out: dict[str, Any] = {}
    for streams, dim in ((sz["mem_streams"], 768),):
        r = _memory_point(streams, dim, config=config)
        total = r["rss_after_mb"]
        r["rss_after"] = figure(total, "MiB", **_limit(total if streams == 200 else None, config))
        r["per_stream"] = figure(r["mb_per_stream"], "MiB/stream")
        if streams != 200:
            r["projected_200_streams_mb"] = figure(r["rss_before_mb"] + 200 * r["mb_per_stream"], "MiB")
        out[f"{streams}x{dim}"] = r
        print(f"  {streams} streams x {dim}-d: RSS {total:.0f} MiB, {r['mb_per_stream']:.2f} MiB/stream", flush=True)
    # Steady state: a stream that has run long also holds a full duplicate-id memory. Feeding 200
    # streams that far takes 20M events, so two smaller counts are fed and the slope between them
    # is the per-stream figure (the process's fixed growth cancels out).
    d = (load_settings(config) if config is not None else Settings()).detection
    events = d.reference_size + d.window_events + d.duplicate_window
    lo_s, hi_s = sz["mem_steady_streams"]
    lo, hi = _memory_point(lo_s, 768, events, config), _memory_point(hi_s, 768, events, config)
    slope = (hi["rss_after_mb"] - lo["rss_after_mb"]) / (hi_s - lo_s)
    projected = hi["rss_after_mb"] + (200 - hi_s) * slope
    out["steady_768"] = {
        "events_per_stream": events, "points": {str(lo_s): lo, str(hi_s): hi},
        "per_stream": figure(slope, "MiB/stream", method=f"RSS slope between {lo_s} and {hi_s} streams"),
        "projected_200_streams": figure(projected, "MiB", **_limit(projected, config)),
    }
    print(f"  steady state (768-d, {events} events/stream): {slope:.2f} MiB/stream, 200 streams ~{projected:.0f} MiB",
          flush=True)
    return out


def run_memory(sz: dict[str, Any]) -> dict[str, Any]:
    """The defaults (the target's figures), then the low-memory profile (not the defaults: its
    figures are reported beside the target, never as meeting it)."""
    out = _memory_set(sz)
    if LOW_MEMORY_PROFILE.exists():
        print(f"  low-memory profile ({LOW_MEMORY_PROFILE.relative_to(ROOT)}):", flush=True)
        prof = _memory_set(sz, LOW_MEMORY_PROFILE)
        prof["config"] = str(LOW_MEMORY_PROFILE.relative_to(ROOT))
        prof["detection_overrides"] = profile_detection(LOW_MEMORY_PROFILE)
        out["low_memory_profile"] = prof
    return out


def run_kafka(sz: dict[str, Any], sections: set[str], bootstrap: str | None, backends: list[str],
              results: dict[str, Any]) -> None:
    import kafka_e2e

    workdir = Path(tempfile.mkdtemp(prefix="embedwatch-bench-"))
    with kafka_broker(bootstrap) as broker:
        results["broker"] = {"bootstrap": broker.bootstrap, "started_by_bench": broker.owned}
        if "e2e" in sections:
            _timed("e2e", lambda: kafka_e2e.bench_e2e(broker, sz["e2e_json"], sz["e2e_b64"], backends, workdir,
                                                      {"as_shipped": None, "blas_1_thread": ONE_THREAD}), results)
            if "confluent" in backends:
                _timed("many_streams", lambda: kafka_e2e.bench_many_streams(
                    broker, sz["many_streams"], sz["many_per_stream"], workdir, rounds=sz["many_rounds"]), results)
        if "latency" in sections:
            _timed("latency", lambda: {
                "as_shipped": kafka_e2e.bench_latency_all(broker, backends, ["b64"], workdir, sz["latency_s"]),
                "blas_1_thread": kafka_e2e.bench_latency_all(broker, backends, ["b64"], workdir, sz["latency_s"],
                                                             env=ONE_THREAD),
            }, results)


def comparison(results: dict[str, Any]) -> dict[str, Any]:
    """Detection work per event against alibi-detect and Evidently, as their own benchmarks measured it.

    Each ratio is taken from one harness that ran both sides on the same real embeddings and the
    same schedule: ``make bench-quality`` (benchmarks/quality_results.json: alibi-detect's online
    detectors, one update per event) and benchmarks/evidently_bench.py
    (benchmarks/evidently_results.json: Evidently's embedding drift methods on embedwatch's
    schedule, a 1,000-event window every 100 events). embedwatch's side is
    ``StreamMonitor.update_embeddings`` at batches of 100, one BLAS thread, from the quality run.
    The core figure of this run is recorded next to it for reference (a different workload:
    batches of 2,000).
    """
    out: dict[str, Any] = {"embedwatch_core_events_per_s_this_run": results.get("core", {}).get(
        "blas_1_thread", {}).get("update_embeddings", {}).get("value"), "rows": {}}
    try:
        q = json.loads((HERE / "quality_results.json").read_text())
        ev = json.loads((HERE / "evidently_results.json").read_text())
    except (OSError, ValueError) as e:
        out["status"] = f"run make bench-quality and benchmarks/evidently_bench.py first ({e})"
        return out
    tq = q.get("throughput_updates_per_s") or {}
    ours = tq.get("embedwatch_batch_100")
    out["embedwatch_updates_per_s"] = ours
    others = {name: ("quality_results.json", tq.get(name))
              for name in ("alibi_MMDDriftOnline", "alibi_LSDDDriftOnline")}
    others.update({name: ("evidently_results.json", v)
                   for name, v in (ev.get("throughput_updates_per_s") or {}).items() if name.endswith("_every_100")})
    for name, (src, v) in others.items():
        ratio = ours / v if ours and v else None
        online = name.startswith("alibi_")  # the target's anchors: the online detectors
        out["rows"][name] = {"source": src, "other_updates_per_s": v, "embedwatch_updates_per_s": ours,
                             "ratio": figure(ratio, "x", target=">= 100" if online else None,
                                             target_met=None if ratio is None or not online else ratio >= 100)}
    return out


def section_runs(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per section, the run it was measured in (``started``, ``quick``), from a results file's
    ``run`` record, including those written before the record named them per section."""
    if run.get("section_runs"):
        return dict(run["section_runs"])
    here = {"started": run.get("started"), "quick": run.get("quick")}
    other = run.get("other_sections_from") or here
    ran = set(run.get("sections") or ALL)
    return {s: (here if s in ran else other) for s in ALL}


# ----------------------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    ap.add_argument("--only", default=",".join(ALL), help=f"comma list of {','.join(ALL)}")
    ap.add_argument("--bootstrap", default=None, help="use this running broker instead of starting one")
    ap.add_argument("--backends", default="confluent,kafka-python")
    ap.add_argument("--no-doc", action="store_true", help="do not touch docs/benchmarks.md")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: take benchmarks/results.json as it is, recompute the comparison "
                         "with the other tools' latest results (make bench-quality, evidently_bench.py) and "
                         "regenerate the tables")
    args = ap.parse_args()
    if args.report_only:
        results = json.loads(RESULTS.read_text())
        results["comparison"] = comparison(results)
        RESULTS.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
        import report

        report.update_doc(DOC, results)
        print(f"updated {RESULTS.relative_to(ROOT)} (comparison) and {DOC.relative_to(ROOT)}", flush=True)
        return 0
    sections = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = sections - set(ALL)
    if unknown:
        ap.error(f"unknown sections: {sorted(unknown)}")
    sz = _sizes(args.quick)
    t0 = time.perf_counter()
    # A partial run (--only) keeps the other sections of the previous results.
    results: dict[str, Any] = {}
    if RESULTS.exists() and sections != set(ALL):
        try:
            results = json.loads(RESULTS.read_text())
        except ValueError:
            results = {}
    previous = results.get("run") or {}
    results["machine"] = machine_info()
    results["run"] = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "quick": args.quick, "sizes": sz,
                      "sections": sorted(sections)}
    # Which run each section comes from: a partial run keeps the others' (so a second partial run
    # does not credit the first one's sections to the last full run).
    this_run = {"started": results["run"]["started"], "quick": args.quick}
    kept = section_runs(previous) if sections != set(ALL) and previous else {}
    results["run"]["section_runs"] = {s: (this_run if s in sections else kept.get(s, this_run)) for s in ALL}
    print(json.dumps(results["machine"], indent=1), flush=True)
    if "decode" in sections:
        _timed("decode", lambda: run_decode(sz), results)
    if "core" in sections:
        _timed("core", lambda: run_core(sz), results)
    if "scaling" in sections:
        _timed("scaling", lambda: run_scaling(sz), results)
    if "memory" in sections:
        _timed("memory", lambda: run_memory(sz), results)
    if sections & {"e2e", "latency"}:
        try:
            run_kafka(sz, sections, args.bootstrap, [b.strip() for b in args.backends.split(",") if b.strip()],
                      results)
        except Exception as e:
            traceback.print_exc()
            results["broker"] = {"error": f"{type(e).__name__}: {e}"[:1000]}
    results["comparison"] = comparison(results)
    results["run"]["seconds"] = round(time.perf_counter() - t0, 1)
    results["machine"]["loadavg_at_end"] = loadavg()
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)} in {results['run']['seconds']:.0f} s", flush=True)
    if not args.no_doc:
        import report

        report.update_doc(DOC, results)
        print(f"updated {DOC.relative_to(ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
