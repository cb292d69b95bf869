"""The I/O threads' inner loop in native code: read a task's pieces and copy their bundles into the
destination rows without holding the GIL.

In Python, a read piece cost its I/O thread ~100 us of interpreter work (buffer views, masks, the
copy) with the GIL held, on top of the read itself; on a 2-core machine the I/O thread and the
engine's main thread then wait on each other for the GIL, and a look-ahead read of a few bundles
landed after ~5x the device model's time (docs/runtime.md, "Reads without the GIL"). Here one
Numba call per task does the reads (libc ``pread`` on the O_DIRECT descriptor) and the copies.

It handles only the plain case: every read returns its full length. Anything else (an error, EINTR,
a short read, O_DIRECT refused) stops it at that piece, and the caller redoes that piece and the
rest in Python (runtime/streamer.py), where every such case has its one-line error or its retry.
Digests and the finite scan stay with the caller.
"""

from __future__ import annotations

import os

import numpy as np
from numba import njit, types

from sparseflash.layout.format_extents import BLOCK

_pread = types.ExternalFunction("pread", types.int64(types.int32, types.voidptr, types.uint64, types.int64))


@njit(nogil=True, cache=True)
def _read_copy(fd, region_offset, firsts, ends, los, his, buf, positions, bb, dest, dest_slots, cut):
    # piece i: blocks [firsts[i], ends[i]) of the region, holding bytes of positions[los[i]:his[i]]
    # buf (>= largest piece) uint8, page-aligned; dest (rows, >= bb) uint8; cut (len(positions),) bool out
    for i in range(firsts.size):
        lo = firsts[i] * BLOCK
        hi = ends[i] * BLOCK
        if _pread(fd, buf.ctypes.data, hi - lo, region_offset + lo) != hi - lo:
            return i  # error, EINTR or short: the caller redoes pieces i.. in Python
        for j in range(los[i], his[i]):
            p0 = positions[j] * bb
            start = max(p0, lo)
            end = min(p0 + bb, hi)
            if start < end:
                dest[dest_slots[j], start - p0 : end - p0] = buf[start - lo : end - lo]
            cut[j] = p0 < lo or p0 + bb > hi
    return -1


def read_copy(fd: int, region_offset: int, firsts: np.ndarray, ends: np.ndarray, los: np.ndarray, his: np.ndarray,
              buf: np.ndarray, positions: np.ndarray, bundle_bytes: int, dest: np.ndarray, dest_slots: np.ndarray,
              cut: np.ndarray) -> int:
    """Read pieces i (blocks [firsts[i], ends[i]) of the region at ``region_offset``) in turn into
    ``buf`` and copy the bytes of positions[los[i]:his[i]] into dest rows dest_slots[...]: ``cut[j]``
    set where bundle j is not whole in its piece. Returns -1 when every piece was read in full, else
    the first piece that was not (the pieces before it are done)."""
    return int(_read_copy(fd, region_offset, firsts, ends, los, his, buf, positions, bundle_bytes, dest, dest_slots,
                          cut))


def available() -> bool:
    """Whether this platform has ``pread`` (POSIX) for the native loop."""
    return hasattr(os, "pread")
