"""Measure the disk under a layout file: QD1 random reads of 4 KiB .. 1 MiB of that file, direct I/O.

The fit time(size) = latency + size / bandwidth gives the DeviceModel that read planning and the
reports use. The probe only reads: it samples the layout file itself (the file the runtime will
stream from), so it works on read-only and full file systems and never writes next to the user's
files. Page-cache hits are not disk reads: the file is opened with O_DIRECT, or, where the file
system refuses that, dropped from the page cache before every read. When the disk cannot be measured
(the file is too small, a read fails), the default DeviceModel is used and one line says so.
"""

from __future__ import annotations

import json
import mmap
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sparseflash.errors import SparseflashError
from sparseflash.layout.format_extents import BLOCK
from sparseflash.paths import note as stderr_note
from sparseflash.runtime.iomodel import DeviceModel

SIZES = (4096, 16384, 65536, 262144, 1048576)
MIN_SPAN = 4  # a size is probed only if the file holds this many reads of it (distinct random offsets)


def _open_direct(path: str) -> tuple[int, bool]:
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            return os.open(path, os.O_RDONLY | flag), True
        except OSError:
            pass
    return os.open(path, os.O_RDONLY), False


def probe_file(path: str | os.PathLike, seconds_per_size: float = 0.4, seed: int = 0) -> tuple[DeviceModel, list[dict]]:
    """Probe the disk holding ``path`` by reading ``path`` (never writing); returns the fitted model
    and the measured rows. Raises SparseflashError when the file is too small for two read sizes
    (< 64 KiB) and OSError when a read fails."""
    path = os.fspath(path)
    fd, direct = _open_direct(path)
    try:
        file_bytes = os.fstat(fd).st_size // BLOCK * BLOCK
        sizes = [s for s in SIZES if s * MIN_SPAN <= file_bytes]
        if len(sizes) < 2:
            raise SparseflashError(f"{path}: {file_bytes} bytes is too small to measure read sizes")
        rng = np.random.default_rng(seed)
        rows = []
        buf = mmap.mmap(-1, max(sizes))  # page-aligned, as O_DIRECT requires
        try:
            for size in sizes:
                times = []
                deadline = time.perf_counter() + seconds_per_size
                while (time.perf_counter() < deadline or len(times) < 8) and len(times) < 2000:
                    off = int(rng.integers(0, (file_bytes - size) // BLOCK + 1)) * BLOCK
                    if not direct:
                        os.posix_fadvise(fd, off, size, os.POSIX_FADV_DONTNEED)
                    with memoryview(buf)[:size] as view:
                        t = time.perf_counter()
                        os.preadv(fd, [view], off)
                        times.append(time.perf_counter() - t)
                rows.append({"bytes": size, "median_s": float(np.median(times)), "reads": len(times),
                             "mb_per_s": size / float(np.median(times)) / 1e6})
        finally:
            buf.close()
    finally:
        os.close(fd)
    sizes_a = np.array([r["bytes"] for r in rows], dtype=np.float64)
    secs = np.array([r["median_s"] for r in rows])
    slope, intercept = np.polyfit(sizes_a, secs, 1)
    latency = max(float(intercept), float(secs[0]) * 0.5, 1e-7)
    bandwidth = 1.0 / slope if slope > 0 else sizes_a[-1] / secs[-1]
    model = DeviceModel(latency_s=latency, bandwidth_bps=float(bandwidth),
                        source=f"probe of {path} ({'O_DIRECT' if direct else 'buffered + DONTNEED'}, "
                               f"reads up to {max(sizes)} B)")
    return model, rows


def device_model_for(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                     note: Callable[[str], None] = stderr_note) -> DeviceModel:
    """The device model of the disk holding ``path`` (a layout file): measured once per file system by
    reading ``path``, then cached as JSON in ``cache_dir`` (default: $SPARSEFLASH_CACHE or
    ~/.cache/sparseflash). When it cannot be measured, ``note`` is told why and the default
    DeviceModel is returned (not cached, so the next run tries again)."""
    cache_dir = Path(cache_dir or os.environ.get("SPARSEFLASH_CACHE", Path.home() / ".cache" / "sparseflash"))
    try:
        device = os.stat(path).st_dev
    except OSError as e:
        note(f"cannot measure the disk under {path} ({e.strerror}); using the default device model")
        return DeviceModel()
    cache_file = cache_dir / f"device-{device}.json"
    if cache_file.is_file():
        try:
            return DeviceModel.from_file(cache_file)
        except SparseflashError:
            pass  # a damaged cache entry is measured again and replaced
    try:
        model, rows = probe_file(path)
    except (OSError, SparseflashError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        d = DeviceModel()
        note(f"cannot measure the disk under {path} ({reason}); using the default device model "
             f"({d.latency_s * 1e6:.0f} us + bytes / {d.bandwidth_bps / 1e9:.0f} GB/s)")
        return d
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.tmp-{os.getpid()}")
        try:
            tmp.write_text(json.dumps({**model.to_dict(), "rows": rows}))
            os.replace(tmp, cache_file)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError:
        pass  # a read-only or full cache only costs a probe per run
    return model
