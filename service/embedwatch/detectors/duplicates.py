"""Ids repeated within a bounded memory of recent ids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: Batches up to this many ids take the buffered per-id path (:meth:`DuplicateIds._update_small`).
_SMALL = 64
#: Pending changes (additions + distinct evicted hashes) that trigger a merge into the sorted copy.
_MERGE_EVERY = 256

class DuplicateIds:
    """Count events whose id already occurred among the last ``capacity`` ids (bounded memory).

    Ids are reduced to 64-bit hashes (collisions are ~capacity^2 / 2^64, negligible). Memory is a
    FIFO ring of the last ``capacity`` hashes plus a sorted copy of it: a batch is checked with one
    ``searchsorted``. A long batch updates the sorted copy with one ``delete`` + ``insert``
    (``O(capacity)`` memory moves, no per-event Python work beyond hashing the id strings); a short
    one (a few events per stream and batch, as with many streams) leaves its changes in two small
    dicts that are merged into the sorted copy every few hundred changes.
    ``None`` ids are ignored. Within one batch every id is checked against the memory as it was
    before the batch and against all earlier ids of the batch (so a batch longer than
    ``capacity`` is checked in full).

    Parameters
    ----------
    capacity
        How many recent ids are remembered.

    Examples
    --------
    >>> d = DuplicateIds(capacity=3)
    >>> d.update(["a", "b", "a", None])
    1
    >>> d.update(["c", "d", "e"])      # memory now holds the 3 most recent ids: c, d, e
    0
    >>> d.update(["a", "e"])           # "a" was forgotten, "e" was not
    1
    >>> d.total
    2

    References
    ----------
    [^1]: Metwally, A., Agrawal, D. & El Abbadi, A. (2005). Duplicate detection in click streams.
          WWW '05 (sliding-window duplicate detection with bounded memory).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = int(capacity)
        self._ring = np.zeros(self.capacity, dtype=np.int64)
        self._size = 0
        self._head = 0  # next write position
        self._sorted = np.zeros(0, dtype=np.int64)
        # Changes not yet merged into ``_sorted`` (see :meth:`_update_small`): hash -> count of
        # ring entries added since the last merge (the newest ``_nfresh`` of the ring), and of
        # entries evicted since then that ``_sorted`` still holds.
        self._fresh: dict[int, int] = {}
        self._gone: dict[int, int] = {}
        self._nfresh = 0
        self.total = 0

    def update(self, ids: Sequence[str | None]) -> int:
        """Feed the ids of a batch in order; return how many of them are duplicates."""
        present = [i for i in ids if i is not None]
        if not present:
            return 0
        h = np.fromiter(map(hash, present), dtype=np.int64, count=len(present))
        n = self.update_hashes(h)
        self.total += n
        return n

    def update_hashes(self, h: np.ndarray) -> int:
        """Same as :meth:`update` on pre-hashed ids (does not add to :attr:`total`)."""
        if h.shape[0] <= _SMALL:
            return self._update_small(h.tolist())
        self._merge()
        return self._update_bulk(h)

    def _update_small(self, hs: list[int]) -> int:
        """A short batch without touching ``_sorted``: it costs two ``delete``/``insert`` memory moves
        of the whole memory, which with many streams (a few events per stream and batch) was most
        of the cost. Additions and evictions wait in two small dicts, merged every
        :data:`_MERGE_EVERY` changes (amortised ``O(capacity / _MERGE_EVERY)`` per event)."""
        fresh, gone = self._fresh, self._gone
        arr = np.array(hs, dtype=np.int64)
        srt = self._sorted
        merged = (np.searchsorted(srt, arr, side="right") - np.searchsorted(srt, arr)).tolist()
        dups = 0
        seen: set[int] = set()
        for x, c in zip(hs, merged, strict=True):
            if x in seen or c - gone.get(x, 0) + fresh.get(x, 0) > 0:
                dups += 1
            seen.add(x)
        hs = hs[max(0, len(hs) - self.capacity):]
        k = len(hs)
        overflow = self._size + k - self.capacity
        if overflow > 0:
            ring = self._ring
            start = self._head - self._size
            old_merged = self._size - self._nfresh  # the oldest entries are the merged ones
            for j in range(overflow):
                x = int(ring[(start + j) % self.capacity])
                if j < old_merged:
                    gone[x] = gone.get(x, 0) + 1
                else:
                    left = fresh[x] - 1
                    if left:
                        fresh[x] = left
                    else:
                        del fresh[x]
                    self._nfresh -= 1
            self._size -= overflow
        for j, x in enumerate(hs):
            self._ring[(self._head + j) % self.capacity] = x
            fresh[x] = fresh.get(x, 0) + 1
        self._head = (self._head + k) % self.capacity
        self._size += k
        self._nfresh += k
        if self._nfresh + len(gone) >= _MERGE_EVERY:
            self._merge()
        return dups

    def _merge(self) -> None:
        """Apply the pending evictions and additions to ``_sorted``."""
        if self._gone:
            gone = _expand(self._gone)
            at = np.searchsorted(self._sorted, gone)
            run = np.arange(gone.size) - np.searchsorted(gone, gone)
            self._sorted = np.delete(self._sorted, at + run)
            self._gone = {}
        if self._fresh:
            add = _expand(self._fresh)
            self._sorted = np.insert(self._sorted, np.searchsorted(self._sorted, add), add)
            self._fresh = {}
        self._nfresh = 0

    def _update_bulk(self, h: np.ndarray) -> int:
        """A long batch, vectorised; ``_sorted`` is up to date (merged) on entry and on exit."""
        k = h.shape[0]
        # Seen before in memory?
        if self._sorted.size:
            pos = np.searchsorted(self._sorted, h)
            pos_c = np.minimum(pos, self._sorted.size - 1)
            in_mem = self._sorted[pos_c] == h
        else:
            in_mem = np.zeros(k, dtype=bool)
        # Or earlier in this batch?
        _, first = np.unique(h, return_index=True)
        earlier = np.ones(k, dtype=bool)
        earlier[first] = False
        dups = int(np.count_nonzero(in_mem | earlier))
        # Evict the oldest hashes that the batch pushes out, then insert (the newest of) the batch.
        h = h[max(0, k - self.capacity):]
        k = h.shape[0]
        overflow = self._size + k - self.capacity
        if overflow > 0:
            idx = (self._head - self._size + np.arange(overflow)) % self.capacity
            gone = np.sort(self._ring[idx])
            at = np.searchsorted(self._sorted, gone)
            # Equal hashes: searchsorted gives the same slot; offset them to distinct positions.
            run = np.arange(gone.size) - np.searchsorted(gone, gone)
            self._sorted = np.delete(self._sorted, at + run)
            self._size -= overflow
        widx = (self._head + np.arange(k)) % self.capacity
        self._ring[widx] = h
        self._head = int((self._head + k) % self.capacity)
        self._size += k
        hs = np.sort(h)
        self._sorted = np.insert(self._sorted, np.searchsorted(self._sorted, hs), hs)
        return dups


def _expand(counts: dict[int, int]) -> np.ndarray:
    """The sorted hashes of ``{hash: count}``, each repeated ``count`` times."""
    n = len(counts)
    return np.sort(np.repeat(np.fromiter(counts.keys(), dtype=np.int64, count=n),
                             np.fromiter(counts.values(), dtype=np.int64, count=n)))
