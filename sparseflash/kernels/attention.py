"""One decode token's attention block on the host, in native code: norm, q/k/v projections, RoPE, the
KV-cache write, attention over the cached keys, the output projection and the residual add.

At decode time on a small model the block is ~0.3M multiply-adds behind some twenty torch calls
(~5-15 us of fixed cost each), and torch applies a half-precision weight in half precision at about
half the bytes per second of a float32 one (a CPU has no half arithmetic; the input is rounded to
half first). Here the block is one call (``attend``, after ``norm``) on one thread, or, for large matrices, the four
projections split by rows across threads (kernels/cpu.py's rule: a thread only for >= 4M elements)
around one call for the rest. Matrices stay as stored: float32, float16 bits (uint16) or bfloat16
bits (int16), widened element by element (kernels/halfbits.py) with float32 sums, so a half matrix
is read at its own size and the input is not rounded.

Arrays in, arrays out; nothing else of the package is imported (the dot products are
kernels/cpu.py's). The caller (model/transformer.py) checks shapes once per model; here they are
asserted only where a wrong one would write out of bounds.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from sparseflash.kernels.cpu import _dot, _dot4, chunk_bounds, run_chunks, thread_count
from sparseflash.kernels.halfbits import to_f32

_FASTMATH = {"reassoc", "contract"}  # as kernels/cpu.py
_NONE = np.zeros(0, dtype=np.float32)  # an absent bias
_ONE_ROW_BYTES = 1 << 20


@njit(nogil=True, fastmath=_FASTMATH, cache=True)
def _matvec(w, x, bias, out, lo, hi):
    # out[lo:hi] = w[lo:hi] . x (+ bias); w (n, d) stored values, four rows per pass, except a half matrix
    # that fits in cache: there one row at a time widens in wider vectors (256 x 256 f16: 4.8 us vs 8.1;
    # float32, or half from main memory, is faster four rows per pass: 2048 x 2048 f16 338 us vs 394)
    quad = lo + (hi - lo) // 4 * 4
    if w.itemsize == 2 and w.size * 2 <= _ONE_ROW_BYTES:
        quad = lo
    for i in range(lo, quad, 4):
        t0, t1, t2, t3 = _dot4(w[i], w[i + 1], w[i + 2], w[i + 3], x)
        out[i], out[i + 1], out[i + 2], out[i + 3] = t0, t1, t2, t3
    for i in range(quad, hi):
        out[i] = _dot(w[i], x)
    if bias.size:
        for i in range(lo, hi):
            out[i] += to_f32(bias[i])


@njit(nogil=True, fastmath=_FASTMATH, cache=True)
def _norm(h, w, b, layernorm, shift, eps, out):
    # layernorm1p (w + shift, bias b) or RMSNorm (w only), float32 statistics, as model/transformer.py
    d = h.size
    if layernorm:
        mean = np.float32(0.0)
        for i in range(d):
            mean += h[i]
        mean /= d
        var = np.float32(0.0)
        for i in range(d):
            var += (h[i] - mean) * (h[i] - mean)
        inv = np.float32(1.0) / np.float32(math.sqrt(var / d + eps))
        for i in range(d):
            out[i] = (h[i] - mean) * inv * (to_f32(w[i]) + shift) + (to_f32(b[i]) if b.size else np.float32(0.0))
    else:
        ms = np.float32(0.0)
        for i in range(d):
            ms += h[i] * h[i]
        inv = np.float32(1.0) / np.float32(math.sqrt(ms / d + eps))
        for i in range(d):
            out[i] = to_f32(w[i]) * (h[i] * inv)


@njit(nogil=True, fastmath=_FASTMATH, cache=True)
def _rotate(v, heads, head_dim, cos, sin):
    # RoPE in place on the first cos.size dims of each head (rotate-half convention)
    half = cos.size // 2
    for hd in range(heads):
        base = hd * head_dim
        for i in range(half):
            a, b = v[base + i], v[base + i + half]
            v[base + i] = a * cos[i] - b * sin[i]
            v[base + i + half] = b * cos[i + half] + a * sin[i + half]


@njit(nogil=True, fastmath=_FASTMATH, cache=True)
def _attend_cached(q, k, v, kc, vc, pos, lo, heads, head_dim, cos, sin, scale, scores, out):
    # rope q and k, write k and v at slot pos, then each head attends to slots [lo, pos]
    kv_heads = kc.shape[0]
    _rotate(q, heads, head_dim, cos, sin)
    _rotate(k, kv_heads, head_dim, cos, sin)
    for g in range(kv_heads):
        for i in range(head_dim):
            kc[g, pos, i] = k[g * head_dim + i]
            vc[g, pos, i] = v[g * head_dim + i]
    groups = heads // kv_heads
    for hd in range(heads):
        g, qb = hd // groups, hd * head_dim
        top = np.float32(-np.inf)
        for j in range(lo, pos + 1):
            s = np.float32(0.0)
            for i in range(head_dim):
                s += q[qb + i] * kc[g, j, i]
            s *= scale
            scores[j - lo] = s
            top = max(top, s)
        total = np.float32(0.0)
        for j in range(lo, pos + 1):
            e = np.float32(math.exp(scores[j - lo] - top))
            scores[j - lo] = e
            total += e
        for i in range(head_dim):
            out[qb + i] = 0.0
        for j in range(lo, pos + 1):
            p = scores[j - lo] / total
            for i in range(head_dim):
                out[qb + i] += p * vc[g, j, i]


@njit(nogil=True, fastmath=_FASTMATH, cache=True)
def _attend(xn, h, wq, bq, wk, bk, wv, bv, wo, bo, kc, vc, pos, lo, heads, head_dim, cos, sin, scale, q, k, v,
            scores, ctx, proj):
    # the whole block on one thread: h += wo . attention(rope(wq . xn), ...) + bo
    _matvec(wq, xn, bq, q, 0, q.size)
    _matvec(wk, xn, bk, k, 0, k.size)
    _matvec(wv, xn, bv, v, 0, v.size)
    _attend_cached(q, k, v, kc, vc, pos, lo, heads, head_dim, cos, sin, scale, scores, ctx)
    _matvec(wo, ctx, bo, proj, 0, proj.size)
    for i in range(h.size):
        h[i] += proj[i]


class Scratch:
    """Work arrays of one model's decode step (float32), made once and reused by every layer."""

    def __init__(self, d: int, q_out: int, kv_out: int, max_len: int):
        self.proj = np.empty(d, np.float32)
        self.q, self.ctx = np.empty(q_out, np.float32), np.empty(q_out, np.float32)
        self.k, self.v = np.empty(kv_out, np.float32), np.empty(kv_out, np.float32)
        self.scores = np.empty(max_len, np.float32)


