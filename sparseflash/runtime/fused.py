"""The host decode step of the streaming FFN with the predictor, the choice, the cache split and the
kernel over the cached neurons in one native call (kernels/step.py).

It applies where that call can stand for the engine's own steps 2-5 (runtime/engine.py): on the
host, one token, the ``threshold`` strategy, bundles in a float storage. The engine's ``_layer``
hands such a step here; everything else (the read of the misses, the look-ahead read of layer l+1,
the kernel over the misses, batches when the misses do not fit, the statistics) is the engine's, so
the two paths choose, read and compute the same neurons (tests/test_runtime_fused.py).

Time: the native call is counted as compute (``compute_s``: the own prediction, the choice and the
kernel over the cached neurons); ``predict_s`` holds the look-ahead prediction only.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from sparseflash.kernels import step
from sparseflash.kernels.halfbits import KERNEL_DTYPE, kernel_view
from sparseflash.kernels.kinds import ffn_kind
from sparseflash.runtime.planner import LayerPlan

_NO_BIAS = np.zeros(0, dtype=np.float32)


class FusedStep:
    """Per-layer kernel views of the caches and the FFN kind, for the fused host step."""

    def __init__(self, engine):
        kind = ffn_kind(engine.compute.kind)
        self.act_code, self.gated = kind.activation_code, kind.gated
        self.views = [kernel_view(c.slots, engine.compute.storage) for c in engine.caches]

    @staticmethod
    def usable(engine) -> bool:
        """Whether the engine's runs may take this step at all (per call, ``applies`` checks the token)."""
        return (not engine.on_gpu and engine.strategy == "threshold" and engine.compute.storage in KERNEL_DTYPE
                and engine.compute.kernel.name == "cpu"
                and all(p._host is not None for p in engine.predictors.own.values()))

    def applies(self, x: torch.Tensor) -> bool:
        return x.shape[0] == 1 and x.device.type == "cpu"

    def __call__(self, engine, l: int, x: torch.Tensor, s) -> torch.Tensor:
        """Layer l's FFN output for one token x (1, d): steps 2-5 of the engine's layer step."""
        cache, p, policy = engine.caches[l], engine.predictors.own[l], engine.policy
        t = time.perf_counter()
        xf = np.ascontiguousarray(x.detach().float().numpy())
        y = np.empty_like(xf)
        miss_cut = p.miss_cut - policy.margin if engine.applies_miss_cut(p) else None  # the cached cut with it
        counting = s.needed is not None
        top, positions, hit_slots, missing, _, active = step.select_and_run_hits(
            xf, *p._host, p.cut - policy.margin, cache.slot_of, self.views[l], self.act_code, self.gated,
            *self._slot_biases(engine, l), y, offset=engine.cost_terms(p), miss_cut=miss_cut,
            norms=engine.fetcher.norms.known[l] if counting else None, threshold=engine.regions[l].threshold)
        s.ffn_s += time.perf_counter() - t
        if cache.scored:
            cache.note_scores(top)
        s.predicted += len(positions)
        s.per_layer_predicted.append(len(positions))
        if engine.trace is not None:
            engine.trace[l].append(positions)
        s.hits += len(hit_slots)
        s.misses += len(missing)
        cache.touch(hit_slots)
        if counting:
            s.needed += active
        xt, yt = torch.from_numpy(xf), torch.from_numpy(y)
        ahead = lambda: engine._start_prefetch(l + 1, x, s)  # noqa: E731
        if not len(missing):
            ahead()
            return yt
        room = cache.room(protect=hit_slots)
        if len(missing) <= room:  # the misses are read (on this thread when small), then computed
            new = cache.reserve(len(missing), protect=hit_slots)
            fetch = engine.fetcher.start(l, missing, new, demand=True)
            engine._guarded(fetch, ahead)
            engine._land(fetch, s)
            t = time.perf_counter()  # the kernel over the misses, in one native call too
            active = step.run_and_add(xf, self.views[l], new, missing, self.act_code, self.gated,
                                      *self._slot_biases(engine, l), y,
                                      norms=engine.fetcher.norms.known[l] if counting else None,
                                      threshold=engine.regions[l].threshold)
            if counting:
                s.needed += active
            s.ffn_s += time.perf_counter() - t
        else:  # more than the cache holds beside the hits (already computed): batches
            ahead()
            engine._compute_in_batches(l, xt, LayerPlan(hit_slots, missing, room), yt, s, hits_computed=True)
        return yt

    @staticmethod
    def _slot_biases(engine, l: int) -> tuple[np.ndarray, np.ndarray]:
        """Layer l's gate and up biases per slot of its cache, as it is now (empty: none)."""
        position_of = engine.caches[l].position_of
        return tuple(_NO_BIAS if b is None else b[position_of] for b in (engine.compute.b_gate[l], engine.compute.b_up[l]))

    def lookahead(self, engine, ahead, cache, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
        """The engine's look-ahead choice (``_start_prefetch``) for one host token in one native call
        (kernels/step.py ``select_missing``: the predictor's choice, cost offset and miss cut, of the
        neurons not in ``cache``): (positions to read, every logit); None where it does not apply."""
        if ahead._host is None or not self.applies(x):
            return None
        margin = engine.policy.margin - engine.policy.lookahead_raise  # cuts raised (Policy.lookahead_raise)
        top, missing = step.select_missing(
            np.ascontiguousarray(x.detach().float().numpy()), *ahead._host, ahead.cut - margin, cache.slot_of,
            offset=engine.cost_terms(ahead), miss_cut=ahead.miss_cut - margin if engine.applies_miss_cut(ahead) else None)
        return missing, top
