"""The reader's two ways through the kernel's AIO queue (runtime/aio.py), for runtime/streamer.py's
BundleReader (``reader`` below): pieces read into the queue's arena and then copied into their rows
(``submit_arena``), or read straight into the rows (``direct_plan``, ``submit_direct``)."""

from __future__ import annotations

import numpy as np

from sparseflash.layout.format_extents import BLOCK
from sparseflash.runtime import aio, nativeio, streamer
from sparseflash.runtime.bundle_checks import check_bundles


def submit_arena(reader, layer, firsts, ends, los, his, positions, dest, dest_slots, nbytes: int, t0: float):
    """The read's pieces into the kernel's queue at once; their copy and checks when they are all in."""
    region = reader.regions[layer]

    def finish(read: aio.AioRead) -> streamer.ReadResult:
        ok = read.got == read.lengths
        cut = np.zeros(len(positions), dtype=bool)
        checked = reader._checked_natively(layer)
        bad = nativeio.scatter_pieces(reader.aio.array, read.arena_at, firsts, ends, los, his, ok, positions,
                                      region.bundle_bytes, dest.view(np.uint8), dest_slots, cut,
                                      *((region.digests, reader.finite[layer], region.dtype) if checked else ()))
        if bad >= 0:
            raise reader._bad_bundle(layer, positions, dest, dest_slots, bad)
        parts = [reader._after_native(layer, los[ok], his[ok], positions, dest, dest_slots, cut, checked)]
        for i in np.flatnonzero(~ok):  # short or failed: read again here, where each case has its error
            parts.append(reader._read_piece(layer, int(firsts[i]), int(ends[i]), positions[los[i] : his[i]], dest,
                                            dest_slots[los[i] : his[i]]))
        reader._check_cut(layer, [parts], dest)
        return streamer.ReadResult(len(firsts), nbytes, read.end - t0, t0, read.end,
                                   reader.device.read_time(len(firsts), nbytes, len(firsts)))

    try:
        return reader.aio.submit(region.offset + firsts * BLOCK, (ends - firsts) * BLOCK, finish)
    except OSError as e:
        raise streamer.StreamError(f"{reader.path}: {e.strerror or e} queueing {nbytes} bytes from offset "
                                   f"{region.offset + int(firsts[0]) * BLOCK}") from None


def direct_plan(reader, layer: int, positions: np.ndarray, dest: np.ndarray, dest_slots: np.ndarray,
                requests: int, nbytes: int, in_arena: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """(los, his) of the pieces of a read straight into the destination rows, where one can be made and
    the device model prices it no slower than the plan through I/O buffers; else None.

    A direct piece is a run of bundles consecutive both in the file and in ``dest``, read by AIO into
    the rows themselves: no I/O buffer and no copy, and no read-through gaps (those bytes would land in
    rows the read does not own). It needs whole bundles on BLOCK boundaries (bundle_bytes and the
    region's offset multiples of BLOCK) and rows of exactly one bundle in page-aligned memory.

    The buffered plan's pieces are copied once read, by the I/O threads when they do not fit the
    arena, and a thread copying is not reading: on the 1B layout's staged reads (37.6 MiB a layer,
    two threads) the threads got 1.04 GB/s from a disk that gave the direct reads 1.8-2.0 GB/s."""
    region = reader.regions[layer]
    bb = region.bundle_bytes
    if (reader.aio is None or not reader.native or bb % BLOCK or region.offset % BLOCK or dest.ndim != 2
            or not dest.flags.c_contiguous or dest.strides[0] != bb or dest.ctypes.data % BLOCK
            or not dest.flags.writeable):
        return None
    if len(dest_slots) and (dest_slots.min() < 0 or dest_slots.max() >= dest.shape[0]):
        raise ValueError("internal: destination slots outside the destination rows")
    breaks = np.flatnonzero((np.diff(positions) != 1) | (np.diff(dest_slots) != 1)) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(positions)]])
    # bundles per piece: at least an I/O buffer's worth (no buffer holds it), so a run needs no more pieces
    # than the buffered plan cuts it into (1 MiB over 24 KiB bundles: 43, not 42)
    most = max(1, -(-reader.buffer_bytes // bb))
    chunks = -(-(stops - starts) // most)
    first_of = np.repeat(np.cumsum(chunks) - chunks, chunks)
    los = np.repeat(starts, chunks) + (np.arange(int(chunks.sum())) - first_of) * most
    his = np.minimum(los + most, np.repeat(stops, chunks))
    if len(los) <= requests:  # no more requests, no more bytes, and no copy: always as good
        return los, his
    # more requests than the buffered plan, which reads gaps through instead: the device model's price
    # of each at one queue depth (the buffered plan's; only requests against bytes differ)
    depth = requests if in_arena else reader.threads
    direct_s = reader.device.read_time(len(los), len(positions) * bb, depth)
    return (los, his) if direct_s <= reader.device.read_time(requests, nbytes, depth) else None


def submit_direct(reader, layer, los, his, positions, dest, dest_slots, t0: float):
    """The pieces (los, his) by AIO straight into their rows; the checks (with ``verify``) in place
    once all are in, and pieces that read short or failed read again here."""
    region = reader.regions[layer]
    bb = region.bundle_bytes
    offsets = region.offset + positions[los] * bb
    lengths = (his - los) * bb
    addresses = dest.ctypes.data + dest_slots[los] * bb

    def finish(read: aio.AioRead) -> streamer.ReadResult:
        ok = read.got == lengths
        if reader.verify:
            redo = np.zeros(len(positions), dtype=bool)
            for i in np.flatnonzero(~ok):
                redo[los[i] : his[i]] = True
            if reader._checked_natively(layer):
                bad = nativeio.check_rows(positions, bb, dest.view(np.uint8), dest_slots, redo, region.digests,
                                          reader.finite[layer], region.dtype)
                if bad >= 0:
                    raise reader._bad_bundle(layer, positions, dest, dest_slots, bad)
            else:
                keep = np.flatnonzero(~redo)
                check_bundles(reader.path, region, positions[keep], dest, dest_slots[keep], reader.finite[layer])
        for i in np.flatnonzero(~ok):  # short or failed: read again here, where each case has its error
            first, end = positions[los[i]] * bb // BLOCK, (positions[his[i] - 1] + 1) * bb // BLOCK
            reader._read_piece(layer, int(first), int(end), positions[los[i] : his[i]], dest, dest_slots[los[i] : his[i]])
        nbytes = int(lengths.sum())
        return streamer.ReadResult(len(los), nbytes, read.end - t0, t0, read.end,
                                   reader.device.read_time(len(los), nbytes, min(len(los), aio.MAX_EVENTS)))

    try:
        return reader.aio.submit(offsets, lengths, finish, addresses)
    except OSError as e:
        raise streamer.StreamError(f"{reader.path}: {e.strerror or e} queueing {int(lengths.sum())} bytes from "
                                   f"offset {int(offsets[0])}") from None
