"""Each layer's cache demand (layout/schema_cache.py): misses per token against cache size, replayed
from the profile's active masks of the calibration text through the runtime's default eviction.

The replay is the runtime's cache without its predictor term (a mask holds no scores): per token the
active neurons not held are read; a neuron read while its decayed use count was under
``PROBATION_USES`` is on probation until a later token uses it again. When the cache is full, held
neurons on probation go first, then those outside the window (used by one of the ``WINDOW`` tokens
before), each group lowest recent use rate first (uses decayed by ``DECAY`` a token), then the oldest;
the window's go last, ranked the same way. Every neuron competes, the hot
ones too (a run pins them; they are the most frequent, so the replay keeps them as well), and a cache
size is a share of the layer's neurons. Misses are counted after ``WARMUP`` tokens (a run's cache is
warm for most of its tokens).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sparseflash.layout.masks import read_masks, unpack
from sparseflash.layout.schema_cache import (
    DEMAND_SHARES,
    EVICTION_DECAY,
    EVICTION_WINDOW,
    MIN_SLOTS,
    PROBATION_USES,
    CacheDemand,
    split_shares,
)

DEMAND_TOKENS = 1024  # calibration tokens replayed per layer
WARMUP = 128
WINDOW, DECAY = EVICTION_WINDOW, EVICTION_DECAY  # the runtime's defaults (schema_cache)


def replay(active: np.ndarray, capacity: int, window: int = WINDOW, decay: float = DECAY,
           probation_uses: float = PROBATION_USES) -> list[np.ndarray]:
    """Per token, the positions of ``active`` (tokens, neurons) bool that a cache of ``capacity``
    neurons must read (sorted), under the rule in the module docstring; also eval/simulate.py's
    ``frequency`` policy; ``probation_uses`` 0 puts no neuron on probation."""
    tokens, neurons = active.shape
    held = np.zeros(neurons, dtype=bool)
    probation = np.zeros(neurons, dtype=bool)
    last = np.full(neurons, -(1 << 40), dtype=np.int64)
    rate = np.zeros(neurons)
    out = []
    for t in range(tokens):
        need = active[t]
        miss = need & ~held
        missed = np.nonzero(miss)[0]
        probation[need] = False  # the hits (a neuron read now is put on probation below)
        over = len(missed) - (capacity - int(np.count_nonzero(held)))
        if over > 0:
            cand = np.nonzero(held & ~need)[0]
            # on probation first, then outside the window; then lowest rate (a decayed count, under 1e3); the age
            # (under 1e-3 a token apart) breaks near-ties
            on = probation[cand]
            key = ((last[cand] >= t - window) & ~on) * 1e12 - on * 1e10 + rate[cand] * 1e6 + (last[cand] - t) * 1e-6
            held[cand if over >= len(cand) else cand[np.argpartition(key, over - 1)[:over]]] = False
        held[missed] = True
        probation[missed] = rate[missed] * decay < probation_uses  # the count decayed to now, as the runtime's
        excess = int(np.count_nonzero(held)) - capacity
        if excess > 0:  # more active neurons than slots: the step reads them in turns, the last ones not kept
            held[missed[len(missed) - excess:]] = False
            probation[missed[len(missed) - excess:]] = False
        out.append(missed)
        rate *= decay
        rate[need] += 1.0
        last[need] = t
    return out


def replay_misses(active: np.ndarray, capacity: int, window: int = WINDOW, decay: float = DECAY,
                  warmup: int = WARMUP, probation_uses: float = PROBATION_USES) -> float:
    """Misses per token of ``active`` (tokens, neurons) bool through a cache of ``capacity`` neurons
    (``replay``); tokens before ``warmup`` fill the cache but are not counted."""
    tokens, neurons = active.shape
    if capacity >= neurons:  # everything fits: only first uses miss
        first = np.argmax(active, axis=0)[active.any(axis=0)]
        return float(np.count_nonzero(first >= warmup)) / max(tokens - warmup, 1)
    misses = replay(active, capacity, window, decay, probation_uses)[warmup:]
    return sum(len(m) for m in misses) / max(tokens - warmup, 1)


def layer_demand(active: np.ndarray, shares=DEMAND_SHARES) -> tuple[float, ...]:
    """Misses per token at each cache share of the layer's neurons."""
    n = active.shape[1]
    return tuple(replay_misses(active, max(1, int(round(s * n)))) for s in shares)


def profile_demand(profile_dir: str | os.PathLike, thresholds: str, layers: int, neurons: int,
                   tokens: int = DEMAND_TOKENS, quiet: bool = False) -> CacheDemand:
    """The cache demand of every layer from the first ``tokens`` calibration tokens of the profile's masks
    at ``thresholds`` (ppl | cett); one layer's masks in memory at a time."""
    rows = []
    for l in tqdm(range(layers), desc="cache demand", unit="layer", disable=quiet, leave=False):
        path = Path(profile_dir) / "masks" / f"{thresholds}_L{l}.bits.zst"
        chunk = next(read_masks(path, neurons, -1, rows_per_chunk=tokens), None)
        if chunk is None:
            rows.append(tuple(0.0 for _ in DEMAND_SHARES))
            continue
        rows.append(layer_demand(unpack(chunk[:tokens], neurons)))
    return CacheDemand(tuple(DEMAND_SHARES), tuple(rows))


def cache_split(profile_dir: str | os.PathLike, p, config, quiet: bool = False):
    """(demand, split) for the predictors pass (PredictorParams ``p``): ``split(share)`` gives the per-layer
    cache shares a run splits ``share`` into (hot regions of ``p.hot_fraction``), or ``share`` itself
    when the cache is not split (``p.split_cache`` off, or no miss cut to validate)."""
    if not (p.split_cache and p.miss_recalls):
        return None, lambda share: share
    demand = profile_demand(profile_dir, p.thresholds, config.num_layers, config.intermediate_size, quiet=quiet)
    n, layers = config.intermediate_size, config.num_layers
    hot = int(round(p.hot_fraction * n))
    return demand, lambda share: split_shares(demand, [n] * layers, [hot] * layers, share, MIN_SLOTS)
