"""Activation statistics of one FFN layer, as the ReLU² Wins / Sparsing Law papers define them.

Pure functions over numpy/torch arrays; the profiler feeds them batches. Conventions:
- magnitude of neuron i for a token: |a_i| * ||W_down[:, i]||_2, and "active" (magnitude >=
  threshold and > 0), both as layout/schema.py defines them;
- masks are bit-packed along neurons with ``np.packbits(..., bitorder="little")``.
"""

from __future__ import annotations

import numpy as np
import torch

from sparseflash.layout.schema import active_mask

REUSE_WINDOWS = (1, 2, 4, 8, 16)
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def token_cett(a: torch.Tensor, magnitude: torch.Tensor, w_down: torch.Tensor, threshold: float,
               y_norm: torch.Tensor | None = None) -> torch.Tensor:
    """CETT per token (tokens,): ||sum of inactive neurons' outputs|| / ||FFN output||.

    a, magnitude: (tokens, neurons); w_down: (d, neurons). Tokens with a zero output get CETT 0.
    """
    inactive = a * ~active_mask(magnitude, threshold)
    trunc = torch.linalg.vector_norm(inactive @ w_down.T, dim=-1)
    if y_norm is None:
        y_norm = torch.linalg.vector_norm(a @ w_down.T, dim=-1)
    return torch.where(y_norm > 0, trunc / torch.clamp(y_norm, min=1e-30), torch.zeros_like(trunc))


def threshold_candidates(magnitude: torch.Tensor, count: int = 1000, max_sample: int = 1 << 22,
                         seed: int = 0) -> np.ndarray:
    """Sorted candidate thresholds: 0 followed by ``count`` quantiles of the nonzero magnitudes."""
    nz = magnitude[magnitude > 0].float()
    if nz.numel() == 0:
        return np.zeros(1)
    if nz.numel() > max_sample:
        g = torch.Generator().manual_seed(seed)
        nz = nz[torch.randint(0, nz.numel(), (max_sample,), generator=g)]
    nz, _ = torch.sort(nz)
    q = torch.linspace(0, 1, count, dtype=torch.float64)
    idx = torch.clamp((q * (nz.numel() - 1)).round().long(), 0, nz.numel() - 1)
    return np.concatenate([[0.0], np.unique(nz[idx].double().numpy())])


class CettSearch:
    """Per-layer threshold search: the largest candidate whose mean CETT is <= a bound (binary search).

    Holds a token sample's activations; mean CETT per candidate is memoised, so searching several
    bounds (the analysis bound, the PPL-p% bisection) reuses evaluations.
    """

    def __init__(self, a: torch.Tensor, w_down: torch.Tensor, candidates: int = 1000, batch: int = 1024):
        self.a = a.float()
        self.w_down = w_down.float()
        self.col_norm = torch.linalg.vector_norm(self.w_down, dim=0)
        self.batch = batch
        self.y_norm = torch.cat([torch.linalg.vector_norm(self.a[i : i + batch] @ self.w_down.T, dim=-1)
                                 for i in range(0, len(self.a), batch)])
        self.candidates = threshold_candidates(self.a.abs() * self.col_norm, candidates)
        self._memo: dict[int, float] = {}

    def mean_cett(self, threshold: float) -> float:
        total = 0.0
        for i in range(0, len(self.a), self.batch):
            a = self.a[i : i + self.batch]
            total += float(token_cett(a, a.abs() * self.col_norm, self.w_down, threshold,
                                      self.y_norm[i : i + self.batch]).sum())
        return total / max(len(self.a), 1)

    def _cett_at(self, k: int) -> float:
        if k not in self._memo:
            self._memo[k] = self.mean_cett(float(self.candidates[k]))
        return self._memo[k]

    def threshold_for(self, bound: float) -> tuple[float, float]:
        """(threshold, mean CETT at it) for the largest candidate with mean CETT <= bound."""
        lo, hi = 0, len(self.candidates) - 1  # candidates[0] = 0 truncates nothing: CETT 0
        if self._cett_at(hi) <= bound:
            return float(self.candidates[hi]), self._cett_at(hi)
        while hi - lo > 1:  # invariant: cett(lo) <= bound < cett(hi)
            mid = (lo + hi) // 2
            if self._cett_at(mid) <= bound:
                lo = mid
            else:
                hi = mid
        return float(self.candidates[lo]), self._cett_at(lo)

    def sparsity_at(self, threshold: float) -> float:
        """Share of inactive (token, neuron) pairs in the sample at ``threshold``."""
        return 1.0 - float(active_mask(self.a.abs() * self.col_norm, threshold).float().mean())


