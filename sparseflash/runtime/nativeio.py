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

With ``digests`` (the region's per-neuron xxh3_64 digests) it also checks each bundle that is whole
in its piece, where it now is: its digest (the ``XXH3_64bits`` function of the xxhash package's own
extension, bound at import; where it cannot be bound, ``CHECKS`` is False and the
caller checks in Python) and, at its first read (``seen``), that no float value is inf or NaN
(exponent bits all ones). It reports the first bundle that fails; the caller re-checks that one in
Python for the message. Bundles cut by a piece's end are the caller's to check once every piece is in.
"""

from __future__ import annotations

import os

import numpy as np
from numba import njit, types

from sparseflash.layout.format_extents import BLOCK

_pread = types.ExternalFunction("pread", types.int64(types.int32, types.voidptr, types.uint64, types.int64))
_xxh3 = types.ExternalFunction("XXH3_64bits", types.uint64(types.voidptr, types.uint64))
# the float exponent mask that marks inf/NaN, per value width in bytes (f16 and bf16 bits share width 2)
EXPONENT_MASK = {"f16": (2, 0x7C00), "bf16": (2, 0x7F80), "f32": (4, 0x7F800000)}


def _bind_xxh3() -> bool:
    """Make the xxhash extension's XXH3_64bits callable from compiled code (False where it is not there)."""
    try:
        import ctypes

        import xxhash._xxhash as extension
        from llvmlite import binding

        address = ctypes.cast(ctypes.CDLL(extension.__file__).XXH3_64bits, ctypes.c_void_p).value
        binding.add_symbol("XXH3_64bits", address)
        return True
    except (ImportError, OSError, AttributeError):
        return False


CHECKS = _bind_xxh3()  # whether the native loop can check digests itself


@njit(nogil=True, cache=True)
def _finite(row, width, mask):
    # row (bytes,) uint8 of little-endian floats width bytes wide: no value has all exponent bits set
    bad = False
    if width == 2:
        for i in range(0, row.size, 2):
            bad |= ((np.uint32(row[i]) | (np.uint32(row[i + 1]) << 8)) & mask) == mask
    else:
        for i in range(0, row.size, 4):
            v = (np.uint32(row[i]) | (np.uint32(row[i + 1]) << 8) | (np.uint32(row[i + 2]) << 16)
                 | (np.uint32(row[i + 3]) << 24))
            bad |= (v & mask) == mask
    return not bad


@njit(nogil=True, cache=True)
def _scatter(buf, lo, hi, jlo, jhi, positions, bb, dest, dest_slots, cut):
    # buf holds bytes [lo, hi) of the region: copy the parts of positions[jlo:jhi] into their dest rows
    for j in range(jlo, jhi):
        p0 = positions[j] * bb
        start = max(p0, lo)
        end = min(p0 + bb, hi)
        if start < end:
            dest[dest_slots[j], start - p0 : end - p0] = buf[start - lo : end - lo]
        cut[j] = p0 < lo or p0 + bb > hi


@njit(nogil=True, cache=True)
def _piece(fd, region_offset, lo, hi, jlo, jhi, buf, positions, bb, dest, dest_slots, cut):
    # read bytes [lo, hi) of the region into buf, copy the parts of positions[jlo:jhi] into their dest rows;
    # False when the read did not return its full length (error, EINTR or short)
    if _pread(fd, buf.ctypes.data, hi - lo, region_offset + lo) != hi - lo:
        return False
    _scatter(buf, lo, hi, jlo, jhi, positions, bb, dest, dest_slots, cut)
    return True


@njit(nogil=True, cache=True)
def _check(jlo, jhi, positions, bb, dest, dest_slots, cut, digests, seen, width, mask, bad):
    # each bundle of positions[jlo:jhi] whole in its piece, where it now is: digest, then (first read,
    # float storage: width > 0) finite values; bad[0] = the first j that failed (else left as is)
    for j in range(jlo, jhi):
        if cut[j] or bad[0] >= 0:
            continue
        row = dest[dest_slots[j], :bb]
        if _xxh3(row.ctypes.data, bb) != digests[positions[j]]:
            bad[0] = j
        elif width and not seen[positions[j]]:
            if _finite(row, width, mask):
                seen[positions[j]] = True
            else:
                bad[0] = j


@njit(nogil=True, cache=True)
def _read_copy(fd, region_offset, firsts, ends, los, his, buf, positions, bb, dest, dest_slots, cut):
    # piece i: blocks [firsts[i], ends[i]) of the region, holding bytes of positions[los[i]:his[i]]
    # buf (>= largest piece) uint8, page-aligned; dest (rows, >= bb) uint8; cut (len(positions),) bool out
    for i in range(firsts.size):
        if not _piece(fd, region_offset, firsts[i] * BLOCK, ends[i] * BLOCK, los[i], his[i], buf, positions, bb,
                      dest, dest_slots, cut):
            return i  # the caller redoes pieces i.. in Python
    return -1


@njit(nogil=True, cache=True)
def _read_copy_checked(fd, region_offset, firsts, ends, los, his, buf, positions, bb, dest, dest_slots, cut,
                       digests, seen, width, mask, bad):
    # as _read_copy, and each bundle whole in its piece checked in place (_check)
    for i in range(firsts.size):
        if not _piece(fd, region_offset, firsts[i] * BLOCK, ends[i] * BLOCK, los[i], his[i], buf, positions, bb,
                      dest, dest_slots, cut):
            return i
        _check(los[i], his[i], positions, bb, dest, dest_slots, cut, digests, seen, width, mask, bad)
    return -1


@njit(nogil=True, cache=True)
def _scatter_pieces(arena, at, firsts, ends, los, his, ok, positions, bb, dest, dest_slots, cut, checked, digests,
                    seen, width, mask, bad):
    # pieces already read into arena[at[i]:]: those with ok[i] copied (and, with checked, checked) as above
    for i in range(firsts.size):
        if not ok[i]:
            continue
        lo, hi = firsts[i] * BLOCK, ends[i] * BLOCK
        _scatter(arena[at[i] : at[i] + hi - lo], lo, hi, los[i], his[i], positions, bb, dest, dest_slots, cut)
        if checked:
            _check(los[i], his[i], positions, bb, dest, dest_slots, cut, digests, seen, width, mask, bad)


@njit(nogil=True, cache=True)
def _plan_pieces(positions, bb, gap, max_blocks, firsts, ends, los, his):
    # as layout/format_extents.py's plan_extents then split_extents, and the positions each piece holds
    n = 0
    i = 0
    while i < positions.size:  # one extent: positions[i:k] and the gaps between them of <= gap blocks
        first = positions[i] * bb // BLOCK
        last = ((positions[i] + 1) * bb - 1) // BLOCK
        k = i + 1
        while k < positions.size and positions[k] * bb // BLOCK <= last + 1 + gap:
            last = max(last, ((positions[k] + 1) * bb - 1) // BLOCK)
            k += 1
        for start in range(first, last + 1, max_blocks):
            firsts[n] = start
            ends[n] = min(last + 1, start + max_blocks)
            n += 1
        i = k
    j = 0
    for m in range(n):  # positions whose bytes overlap piece m: [los[m], his[m])
        lo_pos = firsts[m] * BLOCK // bb
        hi_pos = -((-(ends[m] * BLOCK)) // bb)
        while j < positions.size and positions[j] < lo_pos:
            j += 1
        los[m] = j
        h = j
        while h < positions.size and positions[h] < hi_pos:
            h += 1
        his[m] = h
    return n


def plan_pieces(positions: np.ndarray, bundle_bytes: int, merge_gap_blocks: int, max_blocks: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pieces to read sorted, distinct stored ``positions`` (int64), in one call: (firsts, ends) in
    blocks from the region start, as ``plan_reads`` (layout/format_extents.py: coalesced extents, gaps
    of up to ``merge_gap_blocks`` read through, cut to ``max_blocks``), and per piece the range
    [los, his) of positions whose bytes it overlaps."""
    span = (int(positions[-1]) + 1) * bundle_bytes // BLOCK + 2 if len(positions) else 0
    most = len(positions) + span // max(max_blocks, 1) + 1  # extents <= positions; each adds <= span/max cuts
    firsts, ends, los, his = (np.empty(most, dtype=np.int64) for _ in range(4))
    n = _plan_pieces(positions, bundle_bytes, merge_gap_blocks, max_blocks, firsts, ends, los, his)
    return firsts[:n], ends[:n], los[:n], his[:n]


def read_copy(fd: int, region_offset: int, firsts: np.ndarray, ends: np.ndarray, los: np.ndarray, his: np.ndarray,
              buf: np.ndarray, positions: np.ndarray, bundle_bytes: int, dest: np.ndarray, dest_slots: np.ndarray,
              cut: np.ndarray) -> int:
    """Read pieces i (blocks [firsts[i], ends[i]) of the region at ``region_offset``) in turn into
    ``buf`` and copy the bytes of positions[los[i]:his[i]] into dest rows dest_slots[...]: ``cut[j]``
    set where bundle j is not whole in its piece. Returns -1 when every piece was read in full, else
    the first piece that was not (the pieces before it are done)."""
    return int(_read_copy(fd, region_offset, firsts, ends, los, his, buf, positions, bundle_bytes, dest, dest_slots,
                          cut))


def read_copy_checked(fd: int, region_offset: int, firsts: np.ndarray, ends: np.ndarray, los: np.ndarray,
                      his: np.ndarray, buf: np.ndarray, positions: np.ndarray, bundle_bytes: int, dest: np.ndarray,
                      dest_slots: np.ndarray, cut: np.ndarray, digests: np.ndarray, seen: np.ndarray,
                      storage: str) -> tuple[int, int]:
    """``read_copy`` that also checks each bundle whole in its piece (needs ``CHECKS``): its xxh3_64
    digest against ``digests`` (per stored position, uint64) and, where ``seen`` (per stored position,
    bool; set here) is False and ``storage`` is a float one, its values. Returns (stop, bad): stop as
    read_copy's, bad the first position index whose check failed (-1: none)."""
    width, mask = EXPONENT_MASK.get(storage, (0, 0))
    bad = np.full(1, -1, dtype=np.int64)
    stop = _read_copy_checked(fd, region_offset, firsts, ends, los, his, buf, positions, bundle_bytes, dest,
                              dest_slots, cut, digests, seen, width, np.uint32(mask), bad)
    return int(stop), int(bad[0])


def scatter_pieces(arena: np.ndarray, at: np.ndarray, firsts: np.ndarray, ends: np.ndarray, los: np.ndarray,
                   his: np.ndarray, ok: np.ndarray, positions: np.ndarray, bundle_bytes: int, dest: np.ndarray,
                   dest_slots: np.ndarray, cut: np.ndarray, digests: np.ndarray | None = None,
                   seen: np.ndarray | None = None, storage: str = "") -> int:
    """Pieces i read elsewhere (runtime/aio.py) into ``arena[at[i]:]``: where ``ok[i]``, copy the bytes of
    positions[los[i]:his[i]] into dest rows as ``read_copy`` does, and with ``digests`` (needs
    ``CHECKS``) check them as ``read_copy_checked`` does. Returns the first position index whose check
    failed (-1: none)."""
    width, mask = EXPONENT_MASK.get(storage, (0, 0))
    bad = np.full(1, -1, dtype=np.int64)
    checked = digests is not None
    if not checked:
        digests, seen = np.zeros(1, dtype=np.uint64), np.zeros(1, dtype=bool)
    _scatter_pieces(arena, at, firsts, ends, los, his, ok, positions, bundle_bytes, dest, dest_slots, cut, checked,
                    digests, seen, width, np.uint32(mask), bad)
    return int(bad[0])


def check_rows(positions: np.ndarray, bundle_bytes: int, dest: np.ndarray, dest_slots: np.ndarray, skip: np.ndarray,
               digests: np.ndarray, seen: np.ndarray, storage: str) -> int:
    """Check bundles already in their rows (dest rows dest_slots[j] hold stored positions[j]; a read
    straight into them), but those with ``skip[j]``, as ``read_copy_checked`` does. Returns the first
    position index whose check failed (-1: none)."""
    width, mask = EXPONENT_MASK.get(storage, (0, 0))
    bad = np.full(1, -1, dtype=np.int64)
    _check(0, len(positions), positions, bundle_bytes, dest, dest_slots, skip, digests, seen, width, np.uint32(mask),
           bad)
    return int(bad[0])


def available() -> bool:
    """Whether this platform has ``pread`` (POSIX) for the native loop."""
    return hasattr(os, "pread")
