"""Reads through the kernel's asynchronous I/O queue (Linux AIO: io_setup, io_submit, io_getevents)
on an O_DIRECT descriptor: every piece of a read is in flight at once, and nothing else runs.

With a thread pool, a read's pieces are only as parallel as the threads, each hand-off to a thread
costs both threads CPU time and a trip through the GIL (~50-300 us on a 2-core VM), and an I/O
thread that wakes while the engine runs Python competes with it for the GIL. Here the caller's
thread hands all of a read's pieces to the kernel in one ``io_submit`` (the device sees them at
queue depth = pieces) and goes on; whoever next asks whether a read is done (``AioRead.done``,
``result``) collects the completions (``io_getevents``) and, for each read whose pieces are all in,
runs its ``finish`` callback (the copy of the bundles into their slots and the checks:
runtime/streamer.py). The pieces land in one arena of page-aligned memory, the reader's I/O
buffers (the bytes the memory plan counts); a read waits for room there when reads in flight fill it.

A read's end time is when a caller first finds it complete: the engine asks after every layer, so
for a look-ahead read it may be up to a layer late (its achieved bandwidth errs low, never high).

``available()`` is False where the kernel refuses io_setup or the architecture's syscall numbers are
not known here; the reader then uses its threads. Any error of the queue itself (io_submit refused)
becomes a StreamError naming the file; a piece that read short or failed is the finish callback's to
redo (the reader redoes it with its own reads, which name the offset and the error).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import threading
import time
import weakref
from collections.abc import Callable

import numpy as np

from sparseflash.layout.format_extents import BLOCK

# io_setup, io_destroy, io_getevents, io_submit per architecture (asm/unistd.h)
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
MAX_EVENTS = 256  # pieces in flight at once (io_setup's nr_events)
_IOCB = np.dtype([("data", "<u8"), ("key", "<u4"), ("rw_flags", "<u4"), ("opcode", "<u2"), ("reqprio", "<i2"),
                  ("fildes", "<u4"), ("buf", "<u8"), ("nbytes", "<u8"), ("offset", "<i8"), ("reserved2", "<u8"),
                  ("flags", "<u4"), ("resfd", "<u4")])  # struct iocb (linux/aio_abi.h), 64 bytes
_EVENT = np.dtype([("data", "<u8"), ("obj", "<u8"), ("res", "<i8"), ("res2", "<i8")])  # struct io_event
_PREAD = 0  # IOCB_CMD_PREAD
_libc = None
_available: bool | None = None


def _syscall(number: int, *args) -> int:
    """libc syscall(2); returns its result, raising OSError on -1."""
    r = _libc.syscall(number, *args)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


def _destroy(number: int, ctx: int) -> None:
    """io_destroy(ctx): waits for what is in flight, then frees the context (never raises)."""
    try:
        _syscall(number, ctypes.c_ulong(ctx))
    except OSError:
        pass


def _numbers() -> tuple[int, int, int, int] | None:
    return _SYSCALLS.get(platform.machine()) if os.name == "posix" else None


def available() -> bool:
    """Whether this kernel takes AIO contexts (tried once per process)."""
    global _available, _libc
    if _available is None:
        _available = False
        if _numbers() is not None and os.environ.get("SPARSEFLASH_AIO", "1") != "0":
            try:
                _libc = ctypes.CDLL(None, use_errno=True)
                _libc.syscall.restype = ctypes.c_long
                ctx = ctypes.c_ulong(0)
                _syscall(_numbers()[0], ctypes.c_long(1), ctypes.byref(ctx))
                _syscall(_numbers()[1], ctx)
                _available = True
            except (OSError, AttributeError):
                _available = False
    return _available


class AioRead:
    """One read in flight: its pieces, where they land in the arena, and (once all are in) its result.
    Future-like: ``done()``, ``result()``, ``exception()``."""

    def __init__(self, queue: AioQueue, offsets: np.ndarray, lengths: np.ndarray, finish: Callable,
                 in_arena: bool = True):
        self.queue, self.offsets, self.lengths, self.finish = queue, offsets, lengths, finish
        self.got = np.full(len(offsets), -1, dtype=np.int64)  # per piece: bytes read (-errno on error)
        # its room in the arena: blocks [first_block, + blocks); none for a read into the caller's memory
        self.blocks = int(lengths.sum()) // BLOCK if in_arena else 0
        self.first_block = 0
        self.arena_at = np.zeros(len(offsets), dtype=np.int64)  # per piece: its byte offset in the arena
        self.address = self.arena_at  # per piece: where it lands (set by the queue)
        self.left = len(offsets)  # pieces not in yet
        self.submitted = 0  # pieces handed to the kernel so far
        self.serial = 0  # the queue's number for it: an iocb's data is serial << 32 | piece index
        self.end = 0.0  # time.perf_counter() when its last piece was collected
        self._result = self._error = None
        self._finished = False

    @property
    def inflight(self) -> int:
        """Pieces in the kernel's queue now: handed over and not collected."""
        return self.submitted - (len(self.offsets) - self.left)

    def done(self) -> bool:
        if not self._finished:
            self.queue.poll()
        return self._finished

    def result(self):
        self.queue.wait(self)
        if self._error is not None:
            raise self._error
        return self._result

    def exception(self) -> BaseException | None:
        self.queue.wait(self)
        return self._error


