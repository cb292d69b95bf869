"""How a run's neuron cache is split among layers: the cache-demand record of a layout's header
(``header.predictors.cache_demand``, written by prepare from the profile's active masks) and the split
rule that both prepare (to validate miss cuts with the caches a run will have) and the runtime's memory
plan apply (docs/runtime.md, "Memory budget"; docs/layout-format.md).

Layers differ in how many neurons fire and how often they fire again: a layer where many neurons fire
gains many hits from slots that a layer with few active neurons would leave idle. The record holds, per
layer, the neurons a token must read (misses per token, simulated on calibration text with the
runtime's default eviction) at a grid of cache sizes, each a share of the layer's neurons with the hot
region counted in. ``split_slots`` gives each layer slots where they save the most reads a byte, within
the same bytes as an even split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .schema_check import _Check

# cache sizes the record is measured at, as shares of a layer's neurons (hot region included)
DEMAND_SHARES = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75, 1.0)
MIN_SLOTS = 16  # the smallest cache a layer gets beyond its hot region (the runtime's Policy.min_slots)
STEPS_PER_LAYER = 32  # the split hands out slots in steps of about total / (32 x layers)
# the runtime's default eviction, which the record replays (layout/cache_demand.py; runtime/cache.py and
# runtime/policy.py take their defaults from here): the window protects the 4 tokens before the current
# one; use counts decay by 0.99 a token; a neuron read with fewer decayed uses than 2 is on probation
EVICTION_WINDOW = 4
EVICTION_DECAY = 0.99
PROBATION_USES = 2.0


@dataclass(frozen=True)
class CacheDemand:
    """Per layer, misses per token at each of ``shares`` (ascending, in (0, 1]); non-increasing."""

    shares: tuple[float, ...]
    misses: tuple[tuple[float, ...], ...]

    def __post_init__(self):
        if not self.misses:
            raise ValueError("cache demand needs at least one layer")
        if len(self.shares) < 2 or any(not 0 < s <= 1 for s in self.shares) or list(self.shares) != sorted(set(self.shares)):
            raise ValueError(f"cache demand shares must be at least two distinct ascending values in (0, 1], "
                             f"got {list(self.shares)}")
        for l, row in enumerate(self.misses):
            if len(row) != len(self.shares) or any(not (math.isfinite(v) and v >= 0) for v in row):
                raise ValueError(f"cache demand of layer {l}: {len(self.shares)} finite non-negative misses "
                                 f"per token expected, got {list(row)}")

    @property
    def layers(self) -> int:
        return len(self.misses)

    def at(self, layer: int, share: float) -> float:
        """Misses per token of ``layer`` with a cache of ``share`` of its neurons (linear between the
        measured sizes, flat outside them; made non-increasing: a larger cache never reads more)."""
        row = np.minimum.accumulate(np.asarray(self.misses[layer], dtype=np.float64))
        return float(np.interp(share, self.shares, row))

    def to_json(self) -> dict:
        return {"shares": list(self.shares), "misses": [list(r) for r in self.misses]}

    @classmethod
    def from_json(cls, doc: dict) -> CacheDemand:
        """The record as ``to_json`` writes it; KeyError, TypeError or ValueError when it is not one."""
        return cls(tuple(doc["shares"]), tuple(tuple(r) for r in doc["misses"]))


def read_demand(c: _Check, doc, layers: int) -> CacheDemand:
    """``header.predictors.cache_demand``, checked (one error line for a lying header)."""
    where = "header.predictors.cache_demand"
    c.object(doc, where, ("shares", "misses"))
    shares, misses = doc["shares"], doc["misses"]
    if not isinstance(shares, list) or not isinstance(misses, list) or len(misses) != layers:
        c.fail(where, f"needs a list of shares and a list of {layers} rows of misses (one per layer)",
               type(misses).__name__ if not isinstance(misses, list) else len(misses))
    if not all(isinstance(r, list) for r in misses):
        c.fail(f"{where}.misses", "must hold one list per layer", misses)
    try:
        return CacheDemand(tuple(c.number(s, f"{where}.shares") for s in shares),
                           tuple(tuple(c.number(v, f"{where}.misses") for v in row) for row in misses))
    except ValueError as e:
        c.fail(where, str(e))


def split_slots(demand: CacheDemand, neurons: Sequence[int], n_hot: Sequence[int], costs: Sequence[int],
                budget: int, floor: Sequence[int]) -> list[int]:
    """Cache slots beyond the hot region per layer: every layer first gets ``floor[l]`` (at most its
    neurons beyond the hot region), then slots go, a step at a time, to the layer whose demand falls
    most per byte (``costs[l]``: bytes a slot of layer l takes; the fall over the step, or the average
    fall to a measured size beyond it where that is steeper), until ``budget`` bytes are spent or every
    layer is full. Where no layer gains (flat demand), the step goes to the layer with the
    smallest cache share, so the result tends to an even split. Deterministic."""
    L = len(neurons)
    if not (len(n_hot) == len(costs) == len(floor) == L == demand.layers):
        raise ValueError(f"split_slots: {demand.layers} layers of demand for {L} layers")
    room = [n - h for n, h in zip(neurons, n_hot)]
    x = [min(f, r) for f, r in zip(floor, room)]
    left = budget - sum(xi * c for xi, c in zip(x, costs))
    if left < 0:
        raise ValueError(f"split_slots: {budget} bytes cannot hold the floor of {sum(x)} slots")
    step = max(1, int(left // (sum(costs) / L)) // (STEPS_PER_LAYER * L))

    def misses(l: int, slots: int) -> float:
        return demand.at(l, (n_hot[l] + slots) / neurons[l])

    def rate(l: int, d: int) -> float:
        """Reads saved a byte: the best average over the next step or up to any measured size beyond it
        (a flat stretch, such as below the smallest measured size, does not hide the fall after it)."""
        ends = {x[l] + d} | {math.ceil(s * neurons[l]) - n_hot[l] for s in demand.shares}
        now = misses(l, x[l])
        return max((now - misses(l, e)) / ((e - x[l]) * costs[l]) for e in ends if x[l] < e <= room[l])

    while True:
        best, best_key = None, None
        for l in range(L):
            d = min(step, room[l] - x[l], left // costs[l])
            if d <= 0:
                continue
            gain = rate(l, d)
            key = (gain, -(n_hot[l] + x[l]) / neurons[l], -l)
            if best_key is None or key > best_key:
                best, best_key = (l, d), key
        if best is None:
            return x
        l, d = best
        x[l] += d
        left -= d * costs[l]


def split_shares(demand: CacheDemand, neurons: Sequence[int], n_hot: Sequence[int], share: float,
                 floor: int) -> list[float]:
    """The cache share of each layer (hot region included) when hot regions plus caches hold ``share``
    of all neurons, split as a run splits it (every bundle the same size): prepare's view of a run."""
    slots = max(0, int(share * sum(neurons)) - sum(n_hot))
    x = split_slots(demand, neurons, n_hot, [1] * len(neurons), slots, [min(floor, slots // len(neurons))] * len(neurons))
    return [(h + s) / n for h, s, n in zip(n_hot, x, neurons)]
