"""Measure the disk under a directory: QD1 random reads of 4 KiB .. 1 MiB, direct I/O.

The fit time(size) = latency + size / bandwidth gives the DeviceModel that read planning and the
reports use. Page-cache hits are not disk reads: the probe opens its file with O_DIRECT, or, where
the file system refuses that, drops the file from the page cache before every read.
"""

from __future__ import annotations

import mmap
import os
import time
from pathlib import Path

import numpy as np

from sparseflash.errors import SparseflashError
from sparseflash.layout.format_extents import BLOCK
from sparseflash.runtime.iomodel import DeviceModel

SIZES = (4096, 16384, 65536, 262144, 1048576)


def _open_direct(path: str) -> tuple[int, bool]:
    flag = getattr(os, "O_DIRECT", 0)
    if flag:
        try:
            return os.open(path, os.O_RDONLY | flag), True
        except OSError:
            pass
    return os.open(path, os.O_RDONLY), False


def probe_disk(directory: str | os.PathLike, file_bytes: int = 128 << 20, seconds_per_size: float = 0.4,
               seed: int = 0) -> tuple[DeviceModel, list[dict]]:
    """Probe the disk holding ``directory``; returns the fitted model and the measured rows."""
    directory = Path(directory)
    path = directory / f".sparseflash-probe-{os.getpid()}"
    rng = np.random.default_rng(seed)
    try:
        with open(path, "wb") as f:  # incompressible, so no device compresses it away
            chunk = rng.integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
            for _ in range(file_bytes // len(chunk)):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        fd, direct = _open_direct(str(path))
        rows = []
        try:
            buf = mmap.mmap(-1, max(SIZES))  # page-aligned, as O_DIRECT requires
            for size in SIZES:
                view = memoryview(buf)[:size]
                times = []
                deadline = time.perf_counter() + seconds_per_size
                while (time.perf_counter() < deadline or len(times) < 8) and len(times) < 2000:
                    off = int(rng.integers(0, (file_bytes - size) // BLOCK)) * BLOCK
                    if not direct:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                    t = time.perf_counter()
                    os.preadv(fd, [view], off)
                    times.append(time.perf_counter() - t)
                rows.append({"bytes": size, "median_s": float(np.median(times)), "reads": len(times),
                             "mb_per_s": size / float(np.median(times)) / 1e6})
            view.release()
            buf.close()
        finally:
            os.close(fd)
    finally:
        path.unlink(missing_ok=True)
    sizes = np.array([r["bytes"] for r in rows], dtype=np.float64)
    secs = np.array([r["median_s"] for r in rows])
    slope, intercept = np.polyfit(sizes, secs, 1)
    latency = max(float(intercept), float(secs[0]) * 0.5, 1e-7)
    bandwidth = 1.0 / slope if slope > 0 else sizes[-1] / secs[-1]
    model = DeviceModel(latency_s=latency, bandwidth_bps=float(bandwidth),
                        source=f"probe of {directory} ({'O_DIRECT' if direct else 'buffered + DONTNEED'})")
    return model, rows


def device_model_for(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> DeviceModel:
    """The device model of the disk holding ``path``: probed once per file system, then cached
    as JSON in ``cache_dir`` (default: $SPARSEFLASH_CACHE or ~/.cache/sparseflash)."""
    import json

    directory = Path(path).resolve().parent
    cache_dir = Path(cache_dir or os.environ.get("SPARSEFLASH_CACHE", Path.home() / ".cache" / "sparseflash"))
    cache_file = cache_dir / f"device-{os.stat(directory).st_dev}.json"
    if cache_file.exists():
        try:
            return DeviceModel.from_file(cache_file)
        except SparseflashError:
            pass  # a damaged cache entry is measured again and replaced
    model, rows = probe_disk(directory)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({**model.to_dict(), "rows": rows}))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only cache only costs a probe per run
    return model
