"""Measure the disk under a layout file: random reads of 4 KiB .. 1 MiB of that file, direct I/O,
one at a time (QD1) and from several threads at once (queue depths 2 .. 16).

Per queue depth q, the fit (wall time per request) = latency + size / bandwidth gives one level of
the DeviceModel (runtime/iomodel.py) that read planning and the reports use: at q in flight,
latency is what a request adds to the wall time and bandwidth the aggregate rate. The probe only
reads: it samples the layout file itself (the file the runtime will stream from), so it works on
read-only and full file systems and never writes next to the user's files. Page-cache hits are not
disk reads: the file is opened with O_DIRECT, or, where the file system refuses that, dropped from
the page cache before every read (racy across threads, and a file system without a page cache to
drop, tmpfs, is measured at memory speed: the model's source says which way it was read). When the
disk cannot be measured (the file is too small, a read fails), the default DeviceModel is used and
one line says so.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sparseflash.errors import SparseflashError
from sparseflash.layout.format_extents import BLOCK
from sparseflash.paths import note as stderr_note
from sparseflash.runtime.iomodel import DeviceModel, QueueLevel

SIZES = (4096, 16384, 65536, 262144, 1048576)
PASSES = 2  # each (depth, size) cell is measured in this many passes over the grid; the fastest is kept
DEPTHS = (2, 4, 8, 16)  # queue depths probed beyond QD1, each with DEPTH_SIZES
DEPTH_SIZES = (4096, 65536, 262144, 1048576)
MIN_SPAN = 4  # a size is probed only if the file holds this many reads of it (distinct random offsets)


def _open_direct(path: str) -> tuple[int, bool]:
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            return os.open(path, os.O_RDONLY | flag), True
        except OSError:
            pass
    return os.open(path, os.O_RDONLY), False


def _fit(rows: list[dict]) -> tuple[float, float]:
    """(latency s, bandwidth bytes/s) of the line through (bytes, seconds per request)."""
    sizes = np.array([r["bytes"] for r in rows], dtype=np.float64)
    secs = np.array([r["median_s"] for r in rows])
    slope, intercept = np.polyfit(sizes, secs, 1)
    latency = max(float(intercept), float(secs[0]) * 0.5, 1e-7)
    bandwidth = 1.0 / slope if slope > 0 else sizes[-1] / secs[-1]
    return latency, float(bandwidth)


def _read_at(fd: int, direct: bool, view: memoryview, off: int) -> None:
    if not direct:
        os.posix_fadvise(fd, off, len(view), os.POSIX_FADV_DONTNEED)
    os.preadv(fd, [view], off)


def _qd1_rows(fd, direct, file_bytes, sizes, seconds, rng) -> list[dict]:
    """Per size: the median time of single reads at random aligned offsets. The sizes take turns (one
    read of each, in random order, per round), so a passing disturbance (another process's I/O) hits
    every size alike instead of bending the fit."""
    times: dict[int, list[float]] = {size: [] for size in sizes}
    buf = mmap.mmap(-1, max(sizes))  # page-aligned, as O_DIRECT requires
    try:
        deadline = time.perf_counter() + seconds * len(sizes)
        rounds = 0
        while (time.perf_counter() < deadline or rounds < 8) and rounds < 2000:
            for size in rng.permutation(sizes):
                size = int(size)
                off = int(rng.integers(0, (file_bytes - size) // BLOCK + 1)) * BLOCK
                with memoryview(buf)[:size] as view:
                    t = time.perf_counter()
                    _read_at(fd, direct, view, off)
                    times[size].append(time.perf_counter() - t)
            rounds += 1
    finally:
        buf.close()
    return [{"depth": 1, "bytes": size, "median_s": float(np.median(times[size])), "reads": len(times[size]),
             "mb_per_s": size / float(np.median(times[size])) / 1e6} for size in sizes]


def _depth_row(fd, direct, file_bytes, size, depth, seconds, seed) -> dict:
    """``depth`` threads reading ``size`` bytes at random aligned offsets for ``seconds``: wall time per read."""
    counts = [0] * depth
    errors: list[BaseException] = []
    start = threading.Barrier(depth + 1)
    stop = threading.Event()

    def worker(k: int) -> None:
        offs = np.random.default_rng([seed, depth, size, k]).integers(0, (file_bytes - size) // BLOCK + 1, 4096) * BLOCK
        buf = None
        try:
            buf = mmap.mmap(-1, size)  # page-aligned, as O_DIRECT requires
            start.wait()
            with memoryview(buf) as view:
                while not stop.is_set():
                    _read_at(fd, direct, view, int(offs[counts[k] % len(offs)]))
                    counts[k] += 1
        except threading.BrokenBarrierError:
            pass  # another reader failed before the start
        except BaseException as e:  # reported by the caller, in its thread
            errors.append(e)
            start.abort()
            stop.set()
        finally:
            if buf is not None:
                buf.close()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(depth)]
    for t in threads:
        t.start()
    try:
        start.wait()
    except threading.BrokenBarrierError:
        pass  # a reader failed: its error is raised below
    t0 = time.perf_counter()
    stop.wait(seconds)
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0  # every read counted was issued before stop and finished before join
    if errors:
        raise errors[0]
    reads = max(sum(counts), 1)
    return {"depth": depth, "bytes": size, "median_s": wall / reads, "reads": reads, "mb_per_s": size * reads / wall / 1e6}


def probe_file(path: str | os.PathLike, seconds_per_size: float = 0.4, seed: int = 0, depths: tuple = DEPTHS,
               seconds_per_depth: float = 0.15) -> tuple[DeviceModel, list[dict]]:
    """Probe the disk holding ``path`` by reading ``path`` (never writing); returns the fitted model
    (QD1 plus a level per depth in ``depths``) and the measured rows (``median_s``: seconds per read,
    at depth > 1 the wall time over the reads). Raises SparseflashError when the file is too small
    for two read sizes (< 64 KiB) and OSError when a read fails."""
    path = os.fspath(path)
    fd, direct = _open_direct(path)
    try:
        file_bytes = os.fstat(fd).st_size // BLOCK * BLOCK
        sizes = [s for s in SIZES if s * MIN_SPAN <= file_bytes]
        if len(sizes) < 2:
            raise SparseflashError(f"{path}: {file_bytes} bytes is too small to measure read sizes")
        rows = _qd1_rows(fd, direct, file_bytes, sizes, seconds_per_size, np.random.default_rng(seed))
        latency, bandwidth = _fit(rows)
        levels = [QueueLevel(1, latency, bandwidth)]
        depth_sizes = [s for s in DEPTH_SIZES if s in sizes]
        if len(depth_sizes) >= 2:
            # the grid is walked PASSES times, each cell for a share of its time, and each cell keeps its
            # fastest pass: a disk that stalls for a moment (seen: 42 ms a read at depth 4 for one
            # 0.15 s window, on a disk that streams at 0.8 GB/s) can only slow a pass, so the fastest is
            # the better estimate of what the device does, and one stall no longer bends a whole level
            best: dict[tuple[int, int], dict] = {}
            for k in range(PASSES):
                for depth in depths:
                    for size in depth_sizes:
                        row = _depth_row(fd, direct, file_bytes, size, depth, seconds_per_depth / PASSES,
                                         seed + k)
                        old = best.get((depth, size))
                        if old is None or row["median_s"] < old["median_s"]:
                            best[(depth, size)] = dict(row, passes=PASSES)
            for depth in depths:
                measured = [best[(depth, size)] for size in depth_sizes]
                rows += measured
                levels.append(QueueLevel(depth, *_fit(measured)))
    finally:
        os.close(fd)
    model = DeviceModel(latency_s=latency, bandwidth_bps=bandwidth, levels=tuple(levels),
                        source=f"probe of {path} ({'O_DIRECT' if direct else 'buffered + DONTNEED'}, "
                               f"reads up to {max(sizes)} B, queue depths {', '.join(str(lv.depth) for lv in levels)})")
    return model, rows


def rate_now(path: str | os.PathLike, size: int, depth: int, seconds: float = 2.0, seed: int = 0) -> float:
    """Bytes per second the disk under ``path`` gives now to ``depth`` readers of ``size``-byte reads at
    random aligned offsets of ``path`` (direct I/O): the limit to put next to a run's achieved rate
    when the disk's speed drifts (a shared device) away from the cached model's."""
    fd, direct = _open_direct(os.fspath(path))
    try:
        file_bytes = os.fstat(fd).st_size // BLOCK * BLOCK
        if file_bytes < MIN_SPAN * BLOCK:
            raise SparseflashError(f"{path}: {file_bytes} bytes is too small to measure reads")
        size = max(BLOCK, min(int(size), file_bytes // MIN_SPAN) // BLOCK * BLOCK)
        row = _depth_row(fd, direct, file_bytes, size, max(1, int(depth)), seconds, seed)
    finally:
        os.close(fd)
    return row["mb_per_s"] * 1e6


def cache_file_for(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the device model of the file system holding ``path`` is cached (OSError if ``path`` is missing)."""
    cache_dir = Path(cache_dir or os.environ.get("SPARSEFLASH_CACHE", Path.home() / ".cache" / "sparseflash"))
    return cache_dir / f"device-{os.stat(path).st_dev}.json"


def device_model_for(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                     note: Callable[[str], None] = stderr_note, refresh: bool = False) -> DeviceModel:
    """The device model of the disk holding ``path`` (a layout file): measured once per file system by
    reading ``path``, then cached as JSON in ``cache_dir`` (default: $SPARSEFLASH_CACHE or
    ~/.cache/sparseflash). When it cannot be measured, ``note`` is told why and the default
    DeviceModel is returned (not cached, so the next run tries again). ``refresh`` measures again and
    replaces the cached model (`sparseflash probe`: a shared disk's speed drifts), and raises
    instead of falling back when the disk cannot be measured."""
    try:
        cache_file = cache_file_for(path, cache_dir)
    except OSError as e:
        if refresh:
            raise
        note(f"cannot measure the disk under {path} ({e.strerror}); using the default device model")
        return DeviceModel()
    if cache_file.is_file() and not refresh:
        try:
            cached = DeviceModel.from_file(cache_file)
            if cached.levels:
                return cached
        except SparseflashError:
            pass  # a damaged cache entry, or one from before queue depths were measured, is measured again
    try:
        model, rows = probe_file(path)
    except (OSError, SparseflashError) as e:
        if refresh:
            raise
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        d = DeviceModel()
        note(f"cannot measure the disk under {path} ({reason}); using the default device model "
             f"({d.latency_s * 1e6:.0f} us + bytes / {d.bandwidth_bps / 1e9:.0f} GB/s)")
        return d
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps({**model.to_dict(), "rows": rows}))
            os.replace(tmp, cache_file)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError:
        if refresh:  # a read-only or full cache only costs a probe per run; an explicit probe must keep it
            raise
    return model
