"""The memory plan: how a budget is split between resident tensors, predictors, the hot region,
the cache index, I/O buffers and the neuron cache slots (docs/runtime.md, "Memory budget").

Pure arithmetic over the layout's FFN regions (each layer may differ: its own neuron count, hot
region and bundle size); nothing here allocates. Every layer gets the same number of extra cache
slots, the most the budget allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sparseflash.errors import SparseflashError
from sparseflash.layout.format import FfnLayer
from sparseflash.runtime.policy import Budget

INDEX_BYTES_PER_NEURON = 8  # slot_of (int64)
# position_of, last_use, uses (int64), pinned (bool), score and down norm (float32)
INDEX_BYTES_PER_SLOT = 8 * 3 + 1 + 4 + 4
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

    @property
    def total(self) -> int:
        return self.resident + self.plugins + self.predictors + self.hot + self.cache + self.index + self.io_buffers


def plan_memory(regions: Sequence[FfnLayer], resident: int, predictors: int, io_buffers: int, budget: Budget,
                min_slots: int, plugins: int = 0) -> MemoryPlan:
    """Split ``budget`` (bytes) over the parts; raises BudgetError below the minimum. ``plugins``:
    bytes of the compression plugins a run holds, fixed like the resident tensors.

    A ``ffn_share`` budget makes hot region + cache bundles that share of all FFN bundle bytes
    (rounded down to whole slots); the fixed parts and the slots' index bytes come on top.
    """
    hot = sum(r.n_hot * r.bundle_bytes for r in regions)
    index = sum(r.n_neurons * INDEX_BYTES_PER_NEURON + r.n_hot * INDEX_BYTES_PER_SLOT for r in regions)
    fixed = resident + plugins + predictors + hot + index + io_buffers
    slot_row = sum(r.bundle_bytes + INDEX_BYTES_PER_SLOT for r in regions)  # one more slot in every layer
    max_extra = min(r.n_neurons - r.n_hot for r in regions)
    minimum = fixed + min(min_slots, max_extra) * slot_row
    if budget.ffn_share is not None:
        ffn = sum(r.n_neurons * r.bundle_bytes for r in regions)
        extra = int((budget.ffn_share * ffn - hot) // sum(r.bundle_bytes for r in regions))
        nbytes = fixed + max(extra, 0) * slot_row
    else:
        nbytes = budget.nbytes
    if nbytes < minimum:
        raise BudgetError(f"{budget.describe()} gives {nbytes} bytes, below the minimum of {minimum} bytes "
                          f"({minimum / 2**20:.1f} MiB: resident {resident}, {f'plugins {plugins}, ' if plugins else ''}"
                          f"hot region {hot}, I/O buffers {io_buffers}, {min(min_slots, max_extra)} cache slots/layer)")
    extra = min(max_extra, (nbytes - fixed) // slot_row)
    return MemoryPlan(resident, predictors, hot, extra * sum(r.bundle_bytes for r in regions),
                      index + extra * len(regions) * INDEX_BYTES_PER_SLOT, io_buffers, int(extra), minimum, nbytes,
                      plugins)
