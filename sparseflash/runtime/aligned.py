"""Zeroed arrays in page-aligned memory, which reads can land in straight from the disk (O_DIRECT and
AIO need aligned addresses; runtime/streamer.py reads into such rows with no I/O buffer or copy)."""

from __future__ import annotations

import mmap

import numpy as np


def aligned_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.zeros(shape, dtype) in anonymous mapped memory: page-aligned, zero-filled, and committed page
    by page as it is written, like a large np.zeros."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype)
    return np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8).view(dtype).reshape(shape)
