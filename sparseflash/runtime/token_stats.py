"""What one forward step of the streaming engine cost: ``TokenStats`` (saved by ``--stats``; every
field is defined in docs/figures.md, the timeline in docs/runtime.md)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenStats:
    """What one forward step (a token, or a prompt for prefill) cost."""

    tokens: int = 0
    predicted: int = 0  # neurons computed, summed over layers
    needed: int | None = 0  # of those, truly active (layout/schema.py); None when not counted (Policy.count_needed)
    hits: int = 0  # predicted neurons found in the cache (hot region included)
    misses: int = 0
    prefetched: int = 0  # neurons read ahead by look-ahead prefetch (used or not)
    bytes_read: int = 0
    requests: int = 0
    io_wait_s: float = 0.0
    model_read_s: float = 0.0  # the device model's time for the same reads at the reader's queue depth
    predictor_s: float = 0.0
    ffn_s: float = 0.0  # the sparse kernel (compute step)
    attention_s: float = 0.0  # attention only (timed by Transformer); norms, embedding, adds go to other_s
    head_s: float = 0.0  # final norm and LM head: from the last FFN to the end of the step
    token_s: float = 0.0  # wall time of the whole forward step (Transformer.forward)
    per_layer_predicted: list = field(default_factory=list)
    # per layer, in order: [attention_s, predict_s, io_wait_s, compute_s, other_s, read_bytes, prefetch_bytes];
    # other_s is the FFN step's bookkeeping (planning, cache index, hand-offs) plus the norms and residual
    # adds between the previous FFN and this one (all but attention). The spans add up:
    # sum(attention + predict + io_wait + compute + other) + head_s == token_s (docs/runtime.md)
    timeline: list = field(default_factory=list)
    read_spans: list = field(default_factory=list)  # (start, end) perf_counter stamps of every read that landed

    @property
    def read_busy_s(self) -> float:
        """Wall time during which at least one of the step's reads was in flight (union of spans)."""
        busy, reach = 0.0, float("-inf")
        for a, b in sorted(self.read_spans):
            if b > reach:
                busy += b - max(a, reach)
                reach = b
        return busy

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "read_spans"}
        out["read_busy_s"] = self.read_busy_s
        return out

    TIMELINE_FIELDS = ("attention_s", "predict_s", "io_wait_s", "compute_s", "other_s", "read_bytes",
                       "prefetch_bytes")

    def add_read(self, result, seconds: float) -> None:
        self.bytes_read += result.bytes
        self.requests += result.requests
        self.io_wait_s += seconds
        self.model_read_s += result.model_s
        if result.requests:
            self.read_spans.append((result.start, result.end))
