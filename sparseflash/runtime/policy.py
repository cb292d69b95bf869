"""Run-time policy: what lives where and how much of it, as numbers (no code that moves bytes)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sparseflash.errors import SparseflashError

EVICTION_POLICIES = ("lru", "lfu", "predicted", "window")
DEFAULT_EVICTION = "predicted"  # fewest bytes in io-report on the bundled model (docs/runtime.md)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}


def parse_budget(text: str, model_weight_bytes: int) -> int:
    """'2GiB', '500MB', '123456' (bytes) or '40%' (of the model's weight bytes) -> bytes."""
    s = str(text).strip().lower()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(%|[a-z]*)", s)
    if s.endswith("%ffn"):
        raise SparseflashError("internal: parse '%ffn' budgets with parse_ffn_share")
    if not m or (m.group(2) not in _UNITS and m.group(2) != "%"):
        raise SparseflashError(f"--budget {text!r} is not a size: use bytes (e.g. 2GiB, 500MB) or a share (40%)")
    value = float(m.group(1))
    if m.group(2) == "%":
        if not 0 < value <= 1000:
            raise SparseflashError(f"--budget {text!r}: a share must be in (0, 1000]%")
        return int(model_weight_bytes * value / 100)
    return int(value * _UNITS[m.group(2)])


def parse_ffn_share(text: str) -> float | None:
    """'25%ffn' -> 0.25 (hot region + neuron cache = 25% of the FFN bytes); None for other budgets."""
    s = str(text).strip().lower()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*%ffn", s)
    if not m:
        return None
    share = float(m.group(1)) / 100
    if not 0 < share <= 1:
        raise SparseflashError(f"--budget {text!r}: the FFN share must be in (0, 100]%ffn")
    return share


@dataclass(frozen=True)
class Policy:
    """Numbers that decide memory use and I/O. Sizes in bytes, windows in tokens."""

    budget_bytes: int
    window: int = 4  # neurons used in the last `window` tokens are protected from eviction
    eviction: str = DEFAULT_EVICTION  # beyond the window: lru | lfu | predicted | window
    io: str = "direct"  # direct (O_DIRECT) | buffered (page cache dropped after each read)
    io_threads: int = 4
    io_buffer_bytes: int = 1 << 20  # per thread; counted in the budget
    lookahead: bool = True  # prefetch layer l+1's predicted bundles while layer l computes
    strategy: str | None = None  # predictor strategy override: topk | threshold | all
    margin: float = 0.0  # predictor safety margin: top-k grows by (1 + margin), the cut drops by margin
    min_slots: int = 16  # smallest neuron cache per layer that the engine accepts
    reuse: bool = True  # False: forget every unpinned neuron at each token (the no-cache baseline)
    ffn_share: float | None = None  # if set, the budget is the fixed part plus this share of the FFN bytes
    device: str = "cpu"  # where the neuron cache and the sparse FFN live: cpu | cuda

    def __post_init__(self):
        if self.eviction not in EVICTION_POLICIES:
            raise SparseflashError(f"--eviction must be one of {', '.join(EVICTION_POLICIES)}")
        if self.io not in ("direct", "buffered"):
            raise SparseflashError("--io must be direct or buffered")
        if self.device not in ("cpu", "cuda"):
            raise SparseflashError("--device must be cpu or cuda")
        if self.window < 0 or self.io_threads < 1:
            raise SparseflashError("--window must be >= 0 and --io-threads >= 1")