def _split_matvec(w: np.ndarray, x: np.ndarray, bias: np.ndarray, out: np.ndarray, threads: int) -> None:
    bounds = chunk_bounds(w.shape[0], threads)
    run_chunks(lambda c: _matvec(w, x, bias, out, bounds[c], bounds[c + 1]), len(bounds) - 1, threads)


def attend(xn: np.ndarray, h: np.ndarray, proj: tuple, kc: np.ndarray, vc: np.ndarray, pos: int, lo: int,
           heads: int, head_dim: int, cos: np.ndarray, sin: np.ndarray, scale: float, scratch: Scratch) -> None:
    """h (d,) float32 += the attention of one token, whose normed input is xn (d,) float32, at KV slot
    ``pos`` (attending to [lo, pos]).

    ``proj`` = (wq, bq, wk, bk, wv, bv, wo, bo): (out, in) matrices as stored (float32, or uint16 /
    int16 views of float16 / bfloat16), biases float32 or empty; ``kc``/``vc`` (kv_heads, slots, head_dim)
    float32 receive the token's key and value at ``pos``; ``cos``/``sin`` (rotary_dim,) float32 of its
    position (RoPE's attention scaling included). The heads share the KV heads in groups of
    heads / kv_heads, in order."""
    wq, bq, wk, bk, wv, bv, wo, bo = proj
    if not (0 <= lo <= pos < kc.shape[1]) or kc.shape != vc.shape or pos - lo + 1 > scratch.scores.size:
        raise ValueError(f"attention: slot {pos} (from {lo}) outside the KV cache {kc.shape}")
    s = scratch
    d, rows = xn.size, wq.shape[0] + wk.shape[0] + wv.shape[0]
    if thread_count(rows, d) == 1 and thread_count(wo.shape[0], wo.shape[1]) == 1:
        _attend(xn, h, wq, bq, wk, bk, wv, bv, wo, bo, kc, vc, pos, lo, heads, head_dim, cos, sin, np.float32(scale),
                s.q, s.k, s.v, s.scores, s.ctx, s.proj)
        return
    for w, b, out in ((wq, bq, s.q), (wk, bk, s.k), (wv, bv, s.v)):  # large: each matrix split by rows
        _split_matvec(w, xn, b, out, thread_count(w.shape[0], d))
    _attend_cached(s.q, s.k, s.v, kc, vc, pos, lo, heads, head_dim, cos, sin, np.float32(scale), s.scores, s.ctx)
    _split_matvec(wo, s.ctx, bo, s.proj, thread_count(wo.shape[0], wo.shape[1]))
    h += s.proj


def norm(h: np.ndarray, w: np.ndarray, b: np.ndarray, layernorm: bool, shift: float, eps: float,
         out: np.ndarray) -> None:
    """out (d,) float32 = layernorm1p (w + shift, bias b) or RMSNorm (b empty) of h (d,) float32; w, b as stored."""
    _norm(h, w, b, layernorm, np.float32(shift), np.float32(eps), out)


def matvec(w: np.ndarray, x: np.ndarray, out: np.ndarray, bias: np.ndarray = _NONE) -> None:
    """out (n,) float32 = w (n, d) as stored . x (d,) float32 (+ bias), rows split across threads when large."""
    if w.shape != (out.size, x.size):
        raise ValueError(f"matvec: w {w.shape}, x {x.shape}, out {out.shape} do not agree")
    _split_matvec(w, x, bias, out, thread_count(w.shape[0], w.shape[1]))


def warmup(dtypes=(np.float32, np.uint16, np.int16)) -> None:
    """Compile (or load from the disk cache) the block, the norms and the matrix product for each matrix dtype."""
    d, heads, hd = 8, 2, 4
    for dt in dtypes:
        w, x = np.zeros((d, d), dtype=dt), np.ones(d, np.float32)
        kc = np.zeros((1, 4, hd), np.float32)
        attend(x, x.copy(), (w, _NONE, w[:hd], _NONE, w[:hd], _NONE, w, _NONE), kc, kc.copy(), 0, 0, heads, hd,
               np.ones(2, np.float32), np.zeros(2, np.float32), 0.5, Scratch(d, d, hd, 4))
        for b in (_NONE, np.zeros(d, dt)):
            norm(x, np.ones(d, dt), b, b.size > 0, 1.0, 1e-5, np.empty(d, np.float32))
        matvec(w, x, np.empty(d, np.float32))
