"""CUDA back end: numba.cuda kernel, one thread block per group of GROUP active neurons.

Per block: for each of its neurons and each token, the threads stride over d, and the up
(and gate) dot products are reduced in shared memory; the activations land in shared memory
and in activations_out. Then each thread takes a strided share of the d output elements,
sums a_i * down_i over the block's neurons and cuda.atomic.add's that into y (float32).
Token batches longer than TOKENS are launched in chunks.

Inputs: numpy arrays or Numba device arrays. With numpy bundles only the active rows are
gathered on the host and copied (k * bundle_len elements); keep the neuron cache on the
device (pass a device array) to avoid even that. Result: a device array if `out` is one,
otherwise a numpy array. Runs under Numba's simulator (NUMBA_ENABLE_CUDASIM=1, set before
numba is imported). numba.cuda is imported on first use, never at package import.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from sparseflash.kernels.contract import check_call, finish, is_device_array
from sparseflash.kernels.errors import BackendUnavailableError
from sparseflash.kernels.storage import STORAGES, from_f32

UNAVAILABLE = "cuda back end: numba.cuda finds no GPU (for tests set NUMBA_ENABLE_CUDASIM=1 before importing numba)"
GROUP = 8  # neurons per block
TOKENS = 8  # tokens per launch (size of the shared activation tile)


def _cuda():
    from numba import cuda  # deferred: importing numba.cuda probes the driver

    return cuda


def is_available() -> bool:
    """True when numba.cuda sees a GPU or runs the simulator."""
    try:
        return bool(_cuda().is_available())
    except Exception:  # a broken driver install must read as "no GPU", not crash the caller
        return False


def _block_threads(d: int) -> int:
    # 128 threads for real hidden sizes; fewer for tiny d so the simulator stays quick
    return 128 if d >= 128 else max(32, 1 << (d - 1).bit_length())


@functools.cache
def _kernel(storage: str, threads: int):
    """The compiled-on-first-launch kernel for one storage and block size."""
    from sparseflash.kernels import cuda_kernels  # imports numba.cuda

    return cuda_kernels.build_kernel(storage, threads, group=GROUP, tokens=TOKENS)


def _to_device(cuda, a: Any, stream: Any = 0) -> Any:
    return a if is_device_array(a) else cuda.to_device(np.ascontiguousarray(a), stream=stream)


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
    stream: Any = 0,
) -> Any:
    """y (batch, d) float32 on the GPU; see sparseflash.kernels.sparse_ffn for the contract.

    Copies and launches go on ``stream`` (a numba stream; 0 is the default stream). With ``out`` a
    device array and no host ``activations_out`` the call returns without waiting for the GPU;
    host results are waited for.
    """
    call = check_call(x, bundles, active_slots, kind, storage=storage, gate_bias=gate_bias,
                      up_bias=up_bias, out=out, activations_out=activations_out)
    if not is_available():
        raise BackendUnavailableError(UNAVAILABLE)
    cuda = _cuda()
    batch, d, k = call.batch, call.d, call.slots.size
    slots, gate_bias, up_bias = call.slots, call.gate_bias, call.up_bias
    rows = call.bundles
    if not is_device_array(rows):  # ship only the active rows; slots become 0..k-1
        rows = rows[slots]
        gate_bias = None if gate_bias is None else np.asarray(gate_bias)[slots]
        up_bias = None if up_bias is None else np.asarray(up_bias)[slots]
        slots = np.arange(k, dtype=np.int64)
    unused = np.zeros(1, dtype=np.float32)
    zeros = np.zeros((batch, d), dtype=np.float32)  # atomics accumulate into y, so it starts at 0
    if is_device_array(call.out):
        y = call.out
        y.copy_to_device(zeros, stream=stream)
    else:
        y = cuda.to_device(zeros, stream=stream)
    acts = call.activations_out
    acts_dev = _to_device(cuda, np.zeros((batch, max(k, 1)), dtype=np.float32) if acts is None else acts, stream)
    if k:
        kernel = _kernel(call.storage, _block_threads(d))
        args = (_to_device(cuda, call.x, stream), _to_device(cuda, rows, stream), cuda.to_device(slots, stream=stream),
                call.kind.activation_code, call.kind.gated,
                _to_device(cuda, unused if gate_bias is None else gate_bias, stream),
                _to_device(cuda, unused if up_bias is None else up_bias, stream),
                gate_bias is not None, up_bias is not None)
        blocks = (k + GROUP - 1) // GROUP
        for t0 in range(0, batch, TOKENS):
            kernel[blocks, _block_threads(d), stream](*args, y, acts_dev, t0, min(TOKENS, batch - t0))
    host_results = False
    if acts is not None and not is_device_array(acts):
        acts_dev.copy_to_host(acts, stream=stream)
        host_results = True
    if call.out is None:
        y_host = y.copy_to_host(stream=stream)
        _wait(stream)
        return finish(call, y_host)
    if not is_device_array(call.out):
        y.copy_to_host(call.out, stream=stream)
        host_results = True
    if host_results:
        _wait(stream)
    return finish(call, call.out)


def _wait(stream: Any) -> None:
    if stream:
        stream.synchronize()
    else:
        _cuda().synchronize()


def warmup(storages: tuple[str, ...] = STORAGES, d: int = 128) -> None:
    """Compile the kernel for each storage at hidden size d (d >= 128 shares one block size)."""
    for storage in storages:
        bundles = from_f32(np.ones((1, 3 * d), dtype=np.float32), storage)
        sparse_ffn(np.ones(d, dtype=np.float32), bundles, np.array([0]), "reglu", storage=storage)
