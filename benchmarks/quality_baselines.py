"""Detectors embedwatch is compared with in `make bench-quality`: a centroid-distance detector
(numpy, runs in the project venv) and alibi-detect's MMDDriftOnline / LSDDDriftOnline (torch
backend, run in the separate benchmark venv ``.cache/bench-venv``; alibi-detect is under the
Business Source License and is never a runtime dependency of embedwatch).

The alibi part is a subprocess with JSON in and out::

    .cache/bench-venv/bin/python benchmarks/quality_baselines.py alibi SPEC.json OUT.json

SPEC: ``{"detectors": [...], "ert": float, "window_size": int, "n_bootstraps": int,
"runs": [{"name": scenario, "seed": int}, ...]}``. Streams are rebuilt from
:mod:`quality_scenarios` (deterministic), so no arrays cross the process boundary.

Alarm semantics, identical for every detector: the detector sees the post-reference events one
at a time (alibi) or in batches (embedwatch, centroid); an alarm before the change index is a false
alarm, after which the detector is reset (alibi: ``reset_state()``; centroid: the alarm must clear
before it can fire again) and the stream goes on; the first alarm at or after the change gives the
detection delay ``alarm index - change index`` (events after the change). For alibi, a run stops at
the first alarm after the change, or after ``LONG_NULL`` events.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import quality_scenarios as qs  # noqa: E402

# ------------------------------------------------------------------------------------- centroid

class CentroidDetector:
    """Cosine distance between the centroid of the last ``window`` events and the reference centroid.

    Evaluated every ``evaluate_every`` events once ``min_window`` events are in the window (the same
    schedule as embedwatch's defaults). The threshold for a window of ``m`` events is the
    ``alpha`` upper quantile of the distance under H0: to second order the distance is
    ``|P (w - r)|^2 / (2 |r|^2)`` with ``P`` the projection orthogonal to the reference centroid
    ``r`` and ``w - r ~ N(0, (1/m + 1/n) S)`` (``S`` the reference covariance), i.e. a weighted sum
    of chi2_1 whose tail is computed with a saddlepoint approximation. ``alpha`` is the same
    per-evaluation budget as embedwatch's ``false_alarm_rate``. An alarm ends when the distance falls
    back under the threshold.
    """

    def __init__(self, reference: np.ndarray, alpha: float, window: int, evaluate_every: int,
                 min_window: int) -> None:
        from embedwatch.stats import weighted_chi2_isf

        ref = np.asarray(reference, dtype=np.float64)
        self.n = ref.shape[0]
        self.r = ref.mean(axis=0)
        r2 = float(self.r @ self.r)
        u = self.r / math.sqrt(r2)
        c = np.cov(ref, rowvar=False)
        p = np.eye(c.shape[0]) - np.outer(u, u)
        self.w = np.clip(np.linalg.eigvalsh(p @ c @ p), 0.0, None) / (2.0 * r2)
        self.alpha, self.window, self.every, self.min_window = alpha, window, evaluate_every, min_window
        self._isf = weighted_chi2_isf
        self._thr: dict[int, float] = {}

    def threshold(self, m: int) -> float:
        t = self._thr.get(m)
        if t is None:
            t = self._thr[m] = float(self._isf(self.alpha, (1.0 / m + 1.0 / self.n) * self.w))
        return t

    def run(self, events: np.ndarray) -> list[tuple[int, float, float]]:
        """Alarm starts ``(index in events, distance, threshold)`` over a whole stream."""
        x = np.asarray(events, dtype=np.float64)
        cs = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(x, axis=0)])
        rn = float(np.linalg.norm(self.r))
        out: list[tuple[int, float, float]] = []
        on = False
        for i in range(self.every - 1, x.shape[0], self.every):
            lo = max(0, i + 1 - self.window)
            m = i + 1 - lo
            if m < self.min_window:
                continue
            wmean = (cs[i + 1] - cs[lo]) / m
            dist = 1.0 - float(wmean @ self.r) / (float(np.linalg.norm(wmean)) * rn)
            thr = self.threshold(m)
            if dist > thr and not on:
                out.append((i, dist, thr))
            on = dist > thr
        return out


# ------------------------------------------------------------------------------------- alibi

def _make_alibi(kind: str, reference: np.ndarray, spec: dict[str, Any]) -> Any:
    """A detector whose thresholds alibi configures by simulation (``n_bootstraps`` bootstrap streams).

    This costs minutes per reference at ERT ~1e3-1e4 and is not cached: LSDD's configuration also
    sets its regularisation and kernel centres, so thresholds alone cannot be reused safely.
    """
    from alibi_detect.cd import LSDDDriftOnline, MMDDriftOnline

    cls = {"MMDDriftOnline": MMDDriftOnline, "LSDDDriftOnline": LSDDDriftOnline}[kind]
    return cls(np.ascontiguousarray(reference, dtype=np.float32), ert=float(spec["ert"]),
               window_size=int(spec["window_size"]), backend="pytorch", n_bootstraps=int(spec["n_bootstraps"]),
               verbose=False, device="cpu")


def _reset(det: Any) -> None:
    if hasattr(det, "reset_state"):
        det.reset_state()
    else:  # older alibi-detect
        det.reset()


def run_alibi(spec: dict[str, Any]) -> dict[str, Any]:
    """Run alibi-detect's online detectors over the spec's scenario runs (bench venv only)."""
    import warnings

    warnings.filterwarnings("ignore")
    import alibi_detect
    import torch

    torch.set_num_threads(int(spec.get("torch_threads", 1)))
    torch.manual_seed(0)
    np.random.seed(0)
    cap = int(spec.get("max_events", qs.LONG_NULL))
    out: dict[str, Any] = {"versions": {"alibi_detect": alibi_detect.__version__, "torch": torch.__version__,
                                        "numpy": np.__version__},
                           "torch_threads": torch.get_num_threads(), "calibration": [], "runs": []}
    # runs grouped by reference (domain, seed): one configured detector per group, dropped after it
    # (alibi's configuration holds a lot of memory; keeping several detectors alive OOMs a 24 GB box)
    ordered = sorted(spec["runs"], key=lambda r: (qs.domain(r["name"]), int(r["seed"])))
    for kind in spec["detectors"]:
        det: Any = None
        det_key: tuple[str, int] | None = None
        for run in ordered:
            s = qs.build(run["name"], int(run["seed"]))
            key = (qs.domain(s.name), s.seed)
            if key != det_key:
                det = None
                gc.collect()
                t0 = time.perf_counter()
                torch.manual_seed(s.seed)
                det = _make_alibi(kind, s.reference, spec)
                det_key = key
                dt = time.perf_counter() - t0
                out["calibration"].append({"detector": kind, "seed": s.seed, "domain": key[0], "seconds": dt})
                print(f"[alibi] configured {kind} thresholds for {key[0]} seed {s.seed} in {dt:.1f}s",
                      file=sys.stderr, flush=True)
            else:
                _reset(det)
            ev = s.events
            fas: list[int] = []
            detection: int | None = None
            n = 0
            t0 = time.perf_counter()
            for t in range(min(ev.shape[0], cap)):
                pred = det.predict(ev[t])
                n += 1
                if pred["data"]["is_drift"]:
                    if s.change is not None and t >= s.change:
                        detection = t
                        break
                    fas.append(t)
                    _reset(det)
            dt = time.perf_counter() - t0
            out["runs"].append({"detector": kind, "name": s.name, "seed": s.seed, "change": s.change,
                                "false_alarms": fas, "detection": detection, "events": n, "seconds": dt})
            print(f"[alibi] {kind:16s} {s.name:28s} seed {s.seed}: fa={len(fas)} det={detection} "
                  f"({n / dt:.0f} ev/s)", file=sys.stderr, flush=True)
    return out


def throughput_alibi(spec: dict[str, Any]) -> dict[str, Any]:
    """Updates/s of each alibi detector's ``predict`` on one event at a time (bench venv only)."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(int(spec.get("torch_threads", 1)))
    s = qs.build("null/moby", 0)
    res: dict[str, Any] = {}
    for kind in spec["detectors"]:
        det = _make_alibi(kind, s.reference, {**spec, "n_bootstraps": 1000, "ert": 100.0})
        n = int(spec.get("throughput_events", 2000))
        for t in range(50):  # warm-up
            det.predict(s.events[t])
        dt = math.inf
        for _ in range(3):  # best of 3, like embedwatch's figure
            t0 = time.perf_counter()
            for t in range(n):
                det.predict(s.events[t % s.events.shape[0]])
            dt = min(dt, time.perf_counter() - t0)
        res[kind] = {"events": n, "seconds": dt, "updates_per_s": n / dt, "repeats": 3}
    return res


def main(argv: list[str]) -> int:
    if len(argv) == 4 and argv[1] in ("alibi", "throughput"):
        spec = json.loads(Path(argv[2]).read_text())
        res = run_alibi(spec) if argv[1] == "alibi" else throughput_alibi(spec)
        Path(argv[3]).write_text(json.dumps(res))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
