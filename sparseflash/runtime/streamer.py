"""Read neuron bundles from a layout file into cache slots: few, aligned, concurrent reads.

Missing positions become coalesced 4096-aligned extents (planner.plan_reads, merging gaps the
device model says are cheaper to read through at the reader's queue depth), cut into pieces no
larger than one I/O buffer. Pieces are read by a thread pool (one thread per read in flight) with ``os.preadv`` (which releases the GIL) into page-aligned
buffers, from an O_DIRECT descriptor; where the file system refuses O_DIRECT the reader falls back
to buffered reads and drops what it read from the page cache, so every read is a disk read.
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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from sparseflash.errors import SparseflashError
from sparseflash.kernels import KernelInputError, check_quantized
from sparseflash.kernels.finite import first_non_finite_row
from sparseflash.layout.format import QUANT_TYPES, LayoutError, check_digests
from sparseflash.layout.format_extents import BLOCK
from sparseflash.runtime.iomodel import DeviceModel
from sparseflash.runtime.planner import plan_reads


class StreamError(SparseflashError):
    """A read of the layout file failed (I/O error, unexpected end of file)."""


@dataclass
class ReadResult:
    requests: int = 0
    bytes: int = 0  # bytes read from the file (aligned, gaps included)
    seconds: float = 0.0  # wall time of the whole read
    start: float = 0.0  # time.perf_counter() when it was submitted
    end: float = 0.0  # ... and when its last piece landed
    model_s: float = 0.0  # the device model's time for the same pieces at the same queue depth


class BundleReader:
    """Reads bundles of the FFN regions of one layout file."""

    def __init__(self, path: str, regions: list, device: DeviceModel, io: str = "direct", threads: int = 4,
                 buffer_bytes: int = 1 << 20, preadv=os.preadv, verify: bool = False):
        self.path = path
        self.verify = verify  # check every bundle against its digest (regions must be FfnLayer records)
        # per stored position: values already found finite (a matching digest means the same bytes)
        self.finite = [np.zeros(r.n_neurons if verify else 0, dtype=bool) for r in regions]
        self.regions = regions  # FfnLayer records: offset, bundle_bytes
        self.device = device
        largest = max((r.length for r in regions), default=BLOCK)
        self.buffer_bytes = max(BLOCK, min(buffer_bytes, -(-largest // BLOCK) * BLOCK) // BLOCK * BLOCK)
        # reading a gap costs less than a request's latency at this queue depth; never more than a buffer
        self.merge_gap_blocks = min(device.gap_bytes(threads), self.buffer_bytes) // BLOCK
        self._preadv = preadv
        self.direct = False
        self.fd = self._open(io)
        self._buffered_fd = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self.threads = threads
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="sparseflash-io")

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
    def buffer_total_bytes(self) -> int:
        """Bytes of I/O buffers this reader may hold (one per thread)."""
        return self.threads * self.buffer_bytes

    def _buffer(self) -> memoryview:
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = mmap.mmap(-1, self.buffer_bytes)  # page-aligned for O_DIRECT
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

    def _read_pieces(self, work: list) -> list[tuple[np.ndarray, np.ndarray]]:
        return [self._read_piece(*args) for args in work]

    def submit(self, layer: int, positions: np.ndarray, dest: np.ndarray, dest_slots: np.ndarray) -> Future:
        """Start reading the bundles of sorted ``positions`` into ``dest[dest_slots]``; the future's
        result is a ReadResult (or raises StreamError)."""
        positions = np.asarray(positions, dtype=np.int64)
        order = np.argsort(positions, kind="stable")
        positions, dest_slots = positions[order], np.asarray(dest_slots, dtype=np.int64)[order]
        bb = self.regions[layer].bundle_bytes
        pieces = plan_reads(positions, bb, self.merge_gap_blocks, self.buffer_bytes // BLOCK)
        t0 = time.perf_counter()
        # positions whose bytes overlap each piece
        los = np.searchsorted(positions, [a * BLOCK // bb for a, _ in pieces], side="left")
        his = np.searchsorted(positions, [-(-(b * BLOCK) // bb) for _, b in pieces], side="left")
        work = [(layer, a, b, positions[lo:hi], dest, dest_slots[lo:hi])
                for (a, b), lo, hi in zip(pieces, los, his)]
        # one task per thread, each reading its share of the pieces in turn: as many reads in flight as
        # threads, without a task hand-off per piece
        groups = min(self.threads, len(work))
        futures = [self.pool.submit(self._read_pieces, work[g::groups]) for g in range(groups)]
        result = Future()
        nbytes = sum((b - a) * BLOCK for a, b in pieces)
        remaining = [len(futures)]
        lock = threading.Lock()

        def done(_):
            with lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            t1 = time.perf_counter()  # the last piece landed: the read's span ends here, before any check
            errors = [f.exception() for f in futures if f.exception() is not None]
            if not errors and self.verify:  # the bundles cut by pieces' ends, now whole
                cut = [part for f in futures for part in f.result()]
                cut_pos = np.concatenate([c[0] for c in cut]) if cut else np.zeros(0, np.int64)
                cut_pos, first = np.unique(cut_pos, return_index=True)
                cut_slots = np.concatenate([c[1] for c in cut])[first] if len(cut_pos) else cut_pos
                try:
                    check_bundles(self.path, self.regions[layer], cut_pos, dest, cut_slots, self.finite[layer])
                except StreamError as e:
                    errors.append(e)
            if errors:
                result.set_exception(errors[0])
            else:
                result.set_result(ReadResult(len(pieces), nbytes, t1 - t0, t0, t1,
                                             self.device.read_time(len(pieces), nbytes, self.threads)))

        if not futures:
            result.set_result(ReadResult())
        for f in futures:
            f.add_done_callback(done)
        return result

    def read(self, layer: int, positions: np.ndarray, dest: np.ndarray, dest_slots: np.ndarray) -> ReadResult:
        return self.submit(layer, positions, dest, dest_slots).result()

    def close(self) -> None:
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


def check_bundles(path: str, region, positions: np.ndarray, rows: np.ndarray, index: np.ndarray | None = None,
                  finite: np.ndarray | None = None) -> None:
    """The bundles read for stored ``positions`` of ``region`` (an FfnLayer record), ``rows`` (with
    ``index``: rows[index[i]] holds positions[i], checked in place), are the ones written (digests) and
    hold finite values; else a StreamError naming layer and neuron. ``finite`` (per stored position):
    positions whose values were already found finite, skipped by the scan and set by it."""
    if index is not None and not len(index):
        return
    try:
        check_digests(path, region, positions, rows, index)
    except LayoutError as e:
        raise StreamError(f"{e}: the file changed on disk or the disk returned bad data; copy it again or "
                          "rebuild the layout (`--no-verify` would use these bytes as they are)") from None
    if finite is not None:
        new = np.flatnonzero(~finite[positions])
        if not len(new):
            return
        positions = positions[new]
        index = new if index is None else index[new]
    bad = _first_non_finite(rows, region, index)
    if bad is not None:
        raise StreamError(f"{path}: layer {region.index}, stored neuron {int(positions[bad])}: {_NON_FINITE}")
    if finite is not None:
        finite[positions] = True


_NON_FINITE = ("holds non-finite weights although its digest matches: the layout was written wrong; rebuild it "
               "with `sparseflash prepare`")


def _first_non_finite(rows: np.ndarray, region, index: np.ndarray | None = None) -> int | None:
    """Index (into ``index`` when given: the rows rows[index]) of the first row holding an inf/NaN value
    (or quantization scale), None if all are finite."""
    if region.dtype in QUANT_TYPES:
        if index is not None:
            rows = rows[index]  # a read piece's wanted rows: at most one I/O buffer
        try:
            check_quantized(rows, region.d_model, region.gated, region.dtype)
        except KernelInputError:
            for i in range(len(rows)):  # rare: find which row, for the message
                try:
                    check_quantized(rows[i : i + 1], region.d_model, region.gated, region.dtype)
                except KernelInputError:
                    return i
        return None
    return first_non_finite_row(rows, region.dtype, index)  # exponent bits all ones: inf or NaN
