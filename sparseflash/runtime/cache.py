"""Neuron cache of one layer: preallocated bundle slots, O(1) insert and delete.

``slots`` (capacity, bundle_len) holds bundles in the storage dtype; ``slot_of[position]`` and
``position_of[slot]`` keep the index in step; free slots are a stack. Pinned slots (the hot region)
are never evicted. Eviction picks victims among unprotected slots. ``window`` K protects every neuron
used by the current token or by one of the K tokens before it (last use >= step - K); this is what
``--window K`` means everywhere (the ``window`` policy, eval/simulate.py, io-report's sweeps). The
window yields only to a step whose misses need its slots (``room``): they are then evicted last,
ranked by the policy, so the step still reads its misses at once (not in batches).
Beyond the window the policy is
- ``lru``: oldest last use first;
- ``lfu``: fewest uses, then oldest;
- ``predicted`` (predictor-informed): lowest predictor score first, then oldest; the engine sets the
  scores of cached neurons from the current token's predictor logits (``note_scores``), so the
  neurons the predictor thinks least likely to fire now go first;
- ``forecast``: like ``predicted``, but the score is a forecast of the next tokens' use: per neuron, an
  exponential average (``FORECAST_DECAY``) over tokens of the predicted probability sigmoid(logit);
  a look-ahead prediction (``note_lookahead``) refreshes the scores of the layer before its own;
- ``frequency`` (the default): lowest sum of two probabilities first, then oldest: the current token's
  predicted probability sigmoid(logit) (as ``predicted``) plus the neuron's recent use rate, its use
  count decayed by ``FREQUENCY_DECAY`` per token (kept per neuron, in memory or not) times
  (1 - decay), so a neuron that fired often over the last ~100 tokens stays, though this token does
  not predict it (docs/fetchless.md, "Eviction"). A neuron read while its decayed use count was
  under ``PROBATION_USES`` enters *on probation*: until a later token uses it again it is evicted
  before every other neuron (its key lowered by ``PROBATION_KEY``), the window's protection
  included, so a rarely used neuron read once does not push out one that is used often;
- ``window``: LLM in a Flash's plain sliding window: at each new token every neuron outside the
  window is dropped (slots are freed eagerly, not kept until the space is needed).
"""

from __future__ import annotations

import numpy as np

from sparseflash.layout.schema_cache import EVICTION_DECAY, PROBATION_USES
from sparseflash.runtime import nativecache
from sparseflash.runtime.aligned import aligned_zeros
from sparseflash.runtime.nativecache import PROBATION_KEY

NEVER = np.iinfo(np.int64).min // 2
FORECAST_DECAY = 0.5  # policy "forecast": weight of the past in the average of predicted probabilities
# policy "frequency": per-token decay of each neuron's use count; read with fewer decayed uses than
# PROBATION_USES, a neuron enters on probation (the values the layout's cache demand was replayed with)
FREQUENCY_DECAY = EVICTION_DECAY


