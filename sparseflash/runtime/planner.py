"""Planning, with no side effects: which predicted neurons are cached, which must be read, and
which aligned extents of the layout file a read covers.

The engine asks these questions of the current cache state and then acts on the answers
(reserve slots, hand positions to the fetcher, compute); nothing here changes the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparseflash.layout.format_extents import plan_extents, split_extents
from sparseflash.runtime.cache import NeuronCache


@dataclass(frozen=True)
class LayerPlan:
    """What one layer step needs from its cache."""

    hit_slots: np.ndarray  # slots of the predicted positions that are cached (hot region included)
    missing: np.ndarray  # predicted stored positions to read
    room: int  # slots that can take new bundles now without evicting the hits (NeuronCache.room)

    @property
    def fits(self) -> bool:
        """The misses fit beside the hits: one read, one kernel call (else: batches)."""
        return len(self.missing) <= self.room


def plan_layer(cache: NeuronCache, positions: np.ndarray) -> LayerPlan:
    """Hits, misses and free room for the predicted ``positions`` of one layer."""
    slots = cache.lookup(positions)
    hit = slots >= 0
    hit_slots = slots[hit]
    return LayerPlan(hit_slots, positions[~hit], cache.room(protect=hit_slots))


def plan_prefetch(cache: NeuronCache, positions: np.ndarray, keep_free: int, limit: int | None = None) -> np.ndarray:
    """Positions of a look-ahead prediction worth reading now: those not cached, as many as fit while
    ``keep_free`` slots stay available for the layer's own demand read (and at most ``limit``)."""
    missing = positions[cache.lookup(positions) < 0]
    room = cache.free_count() + cache.evictable_count() - keep_free
    if limit is not None:
        room = min(room, limit)
    return missing[: max(0, min(len(missing), room))]


def plan_prefetch_free(cache: NeuronCache, limit: int | None = None) -> np.ndarray:
    """For a layer whose every neuron is needed (strategy ``all``): the positions not cached, as many as
    the free slots take (and at most ``limit``). Nothing is evicted, since every cached neuron will be
    used by the layer's own step: a look-ahead read never costs a second read of a bundle."""
    missing = np.nonzero(cache.slot_of < 0)[0]
    room = cache.free_count() if limit is None else min(cache.free_count(), limit)
    return missing[:room]


def plan_reads(positions: np.ndarray, bundle_bytes: int, merge_gap_blocks: int, buffer_blocks: int
               ) -> list[tuple[int, int]]:
    """Pieces (first_block, end_block) from the region start to read sorted stored ``positions``:
    coalesced aligned extents (gaps up to ``merge_gap_blocks`` read through), each cut to at
    most one I/O buffer."""
    return split_extents(plan_extents(positions, bundle_bytes, merge_gap_blocks), buffer_blocks)