def popcount_rows(packed: np.ndarray) -> np.ndarray:
    """Set bits per row of a packed (rows, bytes) uint8 array."""
    return _POPCOUNT[packed].sum(axis=1, dtype=np.int64)


def reuse_ratios(packed: np.ndarray, windows=REUSE_WINDOWS) -> tuple[dict[int, float], dict[int, int]]:
    """Reuse ratio per window k over one token sequence of packed masks (tokens, bytes).

    For token t with at least k predecessors and a non-empty active set:
    |A_t ∩ (A_{t-1} ∪ ... ∪ A_{t-k})| / |A_t|. Returns (sum of ratios, count of tokens) per k,
    so sequences can be pooled before dividing.
    """
    sums, counts = {}, {}
    size = popcount_rows(packed)
    union = np.zeros_like(packed)
    kmax = max(windows)
    for k in range(1, kmax + 1):
        if k == 1:
            union = packed[:-1].copy()  # union[t'] covers token t' + k
        else:
            union = union[1:] | packed[: len(packed) - k]
        if k in windows:
            cur = packed[k:]
            inter = popcount_rows(cur & union)
            sz = size[k:]
            ok = sz > 0
            sums[k] = float((inter[ok] / sz[ok]).sum())
            counts[k] = int(ok.sum())
        if len(union) == 0:
            for w in windows:
                if w > k:
                    sums.setdefault(w, 0.0)
                    counts.setdefault(w, 0)
            break
    return sums, counts


def coactivation_gap(counts: np.ndarray) -> float:
    """Top-average co-activation gap: mean_i max_{j!=i} P_ij - mean_{i, j!=i} P_ij, P_ij = C_ij / C_ii.

    Rows of neurons that were never active are left out. 0 for fewer than two active neurons.
    """
    diag = np.diag(counts).astype(np.float64)
    rows = np.nonzero(diag > 0)[0]
    n = counts.shape[0]
    if len(rows) == 0 or n < 2:
        return 0.0
    p = counts[rows].astype(np.float64) / diag[rows, None]
    p[np.arange(len(rows)), rows] = np.nan  # drop the diagonal
    return float(np.nanmean(np.nanmax(p, axis=1)) - np.nanmean(p))


def hot_cdf(frequency: np.ndarray, points: int = 101) -> np.ndarray:
    """Share of all activations covered by the most frequent x of neurons, x = linspace(0, 1, points)."""
    f = np.sort(np.asarray(frequency, dtype=np.float64))[::-1]
    total = f.sum()
    if total == 0:
        return np.zeros(points)
    cum = np.concatenate([[0.0], np.cumsum(f) / total])
    k = np.ceil(np.linspace(0, 1, points) * len(f)).astype(int)
    return cum[k]


def top_neighbors(counts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """For each neuron its k most co-activated partners (by count) and those counts, (n, k) each."""
    c = counts.astype(np.int64, copy=True)
    np.fill_diagonal(c, -1)
    k = min(k, c.shape[0] - 1)
    idx = np.argpartition(-c, kth=k - 1, axis=1)[:, :k] if k > 0 else np.zeros((len(c), 0), dtype=np.int64)
    vals = np.take_along_axis(c, idx, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1).astype(np.int32), np.take_along_axis(vals, order, axis=1)
