"""Neuron order of an FFN layer on disk: which neuron sits next to which.

Every order starts with the layer's hot region (the most frequently active neurons, pinned resident
by the runtime, so they are never part of a per-token read), followed by the rest:
- ``identity``: checkpoint order;
- ``frequency``: most frequently active first;
- ``coact``: neurons that fire together placed next to each other. Several methods are built
  (greedy chains over co-activation affinities, a spectral order) and the one needing the fewest
  read requests per token on the calibration masks is kept, per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sparseflash.layout.format_extents import mask_read_cost
from sparseflash.layout.params import ORDERS


@dataclass(frozen=True)
class LayerStats:
    """What the ordering needs from the profile for one layer."""

    frequency: np.ndarray  # (n,) activation counts
    neighbors: np.ndarray  # (n, k) most co-activated partners
    neighbor_counts: np.ndarray  # (n, k)
    coactivation: np.ndarray | None  # (n, n) counts, for small layers
    masks: np.ndarray | None  # (tokens, n) bool calibration active sets, to measure candidates


def hot_neurons(frequency: np.ndarray, n_hot: int) -> np.ndarray:
    """Ids of the n_hot most frequent neurons, most frequent first (ties by id)."""
    return np.lexsort((np.arange(len(frequency)), -frequency))[:n_hot]


def _affinity_dense(c: np.ndarray, kind: str) -> np.ndarray:
    f = np.diag(c).astype(np.float64)
    c = c.astype(np.float64)
    if kind == "jaccard":
        denom = f[:, None] + f[None, :] - c
    else:  # "cosine"
        denom = np.sqrt(np.outer(f, f))
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(denom > 0, c / denom, 0.0)
    np.fill_diagonal(a, 0.0)
    return a


def greedy_chain(ids: np.ndarray, affinity: np.ndarray, frequency: np.ndarray, lookback: int = 1) -> np.ndarray:
    """Path through ``ids``: start at the most frequent, then repeatedly append the unplaced neuron
    with the highest summed affinity to the last ``lookback`` placed ones (the most frequent
    unplaced when none has any affinity)."""
    ids = np.asarray(ids)
    if len(ids) == 0:
        return ids
    sub = affinity[np.ix_(ids, ids)].copy()
    freq = frequency[ids].astype(np.float64)
    placed = np.zeros(len(ids), dtype=bool)
    order = [int(np.argmax(freq))]
    placed[order[0]] = True
    score = sub[order[0]].copy()
    recent = [order[0]]
    for _ in range(len(ids) - 1):
        s = np.where(placed, -np.inf, score)
        nxt = int(np.argmax(s))
        if s[nxt] <= 0:
            nxt = int(np.argmax(np.where(placed, -np.inf, freq)))
        order.append(nxt)
        placed[nxt] = True
        recent.append(nxt)
        score += sub[nxt]
        if len(recent) > lookback:
            score -= sub[recent.pop(0)]
    return ids[np.array(order)]


def greedy_chain_sparse(ids: np.ndarray, neighbors: np.ndarray, neighbor_counts: np.ndarray,
                        frequency: np.ndarray) -> np.ndarray:
    """greedy_chain over top-k neighbour lists (for layers too large for a dense co-activation matrix)."""
    keep = np.zeros(len(frequency), dtype=bool)
    keep[ids] = True
    placed = ~keep
    by_freq = [int(i) for i in ids[np.argsort(-frequency[ids], kind="stable")]]
    cursor = 0
    order = []
    tail = None
    for _ in range(len(ids)):
        nxt = None
        if tail is not None:
            for j, cnt in zip(neighbors[tail], neighbor_counts[tail]):
                if cnt > 0 and not placed[j]:
                    nxt = int(j)
                    break
        if nxt is None:
            while placed[by_freq[cursor]]:
                cursor += 1
            nxt = by_freq[cursor]
        placed[nxt] = True
        order.append(nxt)
        tail = nxt
    return np.array(order, dtype=np.int64)


def spectral_order(ids: np.ndarray, affinity: np.ndarray) -> np.ndarray:
    """Sort ``ids`` by the Fiedler vector of the normalised Laplacian of the affinity graph."""
    if len(ids) < 3:
        return np.asarray(ids)
    a = torch.from_numpy(affinity[np.ix_(ids, ids)])
    deg = a.sum(1)
    inv = torch.where(deg > 0, deg.rsqrt(), torch.zeros_like(deg))
    lap = torch.eye(len(ids), dtype=a.dtype) - inv[:, None] * a * inv[None, :]
    _, vecs = torch.linalg.eigh(lap)
    return np.asarray(ids)[np.argsort(vecs[:, 1].numpy() * inv.numpy(), kind="stable")]


def requests_per_token(order: np.ndarray, n_hot: int, masks: np.ndarray, bundle_bytes: int) -> tuple[float, float]:
    """Mean (requests, bytes) per token to read the non-hot active neurons of ``masks`` in ``order``."""
    stored = masks[:, order].copy()  # (tokens, positions)
    stored[:, :n_hot] = False
    req, nbytes = mask_read_cost(stored, bundle_bytes)
    return float(req.mean()), float(nbytes.mean())


def order_layer(method: str, stats: LayerStats, n_hot: int, bundle_bytes: int,
                extended: bool = False) -> tuple[np.ndarray, dict]:
    """Permutation (stored position -> neuron id), hot region first, and what was measured.

    ``extended`` also tries the methods that have not won on real traces so far (cosine affinity
    spectral order), for measurement."""
    n = len(stats.frequency)
    hot = hot_neurons(stats.frequency, n_hot)
    rest_mask = np.ones(n, dtype=bool)
    rest_mask[hot] = False
    rest = np.nonzero(rest_mask)[0]
    if method == "identity":
        return np.concatenate([hot, rest]), {"method": "identity"}
    if method == "frequency":
        return np.concatenate([hot, rest[np.argsort(-stats.frequency[rest], kind="stable")]]), {"method": "frequency"}
    if method != "coact":
        raise ValueError(f"unknown order {method!r} (choose from {', '.join(ORDERS)})")
    candidates = {"frequency": rest[np.argsort(-stats.frequency[rest], kind="stable")]}
    if stats.coactivation is not None:
        for kind, lookbacks, spectral in (("jaccard", (1, 4), True), ("cosine", (4,), extended)):
            aff = _affinity_dense(stats.coactivation, kind)
            for lookback in lookbacks:
                candidates[f"greedy-{kind}-{lookback}"] = greedy_chain(rest, aff, stats.frequency, lookback)
            if spectral:
                candidates[f"spectral-{kind}"] = spectral_order(rest, aff)
    candidates["greedy-neighbors"] = greedy_chain_sparse(rest, stats.neighbors, stats.neighbor_counts,
                                                         stats.frequency)
    if stats.masks is None:
        best = "greedy-jaccard-4" if "greedy-jaccard-4" in candidates else "greedy-neighbors"
        return np.concatenate([hot, candidates[best]]), {"method": best, "measured": {}}
    measured = {name: requests_per_token(np.concatenate([hot, o]), n_hot, stats.masks, bundle_bytes)
                for name, o in candidates.items()}
    best = min(measured, key=lambda k: measured[k])
    return np.concatenate([hot, candidates[best]]), {
        "method": best, "measured": {k: {"requests": v[0], "bytes": v[1]} for k, v in measured.items()}}
