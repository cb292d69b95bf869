"""Co-activation counts C[i, j] (tokens where neurons i and j are both active) from packed masks.

Two ways, chosen per block by estimated cost: a Numba loop over active pairs (cost ~ sum |A_t|^2,
best when few neurons fire) or an int8 matrix product of the 0/1 masks (exact int32 sums; cost ~
tokens * rows * n / GEMM speed).

``coactivation_stats`` never holds more than a block of rows of C: it counts rows [r0, r1) against
every neuron, takes each row's top-k partners and its share of the co-activation gap, and moves
on. The whole (n, n) int32 table exists only when asked for (small layers keep it for ordering).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from sparseflash.layout.stats import popcount_rows

# one pair increment in the Numba loop costs about this many GEMM multiply-adds
_PAIR_COST_IN_GEMM_OPS = 30.0
_GEMM_TOKENS = 4096  # mask rows unpacked at a time for the matrix product


@functools.cache
def _pair_kernel():
    from numba import njit

    @njit(cache=True)
    def accumulate(packed, n, counts, r0, r1):
        idx = np.empty(n, dtype=np.int64)
        for t in range(packed.shape[0]):
            k = 0
            for b in range(packed.shape[1]):
                byte = packed[t, b]
                bit = 0
                while byte:
                    if byte & 1:
                        idx[k] = b * 8 + bit
                        k += 1
                    byte >>= 1
                    bit += 1
            for x in range(k):
                row = idx[x]
                if row < r0 or row >= r1:
                    continue
                for y in range(k):
                    counts[row - r0, idx[y]] += 1

    return accumulate


def _gemm_rows(packed: np.ndarray, n: int, counts: np.ndarray, r0: int, r1: int) -> None:
    for i in range(0, len(packed), _GEMM_TOKENS):
        m = torch.from_numpy(np.unpackbits(packed[i : i + _GEMM_TOKENS], axis=1, count=n, bitorder="little"))
        m = m.view(torch.int8)  # (tokens, n) 0/1
        block = torch._int_mm(m[:, r0:r1].T.contiguous(), m)  # (rows, n) int32, exact
        counts += block.numpy().astype(counts.dtype, copy=False)


def accumulate_coactivation(packed: np.ndarray, n: int, counts: np.ndarray, r0: int = 0, r1: int | None = None) -> None:
    """Add the co-activations of packed masks (tokens, ceil(n/8)) into rows [r0, r1) of C, in place:
    ``counts`` is (r1 - r0, n) int32/int64."""
    r1 = n if r1 is None else r1
    if len(packed) == 0 or r1 <= r0:
        return
    sizes = popcount_rows(packed).astype(np.float64)
    pairs = float((sizes**2).sum()) * (r1 - r0) / n  # pairs whose row falls in the block (on average)
    gemm = float(len(packed)) * (r1 - r0) * n
    if pairs * _PAIR_COST_IN_GEMM_OPS < gemm:
        _pair_kernel()(np.ascontiguousarray(packed), n, counts, r0, r1)
    else:
        _gemm_rows(packed, n, counts, r0, r1)


def top_neighbors_rows(counts: np.ndarray, k: int, r0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """For rows r0.. of C (``counts`` holds them) each neuron's k most co-activated partners (by
    count, itself excluded) and those counts, (rows, k) each."""
    c = counts.astype(np.int64, copy=True)
    rows = np.arange(len(c))
    c[rows, rows + r0] = -1
    k = min(k, c.shape[1] - 1)
    idx = np.argpartition(-c, kth=k - 1, axis=1)[:, :k] if k > 0 else np.zeros((len(c), 0), dtype=np.int64)
    vals = np.take_along_axis(c, idx, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1).astype(np.int32), np.take_along_axis(vals, order, axis=1)


@dataclass
class CoactivationStats:
    neighbors: np.ndarray  # (n, k) int32, most co-activated partners first
    neighbor_counts: np.ndarray  # (n, k) int64
    gap: float  # stats.coactivation_gap of the full table
    counts: np.ndarray | None  # (n, n) int32, when kept


def coactivation_stats(packed: np.ndarray, n: int, k: int, keep_full: bool = False,
                       block_bytes: int = 64 << 20) -> CoactivationStats:
    """Neighbour lists and co-activation gap of packed masks (tokens, ceil(n/8)), a block of rows of
    C at a time (``block_bytes`` bounds a block and its temporaries); ``keep_full`` also returns C."""
    full = np.zeros((n, n), dtype=np.int32) if keep_full else None
    if keep_full:
        accumulate_coactivation(packed, n, full)
    rows = max(1, min(n, block_bytes // (24 * n)))  # int32 counts + int64 and float64 temporaries
    nb_idx = np.zeros((n, min(k, n - 1)), dtype=np.int32)
    nb_cnt = np.zeros((n, min(k, n - 1)), dtype=np.int64)
    top_sum, p_sum, p_count, live_rows = 0.0, 0.0, 0, 0
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        if full is not None:
            counts = full[r0:r1]
        else:
            counts = np.zeros((r1 - r0, n), dtype=np.int32)
            accumulate_coactivation(packed, n, counts, r0, r1)
        nb_idx[r0:r1], nb_cnt[r0:r1] = top_neighbors_rows(counts, k, r0)
        diag = counts[np.arange(r1 - r0), np.arange(r0, r1)].astype(np.float64)
        live = np.nonzero(diag > 0)[0]
        if len(live) and n > 1:
            p = counts[live].astype(np.float64) / diag[live, None]
            p[np.arange(len(live)), live + r0] = np.nan
            top_sum += float(np.nanmax(p, axis=1).sum())
            p_sum += float(np.nansum(p))
            p_count += len(live) * (n - 1)
            live_rows += len(live)
    gap = top_sum / live_rows - p_sum / p_count if live_rows else 0.0
    return CoactivationStats(nb_idx, nb_cnt, gap, full)
