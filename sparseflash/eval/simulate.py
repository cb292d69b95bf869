"""Replay active-set traces through a model of the neuron cache, without reading anything.

Used for sweeps (bytes per token vs budget and window) and for the oracle floor: Belady's optimal
eviction needs the future, which only a recorded trace has. All bundles of a layer are the same
size, so evicting the neuron needed farthest in the future minimises neurons fetched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sparseflash.layout.cache_demand import replay
from sparseflash.layout.format_extents import extent_bytes, plan_extents
from sparseflash.runtime.cache import FREQUENCY_DECAY


@dataclass
class SimResult:
    fetched: np.ndarray  # (tokens,) neurons read per token (all layers)
    needed: np.ndarray  # (tokens,) non-hot neurons needed per token
    requests: np.ndarray  # (tokens,) read requests
    bytes: np.ndarray  # (tokens,) bytes read
    misses: list  # per layer, per token: the missing positions (sorted)


def simulate_layer(trace: list[np.ndarray], n_hot: int, capacity: int, policy: str = "lru", window: int = 0):
    """Per token, the positions that must be read. ``trace[t]`` holds stored positions needed at t;
    positions < n_hot are resident. ``capacity`` counts unpinned slots. ``window`` K protects the
    neurons used by token t or by one of the K tokens before it (runtime/cache.py's rule: when the misses
    need the room, the window's neurons go last, ranked by the policy). Policies:
    ``lru``, ``lfu``, ``belady`` (the future known), ``frequency`` (runtime/cache.py's default without
    its predictor term, which a trace does not hold: lowest recent use rate first, then oldest)."""
    if policy not in ("lru", "lfu", "belady", "frequency"):
        raise ValueError(f"cannot simulate eviction policy {policy!r} (a trace holds no predictor scores)")
    needed = [np.asarray(p, dtype=np.int64)[np.asarray(p) >= n_hot] for p in trace]
    if policy == "frequency":  # the cache-demand replay's rule (layout/cache_demand.py), on a mask of the trace
        width = max((int(p.max()) + 1 for p in needed if len(p)), default=1)
        active = np.zeros((len(needed), width), dtype=bool)
        for t, p in enumerate(needed):
            active[t, p] = True
        return replay(active, capacity, window, FREQUENCY_DECAY)
    next_use = None
    if policy == "belady":
        next_use = []
        upcoming: dict[int, int] = {}
        for t in range(len(needed) - 1, -1, -1):
            next_use.append({int(p): upcoming.get(int(p), 1 << 60) for p in needed[t]})
            for p in needed[t]:
                upcoming[int(p)] = t
        next_use.reverse()
    cached: dict[int, int] = {}  # position -> last use (lru) or next use (belady)
    uses: dict[int, int] = {}
    out = []
    for t, need in enumerate(needed):
        need_set = set(need.tolist())
        miss = [p for p in need.tolist() if p not in cached]
        for p in need.tolist():
            if p in cached:
                cached[p] = next_use[t][p] if next_use else t
                uses[p] = uses.get(p, 0) + 1
        free = capacity - len(cached)
        overflow = len(miss) - free
        if overflow > 0:
            candidates = [p for p in cached if p not in need_set]
            if policy == "belady":
                candidates.sort(key=lambda p: -cached[p])
            else:  # outside the window first, then (forced) the window's, each ranked by the policy
                count = {"lru": lambda p: 0, "lfu": lambda p: uses.get(p, 0)}[policy]  # noqa: E731
                candidates.sort(key=lambda p: (cached[p] >= t - window, count(p), cached[p]))
            for p in candidates[:overflow]:
                del cached[p]
                uses.pop(p, None)
        room = capacity - len(cached)
        for p in miss[:room]:
            cached[p] = next_use[t][p] if next_use else t
            uses[p] = 1
        out.append(np.array(sorted(miss), dtype=np.int64))
    return out


def simulate(traces: list[list[np.ndarray]], n_hot: list[int], capacity, bundle_bytes: int,
             policy: str = "lru", window: int = 0, merge_gap_blocks: int = 0) -> SimResult:
    """Simulate every layer; traces[l][t] are the stored positions layer l needs at token t; ``capacity``:
    unpinned slots, the same for every layer or one per layer."""
    capacity = np.broadcast_to(np.asarray(capacity, dtype=np.int64), (len(traces),))
    tokens = len(traces[0])
    fetched = np.zeros(tokens, dtype=np.int64)
    needed = np.zeros(tokens, dtype=np.int64)
    requests = np.zeros(tokens, dtype=np.int64)
    nbytes = np.zeros(tokens, dtype=np.int64)
    misses = []
    for l, trace in enumerate(traces):
        layer_miss = simulate_layer(trace, n_hot[l], int(capacity[l]), policy, window)
        misses.append(layer_miss)
        for t, m in enumerate(layer_miss):
            fetched[t] += len(m)
            needed[t] += int((np.asarray(trace[t]) >= n_hot[l]).sum())
            ext = plan_extents(m, bundle_bytes, merge_gap_blocks)
            requests[t] += len(ext)
            nbytes[t] += extent_bytes(ext)
    return SimResult(fetched, needed, requests, nbytes, misses)
