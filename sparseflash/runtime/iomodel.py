"""Which bytes a set of neurons costs to read, and how long: extents, alignment, coalescing.

A layer region stores bundles of ``bundle_bytes`` back to back from a 4096-aligned offset. Reading a
set of stored positions means reading the aligned blocks that cover them; adjacent blocks form one
request, and a gap between two requests is read through when that is cheaper than a new request
under the device model (latency per request + bytes / bandwidth).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 4096


@dataclass(frozen=True)
class DeviceModel:
    """Read time of one request of s bytes: latency_s + s / bandwidth_bps."""

    latency_s: float = 100e-6
    bandwidth_bps: float = 2e9
    source: str = "default"

    def read_time(self, requests: float, nbytes: float) -> float:
        return requests * self.latency_s + nbytes / self.bandwidth_bps

    @property
    def merge_gap_bytes(self) -> int:
        """Largest gap worth reading through instead of issuing a new request (whole blocks)."""
        return int(self.latency_s * self.bandwidth_bps) // BLOCK * BLOCK

    def to_dict(self) -> dict:
        return {"latency_s": self.latency_s, "bandwidth_bps": self.bandwidth_bps, "source": self.source}


def block_span(positions: np.ndarray, bundle_bytes: int, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """First and last block index (relative to the region start) covering each stored position."""
    p = np.asarray(positions, dtype=np.int64)
    return p * bundle_bytes // block, ((p + 1) * bundle_bytes - 1) // block


def plan_extents(positions: np.ndarray, bundle_bytes: int, merge_gap_blocks: int = 0,
                 block: int = BLOCK) -> np.ndarray:
    """Coalesced aligned reads (k, 2) of [first_block, end_block) covering the stored positions.

    Blocks closer than ``merge_gap_blocks`` unused blocks are merged into one read.
    """
    if len(positions) == 0:
        return np.zeros((0, 2), dtype=np.int64)
    first, last = block_span(np.sort(np.asarray(positions)), bundle_bytes, block)
    last = np.maximum.accumulate(last)
    # a new extent starts where the next first block lies beyond last + 1 + gap allowance
    starts = np.concatenate([[True], first[1:] > last[:-1] + 1 + merge_gap_blocks])
    idx = np.nonzero(starts)[0]
    ends = np.concatenate([idx[1:] - 1, [len(first) - 1]])
    return np.stack([first[idx], last[ends] + 1], axis=1)


def token_read_cost(active_positions: list[np.ndarray], bundle_bytes: int, merge_gap_blocks: int = 0,
                    block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Per token: (requests, bytes) to read the given stored positions with aligned, coalesced reads."""
    requests = np.zeros(len(active_positions), dtype=np.int64)
    nbytes = np.zeros(len(active_positions), dtype=np.int64)
    for i, pos in enumerate(active_positions):
        ext = plan_extents(pos, bundle_bytes, merge_gap_blocks, block)
        requests[i] = len(ext)
        nbytes[i] = int((ext[:, 1] - ext[:, 0]).sum()) * block
    return requests, nbytes


def mask_read_cost(mask: np.ndarray, bundle_bytes: int, merge_gap_blocks: int = 0,
                   block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised token_read_cost for a bool mask (tokens, positions) in stored order."""
    tokens, n = mask.shape
    first, last = block_span(np.arange(n), bundle_bytes, block)
    blocks = int(last[-1]) + 1 if n else 0
    touched = np.zeros((tokens, blocks + 1), dtype=np.int32)
    t_idx, p_idx = np.nonzero(mask)
    np.add.at(touched, (t_idx, first[p_idx]), 1)
    np.add.at(touched, (t_idx, last[p_idx] + 1), -1)
    touched = np.cumsum(touched, axis=1)[:, :blocks] > 0
    if merge_gap_blocks > 0:
        touched = _fill_small_gaps(touched, merge_gap_blocks)
    starts = touched & ~np.concatenate([np.zeros((tokens, 1), bool), touched[:, :-1]], axis=1)
    return starts.sum(1), touched.sum(1).astype(np.int64) * block


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
