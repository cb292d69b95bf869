"""The neuron cache's per-token bookkeeping in native code: ``reserve`` (rank the victims, evict them,
take the slots), ``commit``, ``touch``, ``note_scores`` / ``note_lookahead`` and ``evictable_count`` in one Numba
call each.

On the bundled model a layer's cache holds a few hundred slots, and every ``reserve`` cost ~60 us of
numpy calls (masks, the policy's key, a lexsort, the eviction's checks) for ~1 us of work; a decoded
token made ~5 of them. The functions here do the same steps on the cache's own arrays, in the same
order, with the same result (tests/test_runtime_nativecache.py compares them with runtime/cache.py's
numpy path on random states):

- victims are the unpinned, held slots not in ``protect``, those outside the window or on probation
  first, each group ranked by the policy (``POLICY_CODE``): ``lru`` by last use; ``lfu`` by uses, then
  last use; ``predicted``/``forecast`` by score, then last use; ``frequency`` by the decayed use rate
  plus the score's sigmoid (less ``PROBATION_KEY`` on probation), then last use; ties by slot, as
  numpy's stable sorts;
- evicting a slot clears its index entries, its last use, uses, score and probation, and pushes it on
  the free stack; the slots taken are the lowest free ones, as ``NeuronCache.reserve``;
- ``commit`` puts a ``frequency`` cache's new neurons on probation where their decayed use count is
  under the threshold; ``touch`` takes a slot off probation when a later token uses it.

Arrays in, counts out; the cache (runtime/cache.py) owns the arrays and decides when to call.
"""

from __future__ import annotations

import numpy as np
from numba import njit

PROBATION_KEY = 4.0  # subtracted from a probation neuron's key (runtime/cache.py)


@njit(nogil=True, cache=True)
def decay_pow(decay, k):
    """decay ** k for an int k >= 0 by squaring: the same multiplications as ``decay_pows`` (a libm pow()
    and numpy's differ in the last bit for some k, which would break exact ties differently)."""
    out, base = 1.0, decay
    while k > 0:
        if k & 1:
            out *= base
        base *= base
        k >>= 1
    return out


def decay_pows(decay: float, k: np.ndarray) -> np.ndarray:
    """``decay_pow`` over an int array (numpy), bit for bit."""
    k = np.array(k, dtype=np.int64)
    out, base = np.ones(k.shape), decay
    while np.any(k > 0):
        out = np.where(k & 1, out * base, out)
        base *= base
        k >>= 1
    return out

POLICY_CODE = {"lru": 0, "window": 0, "lfu": 1, "predicted": 2, "forecast": 2, "frequency": 3}


@njit(nogil=True, cache=True)
def _keys(cand, policy, position_of, last_use, uses, score, freq, freq_step, step, decay, probation):
    # the policy's primary key per candidate (float64); lru's is last use itself
    key = np.empty(cand.size, dtype=np.float64)
    for i in range(cand.size):
        s = cand[i]
        if policy == 1:
            key[i] = uses[s]
        elif policy == 2:
            key[i] = score[s]
        elif policy == 3:
            p = position_of[s]
            rate = freq[p] * decay_pow(decay, step - freq_step[p]) * (1.0 - decay)
            z = score[s]
            sig = np.float32(0.5) * (np.float32(1.0) + np.tanh(np.float32(0.5) * z))
            key[i] = rate + np.float64(sig)
            if probation[s]:
                key[i] -= PROBATION_KEY
        else:
            key[i] = last_use[s]
    return key


@njit(nogil=True, cache=True)
def _ranked(cand, policy, position_of, last_use, uses, score, freq, freq_step, step, decay, probation):
    # cand ordered best victim first: by key, then last use, then slot (stable sorts on ascending slots)
    if policy != 0:
        by_use = cand[np.argsort(last_use[cand], kind="mergesort")]
        key = _keys(by_use, policy, position_of, last_use, uses, score, freq, freq_step, step, decay, probation)
        return by_use[np.argsort(key, kind="mergesort")]
    return cand[np.argsort(last_use[cand], kind="mergesort")]


