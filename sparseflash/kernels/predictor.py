"""The active-set predictor of one layer, for the few tokens of a decode step, in one Numba call.

A stored predictor scores neurons as W2 · relu(W1 · x + b1) + b2 (low rank r: W1 (r, d), W2 (n, r)).
At decode time x is one token, and the work (r·d + n·r multiply-adds, ~50k on the bundled model) is
smaller than the fixed cost of the ten-odd torch and numpy calls that computed and selected it
(~25 us each on one core). Here it is two calls:

- ``top_logits(x, w1, b1, w2, b2)``: per neuron, its highest logit over the tokens of x, float32;
- ``select(top, cut, offset, cached, miss_cut)``: the positions whose ``top + offset`` exceeds
  ``cut``, less those not ``cached`` whose ``top`` does not exceed ``miss_cut``, ascending.

Thresholds compare the highest logit over tokens, which is what "above the cut for some token"
means when the offset is per neuron. float32 sums, in a fixed order (the result does not depend on
threads); they may differ from torch's in the last bits, so a logit within ~1e-6 of a cut can fall
on the other side. Arrays in, arrays out: nothing else of the package is imported.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_FASTMATH = {"reassoc", "contract"}  # as kernels/cpu.py: dot products vectorise, NaN semantics kept
_EMPTY_F32 = np.zeros(0, dtype=np.float32)
_EMPTY_BOOL = np.zeros(0, dtype=np.bool_)


@njit(fastmath=_FASTMATH, cache=True, nogil=True)
def _top_logits(x, w1, b1, w2, b2, h, top):
    # x (t, d), w1 (r, d), b1 (r,), w2 (n, r), b2 (n,), h (r,) scratch, top (n,) out; all float32
    tokens, d = x.shape
    rank, n = w1.shape[0], w2.shape[0]
    for t in range(tokens):
        for j in range(rank):
            s = b1[j]
            for i in range(d):
                s += w1[j, i] * x[t, i]
            h[j] = s if (s > 0 or s != s) else np.float32(0.0)  # relu that keeps NaN, as torch's
        for k in range(n):
            s = b2[k]
            for j in range(rank):
                s += w2[k, j] * h[j]
            if t == 0 or s > top[k] or s != s:
                top[k] = s


@njit(cache=True, nogil=True)
def _select(top, cut, offset, cached, miss_cut, out):
    # out (n,) int64: the selected positions, ascending; returns how many
    count = 0
    for k in range(top.size):
        v = top[k] + offset[k] if offset.size else top[k]
        if v > cut and (cached.size == 0 or cached[k] or top[k] > miss_cut):
            out[count] = k
            count += 1
    return count


def _f32(a: np.ndarray, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.float32 or a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D float32 array, got {a.ndim}-D {a.dtype}")
    return np.ascontiguousarray(a)


def top_logits(x: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> np.ndarray:
    """float32 (n,): each neuron's highest logit over the tokens of x (t, d) (t >= 1)."""
    x, w1, b1, w2, b2 = (_f32(a, name, nd) for a, name, nd in
                         ((x, "x", 2), (w1, "w1", 2), (b1, "b1", 1), (w2, "w2", 2), (b2, "b2", 1)))
    rank, d = w1.shape
    if x.shape[1] != d or x.shape[0] < 1 or b1.shape != (rank,) or w2.shape[1] != rank or b2.shape != (w2.shape[0],):
        raise ValueError(f"predictor shapes do not agree: x {x.shape}, w1 {w1.shape}, b1 {b1.shape}, "
                         f"w2 {w2.shape}, b2 {b2.shape}")
    top = np.empty(w2.shape[0], dtype=np.float32)
    _top_logits(x, w1, b1, w2, b2, np.empty(rank, dtype=np.float32), top)
    return top


def select(top: np.ndarray, cut: float, offset: np.ndarray | None = None, cached: np.ndarray | None = None,
           miss_cut: float | None = None) -> np.ndarray:
    """int64 ascending positions k with top[k] + offset[k] > cut; with ``cached`` (bool per position) and
    ``miss_cut``, a position not cached is kept only if top[k] > miss_cut."""
    top = _f32(top, "top", 1)
    offset = _EMPTY_F32 if offset is None else _f32(offset, "offset", 1)
    use_cached = cached is not None and miss_cut is not None
    cached = np.ascontiguousarray(cached, dtype=np.bool_) if use_cached else _EMPTY_BOOL
    for name, a in (("offset", offset), ("cached", cached)):
        if a.size and a.shape != top.shape:
            raise ValueError(f"{name} has shape {a.shape}, expected {top.shape}")
    out = np.empty(top.size, dtype=np.int64)
    n = _select(top, np.float32(cut), offset, cached, np.float32(miss_cut if use_cached else 0.0), out)
    return out[:n]


def warmup() -> None:
    """Compile (or load from the disk cache) both kernels."""
    w = np.ones((2, 4), dtype=np.float32)
    top = top_logits(np.ones((1, 4), dtype=np.float32), w, np.zeros(2, np.float32), w.T.copy(),
                     np.zeros(4, np.float32))
    select(top, 0.0)
    select(top, 0.0, np.zeros(4, np.float32), np.ones(4, bool), 1.0)
