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

Quantized bundles (q8 / q4) run cuda_quant_kernels' variant of the same kernel, reading the
bytes through an int8/uint8 and a float16 view of the same device memory. quant_linear(x, w)
is x @ W.T for a quantized matrix: one block per row of W, reduced in shared memory.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from sparseflash.kernels.bundles import pack_bundles
from sparseflash.kernels.contract import check_call, check_linear, finish, finish_linear, is_device_array
from sparseflash.kernels.errors import BackendUnavailableError
from sparseflash.kernels.quant import QUANT_STORAGES
from sparseflash.kernels.storage import STORAGES

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
    if storage in QUANT_STORAGES:
        from sparseflash.kernels import cuda_quant_kernels  # imports numba.cuda

        return cuda_quant_kernels.build_sparse_kernel(storage, threads, group=GROUP, tokens=TOKENS)
    from sparseflash.kernels import cuda_kernels  # imports numba.cuda

    return cuda_kernels.build_kernel(storage, threads, group=GROUP, tokens=TOKENS)


@functools.cache
def _linear_kernel(storage: str, threads: int):
    from sparseflash.kernels import cuda_quant_kernels

    return cuda_quant_kernels.build_linear_kernel(storage, threads)


_VALUE_VIEW = {"q8": np.int8, "q4": np.uint8}


def _quant_views(rows: Any, storage: str) -> tuple[Any, Any]:
    """(values, float16 scales) views of quantized rows already on the device; no copy."""
    return rows.view(_VALUE_VIEW[storage]), rows.view(np.float16)


def _to_device(cuda, a: Any, stream: Any = 0) -> Any:
    return a if is_device_array(a) else cuda.to_device(np.ascontiguousarray(a), stream=stream)


class _Scratch:
    """Device buffers one stream's calls reuse (grown to the largest call so far), so a call allocates
    no device memory: every allocation is a cudaMalloc, and numba's deferred frees of them, flushed every
    few calls, wait for the whole device. Calls on one stream are ordered, so a buffer is never written
    while an earlier kernel of the same stream still reads it."""

    _by_stream: dict[int, tuple[Any, _Scratch]] = {}

    def __init__(self) -> None:
        self.arrays: dict[tuple[str, str], Any] = {}

    @classmethod
    def of(cls, stream: Any) -> _Scratch:
        held = cls._by_stream.get(id(stream))
        if held is None or held[0] is not stream:
            held = cls._by_stream[id(stream)] = (stream, cls())  # holding the stream keeps its id unique
        return held[1]

    def take(self, name: str, n: int, dtype: Any, stream: Any) -> Any:
        """A device array of n elements of ``dtype`` (its contents are whatever the last call left)."""
        key = (name, np.dtype(dtype).str)
        a = self.arrays.get(key)
        if a is None or a.size < n:
            a = self.arrays[key] = _cuda().device_array(max(n, 64, 2 * (0 if a is None else a.size)), dtype=dtype,
                                                         stream=stream)
        return a[:n]

    def upload(self, name: str, host: np.ndarray, stream: Any) -> Any:
        """``host`` copied into the named buffer (shaped like it). A copy from pageable host memory is
        staged by the driver before it returns, so ``host`` may change right after."""
        host = np.ascontiguousarray(host)
        dev = self.take(name, host.size, host.dtype, stream).reshape(host.shape)
        dev.copy_to_device(host, stream=stream)
        return dev

    def zeros(self, name: str, shape: tuple[int, ...], stream: Any) -> Any:
        return self.upload(name, np.zeros(shape, dtype=np.float32), stream)

    def constant(self, name: str, host: np.ndarray, stream: Any) -> Any:
        """``host`` on the device, copied at the first call only (its value never changes)."""
        key = (name, host.dtype.str)
        if key not in self.arrays:
            self.upload(name, host, stream)
        return self.arrays[key][: host.size].reshape(host.shape)


