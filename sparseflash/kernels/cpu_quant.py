"""CPU kernels on quantized weights (q8 / q4): the sparse FFN and the resident-matrix product.

The sparse FFN follows cpu.py exactly (chunks of active neurons on plain threads, four
neurons per pass, partial outputs summed in chunk order, no down read when a_i == 0); only
the inner loops differ. They read the bundle bytes through two zero-copy views of the same
matrix: the values (int8 for q8, uint8 for q4: the dtype selects the decoder) and uint16
for the float16 scales. Nothing is dequantized ahead: a group of 32 values is decoded into
registers, used, and dropped, so memory traffic is the quantized bytes (see quant.py for the
byte layout).

A group is 16 lanes: lane i holds values i and i + 16 of the group (for q4 that is one
byte, low and high nibble), which pair with x[i] and x[i + 16], two contiguous runs. So a
dot product is acc[lane] += scale * (q_lo * x_lo + q_hi * x_hi) over the groups, with 16
float32 lanes per neuron summed once at the end: no horizontal sum per group (that
variant ran 3x slower), and four neurons side by side like the float kernel.

quant_linear(x, w) is x @ W.T for a quantized matrix: rows of W four at a time with the same
dot products, row ranges spread over the threads.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, types
from numba.extending import overload

from sparseflash.kernels.contract import FFNCall, check_linear, finish, finish_linear
from sparseflash.kernels.cpu import (
    _FASTMATH,
    _neuron_activation,
    _writable,
    call_buffers,
    chunk_bounds,
    run_chunks,
    run_neurons,
    thread_count,
)
from sparseflash.kernels.halfbits import q4_pair, to_f32
from sparseflash.kernels.quant import GROUP, SCALE_BYTES

_VALUE_VIEW = {"q8": np.dtype(np.int8), "q4": np.dtype(np.uint8)}  # the values view selects the decoder
_LANES = 32  # float32 accumulator lanes per neuron (q4 uses the first 16)


# q8: a group is 32 int8 at bytes g*32 .. g*32+31, one lane per value.

@njit(fastmath=_FASTMATH, cache=True)
def _q8_dot(v, s, x, acc):
    # one part: values v (d,) int8, scales s (d/32,) f16 bits . x (d,); acc (32,) scratch
    acc[:] = 0.0
    for g in range(s.size):
        c = to_f32(s[g])
        for i in range(GROUP):
            acc[i] += c * np.float32(v[g * GROUP + i]) * x[g * GROUP + i]
    return acc.sum()


@njit(fastmath=_FASTMATH, cache=True)
def _q8_dot4(v0, v1, v2, v3, s0, s1, s2, s3, x, acc):
    # four parts . x in one pass; acc (4, 32) scratch
    acc[:] = 0.0
    for g in range(s0.size):
        c0, c1, c2, c3 = to_f32(s0[g]), to_f32(s1[g]), to_f32(s2[g]), to_f32(s3[g])
        for i in range(GROUP):
            j = g * GROUP + i
            xi = x[j]
            acc[0, i] += c0 * np.float32(v0[j]) * xi
            acc[1, i] += c1 * np.float32(v1[j]) * xi
            acc[2, i] += c2 * np.float32(v2[j]) * xi
            acc[3, i] += c3 * np.float32(v3[j]) * xi
    return acc[0].sum(), acc[1].sum(), acc[2].sum(), acc[3].sum()


@njit(fastmath=_FASTMATH, cache=True)
def _q8_axpy(y, a, v, s):
    # y (d,) += a * part
    for g in range(s.size):
        c = a * to_f32(s[g])
        for i in range(GROUP):
            y[g * GROUP + i] += c * np.float32(v[g * GROUP + i])


@njit(fastmath=_FASTMATH, cache=True)
def _q8_axpy4(y, a0, v0, s0, a1, v1, s1, a2, v2, s2, a3, v3, s3):
    # y (d,) += sum of four a * part, one pass over y
    for g in range(s0.size):
        c0, c1, c2, c3 = a0 * to_f32(s0[g]), a1 * to_f32(s1[g]), a2 * to_f32(s2[g]), a3 * to_f32(s3[g])
        for i in range(GROUP):
            j = g * GROUP + i
            y[j] += (c0 * np.float32(v0[j]) + c1 * np.float32(v1[j])) + (c2 * np.float32(v2[j]) + c3 * np.float32(v3[j]))


# q4: a group is 16 bytes at g*16 .. g*16+15; byte i holds values i and i + 16: lane i pairs them.

@njit(fastmath=_FASTMATH, cache=True)
def _q4_dot(v, s, x, acc):
    # one part: values v (d/2,) uint8, scales s (d/32,) f16 bits . x (d,); acc (>= 16,) scratch
    acc[:] = 0.0
    for g in range(s.size):
        c = to_f32(s[g])
        for i in range(GROUP // 2):
            lo, hi = q4_pair(v[g * 16 + i])
            acc[i] += c * (lo * x[g * GROUP + i] + hi * x[g * GROUP + 16 + i])
    return acc.sum()


@njit(fastmath=_FASTMATH, cache=True)
def _q4_dot4(v0, v1, v2, v3, s0, s1, s2, s3, x, acc):
    # four parts . x in one pass; acc (4, >= 16) scratch
    acc[:] = 0.0
    for g in range(s0.size):
        c0, c1, c2, c3 = to_f32(s0[g]), to_f32(s1[g]), to_f32(s2[g]), to_f32(s3[g])
        for i in range(GROUP // 2):
            x_lo, x_hi = x[g * GROUP + i], x[g * GROUP + 16 + i]
            lo, hi = q4_pair(v0[g * 16 + i])
            acc[0, i] += c0 * (lo * x_lo + hi * x_hi)
            lo, hi = q4_pair(v1[g * 16 + i])
            acc[1, i] += c1 * (lo * x_lo + hi * x_hi)
            lo, hi = q4_pair(v2[g * 16 + i])
            acc[2, i] += c2 * (lo * x_lo + hi * x_hi)
            lo, hi = q4_pair(v3[g * 16 + i])
            acc[3, i] += c3 * (lo * x_lo + hi * x_hi)
    return acc[0].sum(), acc[1].sum(), acc[2].sum(), acc[3].sum()


@njit(fastmath=_FASTMATH, cache=True)
def _q4_axpy(y, a, v, s):
    # y (d,) += a * part
    for g in range(s.size):
        c = a * to_f32(s[g])
        for i in range(GROUP // 2):
            lo, hi = q4_pair(v[g * 16 + i])
            y[g * GROUP + i] += c * lo
            y[g * GROUP + 16 + i] += c * hi


@njit(fastmath=_FASTMATH, cache=True)
def _q4_axpy4(y, a0, v0, s0, a1, v1, s1, a2, v2, s2, a3, v3, s3):
    # y (d,) += sum of four a * part, one pass over y
    for g in range(s0.size):
        c0, c1, c2, c3 = a0 * to_f32(s0[g]), a1 * to_f32(s1[g]), a2 * to_f32(s2[g]), a3 * to_f32(s3[g])
        for i in range(GROUP // 2):
            lo0, hi0 = q4_pair(v0[g * 16 + i])
            lo1, hi1 = q4_pair(v1[g * 16 + i])
            lo2, hi2 = q4_pair(v2[g * 16 + i])
            lo3, hi3 = q4_pair(v3[g * 16 + i])
            y[g * GROUP + i] += (c0 * lo0 + c1 * lo1) + (c2 * lo2 + c3 * lo3)
            y[g * GROUP + 16 + i] += (c0 * hi0 + c1 * hi1) + (c2 * hi2 + c3 * hi3)


# Dispatch on the values view: int8 -> q8, uint8 -> q4, chosen when the caller compiles.

def _qdot(v, s, x, acc):
    """Dot product of one quantized part with x (compiled code only)."""
    raise NotImplementedError


def _qdot4(v0, v1, v2, v3, s0, s1, s2, s3, x, acc):
    """Dot products of four quantized parts with x (compiled code only)."""
    raise NotImplementedError


def _qaxpy(y, a, v, s):
    """y += a * one quantized part (compiled code only)."""
    raise NotImplementedError


def _qaxpy4(y, a0, v0, s0, a1, v1, s1, a2, v2, s2, a3, v3, s3):
    """y += sum of four a * quantized part (compiled code only)."""
    raise NotImplementedError


def _is_q8(values_type) -> bool:
    return values_type.dtype == types.int8


@overload(_qdot, inline="always")
def _qdot_impl(v, s, x, acc):
    impl = _q8_dot if _is_q8(v) else _q4_dot
    return lambda v, s, x, acc: impl(v, s, x, acc)


@overload(_qdot4, inline="always")
def _qdot4_impl(v0, v1, v2, v3, s0, s1, s2, s3, x, acc):
    impl = _q8_dot4 if _is_q8(v0) else _q4_dot4
    return lambda v0, v1, v2, v3, s0, s1, s2, s3, x, acc: impl(v0, v1, v2, v3, s0, s1, s2, s3, x, acc)


@overload(_qaxpy, inline="always")
def _qaxpy_impl(y, a, v, s):
    impl = _q8_axpy if _is_q8(v) else _q4_axpy
    return lambda y, a, v, s: impl(y, a, v, s)


@overload(_qaxpy4, inline="always")
def _qaxpy4_impl(y, a0, v0, s0, a1, v1, s1, a2, v2, s2, a3, v3, s3):
    impl = _q8_axpy4 if _is_q8(v0) else _q4_axpy4
    return lambda y, a0, v0, s0, a1, v1, s1, a2, v2, s2, a3, v3, s3: impl(y, a0, v0, s0, a1, v1, s1, a2, v2, s2,
                                                                         a3, v3, s3)


@njit(inline="always")
def _values(vals, s, off, groups, part):
    # the quantized values of the part at byte offset off of bundle s
    return vals[s, off + groups * SCALE_BYTES : off + part]


@njit(inline="always")
def _scales(scales, s, off, groups):
    # its float16 scales (uint16 bits); parts start at even offsets
    return scales[s, off // 2 : off // 2 + groups]


@njit(nogil=True, cache=True)
def _qneuron_range(x, vals, scales, slots, act_code, gated, gate_bias, up_bias, acts, lo, hi, y):
    """y = sum over j in [lo, hi) of acts[:, j] * down(slots[j]); fills acts[:, lo:hi]. See cpu._neuron_range."""
    # x (batch, d) f32; vals (slots, bundle_nbytes) int8/uint8; scales (slots, bundle_nbytes / 2) uint16
    batch, d = x.shape
    groups = d // GROUP
    part = vals.shape[1] // (3 if gated else 2)  # bytes per part
    up, down = vals.shape[1] - 2 * part, vals.shape[1] - part  # byte offsets; the gate part starts at 0
    acc = np.empty((4, _LANES), dtype=np.float32)
    y[:] = 0.0
    quad_end = lo + (hi - lo) // 4 * 4
    for j in range(lo, quad_end, 4):
        s0, s1, s2, s3 = slots[j], slots[j + 1], slots[j + 2], slots[j + 3]
        for t in range(batch):
            z_up = _qdot4(_values(vals, s0, up, groups, part), _values(vals, s1, up, groups, part),
                          _values(vals, s2, up, groups, part), _values(vals, s3, up, groups, part),
                          _scales(scales, s0, up, groups), _scales(scales, s1, up, groups),
                          _scales(scales, s2, up, groups), _scales(scales, s3, up, groups), x[t], acc)
            z_gate = z_up
            if gated:
                z_gate = _qdot4(_values(vals, s0, 0, groups, part), _values(vals, s1, 0, groups, part),
                                _values(vals, s2, 0, groups, part), _values(vals, s3, 0, groups, part),
                                _scales(scales, s0, 0, groups), _scales(scales, s1, 0, groups),
                                _scales(scales, s2, 0, groups), _scales(scales, s3, 0, groups), x[t], acc)
            for q in range(4):
                acts[t, j + q] = _neuron_activation(z_up[q], z_gate[q], slots[j + q], act_code, gated,
                                                    gate_bias, up_bias)
        for t in range(batch):
            a = acts[t, j : j + 4]
            if a[0] != 0 and a[1] != 0 and a[2] != 0 and a[3] != 0:
                _qaxpy4(y[t], a[0], _values(vals, s0, down, groups, part), _scales(scales, s0, down, groups),
                        a[1], _values(vals, s1, down, groups, part), _scales(scales, s1, down, groups),
                        a[2], _values(vals, s2, down, groups, part), _scales(scales, s2, down, groups),
                        a[3], _values(vals, s3, down, groups, part), _scales(scales, s3, down, groups))
            else:  # a neuron that did not fire adds nothing and its down part is not read
                for q in range(4):
                    if a[q] != 0:
                        s = slots[j + q]
                        _qaxpy(y[t], a[q], _values(vals, s, down, groups, part), _scales(scales, s, down, groups))
    for j in range(quad_end, hi):
        s = slots[j]
        for t in range(batch):
            z_up = _qdot(_values(vals, s, up, groups, part), _scales(scales, s, up, groups), x[t], acc[0])
            z_gate = z_up
            if gated:
                z_gate = _qdot(_values(vals, s, 0, groups, part), _scales(scales, s, 0, groups), x[t], acc[0])
            acts[t, j] = _neuron_activation(z_up, z_gate, s, act_code, gated, gate_bias, up_bias)
        for t in range(batch):
            if acts[t, j] != 0:
                _qaxpy(y[t], acts[t, j], _values(vals, s, down, groups, part), _scales(scales, s, down, groups))


def _views(matrix: np.ndarray, storage: str) -> tuple[np.ndarray, np.ndarray]:
    """(values view, scales view) of a quantized uint8 matrix, both zero-copy."""
    return matrix.view(_VALUE_VIEW[storage]), matrix.view(np.uint16)


def sparse_ffn(call: FFNCall) -> Any:
    """y (batch, d) float32 of a validated call on q8 / q4 bundles (cpu.sparse_ffn sends these here)."""
    y, acts, gate_bias, up_bias = call_buffers(call)
    k = call.slots.size
    if k == 0:
        return finish(call, y)
    vals, scales = _views(call.bundles, call.storage)
    common = (_writable(call.x), vals, scales, _writable(call.slots), call.kind.activation_code, call.kind.gated,
              gate_bias, up_bias, acts)
    run_neurons(_qneuron_range, common, k, call.bundles.shape[1], y)
    return finish(call, y)


@njit(nogil=True, cache=True)
def _qlinear_range(x, vals, scales, lo, hi, out):
    """out[:, r] = x . row r of W for rows r in [lo, hi), four rows per pass."""
    # x (batch, k) f32; vals (rows, row_bytes) int8/uint8; scales (rows, row_bytes / 2) uint16
    batch, k = x.shape
    groups = k // GROUP
    part = vals.shape[1]
    acc = np.empty((4, _LANES), dtype=np.float32)
    quad_end = lo + (hi - lo) // 4 * 4
    for r in range(lo, quad_end, 4):
        for t in range(batch):
            z = _qdot4(_values(vals, r, 0, groups, part), _values(vals, r + 1, 0, groups, part),
                       _values(vals, r + 2, 0, groups, part), _values(vals, r + 3, 0, groups, part),
                       _scales(scales, r, 0, groups), _scales(scales, r + 1, 0, groups),
                       _scales(scales, r + 2, 0, groups), _scales(scales, r + 3, 0, groups), x[t], acc)
            for q in range(4):
                out[t, r + q] = z[q]
    for r in range(quad_end, hi):
        for t in range(batch):
            out[t, r] = _qdot(_values(vals, r, 0, groups, part), _scales(scales, r, 0, groups), x[t], acc[0])


def quant_linear(x: Any, w: Any, storage: str, *, out: Any = None) -> np.ndarray:
    """float32 (batch, rows) = x (batch, k) @ W.T for W quantized (rows, part_nbytes(k)) uint8; see cpu.quant_linear."""
    call = check_linear(x, w, storage, out)
    rows = call.w.shape[0]
    y = call.out if call.out is not None else np.empty((call.x.shape[0], rows), dtype=np.float32)
    vals, scales = _views(call.w, storage)
    common = (_writable(call.x), vals, scales)
    threads = thread_count(rows, call.w.shape[1] * call.x.shape[0])
    if threads == 1:
        _qlinear_range(*common, 0, rows, y)
    else:
        bounds = chunk_bounds(rows, threads)
        run_chunks(lambda c: _qlinear_range(*common, bounds[c], bounds[c + 1], y), len(bounds) - 1, threads)
    return finish_linear(call, y)
