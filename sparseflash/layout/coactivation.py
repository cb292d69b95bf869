"""Co-activation counts C[i, j] (tokens where neurons i and j are both active) from packed masks.

Two ways, chosen by estimated cost: a Numba loop over active pairs (each token's active neurons
listed once, ``active_lists``; cost ~ sum |A_t|^2, best when few neurons fire; the threads split
the rows) or an int8 matrix
product of the 0/1 masks (exact int32 sums; cost ~ tokens * rows * n / GEMM speed).

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
    from numba import njit, prange

    @njit(parallel=True, cache=True)
    def accumulate(indptr, indices, counts, r0, r1, threads):
        # each thread owns a slice of rows [a, b) of the block, so no two threads write one count
        for th in prange(threads):
            a = r0 + (r1 - r0) * th // threads
            b = r0 + (r1 - r0) * (th + 1) // threads
            for t in range(len(indptr) - 1):
                start, stop = indptr[t], indptr[t + 1]
                first = start + np.searchsorted(indices[start:stop], a)  # indices ascend within a token
                for x in range(first, stop):
                    row = indices[x]
                    if row >= b:
                        break
                    for y in range(start, stop):
                        counts[row - r0, indices[y]] += 1

    return accumulate


def active_lists(packed: np.ndarray, n: int, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Packed masks (tokens, ceil(n/8)) as per-token active-neuron lists: (indptr (tokens + 1,)
    int64, indices int32 ascending within each token)."""
    sizes = popcount_rows(packed)
    indptr = np.zeros(len(packed) + 1, dtype=np.int64)
    np.cumsum(sizes, out=indptr[1:])
    indices = np.empty(int(indptr[-1]), dtype=np.int32)
    for i in range(0, len(packed), chunk):
        m = np.unpackbits(packed[i : i + chunk], axis=1, count=n, bitorder="little")
        indices[indptr[i] : indptr[min(len(packed), i + chunk)]] = np.nonzero(m)[1]  # row-major: by token, then neuron
    return indptr, indices


def _gemm_rows(packed: np.ndarray, n: int, counts: np.ndarray, r0: int, r1: int) -> None:
    for i in range(0, len(packed), _GEMM_TOKENS):
        m = torch.from_numpy(np.unpackbits(packed[i : i + _GEMM_TOKENS], axis=1, count=n, bitorder="little"))
        m = m.view(torch.int8)  # (tokens, n) 0/1
        block = torch._int_mm(m[:, r0:r1].T.contiguous(), m)  # (rows, n) int32, exact
        counts += block.numpy().astype(counts.dtype, copy=False)


def _pair_path(packed: np.ndarray, n: int) -> bool:
    """Whether the pair loop is cheaper than the matrix product for these masks (any block size)."""
    sizes = popcount_rows(packed).astype(np.float64)
    return float((sizes**2).sum()) / n * _PAIR_COST_IN_GEMM_OPS < float(len(packed)) * n


def accumulate_coactivation(packed: np.ndarray, n: int, counts: np.ndarray, r0: int = 0, r1: int | None = None,
                            lists: tuple[np.ndarray, np.ndarray] | None = None) -> None:
    """Add the co-activations of packed masks (tokens, ceil(n/8)) into rows [r0, r1) of C, in place:
    ``counts`` is (r1 - r0, n) int32/int64. ``lists`` (active_lists of the masks) chooses the pair
    loop and saves re-reading the bits for each block."""
    r1 = n if r1 is None else r1
    if len(packed) == 0 or r1 <= r0:
        return
    if lists is None and _pair_path(packed, n):
        lists = active_lists(packed, n)
    if lists is not None:
        from numba import get_num_threads

        _pair_kernel()(lists[0], lists[1], counts, r0, r1, max(1, min(get_num_threads(), r1 - r0)))
    else:
        _gemm_rows(packed, n, counts, r0, r1)


def top_neighbors_rows(counts: np.ndarray, k: int, r0: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """For rows r0.. of C (``counts`` holds them) each neuron's k most co-activated partners (by
    count, the lower index first among equal counts, itself excluded) and those counts, (rows, k) each."""
    n = counts.shape[1]
    k = min(k, n - 1)
    if k <= 0:
        return np.zeros((len(counts), 0), dtype=np.int32), np.zeros((len(counts), 0), dtype=np.int64)
    # one distinct key per entry: count first, then the lower index (ties among equal counts, which
    # are most entries, would make the partition slow and its order arbitrary)
    key = counts.astype(np.int64) * n + (n - 1 - np.arange(n, dtype=np.int64))
    rows = np.arange(len(counts))
    key[rows, rows + r0] = -1  # itself excluded
    idx = torch.topk(torch.from_numpy(key), k, dim=1, sorted=True).indices.numpy()  # keys distinct: one answer
    return idx.astype(np.int32), np.take_along_axis(counts, idx, axis=1).astype(np.int64)


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
    lists = active_lists(packed, n) if len(packed) and _pair_path(packed, n) else None  # read the bits once
    if keep_full:
        accumulate_coactivation(packed, n, full, lists=lists)
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
            accumulate_coactivation(packed, n, counts, r0, r1, lists)
        nb_idx[r0:r1], nb_cnt[r0:r1] = top_neighbors_rows(counts, k, r0)
        diag = counts[np.arange(r1 - r0), np.arange(r0, r1)].astype(np.float64)
        live = np.nonzero(diag > 0)[0]
        if len(live) and n > 1:  # P(j | i) = C_ij / C_ii over j != i: its max is the top neighbour's
            top_sum += float((nb_cnt[r0 + live, 0] / diag[live]).sum())
            others = counts[live].sum(axis=1, dtype=np.int64) - diag[live]
            p_sum += float((others / diag[live]).sum())
            p_count += len(live) * (n - 1)
            live_rows += len(live)
    gap = top_sum / live_rows - p_sum / p_count if live_rows else 0.0
    return CoactivationStats(nb_idx, nb_cnt, gap, full)
