"""One decode token's FFN step for the neurons already in memory, in one Numba call.

At decode time on a small model every part of the streamed FFN step is a few microseconds of work
behind tens of microseconds of Python and numpy calls (predictor logits, the threshold, the cost
offset, the miss cut, the cache lookup, the kernel call's checks). ``select_and_run_hits`` does the
part that needs no read in one call:

1. the predictor's logits for the token (W2 . relu(W1 . x + b1) + b2, as kernels/predictor.py);
2. the choice: a neuron is selected when its logit plus its cost offset (``cached_bonus`` where it is
   in memory, ``-miss_penalty`` where not) exceeds ``cut``; one not in memory is kept only if its
   logit exceeds ``miss_cut`` (when ``use_miss_cut``), as kernels/predictor.py's ``select``;
3. the split by the cache index ``slot_of`` (stored position -> slot, -1 when not in memory);
4. the sparse FFN over the selected neurons in memory (kernels/cpu.py's neuron loop), into y.

It returns how many neurons it selected, how many were in memory, and how many must be read; the
caller reads those and runs the kernel over them. Arrays in, arrays out; nothing else of the package
is imported (the predictor and neuron loops are the kernels' own).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from sparseflash.kernels.cpu import _neuron_range
from sparseflash.kernels.predictor import _top_logits

_NO_NORMS = np.zeros(0, dtype=np.float32)


@njit(nogil=True, cache=True)
def _step(x, w1, b1, w2, b2, h, top, cut, use_offset, cached_bonus, miss_penalty, use_miss_cut, miss_cut, slot_of,
          positions, hit_slots, missing, bundles, act_code, gated, gate_bias, up_bias, acts, y, norms, threshold):
    _top_logits(x, w1, b1, w2, b2, h, top)
    n_pos = n_hit = n_miss = n_active = 0
    for k in range(top.size):
        slot = slot_of[k]
        v = top[k]
        if use_offset:
            v += cached_bonus if slot >= 0 else -miss_penalty
        if v > cut and (not use_miss_cut or slot >= 0 or top[k] > miss_cut):
            positions[n_pos] = k
            n_pos += 1
            if slot >= 0:
                hit_slots[n_hit] = slot
                n_hit += 1
            else:
                missing[n_miss] = k
                n_miss += 1
    if n_hit:
        _neuron_range(x, bundles, hit_slots[:n_hit], act_code, gated, gate_bias, up_bias, acts, 0, n_hit, y)
    else:
        y[:] = 0.0
    if norms.size:  # truly active among the cached: |a| x ||down|| >= threshold and > 0 (layout/schema.py)
        j = 0
        for k in range(n_pos):
            if slot_of[positions[k]] >= 0:
                m = abs(acts[0, j]) * norms[positions[k]]
                if m >= threshold and m > 0:
                    n_active += 1
                j += 1
    return n_pos, n_hit, n_miss, n_active


def select_and_run_hits(x: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, cut: float,
                        slot_of: np.ndarray, bundles: np.ndarray, act_code: int, gated: bool,
                        gate_bias: np.ndarray, up_bias: np.ndarray, y: np.ndarray, *,
                        offset: tuple[float, float] | None = None, miss_cut: float | None = None,
                        norms: np.ndarray | None = None, threshold: float = 0.0):
    """For one token x (1, d) float32: the predictor (w1 (r, d), b1 (r,), w2 (n, r), b2 (n,) float32)
    picks stored positions (``cut``; ``offset`` (cached_bonus, miss_penalty); ``miss_cut``), and the
    FFN of those cached (``slot_of`` (n,) int64) is written into y (1, d) float32 from ``bundles``
    (slots, bundle_len) in the kernel dtype (halfbits.kernel_view). Biases are per slot (empty: none).

    With ``norms`` (n,) float32, each neuron's down-column norm by stored position, it also counts the
    cached neurons that are truly active (|a| x norm >= ``threshold`` and > 0, layout/schema.py).

    Returns (top, positions, hit_slots, missing, acts, active): every neuron's logit (n,), the selected
    positions ascending, the slots of those in memory and the positions of those not (both in position
    order), the activations (1, len(hit_slots)) and the truly active count (0 without ``norms``). The
    arrays are checked by the caller once (the engine's are fixed for a run); here only their lengths
    are asserted."""
    n, rank = w2.shape
    if x.shape != (1, w1.shape[1]) or slot_of.shape != (n,) or y.shape != x.shape:
        raise ValueError(f"fused step: x {x.shape}, w1 {w1.shape}, w2 {w2.shape}, slot_of {slot_of.shape}, "
                         f"y {y.shape} do not agree")
    top = np.empty(n, dtype=np.float32)
    positions, hit_slots, missing = (np.empty(n, dtype=np.int64) for _ in range(3))
    acts = np.empty((1, n), dtype=np.float32)
    bonus, penalty = offset if offset is not None else (0.0, 0.0)
    if norms is not None and norms.shape != (n,):
        raise ValueError(f"fused step: norms {norms.shape}, expected ({n},)")
    n_pos, n_hit, n_miss, active = _step(
        x, w1, b1, w2, b2, np.empty(rank, dtype=np.float32), top, np.float32(cut), offset is not None,
        np.float32(bonus), np.float32(penalty), miss_cut is not None, np.float32(0.0 if miss_cut is None else miss_cut),
        slot_of, positions, hit_slots, missing, bundles, act_code, gated, gate_bias, up_bias, acts, y,
        _NO_NORMS if norms is None else norms, np.float32(threshold))
    return top, positions[:n_pos], hit_slots[:n_hit], missing[:n_miss], acts[:, :n_hit], int(active)


@njit(nogil=True, cache=True)
def _select_missing(x, w1, b1, w2, b2, h, top, cut, use_offset, miss_penalty, use_miss_cut, miss_cut, slot_of,
                    missing):
    # steps 1-3 of _step for a look-ahead: the selected positions not in memory, ascending (the cached
    # bonus does not matter: only neurons not in memory are kept)
    _top_logits(x, w1, b1, w2, b2, h, top)
    n_miss = 0
    for k in range(top.size):
        slot = slot_of[k]
        if slot >= 0:
            continue
        v = top[k]
        if use_offset:
            v += -miss_penalty
        if v > cut and (not use_miss_cut or top[k] > miss_cut):
            missing[n_miss] = k
            n_miss += 1
    return n_miss


def select_missing(x: np.ndarray, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, cut: float,
                   slot_of: np.ndarray, *, offset: tuple[float, float] | None = None,
                   miss_cut: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The choice of ``select_and_run_hits`` without the kernel, for a look-ahead read: (top, missing),
    every neuron's logit and the selected positions not in memory (``slot_of`` < 0), ascending."""
    n, rank = w2.shape
    if x.shape != (1, w1.shape[1]) or slot_of.shape != (n,):
        raise ValueError(f"fused look-ahead: x {x.shape}, w1 {w1.shape}, w2 {w2.shape}, slot_of {slot_of.shape} "
                         "do not agree")
    top, missing = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.int64)
    penalty = offset[1] if offset is not None else 0.0
    n_miss = _select_missing(x, w1, b1, w2, b2, np.empty(rank, dtype=np.float32), top, np.float32(cut),
                             offset is not None, np.float32(penalty), miss_cut is not None,
                             np.float32(0.0 if miss_cut is None else miss_cut), slot_of, missing)
    return top, missing[:n_miss]


