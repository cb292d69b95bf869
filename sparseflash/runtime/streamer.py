"""Read neuron bundles from a layout file into cache slots: few, aligned, concurrent reads.

Missing positions become coalesced 4096-aligned extents (planner.plan_reads' pieces, planned in one
native call: nativeio.plan_pieces; gaps are merged where the device model says they are cheaper to
read through at the reader's queue depth), cut into pieces no larger than one I/O buffer. Pieces are
read by a thread pool (one thread per read in flight) into
page-aligned buffers, from an O_DIRECT descriptor: each thread's pieces in one native call that reads
(libc ``pread``) and copies without the GIL (runtime/nativeio.py), and in Python (``os.preadv``) from
the first piece that call could not read in full. Where the file system refuses O_DIRECT the reader
falls back to buffered reads and drops what it read from the page cache, so every read is a disk read.
Where the kernel has Linux AIO (runtime/aio.py) every piece of a read is handed to the kernel at once
from the caller's thread, the device sees them all in flight, and no thread is involved: the default
(runtime/aio_reads.py; where the bundles and the rows allow, straight into the rows, with no copy).
Otherwise (or with ``use_aio=False``) a read goes to as many threads as pay for their measured hand-off, and
a demand read (the caller waits for it next) of a few pieces is read on the calling thread when that is
quickest (tasks_for).
Short reads are completed, EINTR is retried, and any other OSError becomes a StreamError naming
the file and offset; slots of a failed read are never committed, so the cache stays consistent.
With ``verify`` every bundle read is checked against its digest in the index before the read is
reported done, and its values (or quantization scales) must be finite: a bundle changed on disk or
corrupted on the way is a StreamError naming the layer and the stored neuron, never a wrong answer.
The values are scanned at the first read of each bundle only: a later read whose digest matches
holds the same bytes, already found finite.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
import types
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from sparseflash.layout.format_extents import BLOCK
from sparseflash.runtime import aio, aio_reads, nativeio
from sparseflash.runtime.bundle_checks import StreamError, check_bundles
from sparseflash.runtime.iomodel import DeviceModel

AIO_GAP_DEPTH = 16  # with AIO, gaps are priced at this queue depth (a read's pieces are all in flight)
HANDOFF_TRIPS = 9  # round trips timed to measure the hand-off to an I/O thread (their median)


@dataclass
class ReadResult:
    requests: int = 0
    bytes: int = 0  # bytes read from the file (aligned, gaps included)
    seconds: float = 0.0  # wall time of the whole read
    start: float = 0.0  # time.perf_counter() when it was submitted
    end: float = 0.0  # ... and when its last piece landed
    model_s: float = 0.0  # the device model's time for the same pieces at the same queue depth
    inline: bool = False  # read on the calling thread inside submit(): the caller spent its whole span


class BundleReader:
    """Reads bundles of the FFN regions of one layout file."""

    def __init__(self, path: str, regions: list, device: DeviceModel, io: str = "direct", threads: int = 4,
                 buffer_bytes: int = 1 << 20, preadv=os.preadv, verify: bool = False, use_aio: bool = True):
        self.path = path
        self.verify = verify  # check every bundle against its digest (regions must be FfnLayer records)
        # per stored position: values already found finite (a matching digest means the same bytes)
        self.finite = [np.zeros(r.n_neurons if verify else 0, dtype=bool) for r in regions]
        self.regions = regions  # FfnLayer records: offset, bundle_bytes
        self.device = device
        largest = max((r.length for r in regions), default=BLOCK)
        self.buffer_bytes = max(BLOCK, min(buffer_bytes, -(-largest // BLOCK) * BLOCK) // BLOCK * BLOCK)
        self._preadv = preadv
        # the native loop (runtime/nativeio.py) reads the plain case without the GIL; a preadv that is not
        # the os module's own (tests inject faults that way) keeps every read in Python
        self.native = isinstance(preadv, types.BuiltinFunctionType) and nativeio.available()
        self.direct = False
        self.fd = self._open(io)
        self.threads = threads
        self.aio = None  # the kernel's queue (runtime/aio.py), where it can take O_DIRECT reads of this file
        if use_aio and self.native and self.direct and aio.available():
            try:
                self.aio = aio.AioQueue(self.fd, self.buffer_total_bytes)
            except OSError:
                self.aio = None
        # reading a gap costs less than a request's latency at the queue depth reads see; never more than a buffer
        gap = device.gap_bytes(AIO_GAP_DEPTH if self.aio is not None else threads)
        self.merge_gap_blocks = min(gap, self.buffer_bytes) // BLOCK
        self._buffered_fd = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sparseflash-io")
        self._handoff_s: float | None = None  # measured at first use (handoff_s)

    def _open(self, io: str) -> int:
        flag = getattr(os, "O_DIRECT", 0)
        try:
            if io == "direct" and flag:
                try:
                    fd = os.open(self.path, os.O_RDONLY | flag)
                    self.direct = True
                    return fd
                except OSError as e:
                    if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                        raise
            return os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise StreamError(f"{self.path}: cannot open for reading ({e.strerror})") from None

    @property
    def engine(self) -> str:
        """How reads are issued: ``aio`` (the kernel's queue) or ``threads``."""
        return "threads" if self.aio is None else "aio"

    @property
    def buffer_total_bytes(self) -> int:
        """Bytes of I/O buffers this reader may hold (one per thread; with AIO, the arena)."""
        return self.threads * self.buffer_bytes

    def _buffer(self) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = mmap.mmap(-1, self.buffer_bytes)  # page-aligned for O_DIRECT
            self._local.array = np.frombuffer(buf, dtype=np.uint8)
        return memoryview(buf)

    def _fallback_to_buffered(self) -> int:
        with self._lock:
            if self._buffered_fd is None:
                self._buffered_fd = os.open(self.path, os.O_RDONLY)
            return self._buffered_fd

    def _read_exact(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` from ``offset``: complete short reads, retry EINTR, report anything else."""
        done, fd, direct = 0, self.fd, self.direct
        while done < len(view):
            try:
                got = self._preadv(fd, [view[done:]], offset + done)
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.EINVAL and direct:  # O_DIRECT refused for this read: go buffered
                    fd, direct = self._fallback_to_buffered(), False
                    continue
                raise StreamError(f"{self.path}: {e.strerror or e} reading {len(view) - done} bytes at offset "
                                  f"{offset + done}") from None
            if got == 0:
                raise StreamError(f"{self.path}: unexpected end of file at offset {offset + done}")
            done += got
        if not direct:
            os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)

    def _read_piece(self, layer: int, first_block: int, end_block: int, positions: np.ndarray,
                    dest: np.ndarray, dest_slots: np.ndarray) -> None:
        region = self.regions[layer]
        bb = region.bundle_bytes
        nbytes = (end_block - first_block) * BLOCK
        view = self._buffer()[:nbytes]
        self._read_exact(view, region.offset + first_block * BLOCK)
        raw = np.frombuffer(view, dtype=np.uint8)
        dest_bytes = dest.view(np.uint8)
        lo, hi = first_block * BLOCK, end_block * BLOCK
        whole = (positions * bb >= lo) & ((positions + 1) * bb <= hi)
        if whole.any():  # bundles inside the piece: one gather from a (bundles, bb) view of the buffer
            skip = -lo % bb  # bytes before the first bundle boundary in the piece
            count = (nbytes - skip) // bb
            rows = np.lib.stride_tricks.as_strided(raw[skip:], shape=(count, bb), strides=(bb, 1))
            dest_bytes[_run_or_index(dest_slots[whole])] = rows[_run_or_index((positions[whole] * bb - lo - skip) // bb)]
            if self.verify:  # on this thread, as soon as the piece is in (the checks overlap the other reads):
                # the wanted bundles whole in it, where they now are, in place (no gathered copy)
                check_bundles(self.path, region, positions[whole], dest, dest_slots[whole], self.finite[layer])
        for p, s in zip(positions[~whole], dest_slots[~whole]):  # bundles cut by the piece's ends
            start, end = max(p * bb, lo), min((p + 1) * bb, hi)
            if start < end:
                dest_bytes[s, start - p * bb : end - p * bb] = raw[start - lo : end - lo]
        return positions[~whole], dest_slots[~whole]  # not checked yet: whole only once every piece is in

    def _read_task(self, layer: int, firsts: np.ndarray, ends: np.ndarray, los: np.ndarray, his: np.ndarray,
                   positions: np.ndarray, dest: np.ndarray, dest_slots: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Read pieces i (blocks [firsts[i], ends[i]), holding positions[los[i]:his[i]]) in turn; returns
        the (positions, slots) of the bundles cut by the pieces' ends, unchecked. The plain case runs in
        the native loop (no GIL); from a piece it could not read in full, the rest go through Python."""
        region, start, cut_parts = self.regions[layer], 0, []
        if self.native and self.direct:
            self._buffer()
            cut = np.zeros(len(positions), dtype=bool)
            args = (self.fd, region.offset, firsts, ends, los, his, self._local.array, positions, region.bundle_bytes,
                    dest.view(np.uint8), dest_slots, cut)
            checked = self._checked_natively(layer)
            if checked:  # digests and first-read value scans in the loop too
                stop, bad = nativeio.read_copy_checked(*args, region.digests, self.finite[layer], region.dtype)
                if bad >= 0:
                    raise self._bad_bundle(layer, positions, dest, dest_slots, bad)
            else:
                stop = nativeio.read_copy(*args)
            start = len(firsts) if stop < 0 else stop
            if start:
                cut_parts.append(self._after_native(layer, los[:start], his[:start], positions, dest, dest_slots, cut,
                                                    checked))
        for i in range(start, len(firsts)):
            lo, hi = los[i], his[i]
            cut_parts.append(self._read_piece(layer, int(firsts[i]), int(ends[i]), positions[lo:hi], dest,
                                              dest_slots[lo:hi]))
        return cut_parts

    def _after_native(self, layer: int, los: np.ndarray, his: np.ndarray, positions: np.ndarray, dest: np.ndarray,
                      dest_slots: np.ndarray, cut: np.ndarray, checked: bool) -> tuple[np.ndarray, np.ndarray]:
        """After the native loop copied pieces holding positions[los[i]:his[i]]: check the bundles whole in
        them unless it did (``checked``); returns the (positions, slots) of those cut by a piece's end."""
        if checked:  # only rows the loop scattered can be marked cut: no need to list the pieces' rows
            cut_rows = np.flatnonzero(cut)
            return positions[cut_rows], dest_slots[cut_rows]
        mine = np.concatenate([np.arange(a, b) for a, b in zip(los, his)]) if len(los) else np.zeros(0, np.int64)
        whole, cut_rows = mine[~cut[mine]], mine[cut[mine]]
        if self.verify and not checked:  # the bundles whole in their piece, where they now are, in place
            check_bundles(self.path, self.regions[layer], positions[whole], dest, dest_slots[whole], self.finite[layer])
        return positions[cut_rows], dest_slots[cut_rows]

    def _checked_natively(self, layer: int) -> bool:
        return self.verify and nativeio.CHECKS and self.regions[layer].dtype in nativeio.EXPONENT_MASK

    def _bad_bundle(self, layer: int, positions: np.ndarray, dest: np.ndarray, dest_slots: np.ndarray, bad: int):
        """The native check found bundle ``bad`` wrong: the check in Python names the neuron and what is wrong."""
        region = self.regions[layer]
        check_bundles(self.path, region, positions[bad : bad + 1], dest, dest_slots[bad : bad + 1])
        return StreamError(f"{self.path}: layer {region.index}, stored neuron {int(positions[bad])} failed its check "
                           "when read")

    def submit(self, layer: int, positions: np.ndarray, dest: np.ndarray, dest_slots: np.ndarray,
               inline_ok: bool = False) -> Future | aio.AioRead:
        """Start reading the bundles of sorted ``positions`` into ``dest[dest_slots]``; the future's
        result is a ReadResult (or raises StreamError). ``inline_ok``: the caller will wait for this read
        at once (a demand read), so where that is quickest (``tasks_for`` says 0) its pieces are read on
        the calling thread and the future is already done. With AIO the result is an ``AioRead`` (the same
        ``done``, ``result`` and ``exception``)."""
        positions = np.asarray(positions, dtype=np.int64)
        order = np.argsort(positions, kind="stable")
        positions, dest_slots = positions[order], np.asarray(dest_slots, dtype=np.int64)[order]
        bb = self.regions[layer].bundle_bytes
        t0 = time.perf_counter()
        # the pieces (plan_reads') and the positions whose bytes overlap each
        firsts, ends, los, his = nativeio.plan_pieces(positions, bb, self.merge_gap_blocks, self.buffer_bytes // BLOCK)
        nbytes = int((ends - firsts).sum()) * BLOCK
        result = Future()
        if not len(firsts):
            result.set_result(ReadResult())
            return result
        in_arena = self.aio is not None and self.native and nbytes <= self.aio.blocks * BLOCK
        direct = aio_reads.direct_plan(self, layer, positions, dest, dest_slots, len(firsts), nbytes, in_arena)
        if direct is not None:
            return aio_reads.submit_direct(self, layer, *direct, positions, dest, dest_slots, t0)
        if in_arena:
            return aio_reads.submit_arena(self, layer, firsts, ends, los, his, positions, dest, dest_slots, nbytes, t0)
        groups = self.tasks_for(len(firsts), nbytes, inline_ok)
        if groups == 0:
            try:
                cut = self._read_task(layer, firsts, ends, los, his, positions, dest, dest_slots)
                t1 = time.perf_counter()
                self._check_cut(layer, [cut], dest)
            except BaseException as e:
                result.set_exception(e)
                return result
            result.set_result(ReadResult(len(firsts), nbytes, t1 - t0, t0, t1,
                                         self.device.read_time(len(firsts), nbytes), inline=True))
            return result
        # one task per thread used, each reading its share of the pieces in turn, without a task hand-off
        # per piece
        futures = [self.pool.submit(self._read_task, layer,
                                    *(np.ascontiguousarray(a[g::groups]) for a in (firsts, ends, los, his)),
                                    positions, dest, dest_slots) for g in range(groups)]
        remaining = [len(futures)]
        lock = threading.Lock()

        def done(_):
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            t1 = time.perf_counter()  # the last piece landed: the read's span ends here, before any check
            errors = [f.exception() for f in futures if f.exception() is not None]
            if not errors:
                try:
                    self._check_cut(layer, [f.result() for f in futures], dest)
                except StreamError as e:
                    errors.append(e)
            if errors:
                result.set_exception(errors[0])
            else:
                result.set_result(ReadResult(len(firsts), nbytes, t1 - t0, t0, t1,
                                             self.device.read_time(len(firsts), nbytes, self.threads)))

        for f in futures:
            f.add_done_callback(done)
        return result

    def _check_cut(self, layer: int, parts: list, dest: np.ndarray) -> None:
        """With ``verify``: check the bundles cut by pieces' ends (``parts``: per task, the (positions,
        slots) pairs its pieces left), now that every piece is in."""
        if not self.verify:
            return
        cut = [part for task in parts for part in task if len(part[0])]
        if not cut:
            return
        cut_pos, first = np.unique(np.concatenate([c[0] for c in cut]), return_index=True)
        cut_slots = np.concatenate([c[1] for c in cut])[first]
        check_bundles(self.path, self.regions[layer], cut_pos, dest, cut_slots, self.finite[layer])

    def tasks_for(self, requests: int, nbytes: int, inline_ok: bool = False) -> int:
        """How many I/O threads to deal ``requests`` pieces (``nbytes`` in all) to, 0 meaning none (read on
        the calling thread, an option only with ``inline_ok``): the count g that minimises g hand-offs
        (measured: ``handoff_s``) plus the device model's time at g reads in flight (at depth 1 for 0).
        A demand read of a piece or two stays on the caller's thread, a read of a few small pieces takes
        one or two threads (each hand-off costs both threads CPU time on a machine with few cores), and
        a large one all of them."""
        options = range(0 if inline_ok else 1, min(self.threads, requests) + 1)
        return min(options, key=lambda g: g * self.handoff_s + self.device.read_time(requests, nbytes, max(g, 1)))

    @property
    def handoff_s(self) -> float:
        """Seconds from handing a task to an I/O thread to having its result back, for a task that does
        nothing: the median of a few round trips, measured at the first call (on a shared 2-core VM
        100-300 us, several disk latencies; on an idle desktop ~10-30 us)."""
        if self._handoff_s is None:
            trips = []
            for _ in range(HANDOFF_TRIPS):
                t = time.perf_counter()
                self.pool.submit(int).result()
                trips.append(time.perf_counter() - t)
            self._handoff_s = float(np.median(trips))
        return self._handoff_s

    def read(self, layer: int, positions: np.ndarray, dest: np.ndarray, dest_slots: np.ndarray) -> ReadResult:
        return self.submit(layer, positions, dest, dest_slots).result()

    def close(self) -> None:
        if self.aio is not None:
            self.aio.close()
        self.pool.shutdown(wait=True)
        for fd in (self.fd, self._buffered_fd):
            if fd is not None:
                os.close(fd)
        self._buffered_fd = None


def _run_or_index(rows: np.ndarray) -> slice | np.ndarray:
    """Increasing row numbers as a slice where they are one run (a copy through a slice needs no
    gathered temporary: 3-5x faster than fancy indexing), else the array itself."""
    if len(rows) and np.all(np.diff(rows) == 1):
        return slice(int(rows[0]), int(rows[-1]) + 1)
    return rows
