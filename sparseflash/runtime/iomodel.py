"""How long reads take on a device: latency per request plus bytes over bandwidth, per queue depth.

Which blocks a set of neurons costs is a property of the file format (layout/format_extents.py);
this module prices them. A device answers q requests in flight faster than one at a time, so the
model keeps one linear fit per measured queue depth q (``QueueLevel``): n requests of N bytes in
all, issued q at a time, take n * latency + N / bandwidth of wall time, where latency is the wall
time a request adds at that depth (the device's latency shared by the q in flight) and bandwidth
the aggregate transfer rate at that depth. QD1's fit is ``latency_s`` / ``bandwidth_bps``; a model
with no measured depths (an old cache file, the default) knows only QD1 and prices every depth so.

The runtime's read planning asks it three things: how many reads to keep in flight and how large
each may be (``plan_io``), and when to read through the gap between two extents rather than issue
a new request (``merge_gap_bytes``: reading g bytes costs less than one request's latency).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from sparseflash.errors import SparseflashError
from sparseflash.layout.format_extents import BLOCK
from sparseflash.paths import input_file

DEFAULT_IO = (4, 1 << 20)  # (reads in flight, bytes per read) without a measured queue-depth model
REQUEST_SIZES = tuple(BLOCK << k for k in range(9))  # 4 KiB .. 1 MiB: the request sizes plan_io considers
GOOD_ENOUGH = 0.95  # plan_io's choices reach this share of the best modelled throughput
# Each piece's check and commit run on its I/O thread after the read: with one read in flight the disk
# idles meanwhile, which the probe (bare reads) does not see. Plans keep at least this many in flight.
MIN_IN_FLIGHT = 2


@dataclass(frozen=True)
class QueueLevel:
    """The linear fit at ``depth`` reads in flight: wall seconds per request, aggregate bytes/s."""

    depth: int
    latency_s: float
    bandwidth_bps: float

    def throughput(self, request_bytes: float) -> float:
        """Aggregate bytes/s of requests of ``request_bytes`` kept ``depth`` in flight."""
        return request_bytes / (self.latency_s + request_bytes / self.bandwidth_bps)


@dataclass(frozen=True)
class DeviceModel:
    """Read time of one request of s bytes at QD1: latency_s + s / bandwidth_bps; ``levels``: the fits
    at other measured queue depths (QD1 included when measured)."""

    latency_s: float = 100e-6
    bandwidth_bps: float = 2e9
    source: str = "default"
    levels: tuple[QueueLevel, ...] = ()

    def level(self, depth: int = 1) -> QueueLevel:
        """The fit for ``depth`` reads in flight: the deepest measured level not above it (QD1 when none)."""
        below = [lv for lv in self.levels if lv.depth <= depth]
        return max(below, key=lambda lv: lv.depth) if below else QueueLevel(1, self.latency_s, self.bandwidth_bps)

    @property
    def depths(self) -> tuple[int, ...]:
        """Measured queue depths (just 1 for a QD1-only model)."""
        return tuple(sorted({1, *(lv.depth for lv in self.levels)}))

    def read_time(self, requests: float, nbytes: float, depth: int = 1) -> float:
        """Seconds for ``requests`` reads of ``nbytes`` in all, at most ``depth`` in flight (never more
        in flight than there are requests). At depth 1, ``requests`` and ``nbytes`` may be arrays."""
        if depth <= 1:
            return requests * self.latency_s + nbytes / self.bandwidth_bps
        lv = self.level(max(1, min(depth, math.ceil(requests))))
        return requests * lv.latency_s + nbytes / lv.bandwidth_bps

    def gap_bytes(self, depth: int = 1) -> int:
        """Largest gap worth reading through instead of issuing a new request at ``depth`` (whole blocks)."""
        lv = self.level(depth)
        return int(lv.latency_s * lv.bandwidth_bps) // BLOCK * BLOCK

    @property
    def merge_gap_bytes(self) -> int:
        """The QD1 gap (reports that model one request at a time)."""
        return self.gap_bytes(1)

    @property
    def merge_gap_blocks(self) -> int:
        return self.merge_gap_bytes // BLOCK

    def plan_io(self, max_request_bytes: int = 1 << 20, memory_bytes: int = 32 << 20, max_depth: int = 16,
                request_bytes: int | None = None) -> tuple[int, int]:
        """(reads in flight, bytes per read) for streaming: among measured depths <= ``max_depth`` and
        request sizes <= ``max_request_bytes`` (or exactly ``request_bytes``) whose buffers (depth x
        size) fit ``memory_bytes`` and that reach GOOD_ENOUGH of the best modelled throughput: the
        largest requests (fewest pieces, each costing the host CPU time), then the fewest in flight, but not
        fewer than MIN_IN_FLIGHT (a read overlaps the previous piece's check) where such a depth was
        measured and fits. Without depths measured beyond QD1: DEFAULT_IO, cut to the limits."""
        if request_bytes is not None:
            sizes = [max(BLOCK, request_bytes // BLOCK * BLOCK)]
        else:
            sizes = [s for s in REQUEST_SIZES if s <= max_request_bytes] or [BLOCK]
        if len(self.depths) < 2:  # nothing measured beyond QD1: the model cannot tell, keep the default
            size = sizes[0] if request_bytes is not None else max(BLOCK, min(DEFAULT_IO[1], max_request_bytes))
            return max(1, min(DEFAULT_IO[0], max_depth, memory_bytes // size)), size
        def options_at(depths):
            return [(self.level(q).throughput(s), q * s, q, s) for q in depths if q <= max_depth
                    for s in sizes if q * s <= memory_bytes]

        options = (options_at([q for q in self.depths if q >= MIN_IN_FLIGHT]) or options_at(self.depths)
                   or [(0.0, sizes[0], 1, sizes[0])])
        best = max(o[0] for o in options)
        _, _, depth, size = min((o for o in options if o[0] >= GOOD_ENOUGH * best), key=lambda o: (-o[3], o[2]))
        return depth, size

    def to_dict(self) -> dict:
        out = {"latency_s": self.latency_s, "bandwidth_bps": self.bandwidth_bps, "source": self.source}
        if self.levels:
            out["levels"] = [{"depth": lv.depth, "latency_s": lv.latency_s, "bandwidth_bps": lv.bandwidth_bps}
                             for lv in self.levels]
        return out

    @classmethod
    def from_dict(cls, d: dict, where: str = "device model") -> DeviceModel:
        """A model from ``to_dict``'s JSON; ``levels`` is optional (files written before queue depths
        were measured hold QD1 only). Bad values are one SparseflashError line naming ``where``."""
        try:
            levels = tuple(sorted((QueueLevel(int(lv["depth"]), float(lv["latency_s"]), float(lv["bandwidth_bps"]))
                                   for lv in d.get("levels", ())), key=lambda lv: lv.depth))
            model = cls(float(d["latency_s"]), float(d["bandwidth_bps"]), str(d.get("source", where)), levels)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise SparseflashError(f"{where}: not a device model (JSON with latency_s and bandwidth_bps)") from None
        for lv in (QueueLevel(1, model.latency_s, model.bandwidth_bps), *levels):
            if not (math.isfinite(lv.latency_s) and lv.latency_s >= 0 and math.isfinite(lv.bandwidth_bps)
                    and lv.bandwidth_bps > 0 and lv.depth >= 1):
                raise SparseflashError(f"{where}: device model needs latency_s >= 0 and bandwidth_bps > 0, finite "
                                       "(and queue depths >= 1)")
        return model

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> DeviceModel:
        """A device model saved as JSON (latency_s, bandwidth_bps, optional levels; what the disk probe
        caches). A file that is missing, not a regular file, not such JSON or out of range is one
        SparseflashError line."""
        input_file(path, "device model (JSON with latency_s and bandwidth_bps)")
        try:
            with open(path) as f:
                d = json.load(f)
        except OSError as e:
            raise SparseflashError(f"{path}: cannot read the device model ({e.strerror})") from None
        except (ValueError, UnicodeDecodeError):
            raise SparseflashError(f"{path}: not a device model (JSON with latency_s and bandwidth_bps)") from None
        if not isinstance(d, dict):
            raise SparseflashError(f"{path}: not a device model (JSON with latency_s and bandwidth_bps)")
        return cls.from_dict({**d, "source": d.get("source", str(path))}, str(path))
