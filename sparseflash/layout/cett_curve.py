"""Mean CETT of a token sample at every threshold candidate, in one sweep (the fast CETT search).

CETT at threshold t, per token: ||sum of the inactive neurons' outputs|| / ||FFN output||, where a
neuron is inactive when its magnitude |a_i| * ||W_down[:, i]|| is below t (layout/schema.py).
Evaluating it for one t is a (tokens x neurons x d) product; a binary search over 1,000 candidates
for several bounds (the analysis bound, every step of the PPL-p% bisection) needs dozens of them.

Here each token's nonzero activations are bucketed by the first candidate at which they become
inactive, and its truncated output is built up bucket by bucket, smallest magnitudes first: adding
a neuron costs one row of W_down (d values), and the norm is taken once per bucket that holds one
of the token's neurons. The whole curve (every candidate, for any bound asked later) costs
(nonzero activations x d), about one dense product at 100% density and a tenth of one at 10%,
and it is kept as 1,001 numbers per layer, so the sample's activations can be dropped at once.

Float32 sums in another order than the dense product's: values agree with it to ~1e-6 (tested).

The sweep is bound by reading W_down rows (one per nonzero activation, scattered over the matrix).
When W_down is stored in bfloat16, as published checkpoints are, its rows are read as stored (half
the bytes) and widened to float32 one row at a time: widening is exact, so the curve is bit for bit
the one computed from the float32 matrix (tested).
"""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.cache
def _kernel():
    from numba import njit, prange

    @njit(parallel=True, cache=True, fastmath=True)
    def sweep(a, col_norm, wt, wt16, cand, delta, active):
        # W_down rows: wt (neurons, d) float32, or, when wt16 has rows, wt16 (neurons, d) bfloat16 bits
        tokens, n = a.shape
        half = wt16.shape[0] > 0
        d = wt16.shape[1] if half else wt.shape[1]
        k_count = cand.shape[0]
        threads = delta.shape[0]
        for th in prange(threads):
            t_vec = np.empty(d, dtype=np.float32)
            bits = np.empty(d, dtype=np.uint32)
            widened = bits.view(np.float32)  # one row of wt16 widened (exactly) to float32
            ids = np.empty(n, dtype=np.int64)
            buckets = np.empty(n, dtype=np.int64)
            for s in range(th, tokens, threads):
                m = 0
                for i in range(n):
                    v = a[s, i]
                    if v != 0.0:
                        mag = np.float32(abs(v)) * col_norm[i]
                        if mag > 0.0:
                            b = np.searchsorted(cand, np.float64(mag), side="right")
                            active[th, b] += 1  # active at candidates below b
                        else:
                            b = 0  # never active (magnitude 0): truncated from the first candidate on
                        ids[m] = i
                        buckets[m] = b
                        m += 1
                if m == 0:
                    continue
                order = np.argsort(buckets[:m], kind="mergesort")
                t_vec[:] = 0.0
                norms = np.empty(m, dtype=np.float64)  # truncated norm after each bucket group
                groups = np.empty(m, dtype=np.int64)
                g = 0
                e = 0
                while e < m:
                    b = buckets[order[e]]
                    stop = e
                    while stop < m and buckets[order[stop]] == b:
                        stop += 1
                    acc = np.float32(0.0)
                    for f in range(e, stop):
                        i = ids[order[f]]
                        v = a[s, i]
                        if half:
                            for j in range(d):
                                bits[j] = np.uint32(wt16[i, j]) << 16
                            row = widened
                        else:
                            row = wt[i]
                        if f < stop - 1:
                            for j in range(d):
                                t_vec[j] += v * row[j]
                        else:
                            for j in range(d):
                                x = t_vec[j] + v * row[j]
                                t_vec[j] = x
                                acc += x * x
                    norms[g] = acc
                    groups[g] = b
                    g += 1
                    e = stop
                y2 = norms[g - 1]  # every nonzero entry added: the FFN output (without bias)
                if y2 <= 0.0:
                    continue
                y = np.sqrt(y2)
                prev = 0.0
                for q in range(g):
                    b = groups[q]
                    if b >= k_count:
                        break  # active at every candidate
                    cett = np.sqrt(norms[q]) / y
                    delta[th, b] += cett - prev
                    prev = cett

    return sweep


def cett_curve(a: torch.Tensor, w_down: torch.Tensor, candidates: np.ndarray,
               col_norm: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mean CETT, active neuron count) of activations ``a`` (tokens, neurons) at every candidate
    threshold (sorted float64, candidates[0] = 0), with W_down (d, neurons) in float32 or as stored
    in bfloat16 (read as stored: half the bytes, the same result). Exact up to float32 summation
    order; cost ~ nonzeros x d."""
    from numba import get_num_threads

    a32 = np.ascontiguousarray(a.detach().float().numpy())
    w = w_down.detach()
    norms = torch.linalg.vector_norm(w.float(), dim=0) if col_norm is None else col_norm.float()
    if w.dtype == torch.bfloat16:  # (neurons, d) bit patterns: one neuron's output direction per row
        wt16 = np.ascontiguousarray(w.T.contiguous().view(torch.int16).numpy().view(np.uint16))
        wt = np.zeros((0, 0), dtype=np.float32)
    else:
        wt = np.ascontiguousarray(w.float().T.numpy())  # (neurons, d)
        wt16 = np.zeros((0, 0), dtype=np.uint16)
    cand = np.ascontiguousarray(candidates, dtype=np.float64)
    threads = max(1, min(get_num_threads(), len(a32)))
    delta = np.zeros((threads, len(cand) + 1), dtype=np.float64)
    active = np.zeros((threads, len(cand) + 1), dtype=np.int64)
    if len(a32):
        _kernel()(a32, np.ascontiguousarray(norms.numpy()), wt, wt16, cand, delta, active)
    mean = np.cumsum(delta.sum(0))[: len(cand)] / max(len(a32), 1)
    per_bucket = active.sum(0)  # entries first inactive at candidate b (those with magnitude > 0)
    active_at = per_bucket[::-1].cumsum()[::-1][1:]  # active at candidate k: first inactive after k
    return mean, active_at
