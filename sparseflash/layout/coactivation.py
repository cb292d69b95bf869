"""Co-activation counts C[i, j] (tokens where neurons i and j are both active) from packed masks.

Two ways, chosen per block by estimated cost: a Numba loop over active pairs (cost ~ sum |A_t|^2,
best when few neurons fire) or a dense GEMM of the 0/1 mask (cost ~ tokens * n^2 / GEMM speed).
"""

from __future__ import annotations

import numpy as np
import torch

from sparseflash.layout.stats import popcount_rows

# one pair increment in the Numba loop costs about this many GEMM multiply-adds
_PAIR_COST_IN_GEMM_OPS = 30.0


def _pair_kernel():
    from numba import njit

    @njit(cache=True)
    def accumulate(packed, n, counts):
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
                for y in range(k):
                    counts[row, idx[y]] += 1

    return accumulate


_KERNEL = None


def accumulate_coactivation(packed: np.ndarray, n: int, counts: np.ndarray) -> None:
    """Add the co-activations of packed masks (tokens, ceil(n/8)) into counts (n, n) int32/int64, in place."""
    global _KERNEL
    if len(packed) == 0:
        return
    pairs = float((popcount_rows(packed).astype(np.float64) ** 2).sum())
    gemm = float(len(packed)) * n * n
    if pairs * _PAIR_COST_IN_GEMM_OPS < gemm:
        if _KERNEL is None:
            _KERNEL = _pair_kernel()
        _KERNEL(np.ascontiguousarray(packed), n, counts)
        return
    block = 4096  # float32 counts stay exact below 2^24 per block
    for i in range(0, len(packed), block):
        m = torch.from_numpy(np.unpackbits(packed[i : i + block], axis=1, count=n, bitorder="little")).float()
        counts += (m.T @ m).round().to(torch.int64).numpy().astype(counts.dtype)
