"""Run-time policy: what lives where and how much of it, as numbers (no code that moves bytes)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from sparseflash.errors import SparseflashError
from sparseflash.layout.schema_cache import EVICTION_WINDOW, MIN_SLOTS

EVICTION_POLICIES = ("lru", "lfu", "predicted", "forecast", "frequency", "window")
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4, "tb": 1000**4, "tib": 1024**4}
BUDGET_FORMS = "bytes (2GiB, 500MB), a share of the model's weight bytes (40%) or of its FFN bytes (25%ffn)"


@dataclass(frozen=True)
class Budget:
    """A hard bound on the weight bytes held: either ``nbytes``, or ``ffn_share``, meaning the fixed
    parts (resident tensors, predictors, index, I/O buffers) plus hot region and neuron cache
    bundles equal to that share of the FFN bytes (docs/runtime.md)."""

    nbytes: int | None = None
    ffn_share: float | None = None

    def __post_init__(self):
        if (self.nbytes is None) == (self.ffn_share is None):
            raise SparseflashError("a budget is either bytes or an FFN share, not both or neither")
        if self.nbytes is not None and (isinstance(self.nbytes, bool) or not isinstance(self.nbytes, int)
                                        or self.nbytes < 1):
            raise SparseflashError(f"--budget must be a positive number of bytes, got {self.nbytes!r}")
        if self.ffn_share is not None and not 0 < self.ffn_share <= 1:
            raise SparseflashError(f"--budget: the FFN share must be in (0, 100]%ffn, got {self.ffn_share:.2%}")

    @classmethod
    def parse(cls, text: str | int, model_weight_bytes: int) -> Budget:
        """'2GiB', '500MB', '123456' (bytes), '40%' (of the model's weight bytes) or '25%ffn'."""
        if isinstance(text, int) and not isinstance(text, bool):
            return cls(nbytes=text)
        s = str(text).strip().lower()
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*%ffn", s)
        if m:
            return cls(ffn_share=float(m.group(1)) / 100)
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*(%|[a-z]*)", s)
        if not m or (m.group(2) not in _UNITS and m.group(2) != "%"):
            raise SparseflashError(f"--budget {text!r} is not a size: use {BUDGET_FORMS}")
        value = float(m.group(1))
        if m.group(2) == "%":
            if not 0 < value <= 1000:
                raise SparseflashError(f"--budget {text!r}: a share must be in (0, 1000]%")
            return cls(nbytes=max(1, int(model_weight_bytes * value / 100)))
        if value <= 0 or int(value * _UNITS[m.group(2)]) < 1:
            raise SparseflashError(f"--budget {text!r} must be at least one byte")
        return cls(nbytes=int(value * _UNITS[m.group(2)]))

    @classmethod
    def check_text(cls, text: str | int) -> None:
        """Refuse a budget that does not parse, before any file is opened (a share needs the model's
        size to become bytes, not to be checked)."""
        cls.parse(text, 1 << 40)

    def describe(self) -> str:
        return f"FFN share {self.ffn_share:.0%}" if self.ffn_share is not None else f"budget {self.nbytes} bytes"


@dataclass(frozen=True)
class Policy:
    """Numbers that decide memory use and I/O. Sizes in bytes, windows in tokens. The CLI takes its
    defaults from here."""

    budget: Budget
    window: int = EVICTION_WINDOW  # neurons used in the last `window` tokens are protected from eviction (4)
    eviction: str = "frequency"  # beyond the window: lru | lfu | predicted | forecast | frequency | window (docs/runtime.md)
    io: str = "direct"  # direct (O_DIRECT) | buffered (page cache dropped after each read)
    io_threads: int = 4
    io_buffer_bytes: int = 1 << 20  # per thread; counted in the budget
    # prefetch layer l+1's look-ahead-predicted bundles while layer l computes (``run --lookahead``); off by
    # default since 2026-12-05: it read 5-17% more neurons and decoded no faster here (docs/fetchless.md);
    # strategy all reads the next layer ahead whatever this says (all of it is needed)
    lookahead: bool = False
    strategy: str | None = None  # predictor strategy override: topk | threshold | all
    margin: float = 0.0  # predictor safety margin: top-k grows by (1 + margin), the cut drops by margin
    # the look-ahead read's cuts sit this many logits above the layer's own: layer l+1 is read ahead only
    # where the look-ahead is surer, so fewer of its wrong guesses are read (docs/fetchless.md: 1 logit
    # read 3-6% fewer neurons at the same quality and speed on tiny-relu2)
    lookahead_raise: float = 1.0
    # cost-aware selection (docs/runtime.md): a cached neuron costs no read, a missing one costs a read;
    # before the strategy picks, cached neurons' logits get +cached_bonus and missing ones' -miss_penalty
    cached_bonus: float = 0.0
    miss_penalty: float = 0.0
    # cost-aware selection validated by prepare: where the layout records a miss cut per layer (its quality
    # gate measured it within the bound with nothing cached), a neuron not in memory is read only above it
    miss_cut: bool = True
    # eviction frequency's probation (runtime/cache.py): a neuron read with few recent uses goes first until
    # a later token uses it again; False: the rule before 2026-12-05 (for the ablation)
    probation: bool = True
    min_slots: int = MIN_SLOTS  # smallest neuron cache per layer that the engine accepts
    # split the cache among layers by the layout's cache demand (layout/schema_cache.py), where it has one;
    # False: every layer the same slots (prepare validated the miss cuts with the split)
    split_cache: bool = True
    # strategy all on the host with a cache smaller than the model: a staging region of two halves shared
    # by all layers takes the next layer's misses while a layer computes (runtime/staging.py)
    staging: bool = True
    reuse: bool = True  # False: forget every unpinned neuron at each token (the no-cache baseline)
    device: str = "cpu"  # where the neuron cache and the sparse FFN live: cpu | cuda
    verify: bool = True  # check every bundle read (digest, finite values) and resident tensors at load
    # count the truly active among the computed neurons (TokenStats.needed): None = on the host only, since
    # on cuda it copies each layer's activations back and waits for the GPU
    count_needed: bool | None = None

    @property
    def counts_needed(self) -> bool:
        return self.device == "cpu" if self.count_needed is None else self.count_needed

    def __post_init__(self):
        if not isinstance(self.budget, Budget):
            raise SparseflashError(f"internal: Policy.budget must be a Budget, got {type(self.budget).__name__}")
        if self.eviction not in EVICTION_POLICIES:
            raise SparseflashError(f"--eviction must be one of {', '.join(EVICTION_POLICIES)}")
        if self.io not in ("direct", "buffered"):
            raise SparseflashError("--io must be direct or buffered")
        if self.device not in ("cpu", "cuda"):
            raise SparseflashError("--device must be cpu or cuda")
        if not (self.cached_bonus >= 0 and self.miss_penalty >= 0):
            raise SparseflashError("--cached-bonus and --miss-penalty must be >= 0 (logits)")
        check_lookahead_raise(self.lookahead_raise)
        if self.window < 0 or self.io_threads < 1:
            raise SparseflashError("--window must be >= 0 and --io-threads >= 1")


def check_lookahead_raise(value: float) -> None:
    """Policy.lookahead_raise's range (the CLI checks it before a first run prepares the model)."""
    if not math.isfinite(value):
        raise SparseflashError(f"--lookahead-raise must be a finite number of logits, got {value}")


DEFAULT_EVICTION = Policy.eviction