_NO_BIAS = np.zeros(1, dtype=np.float32)


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
    batch, d, k = call.batch, call.d, call.slots.size
    slots, gate_bias, up_bias = call.slots, call.gate_bias, call.up_bias
    rows = call.bundles
    if not is_device_array(rows):  # ship only the active rows; slots become 0..k-1
        rows = rows[slots]
        gate_bias = None if gate_bias is None else np.asarray(gate_bias)[slots]
        up_bias = None if up_bias is None else np.asarray(up_bias)[slots]
        slots = np.arange(k, dtype=np.int64)
    scratch = _Scratch.of(stream)
    if is_device_array(call.out):  # atomics accumulate into y, so it starts at 0
        y = call.out
        y.copy_to_device(np.zeros((batch, d), dtype=np.float32), stream=stream)
    else:
        y = scratch.zeros("y", (batch, d), stream)
    acts = call.activations_out
    # the kernel writes every (token, neuron) activation, so a scratch buffer needs no zeroing
    acts_dev = acts if is_device_array(acts) else scratch.take("acts", batch * max(k, 1), np.float32,
                                                                 stream).reshape((batch, max(k, 1)))
    if k:
        kernel = _kernel(call.storage, _block_threads(d))
        rows = rows if is_device_array(rows) else scratch.upload("rows", rows, stream)
        weights = _quant_views(rows, call.storage) if call.storage in QUANT_STORAGES else (rows,)
        x_dev = call.x if is_device_array(call.x) else scratch.upload("x", call.x, stream)
        args = (x_dev, *weights, scratch.upload("slots", slots, stream),
                call.kind.activation_code, call.kind.gated,
                _bias(scratch, "gate_bias", gate_bias, stream), _bias(scratch, "up_bias", up_bias, stream),
                gate_bias is not None, up_bias is not None)
        blocks = (k + GROUP - 1) // GROUP
        for t0 in range(0, batch, TOKENS):
            kernel[blocks, _block_threads(d), stream](*args, y, acts_dev, t0, min(TOKENS, batch - t0))
    host_results = False
    if acts is not None and not is_device_array(acts) and k:
        acts_dev.copy_to_host(acts, stream=stream)
        host_results = True
    return finish(call, _results(call.out, y, host_results, stream))


def _bias(scratch: _Scratch, name: str, bias: Any, stream: Any) -> Any:
    if bias is None:
        return scratch.constant("no_bias", _NO_BIAS, stream)
    return bias if is_device_array(bias) else scratch.upload(name, bias, stream)


def _results(out: Any, y: Any, host_results: bool, stream: Any) -> Any:
    """What a call returns: y copied to the host (to `out` if it is a host array) or `out` on the device.

    Waits for the stream when anything goes to the host (host_results: something already did).
    """
    if out is None:
        y_host = y.copy_to_host(stream=stream)
        _wait(stream)
        return y_host
    if not is_device_array(out):
        y.copy_to_host(out, stream=stream)
        host_results = True
    if host_results:
        _wait(stream)
    return out


def quant_linear(x: Any, w: Any, storage: str, *, out: Any = None, stream: Any = 0) -> Any:
    """float32 (batch, rows) = x (batch, k) @ W.T for W quantized (rows, part_nbytes(k)) uint8, on the GPU.

    w may be a numpy array (copied whole to the device on each call) or a device array (keep
    resident weights there). Like sparse_ffn: a device `out` is returned without waiting, host
    results are waited for. See sparseflash.kernels.quant_linear for the contract.
    """
    call = check_linear(x, w, storage, out)
    if not is_available():
        raise BackendUnavailableError(UNAVAILABLE)
    scratch = _Scratch.of(stream)
    batch, rows = call.x.shape[0], call.w.shape[0]
    if is_device_array(call.out):
        y = call.out
    else:
        y = scratch.take("linear_y", batch * rows, np.float32, stream).reshape((batch, rows))
    if rows:
        threads = _block_threads(call.x.shape[1] // 2)
        kernel = _linear_kernel(storage, threads)
        x_dev = call.x if is_device_array(call.x) else scratch.upload("linear_x", call.x, stream)
        w_dev = _to_device(_cuda(), call.w, stream)  # a host matrix is copied whole: keep resident weights on the device
        kernel[rows, threads, stream](x_dev, *_quant_views(w_dev, storage), y)
    return finish_linear(call, _results(call.out, y, False, stream))


def _wait(stream: Any) -> None:
    if stream:
        stream.synchronize()
    else:
        _cuda().synchronize()


def warmup(storages: tuple[str, ...] = STORAGES, d: int = 128) -> None:
    """Compile the kernels for each storage at hidden size d (d >= 128 shares one block size; q8/q4:
    d a multiple of 32, and quant_linear too)."""
    for storage in storages:
        w = np.ones((1, d), dtype=np.float32)
        bundles = pack_bundles(w, w.T, w, dtype=storage)
        sparse_ffn(np.ones(d, dtype=np.float32), bundles, np.array([0]), "reglu", storage=storage)
        if storage in QUANT_STORAGES:
            quant_linear(np.ones(d, dtype=np.float32), np.ascontiguousarray(bundles[:, : bundles.shape[1] // 3]),
                         storage)