@njit(nogil=True, cache=True)
def _add_slots(x, bundles, slots, positions, act_code, gated, gate_bias, up_bias, acts, part, y, norms, threshold):
    _neuron_range(x, bundles, slots, act_code, gated, gate_bias, up_bias, acts, 0, slots.size, part)
    for i in range(y.shape[1]):
        y[0, i] += part[0, i]
    n_active = 0
    if norms.size:
        for j in range(slots.size):
            m = abs(acts[0, j]) * norms[positions[j]]
            if m >= threshold and m > 0:
                n_active += 1
    return n_active


def run_and_add(x: np.ndarray, bundles: np.ndarray, slots: np.ndarray, positions: np.ndarray, act_code: int,
                gated: bool, gate_bias: np.ndarray, up_bias: np.ndarray, y: np.ndarray, *,
                norms: np.ndarray | None = None, threshold: float = 0.0) -> int:
    """For one token x (1, d) float32: y += the FFN of ``slots`` of ``bundles`` (the neurons just read, at
    stored ``positions``), as ``select_and_run_hits`` runs the cached ones; biases per slot (empty:
    none). With ``norms`` (per stored position) returns how many of them are truly active (else 0)."""
    if x.shape[0] != 1 or y.shape != x.shape or slots.shape != positions.shape:
        raise ValueError(f"fused step: x {x.shape}, y {y.shape}, slots {slots.shape}, positions {positions.shape}")
    acts = np.empty((1, slots.size), dtype=np.float32)
    return int(_add_slots(x, bundles, slots, positions, act_code, gated, gate_bias, up_bias, acts, np.empty_like(y),
                          y, _NO_NORMS if norms is None else norms, np.float32(threshold)))


def warmup(dtypes=(np.float32, np.uint16, np.int16)) -> None:
    """Compile (or load from the disk cache) the step for each bundle kernel dtype."""
    d, n, r = 4, 8, 2
    w1, w2 = np.ones((r, d), np.float32), np.ones((n, r), np.float32)
    for dt in dtypes:
        bundles = np.zeros((n, 2 * d), dtype=dt)
        for norms in (None, np.ones(n, np.float32)):
            select_and_run_hits(np.ones((1, d), np.float32), w1, np.zeros(r, np.float32), w2,
                                np.zeros(n, np.float32), 0.0, np.arange(n, dtype=np.int64), bundles, 0, False,
                                np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros((1, d), np.float32),
                                norms=norms)
            select_missing(np.ones((1, d), np.float32), w1, np.zeros(r, np.float32), w2, np.zeros(n, np.float32), 0.0,
                           np.arange(n, dtype=np.int64))
            run_and_add(np.ones((1, d), np.float32), bundles, np.arange(2, dtype=np.int64), np.arange(2, dtype=np.int64),
                        0, False, np.zeros(0, np.float32), np.zeros(0, np.float32), np.zeros((1, d), np.float32),
                        norms=norms)
