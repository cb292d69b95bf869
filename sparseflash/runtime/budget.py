"""The memory plan: how a budget is split between resident tensors, predictors, the hot region,
the cache index, I/O buffers and the neuron cache slots (docs/runtime.md, "Memory budget").

Pure arithmetic over the layout's FFN regions (each layer may differ: its own neuron count, hot
region and bundle size); nothing here allocates. The cache takes the most slots the budget allows
for the same number in every layer; with the layout's cache demand (layout/schema_cache.py) those
bytes are split among layers by demand instead (``MemoryPlan.layer_slots``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sparseflash.errors import SparseflashError
from sparseflash.layout.format import FfnLayer
from sparseflash.layout.schema_cache import CacheDemand, split_slots
from sparseflash.runtime.policy import Budget

INDEX_BYTES_PER_NEURON = 8 + 4 + 1  # slot_of (int64), down-column norm (runtime/fetcher.py), values checked (streamer.py)
# position_of, last_use, uses (int64), pinned (bool), score (float32)
INDEX_BYTES_PER_SLOT = 8 * 3 + 1 + 4
STAGING_BUFFERS = 3  # --device cuda: one for the look-ahead prefetch, two to pipeline demand reads


class BudgetError(SparseflashError):
    """The memory budget cannot hold what the engine needs."""


def staging_rows(regions: Sequence[FfnLayer], io_buffer_bytes: int) -> int:
    """--device cuda: bundles per staging buffer (two I/O buffers' worth, 16 to the largest layer)."""
    largest = max(r.bundle_bytes for r in regions)
    return int(min(max(2 * io_buffer_bytes // largest, 16), max(r.n_neurons for r in regions)))


def staging_nbytes(rows: int, bundle_bytes: int) -> int:
    """--device cuda: bytes of the staging ring (pinned host rows + slot ids, and their device copies)."""
    return 2 * STAGING_BUFFERS * rows * (bundle_bytes + 8)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes the engine holds, by kind; ``total`` never exceeds ``budget``."""

    resident: int
    predictors: int
    hot: int
    cache: int
    index: int
    io_buffers: int
    slots_per_layer: int  # neuron cache slots per layer beyond the hot region
    minimum: int  # the smallest budget that can work
    budget: int  # the budget in force (bytes)
    plugins: int = 0  # compression plugins held beside the resident tensors (model/plugin.py)
    staging: int = 0  # strategy all: the staging region shared by all layers (two halves), bytes
    staging_rows: int = 0  # bundles of the largest layer per staging half
    # per layer, cache slots beyond the hot region: slots_per_layer each, or, split by demand, the bytes of
    # that many in every layer spread by demand (never more)
    layer_slots: tuple[int, ...] = ()
    split: bool = False  # whether layer_slots is a split by demand

    def slots_of(self, layer: int) -> int:
        """Cache slots of ``layer`` beyond its hot region."""
        return self.layer_slots[layer]

    @property
    def total(self) -> int:
        return (self.resident + self.plugins + self.predictors + self.hot + self.cache + self.index + self.io_buffers
                + self.staging)


def plan_memory(regions: Sequence[FfnLayer], resident: int, predictors: int, io_buffers: int, budget: Budget,
                min_slots: int, plugins: int = 0, stage_all: bool = False,
                demand: CacheDemand | None = None) -> MemoryPlan:
    """Split ``budget`` (bytes) over the parts; raises BudgetError below the minimum. ``plugins``:
    bytes of the compression plugins a run holds, fixed like the resident tensors. ``demand``: split
    the cache's bytes among layers by it (layout/schema_cache.split_slots; not with a staging region),
    each layer at least the minimum.

    A ``ffn_share`` budget makes hot region + cache bundles that share of all FFN bundle bytes
    (rounded down to whole slots); the fixed parts and the slots' index bytes come on top.

    ``stage_all`` (strategy all, every neuron needed): when the cache cannot hold every layer, part of
    the budget becomes a staging region of two halves shared by all layers, each as large as one
    layer's misses (``staging_rows`` bundles of the largest layer), so that layer l+1's misses are read
    into one half while layer l computes over the other. Its bytes come out of the cache, as few slots a
    layer as L layers share (see ``_staging_rows``); never below ``min_slots`` cache slots a layer.
    """
    hot = sum(r.n_hot * r.bundle_bytes for r in regions)
    index = sum(r.n_neurons * INDEX_BYTES_PER_NEURON + r.n_hot * INDEX_BYTES_PER_SLOT for r in regions)
    fixed = resident + plugins + predictors + hot + index + io_buffers
    bundle_row = sum(r.bundle_bytes for r in regions)  # one more slot in every layer: its bundles
    slot_row = bundle_row + len(regions) * INDEX_BYTES_PER_SLOT  # ... and their index
    max_extra = min(r.n_neurons - r.n_hot for r in regions)
    floor = min(min_slots, max_extra)
    minimum = fixed + floor * slot_row
    largest = max(r.bundle_bytes for r in regions)
    if budget.ffn_share is not None:  # bundles (hot, cache, staging) = the share; everything else on top
        bundles = budget.ffn_share * sum(r.n_neurons * r.bundle_bytes for r in regions) - hot

        def extra_of(rows: int) -> int:
            return min(max_extra, max(0, int((bundles - 2 * rows * largest) // bundle_row)))

        def bytes_of(rows: int) -> int:
            return fixed + extra_of(rows) * slot_row + staging_region_bytes(regions, rows)
    else:
        def extra_of(rows: int) -> int:
            return min(max_extra, max(0, (budget.nbytes - fixed - staging_region_bytes(regions, rows)) // slot_row))

        def bytes_of(rows: int) -> int:
            return budget.nbytes
    nbytes = bytes_of(0)
    if nbytes < minimum or extra_of(0) < floor:
        raise BudgetError(f"{budget.describe()} gives {nbytes} bytes, below the minimum of {minimum} bytes "
                          f"({minimum / 2**20:.1f} MiB: resident {resident}, {f'plugins {plugins}, ' if plugins else ''}"
                          f"hot region {hot}, I/O buffers {io_buffers}, {floor} cache slots/layer)")
    misses = max(r.n_neurons - r.n_hot for r in regions)  # the largest layer's neurons beyond its hot region
    rows = _staging_rows(extra_of, misses, floor) if stage_all and extra_of(0) < max_extra else 0
    extra = int(extra_of(rows))
    layer_slots = (extra,) * len(regions)
    if demand is not None and not rows:
        costs = [r.bundle_bytes + INDEX_BYTES_PER_SLOT for r in regions]
        layer_slots = tuple(split_slots(demand, [r.n_neurons for r in regions], [r.n_hot for r in regions], costs,
                                        extra * slot_row, [floor] * len(regions)))
    return MemoryPlan(resident, predictors, hot, sum(x * r.bundle_bytes for x, r in zip(layer_slots, regions)),
                      index + sum(layer_slots) * INDEX_BYTES_PER_SLOT, io_buffers, extra, minimum, bytes_of(rows),
                      plugins, staging_region_bytes(regions, rows), rows, layer_slots, demand is not None and not rows)


def staging_region_bytes(regions: Sequence[FfnLayer], rows: int) -> int:
    """Bytes of a staging region of two halves, each ``rows`` bundles of the largest layer, with the
    index of what each half holds (stored position and down-column norm per row of the layer with the
    smallest bundles: runtime/staging.py)."""
    if rows <= 0:
        return 0
    largest = max(r.bundle_bytes for r in regions)
    per_row = largest + max(largest // r.bundle_bytes for r in regions) * 8
    return 2 * rows * per_row


def _staging_rows(extra_of, misses: int, floor: int) -> int:
    """Rows per staging half: one layer's misses once the staging has taken its bytes from the cache,
    the fixed point of rows = misses - extra_of(rows) (found by iterating from 0: each round moves 2
    rows out of L layers' slots, so it converges for L > 2); then the most rows, up to that, that leave
    every layer ``floor`` cache slots (extra_of falls as rows grow)."""
    rows = 0
    for _ in range(64):
        nxt = max(0, misses - extra_of(rows))
        if nxt == rows:
            break
        rows = nxt
    lo, hi = 0, rows  # the largest r <= rows with extra_of(r) >= floor (extra_of(0) >= floor)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if extra_of(mid) >= floor:
            lo = mid
        else:
            hi = mid - 1
    return lo
