"""Which aligned blocks of an FFN region hold a set of neurons: the reads a set of neurons costs.

In an uncompressed region, stored neuron j occupies bytes [j * bundle_bytes, (j + 1) * bundle_bytes)
from the region's start, which is a multiple of ALIGNMENT, and the region's padded end lies in the
file (format_spec, docs/layout-format.md §6). So the ALIGNMENT-sized blocks covering any set of
neurons can be read with O_DIRECT without leaving the region: that is the unit every reader, planner
and report here counts. Adjacent blocks form one request; a gap of at most ``merge_gap_blocks``
unused blocks between two requests may be read through, making them one (cheaper when a request
costs more than reading the gap).
"""

from __future__ import annotations

import numpy as np

from .format_spec import ALIGNMENT

BLOCK = ALIGNMENT  # bytes per aligned block


def block_span(positions: np.ndarray, bundle_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """First and last block index (from the region start) covering each stored position."""
    p = np.asarray(positions, dtype=np.int64)
    return p * bundle_bytes // BLOCK, ((p + 1) * bundle_bytes - 1) // BLOCK


def plan_extents(positions: np.ndarray, bundle_bytes: int, merge_gap_blocks: int = 0) -> np.ndarray:
    """Coalesced aligned reads (k, 2) of [first_block, end_block) covering the stored positions.

    Runs of blocks separated by at most ``merge_gap_blocks`` unused blocks are one read.
    """
    if len(positions) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    first, last = block_span(np.sort(np.asarray(positions)), bundle_bytes)
    last = np.maximum.accumulate(last)
    # a new extent starts where the next first block lies beyond last + 1 + gap allowance
    starts = np.concatenate([[True], first[1:] > last[:-1] + 1 + merge_gap_blocks])
    idx = np.nonzero(starts)[0]
    ends = np.concatenate([idx[1:] - 1, [len(first) - 1]])
    return np.stack([first[idx], last[ends] + 1], axis=1)


def split_extents(extents: np.ndarray, max_blocks: int) -> list[tuple[int, int]]:
    """Extents cut into pieces of at most ``max_blocks`` blocks (one I/O buffer each), in order."""
    pieces = []
    for a, b in extents.tolist():
        pieces.extend((s, min(b, s + max_blocks)) for s in range(a, b, max_blocks))
    return pieces


def extent_bytes(extents: np.ndarray) -> int:
    """Bytes read by a set of extents (whole blocks)."""
    return int((extents[:, 1] - extents[:, 0]).sum()) * BLOCK


COST_CHUNK_BYTES = 16 << 20  # mask_read_cost works on this many bytes of (tokens x blocks) int64 at a time


def mask_read_cost(mask: np.ndarray, bundle_bytes: int, merge_gap_blocks: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per token (requests, bytes) to read the neurons of a bool mask (tokens, positions) in stored
    order. Tokens are taken a chunk at a time, so the temporaries stay within a few COST_CHUNK_BYTES
    whatever the mask's size (a (tokens x blocks) table of a 1B layer is ~0.3 GB at 4,096 tokens)."""
    tokens, n = mask.shape
    first, last = block_span(np.arange(n), bundle_bytes)
    blocks = int(last[-1]) + 1 if n else 0
    requests = np.zeros(tokens, dtype=np.int64)
    nbytes = np.zeros(tokens, dtype=np.int64)
    step = max(1, COST_CHUNK_BYTES // (8 * (blocks + 1)))
    for t0 in range(0, tokens, step):
        part = mask[t0 : t0 + step]
        rows = len(part)
        touched = np.zeros((rows, blocks + 1), dtype=np.int32)
        t_idx, p_idx = np.nonzero(part)
        np.add.at(touched, (t_idx, first[p_idx]), 1)
        np.add.at(touched, (t_idx, last[p_idx] + 1), -1)
        del t_idx, p_idx
        touched = np.cumsum(touched, axis=1)[:, :blocks] > 0
        if merge_gap_blocks > 0:
            touched = _fill_small_gaps(touched, merge_gap_blocks)
        starts = touched & ~np.concatenate([np.zeros((rows, 1), bool), touched[:, :-1]], axis=1)
        requests[t0 : t0 + rows] = starts.sum(1)
        nbytes[t0 : t0 + rows] = touched.sum(1).astype(np.int64) * BLOCK
    return requests, nbytes


def _fill_small_gaps(touched: np.ndarray, gap: int) -> np.ndarray:
    """Mark runs of at most ``gap`` untouched blocks lying between touched blocks as touched."""
    out = touched.copy()
    for row in range(len(touched)):
        idx = np.nonzero(touched[row])[0]
        if len(idx) < 2:
            continue
        holes = np.nonzero((np.diff(idx) > 1) & (np.diff(idx) - 1 <= gap))[0]
        for h in holes:
            out[row, idx[h] + 1 : idx[h + 1]] = True
    return out
