"""Evidently's embedding drift methods on the quality benchmark's data: detection work per event.

Run in the benchmark venv (Evidently is never a dependency of embedwatch; pinned in
benchmarks/requirements-quality.txt)::

    .cache/bench-venv/bin/python benchmarks/evidently_bench.py

Writes benchmarks/evidently_results.json. Data: the real all-MiniLM-L6-v2 embeddings of
:mod:`quality_scenarios` (384-d): the 1000-event reference of ``moby`` and current windows of
1000 events (embedwatch's default window). Each Evidently method (legacy 0.4.x API,
``evidently.metrics.data_drift.embedding_drift_methods``: ``model``, ``ratio``, ``distance``,
``mmd``) runs with its default settings (no bootstrap).

Two timings per method, one evaluation of a 1000-event window against the reference (median of
``REPEATS`` after one warm-up, one thread: BLAS pools of 1 and the process pinned to one CPU, so
scikit-learn's ``n_jobs=-1`` also gets one worker; the DataFrames are built outside the timing):

* ``method``: the drift method call alone (the statistical detection work). This is the
  favourable reading and the one in ``throughput_updates_per_s``.
* ``report``: ``Report([EmbeddingsDriftMetric(...)]).run(...)``, what a user of the metric pays;
  in 0.4.x the metric also computes a t-SNE projection of up to 2 x 2500 points for its plot.

Evidently is a batch tool, so per-event rates follow a schedule: a 1000-event window evaluated
every 100 events (embedwatch's schedule) gives ``100 / t`` updates/s; one evaluation per
non-overlapping (tumbling) window gives ``1000 / t``. benchmarks/run.py reads the flat
``throughput_updates_per_s`` dict (keys ``evidently_<method>_every_100`` / ``_tumbling_1000``).

Sanity check that each method ran on real data: drift score and flag for a null pair (reference vs
1000 in-distribution events of ``null/moby``) and for ``abrupt/moby>fortunes_es`` (1000 events of
the Spanish source after the change).
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"
os.environ.setdefault("DO_NOT_TRACK", "1")  # Evidently's usage telemetry off
os.environ.setdefault("EVIDENTLY_DISABLE_TELEMETRY", "1")
if hasattr(os, "sched_setaffinity"):  # one CPU: joblib's n_jobs=-1 then means one worker
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})

import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from datetime import UTC, datetime  # noqa: E402
from importlib import metadata  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import quality_scenarios as qs  # noqa: E402

OUT = HERE / "evidently_results.json"
WINDOW = 1000  # embedwatch's default window_events
EVALUATE_EVERY = 100  # embedwatch's default evaluate_every
REPEATS = 3
METHODS = ("model", "ratio", "distance", "mmd")
SEED = 0
SHIFT = "abrupt/moby>fortunes_es"
NULL = "null/moby"
EMB = "emb"


def _frame(x: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(np.asarray(x, dtype=np.float64), columns=[f"e{i}" for i in range(x.shape[1])])


def _median_seconds(fn: Any, cur: pd.DataFrame, ref: pd.DataFrame, repeats: int) -> tuple[float, list[float]]:
    """``fn(cur, ref)`` on fresh copies each time (copied outside the timing): Evidently's ``model``
    method adds a ``target`` column to the frames it is given, which would corrupt later calls."""
    fn(cur.copy(), ref.copy())  # warm-up
    ts = []
    for _ in range(repeats):
        c, r = cur.copy(), ref.copy()
        t0 = time.perf_counter()
        fn(c, r)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts


def main() -> int:
    warnings.filterwarnings("ignore")
    import evidently
    from evidently import ColumnMapping
    from evidently.metrics import EmbeddingsDriftMetric
    from evidently.metrics.data_drift import embedding_drift_methods as edm
    from evidently.report import Report

    null = qs.build(NULL, SEED)
    shift = qs.build(SHIFT, SEED)
    assert np.array_equal(null.reference, shift.reference)  # same moby reference split
    reference = _frame(null.reference)
    current_null = _frame(null.events[:WINDOW])
    assert shift.change is not None
    current_shift = _frame(shift.events[shift.change:shift.change + WINDOW])
    cols = list(reference.columns)
    frames = (reference, current_null, current_shift)
    mapping = ColumnMapping(embeddings={EMB: cols})

    methods: dict[str, Any] = {}
    rates: dict[str, float] = {}
    for name in METHODS:
        method = getattr(edm, name)()  # defaults
        settings = method.dict() if hasattr(method, "dict") else {}
        settings = {k: v for k, v in settings.items() if k != "type"}

        def call(cur: pd.DataFrame, ref: pd.DataFrame, method: Any = method) -> tuple[float, bool, str]:
            return method(cur, ref)

        def report(cur: pd.DataFrame, ref: pd.DataFrame, method: Any = method) -> Report:
            r = Report(metrics=[EmbeddingsDriftMetric(EMB, drift_method=method)])
            r.run(reference_data=ref, current_data=cur, column_mapping=mapping)
            return r

        t_method, ts_method = _median_seconds(call, current_null, reference, REPEATS)
        t_report, ts_report = _median_seconds(report, current_null, reference, REPEATS)
        score_null, flag_null, _ = call(current_null.copy(), reference.copy())
        score_shift, flag_shift, _ = call(current_shift.copy(), reference.copy())
        res = report(current_shift.copy(), reference.copy()).as_dict()["metrics"][0]["result"]
        methods[name] = {
            "settings": settings,
            "method_call": {"seconds_per_evaluation": t_method, "seconds_all": ts_method,
                            "rate_every_100": EVALUATE_EVERY / t_method, "rate_tumbling_1000": WINDOW / t_method},
            "full_report_run": {"seconds_per_evaluation": t_report, "seconds_all": ts_report,
                                "rate_every_100": EVALUATE_EVERY / t_report, "rate_tumbling_1000": WINDOW / t_report},
            "null_pair": {"drift_score": float(score_null), "drift_detected": bool(flag_null)},
            "spanish_shift": {"drift_score": float(score_shift), "drift_detected": bool(flag_shift),
                              "report_drift_score": float(res["drift_score"]),
                              "report_drift_detected": bool(res["drift_detected"])},
        }
        rates[f"evidently_{name}_every_100"] = EVALUATE_EVERY / t_method
        rates[f"evidently_{name}_tumbling_1000"] = WINDOW / t_method
        print(f"{name:9s} method {t_method:8.4f} s  report {t_report:8.3f} s  "
              f"every100 {EVALUATE_EVERY / t_method:10.1f}/s  tumbling {WINDOW / t_method:10.1f}/s  "
              f"null {score_null:.4g} {flag_null}  shift {score_shift:.4g} {flag_shift}", flush=True)

    assert all(list(f.columns) == cols for f in frames)  # inputs untouched (copies went to Evidently)
    doc = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": ".cache/bench-venv/bin/python benchmarks/evidently_bench.py",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (pinned to 1), Python {platform.python_version()}",
        "versions": {"evidently": evidently.__version__, "numpy": np.__version__, "pandas": pd.__version__,
                     "scikit-learn": metadata.version("scikit-learn"), "scipy": metadata.version("scipy")},
        "data": {"reference": f"{NULL} seed {SEED} reference ({null.reference.shape[0]} x {null.reference.shape[1]})",
                 "window_events": WINDOW, "evaluate_every": EVALUATE_EVERY,
                 "null_window": f"{NULL} events[:{WINDOW}]",
                 "shift_window": f"{SHIFT} events[change:change+{WINDOW}] (all from fortunes_es)"},
        "timing": {"repeats": REPEATS, "statistic": "median after one warm-up", "threads": 1,
                   "headline": "method_call (drift method alone, DataFrames prebuilt); full_report_run adds "
                               "Report/ColumnMapping handling and the metric's t-SNE plot data"},
        "schedules": {"every_100": "1000-event window evaluated every 100 events (embedwatch's schedule): 100 / t",
                      "tumbling_1000": "one evaluation per non-overlapping 1000-event window: 1000 / t"},
        "methods": methods,
        "throughput_updates_per_s": rates,
    }
    OUT.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