@njit(nogil=True, cache=True)
def _reserve(count, protect, policy, window, step, decay, slot_of, position_of, last_use, uses, pinned, score, freq,
             freq_step, free, n_free, never, probation):
    """Take ``count`` slots; returns (n_free after, how many victims were short: 0 when it succeeded).
    The taken slots are free[n_free_after : n_free_after + count] in reverse (lowest first)."""
    short = count - n_free
    if short > 0:
        blocked = np.zeros(position_of.size, dtype=np.bool_)
        for s in protect:
            blocked[s] = True
        n_out = n_in = 0
        outside = np.empty(position_of.size, dtype=np.int64)
        inside = np.empty(position_of.size, dtype=np.int64)
        for s in range(position_of.size):
            if position_of[s] >= 0 and not pinned[s] and not blocked[s]:
                if last_use[s] < step - window or probation[s]:
                    outside[n_out] = s
                    n_out += 1
                else:
                    inside[n_in] = s
                    n_in += 1
        if n_out + n_in < short:
            return n_free, short - n_out - n_in
        victims = _ranked(outside[:n_out], policy, position_of, last_use, uses, score, freq, freq_step, step, decay,
                          probation)
        if n_out < short:  # the window yields to the step's misses, ranked the same way
            ranked_in = _ranked(inside[:n_in], policy, position_of, last_use, uses, score, freq, freq_step, step,
                                decay, probation)
            victims = np.concatenate((victims, ranked_in))
        for i in range(short):
            s = victims[i]
            slot_of[position_of[s]] = -1
            position_of[s] = -1
            last_use[s] = never
            uses[s] = 0
            score[s] = 0.0
            probation[s] = False
            free[n_free] = s
            n_free += 1
    return n_free - count, 0


@njit(nogil=True, cache=True)
def _touch(slots, step, last_use, uses, frequency, position_of, freq, freq_step, decay, probation):
    for s in slots:
        if last_use[s] < step:  # used again by a later token
            probation[s] = False
        last_use[s] = step
        uses[s] += 1
        if frequency:
            p = position_of[s]
            freq[p] = freq[p] * decay_pow(decay, step - freq_step[p]) + 1.0
            freq_step[p] = step


@njit(nogil=True, cache=True)
def _commit(slots, positions, pin, step, slot_of, position_of, pinned, last_use, uses, on_probation, probation, freq,
            freq_step, decay, probation_uses):
    # False (and nothing changed) when a position is already cached
    for p in positions:
        if slot_of[p] >= 0:
            return False
    for i in range(slots.size):
        s = slots[i]
        slot_of[positions[i]] = s
        position_of[s] = positions[i]
        pinned[s] = pin
        last_use[s] = step
        uses[s] = 0
        probation[s] = False
        if on_probation:
            p = positions[i]
            probation[s] = freq[p] * decay_pow(decay, step - freq_step[p]) < probation_uses
    return True


@njit(nogil=True, cache=True)
def _note_scores(position_of, score, scores):
    for s in range(position_of.size):
        if position_of[s] >= 0:
            score[s] = scores[position_of[s]]


@njit(nogil=True, cache=True)
def _evictable_count(position_of, pinned, last_use, step, window, probation):
    n = 0
    for s in range(position_of.size):
        n += position_of[s] >= 0 and not pinned[s] and (last_use[s] < step - window or probation[s])
    return n


def warmup() -> None:
    """Compile (or load from the disk cache) both calls."""
    from sparseflash.runtime.cache import NeuronCache

    for policy in POLICY_CODE:
        c = NeuronCache(8, 4, 2, np.float32, window=0, policy=policy)
        c.commit(c.reserve(4), np.arange(4))
        c.tick()
        c.touch(np.arange(2))
        c.reserve(2, protect=np.arange(1))
        c.note_scores(np.zeros(8, np.float32))
        c.evictable_count()
