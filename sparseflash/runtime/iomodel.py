"""How long reads take on a device: latency per request plus bytes over bandwidth.

Which blocks a set of neurons costs is a property of the file format (layout/format_extents.py);
this module prices them. The runtime's read planning merges two extents when reading the gap
between them is cheaper than a new request (``merge_gap_bytes``); reports model read time with it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from sparseflash.errors import SparseflashError
from sparseflash.layout.format_extents import BLOCK
from sparseflash.paths import input_file


@dataclass(frozen=True)
class DeviceModel:
    """Read time of one request of s bytes: latency_s + s / bandwidth_bps."""

    latency_s: float = 100e-6
    bandwidth_bps: float = 2e9
    source: str = "default"

    def read_time(self, requests: float, nbytes: float) -> float:
        return requests * self.latency_s + nbytes / self.bandwidth_bps

    @property
    def merge_gap_bytes(self) -> int:
        """Largest gap worth reading through instead of issuing a new request (whole blocks)."""
        return int(self.latency_s * self.bandwidth_bps) // BLOCK * BLOCK

    @property
    def merge_gap_blocks(self) -> int:
        return self.merge_gap_bytes // BLOCK

    def to_dict(self) -> dict:
        return {"latency_s": self.latency_s, "bandwidth_bps": self.bandwidth_bps, "source": self.source}

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> DeviceModel:
        """A device model saved as JSON (latency_s, bandwidth_bps; what the disk probe caches). A file that
        is missing, not a regular file, not such JSON or out of range is one SparseflashError line."""
        input_file(path, "device model (JSON with latency_s and bandwidth_bps)")
        try:
            with open(path) as f:
                d = json.load(f)
            model = cls(float(d["latency_s"]), float(d["bandwidth_bps"]), str(d.get("source", path)))
        except OSError as e:
            raise SparseflashError(f"{path}: cannot read the device model ({e.strerror})") from None
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise SparseflashError(f"{path}: not a device model (JSON with latency_s and bandwidth_bps)") from None
        if not (math.isfinite(model.latency_s) and model.latency_s >= 0 and math.isfinite(model.bandwidth_bps)
                and model.bandwidth_bps > 0):
            raise SparseflashError(f"{path}: device model needs latency_s >= 0 and bandwidth_bps > 0, finite")
        return model
