"""Ids repeated within a bounded memory of recent ids."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class DuplicateIds:
    """Count events whose id already occurred among the last ``capacity`` ids (bounded memory).

    Ids are reduced to 64-bit hashes (collisions are ~capacity^2 / 2^64, negligible). Memory is a
    FIFO ring of the last ``capacity`` hashes plus a sorted copy of it: a batch is checked with one
    ``searchsorted`` and the sorted copy is maintained with one ``delete`` + ``insert`` per batch
    (``O(capacity)`` memory moves, no per-event Python work beyond hashing the id strings).
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
