"""Comparison of two versions of one model over the items both embedded (dual-write migrations).

During a migration producers often write the same item (same ``id``) with the old and the new
model version. :class:`VersionComparison` (one per model) keeps, per version, a bounded *probe
set* of vectors keyed by id and compares every pair of versions over the ids they share:

``paired_cosine``
    mean cosine similarity of the two vectors of each shared id. Only meaningful when both
    versions have the same dimension (a fine-tune, a re-quantisation); NaN otherwise or without
    shared ids. 1.0 means the new version embeds exactly like the old one.
``knn_overlap``
    for each shared id, its ``k`` nearest neighbours (cosine) among the shared ids under version A
    and under version B; the mean of ``|A ∩ B| / k``. Works across dimensions: it measures whether
    the new model keeps the *neighbourhood structure* that retrieval depends on. A rotation of the
    whole space changes ``paired_cosine`` but leaves ``knn_overlap`` at 1. ``k`` is capped at
    ``shared_ids - 1``; NaN with fewer than 2 shared ids.
``dimension_changed``
    the two versions emit vectors of different dimensions: reported, never an error.

The reference of a pair is the version seen first (the older one).

Bounded memory. Per version at most ``probe_size`` ids are held (``probe_size * dim * 4``
bytes; ``solo_probe_size`` while the model has a single version, see
:class:`VersionComparison`), and at most ``max_versions`` versions per model (the first one
seen, the reference, is never evicted; beyond the cap the least recently updated other version is dropped). An id
held by two or more versions is *pinned*: it stays until a new version appears. Other ids form a
ring of the most recent ones, evicted first-in first-out to make room. So when a version emits an
id that another version emitted within its last ``probe_size`` unpinned ids, the pair is caught
and kept; once ``probe_size`` ids are pinned the probe set is fixed. That is exactly the dual-write
case, where both versions emit an item at about the same time.

A new version (the next migration: v2 -> v3 after v1 -> v2) restarts the pin set: every pinned id
goes back to the oldest end of its version's ring. A finished migration's pins would otherwise
fill the probes for good (a probe full of pins takes no new id), and the new version could pair
with nothing. A dual write still going on pins its next shared ids again; the pairs of a finished
one leave the rings as their versions emit new ids (the reference, if retired, keeps its last
``probe_size`` ids but pairs with no new version). The restart happens when the new version is
announced (:meth:`VersionComparison.expect`, before a poll batch's blocks are added) or first
updated, so the old version's block of the same batch is taken in full.

Updates are O(batch) dictionary operations plus one numpy scatter; :meth:`results` is
vectorised (one Gram matrix per version of a pair, ``argpartition`` for the k nearest) and
cached until the next update.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

RESULT_KEYS = (
    "model", "model_version", "reference_version", "paired_cosine", "knn_overlap", "shared_ids",
    "dimension_changed",
)


#: A single version's batch of at most this many ids takes the per-id loop of :meth:`update`
#: (O(batch)); a longer one the bulk ring update (:meth:`VersionComparison._update_alone`,
#: O(probe)), whose fixed cost is about a hundred ids' worth of the loop.
_LOOP_MAX = 64
#: Up to this many rows of a batch are copied one by one; more take one fancy-indexed copy
#: (measured crossover about 20 rows of 384-d).
_ROW_COPIES = 16

class _Probe:
    """Vectors of one version keyed by id: pinned (shared) rows plus a FIFO ring of recent ones."""

    __slots__ = ("capacity", "dim", "free", "index", "pinned", "rejected", "seq", "unpinned", "vectors")

    def __init__(self, dim: int, capacity: int, seq: int) -> None:
        self.dim = dim
        self.capacity = capacity
        self.vectors = np.zeros((min(capacity, 64), dim), dtype=np.float32)
        self.index: dict[str, int] = {}
        self.unpinned: OrderedDict[str, None] = OrderedDict()
        self.pinned: set[str] = set()
        self.free: list[int] = []
        self.rejected = 0  # vectors of another dimension than the version's first one
        self.seq = seq  # last update sequence number (for eviction of whole versions)

    def _row(self) -> int | None:
        """A row for a new id: a free one, a new one, or the oldest unpinned id's (evicted)."""
        if self.free:
            return self.free.pop()
        n = len(self.index)
        if n < self.capacity:
            if n >= self.vectors.shape[0]:
                grown = np.zeros((min(self.capacity, 2 * self.vectors.shape[0]), self.dim), dtype=np.float32)
                grown[: self.vectors.shape[0]] = self.vectors
                self.vectors = grown
            return n
        if self.unpinned:
            old, _ = self.unpinned.popitem(last=False)
            return self.index.pop(old)
        return None

    def pin(self, ident: str) -> None:
        if ident not in self.pinned:
            self.pinned.add(ident)
            self.unpinned.pop(ident, None)

    def unpin_all(self) -> None:
        """Every pinned id back to the ring, at its oldest end (in row order: deterministic)."""
        if self.pinned:
            released = sorted(self.pinned, key=self.index.__getitem__)
            self.unpinned = OrderedDict.fromkeys([*released, *self.unpinned])
            self.pinned = set()


