"""Device code of the CUDA back end (see cuda.py for the host side and the algorithm).

Imported only by cuda.py on first use, since importing numba.cuda probes the driver.
`cuda` must stay a module global: the simulator swaps it for its fake module in kernel globals.
"""

from __future__ import annotations

import math

from numba import cuda, float32, int32


@cuda.jit(device=True)
def activate(z, code):
    """Activation `code` (the index in kinds.ACTIVATIONS) of z, float32."""
    if code == 0 or code == 1:
        r = z if (z > 0 or z != z) else float32(0.0)
        return r * r if code == 0 else r
    if code == 2:
        return z / (float32(1.0) + math.exp(-z))
    if code == 3:
        return float32(0.5) * z * (float32(1.0) + math.erf(z * float32(0.7071067811865476)))
    inner = float32(0.7978845608028654) * (z + float32(0.044715) * z * z * z)
    return float32(0.5) * z * (float32(1.0) + math.tanh(inner))


@cuda.jit(device=True)
def neuron_activation(z_up, z_gate, s, code, gated, gate_bias, up_bias, has_gb, has_ub):
    """a of slot s from its raw dot products (z_gate unused when not gated), biases added."""
    if has_ub:
        z_up += up_bias[s]
    if not gated:
        return activate(z_up, code)
    if has_gb:
        z_gate += gate_bias[s]
    return activate(z_gate, code) * z_up


def build_kernel(storage: str, threads: int, group: int, tokens: int):
    """Kernel for one storage ("f32", "f16", "bf16") and block size; it compiles on first launch.

    threads must be a power of two >= group (the reduction halves it); group is neurons
    per block and tokens the largest token count per launch.
    """
    if storage == "bf16":
        @cuda.jit(device=True)
        def decode(v):
            # bf16 bits -> float32 without a bit cast: the simulator has no int_as_float
            b = int32(v)
            e = (b >> 7) & 0xFF
            m = b & 0x7F
            if e == 0xFF:
                mag = float32(math.inf) if m == 0 else float32(math.nan)
            elif e == 0:
                mag = math.ldexp(float32(m), -133)
            else:
                mag = math.ldexp(float32(m | 0x80), int(e) - 134)  # int(): the simulator's ldexp needs a Python int
            return float32(-mag) if b & 0x8000 else float32(mag)
    else:
        @cuda.jit(device=True)
        def decode(v):
            return float32(v)

    @cuda.jit
    def sparse_ffn_kernel(x, bundles, slots, act_code, gated, gate_bias, up_bias, has_gb, has_ub,
                          y, acts, t0, n_tok):
        tid = cuda.threadIdx.x
        first = cuda.blockIdx.x * group
        k = slots.shape[0]
        d = x.shape[1]
        up_off = bundles.shape[1] - 2 * d
        down_off = bundles.shape[1] - d
        red = cuda.shared.array((2, group, threads), float32)  # (gate/up, neuron, thread) partial dots
        a_tile = cuda.shared.array((group, tokens), float32)  # (neuron, token) activations
        for t in range(n_tok):
            # 1. each thread: partial dot products over its strided share of d, for every neuron
            for g in range(group):
                part_gate = float32(0.0)
                part_up = float32(0.0)
                if first + g < k:
                    s = slots[first + g]
                    for i in range(tid, d, threads):
                        xi = x[t0 + t, i]
                        part_up += decode(bundles[s, up_off + i]) * xi
                        if gated:
                            part_gate += decode(bundles[s, i]) * xi
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
        # 4. each thread: its strided share of y += sum over the block's neurons of a * down
        for i in range(tid, d, threads):
            for t in range(n_tok):
                acc = float32(0.0)
                for g in range(group):
                    if first + g < k and a_tile[g, t] != 0:
                        acc += a_tile[g, t] * decode(bundles[slots[first + g], down_off + i])
                cuda.atomic.add(y, (t0 + t, i), acc)

    return sparse_ffn_kernel
