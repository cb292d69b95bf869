"""The staging region of strategy ``all``: two halves of bundle rows shared by all layers.

With every neuron needed and a cache smaller than the model, each layer's uncached neurons must be
read at every token. Evicting cached neurons of layer l+1 to read them ahead would only move the
reads (each evicted one was going to be a hit), so the look-ahead gets memory of its own: while
layer l computes over one half, layer l+1's misses are read into the other (runtime/engine.py);
layer l+1 then computes over its cache slots and its half, and the half is free for layer l+2.
Nothing read into a half enters the cache: the cache keeps the same neurons from token to token.

A half is ``rows`` bundles of the largest layer; each layer sees it as rows of its own bundle
length (``StagedSlots``), which is what the fetcher fills and the compute step reads, like cache
slots. The budget counts it (runtime/budget.py, ``MemoryPlan.staging``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sparseflash.layout.format import FfnLayer
from sparseflash.runtime.aligned import aligned_zeros


class StagedSlots:
    """One staging half seen as a layer's slots: ``slots`` (rows, bundle_len) in the storage dtype,
    ``position_of`` (the stored position each row holds, -1 for none), the parts of a NeuronCache
    that the fetcher commits to and the compute step reads."""

    def __init__(self, buffer: np.ndarray, bundle_len: int, dtype, position_of: np.ndarray):
        """A view of ``buffer`` (bytes); the index array is the half's, shared by every layer's view."""
        itemsize = np.dtype(dtype).itemsize
        rows = buffer.nbytes // (bundle_len * itemsize)
        self.slots = buffer[: rows * bundle_len * itemsize].view(dtype).reshape(rows, bundle_len)
        self.position_of = position_of[:rows]

    @property
    def capacity(self) -> int:
        return len(self.position_of)

    def commit(self, slots: np.ndarray, positions: np.ndarray, pinned: bool = False) -> None:
        self.position_of[slots] = positions

    def release(self, slots: np.ndarray) -> None:
        self.position_of[slots] = -1

    def clear(self) -> None:
        self.position_of[:] = -1


class StagingArea:
    """Two halves, handed out in turn: ``take(layer)`` gives the half not in use, seen as that
    layer's slots; ``give_back(half)`` once the layer has computed over it."""

    def __init__(self, regions: Sequence[FfnLayer], rows: int, dtypes: Sequence):
        largest = max(r.bundle_bytes for r in regions)
        most = rows * max(largest // r.bundle_bytes for r in regions)  # rows of the smallest bundles
        self.rows = rows
        self._buffers = [aligned_zeros((rows * largest,), np.uint8) for _ in range(2)]  # reads land in them directly
        index = self._index = [np.full(most, -1, dtype=np.int64) for _ in range(2)]
        # every layer's view of both halves, made once; a half's index is shared by its views
        self._views = [[StagedSlots(b, r.bundle_len, dt, ix) for b, ix in zip(self._buffers, index)]
                       for r, dt in zip(regions, dtypes)]
        self._busy = [False, False]

    @property
    def nbytes(self) -> int:
        """Bytes held: both halves and their index (what the memory plan counts)."""
        return sum(b.nbytes for b in self._buffers) + sum(a.nbytes for a in self._index)

    def free_half(self) -> int | None:
        """A half nobody holds, or None."""
        for h in (0, 1):
            if not self._busy[h]:
                return h
        return None

    def take(self, layer: int, half: int) -> StagedSlots:
        self._busy[half] = True
        view = self._views[layer][half]
        view.clear()
        return view

    def give_back(self, half: int) -> None:
        self._busy[half] = False