class VersionComparison:
    """Paired cosine and k-NN overlap between the versions of one model; see the module docstring.

    ``VersionComparison(model, probe_size=2000, k=10, max_versions=4, solo_probe_size=64)``; the
    service passes ``detection.version_probe_size``, ``detection.version_knn_k`` and
    ``detection.version_solo_probe_size``.

    While a model has a single version (most models, most of the time) its probe keeps only the
    ``solo_probe_size`` most recent ids, at a fraction of the memory (``probe_size * dim * 4``
    bytes per model otherwise). From the second version on, every probe may grow to
    ``probe_size``. The solo ring only decides which items the new version emits *first* can be
    paired: those whose old-version twin came at most ``solo_probe_size`` ids before the new
    version appeared. Every later pair within ``probe_size`` ids of each other is caught whatever
    its size, so a dual write whose second version lags by ``L`` ids loses at most its first ``L``
    pairs to a small ring. Storage grows with use (never preallocated).
    """

    def __init__(self, model: str, probe_size: int = 2000, k: int = 10, max_versions: int = 4,
                 solo_probe_size: int = 64) -> None:
        if probe_size < 2 or k < 1 or max_versions < 2 or solo_probe_size < 1:
            raise ValueError("probe_size >= 2, k >= 1, max_versions >= 2 and solo_probe_size >= 1 are required")
        self.model = model
        self.probe_size = probe_size
        self.solo_probe_size = min(solo_probe_size, probe_size)
        self.k = k
        self.max_versions = max_versions
        # Insertion order = order first seen: the first is the reference of every pair it is in.
        self._versions: dict[str, _Probe] = {}
        self._several = False  # a second version was seen or announced: probes may grow to probe_size
        # (set once by expect(); the reference is never evicted, so it stays true)
        self._seq = 0
        self._cache: list[dict[str, Any]] | None = None
        # New versions whose pin restart expect() did already: their first update does not redo it
        # (it would release the pins the batch's other blocks made meanwhile).
        self._restarted: set[str] = set()

    @property
    def versions(self) -> list[str]:
        """Versions held, oldest (first seen) first."""
        return list(self._versions)

    def shared_ids(self, version: str, reference: str) -> list[str]:
        """Ids held by both versions, in the reference's row order."""
        a, b = self._versions[reference], self._versions[version]
        return sorted((i for i in a.index if i in b.index), key=a.index.__getitem__)

    def expect(self, versions: Iterable[str]) -> None:
        """Versions about to be updated (e.g. the blocks of one poll batch). With two or more
        versions between them and those held, every probe may grow to ``probe_size`` from now
        on, so the first version's update is not cut to the solo ring before the second arrives.
        A version not held restarts the pin set now (see the module docstring), so that the held
        versions' blocks of the same batch are taken whole, ready to pair with it."""
        versions = set(versions)
        self._widen(versions)
        new = versions - set(self._versions)
        if new:
            self._restart_pins()
        self._restarted = new

    def _widen(self, versions: set[str]) -> None:
        if not self._several and len(set(self._versions) | versions) > 1:
            self._several = True
            for p in self._versions.values():
                p.capacity = self.probe_size

    def _restart_pins(self) -> None:
        for p in self._versions.values():
            p.unpin_all()

    def update(self, model_version: str, ids: Sequence[str | None], vectors: np.ndarray) -> None:
        """Add a batch of one version; rows whose id is None are ignored."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[0] != len(ids) or vectors.shape[1] == 0:
            raise ValueError("vectors must be (len(ids), dim) with dim > 0")
        self._seq += 1
        probe = self._versions.get(model_version)
        if probe is None:
            self._evict_version()
            self._widen({model_version})  # a second version: every probe may grow to full size
            if model_version in self._restarted:
                self._restarted.discard(model_version)  # announced: its restart is done
            else:
                self._restart_pins()
            cap = self.probe_size if self._several else self.solo_probe_size
            probe = self._versions[model_version] = _Probe(vectors.shape[1], cap, self._seq)
        probe.seq = self._seq
        if vectors.shape[1] != probe.dim:
            probe.rejected += sum(1 for i in ids if i is not None)
            return
        others = [p for v, p in self._versions.items() if v != model_version]
        if not others and not probe.pinned and len(ids) > _LOOP_MAX:
            self._update_alone(probe, ids, vectors)
            return
        rows: dict[int, int] = {}  # row -> batch position (the last write of a row wins)
        for pos, ident in enumerate(ids):
            if ident is None:
                continue
            row = probe.index.get(ident)
            if row is None:
                row = probe._row()
                if row is None:
                    continue  # all rows pinned: the probe set is final
                probe.index[ident] = row
                probe.unpinned[ident] = None
            elif ident in probe.unpinned:
                probe.unpinned.move_to_end(ident)
            rows[row] = pos
            for other in others:
                if ident in other.index:
                    other.pin(ident)
                    probe.pin(ident)
        if len(rows) > _ROW_COPIES:
            dst = np.fromiter(rows.keys(), dtype=np.int64, count=len(rows))
            src = np.fromiter(rows.values(), dtype=np.int64, count=len(rows))
            probe.vectors[dst] = vectors[src]
        else:  # a few rows (many streams, a few events each per poll): copies beat a fancy index
            for row, pos in rows.items():
                probe.vectors[row] = vectors[pos]
        if rows:
            self._cache = None

    def _update_alone(self, probe: _Probe, ids: Sequence[str | None], vectors: np.ndarray) -> None:
        """:meth:`update` of the only version of a model (nothing pinned), without a per-id loop.

        Same result as the loop: the probe is a ring of the ``capacity`` most recently seen ids
        (an id seen again moves to the newest end and takes its newest vector). Rows handed out
        so far are ``0..len(index) + len(free) - 1``, as :meth:`_Probe._row` assumes.
        """
        cap = probe.capacity
        # The batch's last ``cap`` distinct ids, newest first, each with its last position: read
        # from the end, a batch much longer than the ring is not read whole (3 streams, 667 ids a
        # batch against a ring of 64). Once the ring is full of the batch's ids, an older id,
        # seen earlier in the batch or not, leaves it either way.
        last: dict[str, int] = {}
        for pos in range(len(ids) - 1, -1, -1):
            ident = ids[pos]
            if ident is not None and ident not in last:
                last[ident] = pos
                if len(last) == cap:
                    break
        if not last:
            return
        order = list(last)[::-1]  # oldest first
        index = probe.index
        untouched = [i for i in probe.unpinned if i not in last]
        keep = cap - len(order)
        kept_old = untouched[max(0, len(untouched) - keep):] if keep > 0 else []
        free = probe.free
        for i in untouched[: len(untouched) - len(kept_old)]:
            free.append(index.pop(i))
        new_ids = [i for i in order if i not in index]
        handed = len(index) + len(free)
        extra = max(0, len(new_ids) - len(free))
        if handed + extra > probe.vectors.shape[0]:
            size = min(cap, max(2 * probe.vectors.shape[0], handed + extra))
            grown = np.zeros((size, probe.dim), dtype=np.float32)
            grown[: probe.vectors.shape[0]] = probe.vectors
            probe.vectors = grown
        pool = free[::-1][: len(new_ids)] + list(range(handed, handed + extra))
        del free[len(free) - min(len(free), len(new_ids)):]
        for ident, row in zip(new_ids, pool, strict=True):
            index[ident] = row
        probe.unpinned = OrderedDict.fromkeys([*kept_old, *order])
        dst = np.fromiter((index[i] for i in order), dtype=np.int64, count=len(order))
        src = np.fromiter((last[i] for i in order), dtype=np.int64, count=len(order))
        probe.vectors[dst] = vectors[src]
        self._cache = None

    def _evict_version(self) -> None:
        if len(self._versions) < self.max_versions:
            return
        names = list(self._versions)[1:]  # never the reference
        victim = min(names, key=lambda v: self._versions[v].seq)
        del self._versions[victim]
        for probe in self._versions.values():
            # Ids pinned only because of the victim go back to the ring (oldest first).
            for ident in list(probe.pinned):
                if not any(ident in p.index for p in self._versions.values() if p is not probe):
                    probe.pinned.discard(ident)
                    probe.unpinned[ident] = None
                    probe.unpinned.move_to_end(ident, last=False)
        self._cache = None

    def results(self) -> list[dict[str, Any]]:
        """One dict per pair of versions (newer, older): keys :data:`RESULT_KEYS` plus
        ``dim`` and ``reference_dim``. Empty while fewer than two versions were seen."""
        if self._cache is None:
            names = list(self._versions)
            out = []
            for j, version in enumerate(names):
                for reference in names[:j]:
                    out.append(self._compare(version, reference))
            self._cache = out
        return [dict(r) for r in self._cache]

    def _compare(self, version: str, reference: str) -> dict[str, Any]:
        a, b = self._versions[reference], self._versions[version]
        shared = self.shared_ids(version, reference)
        xa = a.vectors[[a.index[i] for i in shared]].astype(np.float64)
        xb = b.vectors[[b.index[i] for i in shared]].astype(np.float64)
        changed = a.dim != b.dim
        return {
            "model": self.model,
            "model_version": version,
            "reference_version": reference,
            "paired_cosine": math.nan if changed else paired_cosine(xa, xb),
            "knn_overlap": knn_overlap(xa, xb, self.k),
            "shared_ids": len(shared),
            "dimension_changed": changed,
            "dim": b.dim,
            "reference_dim": a.dim,
        }


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms == 0.0, 1.0, norms)


def paired_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean row-wise cosine similarity of two (n, d) arrays; NaN if n == 0 or the dims differ."""
    if a.shape[0] == 0 or a.shape != b.shape:
        return math.nan
    return float(np.mean(np.einsum("ij,ij->i", _unit(a), _unit(b))))


def knn_indices(x: np.ndarray, k: int) -> np.ndarray:
    """(n, k) indices of each row's k nearest other rows by cosine similarity (order not sorted)."""
    u = _unit(np.asarray(x, dtype=np.float64))
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    return np.argpartition(-sim, k - 1, axis=1)[:, :k]


def knn_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean |kNN_a(i) ∩ kNN_b(i)| / k over the rows (same row = same id; any dims).

    ``k`` is capped at ``n - 1``; NaN when n < 2.
    """
    n = a.shape[0]
    if n < 2 or b.shape[0] != n:
        return math.nan
    k = min(k, n - 1)
    na, nb = knn_indices(a, k), knn_indices(b, k)
    hits = (na[:, :, None] == nb[:, None, :]).any(axis=2).sum(axis=1)
    return float(np.mean(hits / k))
