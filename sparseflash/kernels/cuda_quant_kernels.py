"""Device code of the CUDA back end for quantized weights (q8 / q4); host side in cuda.py.

The sparse FFN kernel is the float one (cuda_kernels.py) with another inner loop: threads
stride over the d/2 *pairs* of a part instead of its d values. Pair p is lane i = p mod 16 of
group g = p // 16, i.e. values g*32 + i and g*32 + i + 16: one byte for q4 (low and high
nibble), two int8 16 bytes apart for q8. Each pair is decoded in registers, scaled by its
group's float16 scale and used; no dequantized copy exists anywhere.

The bundle (or matrix) rows arrive as two views of the same device memory: `vals` (int8 for
q8, uint8 for q4) and `scales` (float16, the row viewed two bytes at a time, so the scale of
group g of the part at byte offset off is scales[row, off // 2 + g]).

Imported only by cuda.py on first use. `cuda` must stay a module global (see cuda_kernels.py).
"""

from __future__ import annotations

from numba import cuda, float32, int32

from sparseflash.kernels.cuda_kernels import neuron_activation
from sparseflash.kernels.quant import GROUP, SCALE_BYTES

LANES = GROUP // 2


def _pair_decoder(storage: str):
    """Device function (vals, row, start, p) -> (q_lo, q_hi) float32 of pair p of the values at byte `start`."""
    if storage == "q4":
        @cuda.jit(device=True)
        def pair(vals, row, start, p):
            b = int32(vals[row, start + p])  # byte p: value i in the low nibble, i + 16 in the high one
            return float32((b & 15) - 8), float32((b >> 4) - 8)
    else:
        @cuda.jit(device=True)
        def pair(vals, row, start, p):
            j = start + (p // LANES) * GROUP + p % LANES
            return float32(vals[row, j]), float32(vals[row, j + LANES])
    return pair


@cuda.jit(device=True)
def _element(p):
    # index in the part of the low value of pair p (the high one is 16 further)
    return (p // LANES) * GROUP + p % LANES


def build_sparse_kernel(storage: str, threads: int, group: int, tokens: int):
    """Sparse FFN kernel for "q8" or "q4" bundles; same launch and arguments as cuda_kernels.build_kernel
    except that the bundles come as (vals, scales). Compiles on first launch."""
    pair = _pair_decoder(storage)

    @cuda.jit
    def sparse_ffn_kernel(x, vals, scales, slots, act_code, gated, gate_bias, up_bias, has_gb, has_ub,
                          y, acts, t0, n_tok):
        tid = cuda.threadIdx.x
        first = cuda.blockIdx.x * group
        k = slots.shape[0]
        d = x.shape[1]
        groups = d // GROUP
        part = vals.shape[1] // (3 if gated else 2)  # bytes
        up_off = vals.shape[1] - 2 * part
        down_off = vals.shape[1] - part
        skip = groups * SCALE_BYTES  # the values of a part start after its scales
        red = cuda.shared.array((2, group, threads), float32)  # (gate/up, neuron, thread) partial dots
        a_tile = cuda.shared.array((group, tokens), float32)  # (neuron, token) activations
        for t in range(n_tok):
            # 1. each thread: partial dot products over its strided share of pairs, for every neuron
            for g in range(group):
                part_gate = float32(0.0)
                part_up = float32(0.0)
                if first + g < k:
                    s = slots[first + g]
                    for p in range(tid, d // 2, threads):
                        e = _element(p)
                        x_lo = x[t0 + t, e]
                        x_hi = x[t0 + t, e + LANES]
                        lo, hi = pair(vals, s, up_off + skip, p)
                        part_up += float32(scales[s, up_off // 2 + p // LANES]) * (lo * x_lo + hi * x_hi)
                        if gated:
                            lo, hi = pair(vals, s, skip, p)
                            part_gate += float32(scales[s, p // LANES]) * (lo * x_lo + hi * x_hi)
                red[0, g, tid] = part_gate
                red[1, g, tid] = part_up
            cuda.syncthreads()
            # 2. tree reduction of all 2 * group sums at once (threads is a power of two)
            step = threads // 2
            while step > 0:
                if tid < step:
                    for g in range(group):
                        red[0, g, tid] += red[0, g, tid + step]
                        red[1, g, tid] += red[1, g, tid + step]
                cuda.syncthreads()
                step //= 2
            # 3. thread g turns neuron g's sums into its activation
            if tid < group and first + tid < k:
                a = neuron_activation(red[1, tid, 0], red[0, tid, 0], slots[first + tid], act_code, gated,
                                      gate_bias, up_bias, has_gb, has_ub)
                a_tile[tid, t] = a
                acts[t0 + t, first + tid] = a
            cuda.syncthreads()
        # 4. each thread: its strided share of pairs of y += sum over the block's neurons of a * down
        for p in range(tid, d // 2, threads):
            e = _element(p)
            for t in range(n_tok):
                acc_lo = float32(0.0)
                acc_hi = float32(0.0)
                for g in range(group):
                    if first + g < k and a_tile[g, t] != 0:
                        s = slots[first + g]
                        c = a_tile[g, t] * float32(scales[s, down_off // 2 + p // LANES])
                        lo, hi = pair(vals, s, down_off + skip, p)
                        acc_lo += c * lo
                        acc_hi += c * hi
                cuda.atomic.add(y, (t0 + t, e), acc_lo)
                cuda.atomic.add(y, (t0 + t, e + LANES), acc_hi)

    return sparse_ffn_kernel


def build_linear_kernel(storage: str, threads: int):
    """Kernel out[t, r] = x[t] . row r of a quantized matrix; launch one block per row, `threads` a power of two."""
    pair = _pair_decoder(storage)

    @cuda.jit
    def linear_kernel(x, vals, scales, out):
        tid = cuda.threadIdx.x
        r = cuda.blockIdx.x
        k = x.shape[1]
        skip = k // GROUP * SCALE_BYTES
        red = cuda.shared.array(threads, float32)
        for t in range(x.shape[0]):
            total = float32(0.0)
            for p in range(tid, k // 2, threads):
                e = _element(p)
                lo, hi = pair(vals, r, skip, p)
                total += float32(scales[r, p // LANES]) * (lo * x[t, e] + hi * x[t, e + LANES])
            red[tid] = total
            cuda.syncthreads()
            step = threads // 2
            while step > 0:
                if tid < step:
                    red[tid] += red[tid + step]
                cuda.syncthreads()
                step //= 2
            if tid == 0:
                out[t, r] = red[0]
            cuda.syncthreads()

    return linear_kernel