class AioQueue:
    """An AIO context on one descriptor, its arena, and the reads in flight (one per reader; its calls
    may come from any thread: a lock orders them)."""

    def __init__(self, fd: int, arena_bytes: int):
        if not available():
            raise OSError(errno.ENOSYS, "Linux AIO is not available")
        self.fd = fd
        self._setup, self._destroy, self._getevents, self._submit = _numbers()
        self.ctx = ctypes.c_ulong(0)
        _syscall(self._setup, ctypes.c_long(MAX_EVENTS), ctypes.byref(self.ctx))
        # a reader dropped without close() gives its context back when collected (contexts are few: aio-max-nr)
        self._release = weakref.finalize(self, _destroy, self._destroy, self.ctx.value)
        self.blocks = max(1, arena_bytes // BLOCK)
        self.arena = mmap.mmap(-1, self.blocks * BLOCK)  # page-aligned, as O_DIRECT needs
        self.array = np.frombuffer(self.arena, dtype=np.uint8)
        self.base = self.array.ctypes.data
        self._free = [(0, self.blocks)]  # free block runs (start, count), by start
        self._iocbs = np.zeros(MAX_EVENTS, dtype=_IOCB)
        self._iocbs["opcode"], self._iocbs["fildes"] = _PREAD, fd
        self._words = self._iocbs.view(np.uint64).reshape(MAX_EVENTS, 8)  # data 0, buf 3, nbytes 4, offset 5
        self._pointers = self._iocbs.ctypes.data + np.arange(MAX_EVENTS, dtype=np.uint64) * _IOCB.itemsize
        self._events = np.zeros(MAX_EVENTS, dtype=_EVENT)
        self._zero = (ctypes.c_long * 2)(0, 0)  # a timespec of 0: io_getevents returns at once
        self._reads: dict[int, AioRead] = {}  # serial -> read with pieces not in yet
        self._inflight = 0  # pieces in the kernel's queue
        self._next_serial = 1
        self._lock = threading.RLock()

    # -- the arena -------------------------------------------------------------------------------
    def _take(self, blocks: int) -> int | None:
        for i, (start, count) in enumerate(self._free):
            if count >= blocks:
                self._free[i : i + 1] = [(start + blocks, count - blocks)] if count > blocks else []
                return start
        return None

    def _give(self, start: int, blocks: int) -> None:
        runs = sorted([*self._free, (start, blocks)])
        merged = [runs[0]]
        for s, c in runs[1:]:
            if merged[-1][0] + merged[-1][1] == s:
                merged[-1] = (merged[-1][0], merged[-1][1] + c)
            else:
                merged.append((s, c))
        self._free = merged

    # -- reads -----------------------------------------------------------------------------------
    def submit(self, offsets: np.ndarray, lengths: np.ndarray, finish: Callable[[AioRead], object],
               addresses: np.ndarray | None = None) -> AioRead:
        """Start reading pieces [offsets[i], offsets[i] + lengths[i]) (BLOCK-aligned) of the file into
        the arena; ``finish(read)`` runs once all are in (their bytes at ``read.arena_at``, their counts
        in ``read.got``) and its return value is the read's result (an exception, its error).

        ``addresses``: piece i lands at that address instead (BLOCK-aligned memory of the caller's, which
        must stay allocated until the read has ended: ``finish`` holding the array does that); no arena."""
        read = AioRead(self, np.asarray(offsets, dtype=np.int64), np.asarray(lengths, dtype=np.int64), finish,
                       in_arena=addresses is None)
        if read.blocks > self.blocks:
            raise ValueError(f"internal: a read of {read.blocks} blocks does not fit an arena of {self.blocks}")
        with self._lock:
            if addresses is None:
                start = self._take(read.blocks)
                while start is None:  # reads in flight fill the arena: wait for one to end
                    self._collect(block=True)
                    start = self._take(read.blocks)
                read.first_block = start
                read.arena_at = start * BLOCK + np.concatenate([[0], np.cumsum(read.lengths)[:-1]]).astype(np.int64)
                read.address = self.base + read.arena_at
            else:
                read.address = np.asarray(addresses, dtype=np.int64)
            read.serial, self._next_serial = self._next_serial, self._next_serial + 1
            self._reads[read.serial] = read
            try:
                while read.submitted < len(offsets):
                    self._submit_some(read)
            except OSError as e:
                self._abort(read, e)
                raise
        return read

    def _submit_some(self, read: AioRead) -> None:
        room = MAX_EVENTS - self._inflight
        if room == 0:
            self._collect(block=True)
            return
        first = read.submitted
        n = min(room, len(read.offsets) - first)
        words = self._words[:n]
        words[:, 0] = (read.serial << 32) + np.arange(first, first + n, dtype=np.uint64)
        words[:, 3] = read.address[first : first + n]
        words[:, 4] = read.lengths[first : first + n]
        words[:, 5] = read.offsets[first : first + n]
        try:
            taken = _syscall(self._submit, self.ctx, ctypes.c_long(n), ctypes.c_void_p(self._pointers.ctypes.data))
        except OSError as e:
            taken = 0
            if e.errno != errno.EAGAIN:
                raise
        read.submitted += taken  # those not taken are submitted again
        self._inflight += taken
        if taken == 0:
            self._collect(block=True)

    def _abort(self, read: AioRead, error: OSError) -> None:
        """io_submit refused the read: what it took still lands (collected first), then its arena room is
        given back and it ends failed (``submit`` raises the error)."""
        while read.inflight:
            self._collect(block=True)
        self._reads.pop(read.serial, None)
        self._end(read, error=error)

    def poll(self) -> None:
        """Collect the completions there are now, without waiting."""
        with self._lock:
            if self._inflight:
                self._collect(block=False)

    def wait(self, read: AioRead) -> None:
        """Return once ``read`` has ended (collecting completions, its own and others')."""
        with self._lock:
            while not read._finished:
                self._collect(block=True)

    def _collect(self, block: bool) -> None:
        if not self._inflight:
            return
        while True:
            try:
                n = _syscall(self._getevents, self.ctx, ctypes.c_long(1 if block else 0), ctypes.c_long(MAX_EVENTS),
                             ctypes.c_void_p(self._events.ctypes.data), None if block else ctypes.byref(self._zero))
                break
            except InterruptedError:
                continue
        now = time.perf_counter()
        events = self._events[:n]
        self._inflight -= n
        for key, res in zip(events["data"].tolist(), events["res"].tolist()):
            read = self._reads[key >> 32]
            read.got[key & 0xFFFFFFFF] = res
            read.left -= 1
            if read.left == 0:
                read.end = now
                del self._reads[read.serial]
                self._end(read)

    def _end(self, read: AioRead, error: BaseException | None = None) -> None:
        try:
            if error is None:
                read._result = read.finish(read)
        except Exception as e:  # the read's own failure, raised by its result()
            error = e
        finally:
            if read.blocks:
                self._give(read.first_block, read.blocks)
            read._error, read._finished = error, True

    def close(self) -> None:
        """Wait for every read in flight, then free the context and the arena."""
        with self._lock:
            while self._inflight:
                self._collect(block=True)
            self._release()