class NeuronCache:
    def __init__(self, neurons: int, capacity: int, bundle_len: int, dtype, window: int = 4, policy: str = "lru",
                 host_slots: bool = True, native: bool = True, probation_uses: float = PROBATION_USES):
        if capacity < 1:
            raise ValueError(f"cache capacity must be >= 1 slot, got {capacity}")
        self.neurons, self.capacity = neurons, capacity
        # host_slots=False: the bundles live elsewhere (GPU memory); this object keeps only the index
        self.slots = aligned_zeros((capacity if host_slots else 0, bundle_len), dtype)  # reads land in them directly
        self.slot_of = np.full(neurons, -1, dtype=np.int64)
        self.position_of = np.full(capacity, -1, dtype=np.int64)
        self.last_use = np.full(capacity, NEVER, dtype=np.int64)
        self.uses = np.zeros(capacity, dtype=np.int64)
        self.pinned = np.zeros(capacity, dtype=bool)
        self.score = np.zeros(capacity, dtype=np.float32)  # predictor score (policy "predicted")
        self.probation = np.zeros(capacity, dtype=bool)  # policy "frequency": read rarely used, not used since
        self.probation_uses = probation_uses  # 0: no neuron goes on probation
        self._free = np.arange(capacity - 1, -1, -1, dtype=np.int64)  # stack: the top gives the lowest free slot
        self._n_free = capacity  # self._free[:self._n_free] are free
        self.window, self.policy = window, policy
        self._forecast = np.zeros(neurons if policy == "forecast" else 0, dtype=np.float32)  # per neuron
        self.step = 0  # token counter, advanced by tick()
        # policy "frequency": per neuron, uses decayed by FREQUENCY_DECAY per token, as of _freq_step
        self._freq = np.zeros(neurons if policy == "frequency" else 0, dtype=np.float64)
        self._freq_step = np.zeros(neurons if policy == "frequency" else 0, dtype=np.int64)
        self.native = native  # reserve and touch in one Numba call each (runtime/nativecache.py)

    @property
    def scored(self) -> bool:
        """Whether the policy ranks by the predictor's logits (the engine then calls ``note_scores``)."""
        return self.policy in ("predicted", "forecast", "frequency")

    @property
    def nbytes(self) -> int:
        return self.slots.nbytes

    @property
    def used(self) -> int:
        return self.capacity - self._n_free

    def tick(self) -> None:
        """A new token begins (policy "window": neurons that left the window are dropped)."""
        self.step += 1
        if self.policy == "window":  # keep exactly what the window (the K tokens before this one) used
            old = (self.position_of >= 0) & ~self.pinned & (self.last_use < self.step - self.window)
            self.evict(np.nonzero(old)[0])

    def note_scores(self, scores: np.ndarray) -> None:
        """Predictor logits of every neuron for the current token (policies "predicted", "forecast")."""
        if self.native and self.policy != "forecast":
            nativecache._note_scores(self.position_of, self.score, np.asarray(scores, dtype=np.float32))
            return
        held = np.nonzero(self.position_of >= 0)[0]
        if self.policy == "forecast":
            self._forecast = FORECAST_DECAY * self._forecast + (1 - FORECAST_DECAY) * _sigmoid(scores)
            self.score[held] = self._forecast[self.position_of[held]]
        else:
            self.score[held] = scores[self.position_of[held]]

    def note_lookahead(self, scores: np.ndarray) -> None:
        """Look-ahead logits of every neuron for the current token, known one layer early: they rank
        the cached neurons until the layer's own logits arrive (the average is not updated)."""
        if self.native and self.policy != "forecast":
            nativecache._note_scores(self.position_of, self.score, np.asarray(scores, dtype=np.float32))
            return
        held = np.nonzero(self.position_of >= 0)[0]
        pos = self.position_of[held]
        if self.policy == "forecast":
            self.score[held] = FORECAST_DECAY * self._forecast[pos] + (1 - FORECAST_DECAY) * _sigmoid(scores[pos])
        else:
            self.score[held] = scores[pos]

    def lookup(self, positions: np.ndarray) -> np.ndarray:
        """Slot of each position, -1 where not cached."""
        return self.slot_of[positions]

    def touch(self, slots: np.ndarray) -> None:
        """Mark slots as used by the current token."""
        if self.native:
            nativecache._touch(np.asarray(slots, dtype=np.int64), self.step, self.last_use, self.uses,
                               self.policy == "frequency", self.position_of, self._freq, self._freq_step,
                               FREQUENCY_DECAY, self.probation)
            return
        slots = np.asarray(slots, dtype=np.int64)
        self.probation[slots[self.last_use[slots] < self.step]] = False  # used again by a later token
        self.last_use[slots] = self.step
        self.uses[slots] += 1
        if self.policy == "frequency":
            pos = self.position_of[slots]
            self._freq[pos] = self._frequency(pos) + 1.0
            self._freq_step[pos] = self.step

    def _frequency(self, positions: np.ndarray) -> np.ndarray:
        """Decayed use counts of ``positions`` now (policy "frequency")."""
        return self._freq[positions] * nativecache.decay_pows(FREQUENCY_DECAY, self.step - self._freq_step[positions])

    def free_count(self) -> int:
        return self._n_free

    def _push_free(self, slots: np.ndarray) -> None:
        self._free[self._n_free : self._n_free + len(slots)] = slots
        self._n_free += len(slots)

    def _held_mask(self, protect: np.ndarray | None) -> np.ndarray:
        ok = (self.position_of >= 0) & ~self.pinned
        if protect is not None and len(protect):
            ok[protect] = False
        return ok

    def _evictable_mask(self, protect: np.ndarray | None) -> np.ndarray:
        # not in the window, or on probation
        return self._held_mask(protect) & ((self.last_use < self.step - self.window) | self.probation)

    def evictable_count(self, protect: np.ndarray | None = None) -> int:
        """How many slots ``evictable(protect)`` would return (without ranking them)."""
        if self.native and (protect is None or not len(protect)):
            return int(nativecache._evictable_count(self.position_of, self.pinned, self.last_use, self.step, self.window,
                                                    self.probation))
        return int(np.count_nonzero(self._evictable_mask(protect)))

    def room(self, protect: np.ndarray | None = None) -> int:
        """Slots a step's misses can take without evicting ``protect`` (its hits) or a pinned slot: the free
        ones and every other held one, the window's included (``reserve`` takes those last)."""
        return self._n_free + int(np.count_nonzero(self._held_mask(protect)))

    def evictable(self, protect: np.ndarray | None = None, forced: bool = False) -> np.ndarray:
        """Slots that may be evicted now, best victims first; ``forced``: then the window's (but not
        ``protect``), ranked the same way."""
        cand = np.nonzero(self._evictable_mask(protect))[0]
        cand = cand[self._rank(cand)]
        if not forced:
            return cand
        inside = np.nonzero(self._held_mask(protect) & (self.last_use >= self.step - self.window) & ~self.probation)[0]
        return np.concatenate([cand, inside[self._rank(inside)]])

    def _rank(self, cand: np.ndarray) -> np.ndarray:
        """The order in which the policy evicts slots ``cand``: best victims first."""
        if self.policy == "lfu":
            order = np.lexsort((self.last_use[cand], self.uses[cand]))
        elif self.policy == "frequency":
            rate = self._frequency(self.position_of[cand]) * (1 - FREQUENCY_DECAY)  # uses per token, recently
            key = rate + _sigmoid(self.score[cand]) - PROBATION_KEY * self.probation[cand]
            order = np.lexsort((self.last_use[cand], key))
        elif self.policy in ("predicted", "forecast"):
            order = np.lexsort((self.last_use[cand], self.score[cand]))
        else:
            order = np.argsort(self.last_use[cand], kind="stable")
        return order

    def evict(self, slots: np.ndarray) -> None:
        slots = np.asarray(slots, dtype=np.int64)
        if len(slots) == 0:
            return
        p = self.position_of[slots]
        if np.any(p < 0) or np.any(self.pinned[slots]) or len(np.unique(slots)) != len(slots):
            bad = slots[(p < 0) | self.pinned[slots]]
            raise ValueError(f"slot {int(bad[0]) if len(bad) else int(slots[0])} is empty, pinned or repeated")
        self.slot_of[p] = -1
        self.position_of[slots] = -1
        self.last_use[slots] = NEVER
        self.uses[slots] = 0
        self.score[slots] = 0.0
        self.probation[slots] = False
        self._push_free(slots)

    def reserve(self, count: int, protect: np.ndarray | None = None) -> np.ndarray:
        """Take ``count`` free slots, evicting victims if needed; raises if too few can be freed."""
        short = count - self._n_free
        if short > 0 and self.native:
            protect = np.zeros(0, np.int64) if protect is None else np.asarray(protect, dtype=np.int64)
            n_free, lacking = nativecache._reserve(
                count, protect, nativecache.POLICY_CODE[self.policy], self.window, self.step, FREQUENCY_DECAY,
                self.slot_of, self.position_of, self.last_use, self.uses, self.pinned, self.score, self._freq,
                self._freq_step, self._free, self._n_free, NEVER, self.probation)
            if lacking:
                raise MemoryError(f"cache needs {short} more slots but only {short - lacking} are evictable")
            taken = self._free[n_free : n_free + count][::-1].copy()
            self._n_free = n_free
            return taken
        if short > 0:
            victims = self.evictable(protect)
            if len(victims) < short:  # the window yields rather than the step reading in batches
                victims = self.evictable(protect, forced=True)
            if len(victims) < short:
                raise MemoryError(f"cache needs {short} more slots but only {len(victims)} are evictable")
            self.evict(victims[:short])
        taken = self._free[self._n_free - count : self._n_free][::-1].copy()  # lowest free slots first
        self._n_free -= count
        return taken

    def release(self, slots: np.ndarray) -> None:
        """Return reserved slots that were not filled (e.g. a failed read)."""
        slots = np.asarray(slots, dtype=np.int64)
        held = slots[self.position_of[slots] >= 0]
        if len(held):
            raise ValueError(f"slot {held[0]} holds neuron {self.position_of[held[0]]}; evict it instead")
        self._push_free(slots)

    def commit(self, slots: np.ndarray, positions: np.ndarray, pinned: bool = False) -> None:
        """Record that ``slots`` now hold ``positions`` (their bytes were written)."""
        slots = np.asarray(slots, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int64)
        on_probation = self.policy == "frequency" and not pinned and self.probation_uses > 0
        if self.native and len(slots) == len(positions):
            if not nativecache._commit(slots, positions, pinned, self.step, self.slot_of, self.position_of,
                                       self.pinned, self.last_use, self.uses, on_probation, self.probation,
                                       self._freq, self._freq_step, FREQUENCY_DECAY, self.probation_uses):
                raise ValueError("a position is already cached")
            return
        if np.any(self.slot_of[positions] >= 0):
            raise ValueError("a position is already cached")
        self.slot_of[positions] = slots
        self.position_of[slots] = positions
        self.pinned[slots] = pinned
        self.last_use[slots] = self.step
        self.uses[slots] = 0
        self.probation[slots] = (self._frequency(positions) < self.probation_uses) if on_probation else False

    def check(self) -> None:
        """Assert the index is consistent (used by tests)."""
        held = np.nonzero(self.position_of >= 0)[0]
        assert np.array_equal(self.slot_of[self.position_of[held]], held)
        assert (self.slot_of >= 0).sum() == len(held)
        free = self._free[: self._n_free]
        assert len(set(free.tolist())) == len(free) == self.capacity - len(held)
        assert not np.any(self.position_of[free] >= 0)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)  # no overflow warning for large |z|
