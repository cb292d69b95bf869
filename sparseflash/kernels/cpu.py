"""CPU back end: a Numba kernel over a range of neurons, run on several threads, float32 sums.

The active slots are cut into contiguous chunks, each with its own partial y (batch, d);
threads take chunks on demand and the partials are summed in chunk order, so the result
does not depend on thread timing. Every bundle is read once per token batch: the up (and
gate) part for the dot products, then the down part for y_partial += a * down_i. A neuron
whose activation is exactly 0 skips its down read.

Neurons go four at a time, as one pass over four rows: one 16 KB row at a time left the core
waiting on memory (11 GB/s per thread on random 7B f16 rows), four side by side keep more
requests in flight (22 GB/s).

The threads are plain Python threads running the nogil kernel (the caller's thread works
too), not numba prange: numba's default OpenMP layer spin-waits at its barrier, and with any
other busy process on a 2-core machine (I/O threads, another job) a 10%-active 7B call took
~24 ms instead of ~1.5 ms. NUMBA_NUM_THREADS sets the thread count (default: all cores);
calls with few neurons stay on one thread.

Compilation is lazy (first call) and cached on disk (cache=True); call warmup() to compile
before timing. Readonly bundle matrices (e.g. np.memmap mode "r") compile a second variant.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np
from numba import njit

from sparseflash.kernels.bundles import pack_bundles
from sparseflash.kernels.contract import check_call, finish
from sparseflash.kernels.halfbits import kernel_view, to_f32
from sparseflash.kernels.quant import QUANT_STORAGES
from sparseflash.kernels.storage import STORAGES

# Let LLVM reorder the float32 sums so dot products vectorise; NaN/inf semantics are kept.
_FASTMATH = {"reassoc", "contract"}
_SQRT1_2 = np.float32(1.0 / math.sqrt(2.0))
_SQRT2_PI = np.float32(math.sqrt(2.0 / math.pi))


@njit(fastmath=_FASTMATH, cache=True)
def _dot(row, x):
    # row (d,) stored values . x (d,) float32
    total = np.float32(0.0)
    for i in range(row.size):
        total += to_f32(row[i]) * x[i]
    return total


@njit(fastmath=_FASTMATH, cache=True)
def _dot4(r0, r1, r2, r3, x):
    # four rows (d,) . x (d,), in one pass: four memory streams in flight instead of one
    t0 = t1 = t2 = t3 = np.float32(0.0)
    for i in range(x.size):
        xi = x[i]
        t0 += to_f32(r0[i]) * xi
        t1 += to_f32(r1[i]) * xi
        t2 += to_f32(r2[i]) * xi
        t3 += to_f32(r3[i]) * xi
    return t0, t1, t2, t3


@njit(fastmath=_FASTMATH, cache=True)
def _axpy(y, a, row):
    # y (d,) float32 += a * row (d,) stored values
    for i in range(row.size):
        y[i] += a * to_f32(row[i])


@njit(fastmath=_FASTMATH, cache=True)
def _axpy4(y, a0, r0, a1, r1, a2, r2, a3, r3):
    # y (d,) float32 += sum of four a * row, one pass over y
    for i in range(y.size):
        y[i] += (a0 * to_f32(r0[i]) + a1 * to_f32(r1[i])) + (a2 * to_f32(r2[i]) + a3 * to_f32(r3[i]))


@njit(inline="always")
def _activate(z, code):
    # codes follow kinds.ACTIVATIONS; every branch returns float32
    if code == 0 or code == 1:
        r = z if (z > 0 or z != z) else np.float32(0.0)  # relu that keeps NaN
        return r * r if code == 0 else r
    if code == 2:
        return z / (np.float32(1.0) + math.exp(-z))
    if code == 3:
        return np.float32(0.5) * z * (np.float32(1.0) + math.erf(z * _SQRT1_2))
    inner = _SQRT2_PI * (z + np.float32(0.044715) * z * z * z)
    return np.float32(0.5) * z * (np.float32(1.0) + math.tanh(inner))


@njit(inline="always")
def _neuron_activation(z_up, z_gate, s, act_code, gated, gate_bias, up_bias):
    # a for slot s from its raw dot products (z_gate unused when not gated)
    if up_bias.size:
        z_up += up_bias[s]
    if not gated:
        return _activate(z_up, act_code)
    if gate_bias.size:
        z_gate += gate_bias[s]
    return _activate(z_gate, act_code) * z_up


@njit(nogil=True, cache=True)
def _neuron_range(x, bundles, slots, act_code, gated, gate_bias, up_bias, acts, lo, hi, y):
    """y = sum over j in [lo, hi) of acts[:, j] * down(slots[j]); fills acts[:, lo:hi].

    Neurons go four at a time (one pass over four rows), the last hi - lo mod 4 one by one.
    """
    # x (batch, d) f32; bundles (slots, bundle_len) f32/uint16/int16; y (batch, d); acts (batch, k)
    batch, d = x.shape
    up, down = bundles.shape[1] - 2 * d, bundles.shape[1] - d  # offsets; the gate part starts at 0
    y[:] = 0.0
    quad_end = lo + (hi - lo) // 4 * 4
    for j in range(lo, quad_end, 4):
        s0, s1, s2, s3 = slots[j], slots[j + 1], slots[j + 2], slots[j + 3]
        for t in range(batch):
            z_up = _dot4(bundles[s0, up:down], bundles[s1, up:down], bundles[s2, up:down],
                         bundles[s3, up:down], x[t])
            z_gate = z_up
            if gated:
                z_gate = _dot4(bundles[s0, :d], bundles[s1, :d], bundles[s2, :d], bundles[s3, :d], x[t])
            for q in range(4):
                acts[t, j + q] = _neuron_activation(z_up[q], z_gate[q], slots[j + q], act_code, gated,
                                                    gate_bias, up_bias)
        for t in range(batch):
            a = acts[t, j : j + 4]
            if a[0] != 0 and a[1] != 0 and a[2] != 0 and a[3] != 0:
                _axpy4(y[t], a[0], bundles[s0, down:], a[1], bundles[s1, down:], a[2], bundles[s2, down:],
                       a[3], bundles[s3, down:])
            else:  # a neuron that did not fire adds nothing and its down part is not read
                for q in range(4):
                    if a[q] != 0:
                        _axpy(y[t], a[q], bundles[slots[j + q], down:])
    for j in range(quad_end, hi):
        s = slots[j]
        for t in range(batch):
            z_up = _dot(bundles[s, up:down], x[t])
            z_gate = _dot(bundles[s, :d], x[t]) if gated else z_up
            acts[t, j] = _neuron_activation(z_up, z_gate, s, act_code, gated, gate_bias, up_bias)
        for t in range(batch):
            if acts[t, j] != 0:
                _axpy(y[t], acts[t, j], bundles[s, down:])


# A second thread pays only for large calls: handing chunks to a helper costs 100-200 us, and on a
# shared 2-core machine one thread already runs ~2.5-15G bundle elements/s (memory bound); there the
# split lost up to 4M elements a call and was even at 8-16M (`python bench/bench_kernels.py --threads`,
# docs/runtime.md). So each thread gets at least this many elements (neurons x bundle_len x tokens).
_MIN_WORK_PER_THREAD = 4 << 20
_MIN_CHUNK = 32  # neurons (or rows) in a chunk, at least
_CHUNKS_PER_THREAD = 4  # pieces of the active set handed out on demand, so a slow core takes fewer
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _threads() -> int:
    # NUMBA_NUM_THREADS (default: all cores) without launching numba's own threading layer
    return max(1, numba.config.NUMBA_NUM_THREADS)


def _helper_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, _threads() - 1), thread_name_prefix="sparse-ffn")
        return _pool


def run_chunks(work: Callable[[int], None], n_chunks: int, threads: int) -> None:
    """Call work(c) once for each c in range(n_chunks), on `threads` threads (the caller's one included).

    Threads take chunk numbers on demand, so a core that is busy elsewhere simply takes fewer.
    work must be thread-safe (a nogil kernel writing its own output); its exceptions propagate.
    """
    todo: queue.SimpleQueue[int] = queue.SimpleQueue()
    for c in range(n_chunks):
        todo.put(c)

    def drain() -> None:
        while True:
            try:
                c = todo.get_nowait()
            except queue.Empty:
                return
            work(c)

    helpers = [_helper_pool().submit(drain) for _ in range(min(threads, n_chunks) - 1)]
    drain()
    for helper in helpers:
        helper.result()


def chunk_bounds(k: int, threads: int) -> list[int]:
    """Edges of the chunks [b[c], b[c + 1]) that k neurons (or rows) are cut into for `threads` threads.

    _CHUNKS_PER_THREAD chunks per thread, whole groups of four, at least _MIN_CHUNK each.
    """
    size = -(-k // (threads * _CHUNKS_PER_THREAD))
    size = max(_MIN_CHUNK, (size + 3) // 4 * 4)
    return list(range(0, k, size)) + [k]


def thread_count(k: int, row_len: int) -> int:
    """Threads worth using for k neurons (or rows) of ``row_len`` elements (or bytes) each: _threads(), but
    each with >= _MIN_WORK_PER_THREAD elements and _MIN_CHUNK rows."""
    return max(1, min(_threads(), k * row_len // _MIN_WORK_PER_THREAD, k // _MIN_CHUNK))


def run_neurons(kernel: Callable[..., None], common: tuple, k: int, row_len: int, y: np.ndarray) -> None:
    """Compute y for k active neurons with a range kernel, split into chunks that the threads take on demand.

    kernel(*common, lo, hi, y_part) computes active neurons [lo, hi) into y_part (batch, d),
    ``row_len`` is a bundle's length (elements of the kernel's view), which sizes the work for thread_count;
    overwriting it (_neuron_range, or cpu_quant's). y (batch, d) float32 receives the sum.
    Each chunk has its own partial output, summed in chunk order, so the result does not
    depend on which thread ran which chunk.
    """
    threads = thread_count(k, row_len * y.shape[0])  # work grows with the tokens too
    if threads == 1:
        kernel(*common, 0, k, y)
        return
    bounds = chunk_bounds(k, threads)
    partial = np.empty((len(bounds) - 2, *y.shape), dtype=np.float32)  # (chunks after the first, batch, d)
    outputs = [y, *partial]
    run_chunks(lambda c: kernel(*common, bounds[c], bounds[c + 1], outputs[c]), len(bounds) - 1, threads)
    for part in partial:
        y += part


def _writable(a: np.ndarray) -> np.ndarray:
    # a readonly small input would compile another kernel variant; copying it is cheaper
    return a if a.flags.writeable else a.copy()


def call_buffers(call):
    """(y, activations, gate bias, up bias) for a validated call: the caller's arrays where given, new
    ones otherwise (y zeroed when no slot is active), biases as writable views or empty arrays."""
    y = call.out if call.out is not None else np.empty((call.batch, call.d), dtype=np.float32)
    if call.slots.size == 0:
        y[...] = 0.0
    acts = call.activations_out
    if acts is None:
        acts = np.empty((call.batch, call.slots.size), dtype=np.float32)
    no_bias = np.zeros(0, dtype=np.float32)
    gate_bias = no_bias if call.gate_bias is None else _writable(call.gate_bias)
    up_bias = no_bias if call.up_bias is None else _writable(call.up_bias)
    return y, acts, gate_bias, up_bias


def sparse_ffn(
    x: Any,
    bundles: Any,
    active_slots: Any,
    kind: Any,
    *,
    storage: str | None = None,
    gate_bias: Any = None,
    up_bias: Any = None,
    out: Any = None,
    activations_out: Any = None,
) -> np.ndarray:
    """y (batch, d) float32 for the active slots; see sparseflash.kernels.sparse_ffn for the contract.

    Host numpy arrays only. bundles stay as stored (f32, f16, bf16 bits, or q8 / q4 bytes, decoded
    in the loops by cpu_quant) and are not copied.
    """
    call = check_call(x, bundles, active_slots, kind, storage=storage, gate_bias=gate_bias,
                      up_bias=up_bias, out=out, activations_out=activations_out)
    if call.storage in QUANT_STORAGES:
        from sparseflash.kernels import cpu_quant  # imports this module

        return cpu_quant.sparse_ffn(call)
    y, acts, gate_bias, up_bias = call_buffers(call)
    if call.slots.size == 0:
        return finish(call, y)
    common = (_writable(call.x), kernel_view(call.bundles, call.storage), _writable(call.slots),
              call.kind.activation_code, call.kind.gated, gate_bias, up_bias, acts)
    run_neurons(_neuron_range, common, call.slots.size, call.bundles.shape[1], y)
    return finish(call, y)


def quant_linear(x: Any, w: Any, storage: str, *, out: Any = None) -> np.ndarray:
    """x (batch, k) @ W.T for a q8 / q4 matrix w (rows, part_nbytes(k)) uint8; float32 (batch, rows).

    W is decoded row by row inside the loops (cpu_quant), never as a whole; see
    sparseflash.kernels.quant_linear for the contract.
    """
    from sparseflash.kernels import cpu_quant

    return cpu_quant.quant_linear(x, w, storage, out=out)


def warmup(storages: tuple[str, ...] = STORAGES, readonly: bool = False) -> None:
    """Compile (or load from the disk cache) the kernel for each storage; takes seconds the first time.

    readonly=True also compiles the variants for readonly bundle matrices (np.memmap mode "r").
    Quantized storages also compile quant_linear (and its readonly variant with readonly=True).
    """
    d = 32  # quantized storages need a multiple of 32
    x = np.ones((1, d), dtype=np.float32)
    for storage in storages:
        w = np.ones((2, d), dtype=np.float32)
        bundles = pack_bundles(w, w.T, w, dtype=storage)
        variants = [bundles]
        if readonly:
            frozen = bundles.copy()
            frozen.flags.writeable = False
            variants.append(frozen)
        for b in variants:
            sparse_ffn(x, b, np.array([1]), "reglu", storage=storage)
            if storage in QUANT_STORAGES:
                matrix = np.ascontiguousarray(b[:, : b.shape[1] // 3])  # one part per row: a (2, d) matrix
                matrix.flags.writeable = b.flags.writeable
                quant_linear(x, matrix, storage)
