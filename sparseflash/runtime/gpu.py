"""GPU side of the neuron cache (numba.cuda): device slot storage, pinned staging, row scatter.

Reads land in page-locked host buffers; the rows are copied to the device in one transfer and a
small kernel scatters them into their cache slots. The engine imports this module only with
``--device cuda``, so numba.cuda is loaded only then; the kernel compiles on first use.
"""

from __future__ import annotations

import numpy as np
from numba import cuda


@cuda.jit
def _scatter(src, slots, dst):
    i = cuda.grid(1)
    width = src.shape[1]
    if i < src.shape[0] * width:
        row = i // width
        col = i - row * width
        dst[slots[row], col] = src[row, col]


def device_slots(capacity: int, bundle_len: int, dtype) -> object:
    """(capacity, bundle_len) slot storage in device memory."""
    return cuda.device_array((capacity, bundle_len), dtype=dtype)


def pinned_rows(rows: int, bundle_len: int, dtype) -> np.ndarray:
    """A page-locked host buffer for ``rows`` bundles (the target of the reads)."""
    return cuda.pinned_array((rows, bundle_len), dtype=dtype)


def upload_rows(staging: np.ndarray, slots: np.ndarray, dst) -> None:
    """Copy host rows up and write row r into device slot slots[r]."""
    if len(slots) == 0:
        return
    stream = cuda.stream()
    src = cuda.to_device(staging, stream=stream)
    idx = cuda.to_device(np.ascontiguousarray(slots, dtype=np.int64), stream=stream)
    total = staging.shape[0] * staging.shape[1]
    threads = 128
    _scatter[(total + threads - 1) // threads, threads, stream](src, idx, dst)
    stream.synchronize()
