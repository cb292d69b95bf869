"""The memory `prepare` will need, stage by stage, from the checkpoint's shapes and the parameters.

Every stage reads the checkpoint one layer at a time (calibration.LayerPass), so its peak is

    baseline + one layer as stored + two of its tensors widened to float32 + the hidden states of
    the windows it moves (unless spilled to a file) + what it keeps of a layer (its working set)

where the working set is, per stage (B = bytes per value: activations float32 4, inputs float16 2):
- threshold sample: the sample's activations and their nonzero magnitudes (2 x sample tokens x
  neurons x 4), 32 MiB for sorting the candidates' sample, W_down transposed for the CETT sweep
  (neurons x d x 4);
- PPL-p% search: a batch's activations only;
- calibration: packed masks of both threshold sets (2 x tokens x neurons / 8) and a block of
  co-activation rows (the whole int32 n x n table when it is kept, n <= 4,096);
- predictors: the layer's FFN inputs (float16) and masks (packed and unpacked), for the training and
  held-out tokens, the previous layer's inputs (float16), the tune slice's neuron magnitudes (float16,
  for the cost-aware miss cuts); the held-out streams' hidden states (dense, oracle, both strategies,
  one per miss cut); on top, the largest of three phases
  that never overlap: a forward batch's activations, training (a training batch's scores and their
  temporaries, 14 x batch x neurons x 4, plus the predictor with its gradient and Adam moments;
  twice that while a layer's predictor and its look-ahead train side by side) and scoring the held-out tokens (float32 scores and int64 ranks, tokens x neurons); each layer's
  predictors go to a file as soon as they are trained;
- predictors saved: the per-layer files joined into one (every predictor loaded and serialized);
- layout: the ordering's mask sample (8,192 tokens x neurons x 3 bytes), a block of bundles
  (BUNDLE_BLOCK neurons), a block of embedding / head rows (ROW_BLOCK_BYTES as read and converted).
A batch's activations (batch x ctx x (6 neurons + 12 d) x 4 plus attention scores) and the
output-head block (layerwise.head_block_bytes(batch) as read and widened, plus its logits) come on
top of every pass. docs/prepare.md
has the same formula with worked figures; bench/bench_prepare.py measures it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from sparseflash.errors import SparseflashError
from sparseflash.layout.cache_demand import DEMAND_TOKENS
from sparseflash.layout.format_extents import COST_CHUNK_BYTES
from sparseflash.layout.layout_weights import ROW_BLOCK_BYTES
from sparseflash.layout.miss_mix import probe_windows
from sparseflash.layout.params import PredictorParams, TrainParams
from sparseflash.layout.predictor_training import rank_candidates
from sparseflash.model.layerwise import head_block_bytes
from sparseflash.model.source import CheckpointSource
from sparseflash.units import fmt_bytes

SLACK = 1.10  # allocator fragmentation and small temporaries
ORDER_SAMPLE_TOKENS = 8192  # layout/build.py's sample of masks for measuring candidate orders
BUNDLE_BLOCK = 1024  # neurons packed at a time by layout/build.py


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per stage and component; ``peak`` is the largest stage total (times SLACK) plus the baseline.
    ``batch``, ``cett_tokens`` and ``spill_bytes`` are the settings the plan was made for (lowered
    from the parameters' when a --memory limit asked for it; ``lowered`` says what was)."""

    baseline: int
    stages: dict[str, dict[str, int]] = field(default_factory=dict)
    spill_bytes: int | None = None  # hidden states per stream above this go to temporary files
    batch: int = 8  # windows per forward batch
    cett_tokens: int = 0  # threshold-search sample (tokens)
    train_jobs: int = 2  # predictor trainings side by side
    lowered: tuple[str, ...] = ()

    def total(self, stage: str) -> int:
        return int(sum(self.stages[stage].values()) * SLACK)

    @property
    def peak_stage(self) -> str:
        return max(self.stages, key=self.total)

    @property
    def peak(self) -> int:
        return self.baseline + self.total(self.peak_stage)

    def text(self) -> str:
        s = self.peak_stage
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in self.stages[s].items() if v)
        spill = ("hidden states in memory" if self.spill_bytes is None else "every stream's hidden states in "
                 "temporary files" if self.spill_bytes == 0 else
                 f"hidden states over {fmt_bytes(self.spill_bytes)} per stream in temporary files")
        low = f"; lowered to fit: {', '.join(self.lowered)}" if self.lowered else ""
        return (f"expected peak memory {fmt_bytes(self.peak)} in the {s} stage: baseline {fmt_bytes(self.baseline)} + "
                f"({parts}) x {SLACK:.2f}; {spill}; {self.batch} windows a batch{low}")

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "peak": self.peak, "peak_stage": self.peak_stage,
                "spill_bytes": self.spill_bytes, "batch": self.batch, "cett_tokens": self.cett_tokens,
                "train_jobs": self.train_jobs,
                "lowered": list(self.lowered), "stages": {s: dict(v) for s, v in self.stages.items()},
                "stage_totals": {s: self.total(s) for s in self.stages}}


def _states(tokens: int, d: int, spill: int | None) -> int:
    """Bytes of one stream's float32 hidden states held in memory."""
    nbytes = tokens * d * 4
    return 0 if spill is not None and nbytes > spill else nbytes


def plan_prepare(source: CheckpointSource, params, baseline: int = 0, spill_bytes: int | None = None,
                 ctx: int = 256, batch: int = 8, coact_block_bytes: int = 64 << 20,
                 cett_tokens: int | None = None, train_jobs: int = 2) -> MemoryPlan:
    """The memory plan of `prepare` (params: layout/params.PrepareParams) on ``source``, with
    ``batch`` windows a batch, a threshold sample of ``cett_tokens`` (default: the params') and
    ``train_jobs`` predictor trainings side by side."""
    c = source.config
    d, n = c.hidden_size, c.intermediate_size
    largest = max(source.numel(k) for k in source.tensors if k.startswith("layers."))
    layer = source.stored_layer_bytes() + 2 * largest * 4  # the layer as stored + two tensors widened to float32
    t_batch = batch * ctx
    per_batch = t_batch * (6 * n + 12 * d) * 4 + 2 * batch * c.num_heads * ctx * ctx * 4
    head_rows = min(c.vocab_size, max(1, head_block_bytes(batch) // (4 * d)))
    head = 2 * head_rows * d * 4 + 3 * batch * ctx * head_rows * 4  # rows as read and widened, their logits
    common = {"layer": layer, "batch activations": per_batch, "head block": head}
    p = params
    sample = min(p.cett_tokens if cett_tokens is None else cett_tokens, p.profile_tokens)
    held = p.heldout_tokens
    coact = coact_block_bytes + (n * n * 4 if n <= 4096 else 0)
    preds_tokens, val = p.predictor_tokens, p.heldout_tokens
    mean_rank = p.rank or rank_candidates(d, n, c.ffn_param_count(), PredictorParams())[-1]  # the largest tried
    rank = mean_rank * 2 if p.rank_spread else mean_rank  # a layer's, spread by active share: at most twice the mean
    training = train_jobs * (14 * TrainParams.batch * n * 4 + 4 * rank * (d + n + 1) * 4)
    all_predictors = 2 * c.num_layers * (mean_rank * (d + n + 1) + n) * 4  # a layer's and its look-ahead, float32
    phase = max(per_batch, training, val * n * 16)  # forward, training and scoring never overlap
    # per-layer miss cuts: the probe stream (a few held-out windows once per layer), then a second pass
    probes = (len(probe_windows(val // ctx, c.num_layers, PredictorParams.probe_budget)) * ctx * c.num_layers
              if p.per_layer_cuts else 0)
    mixes = len(PredictorParams.mix_targets) * (1 + len(p.larger_miss_shares)) if p.per_layer_cuts else 0
    layout_head = 2 * min(c.vocab_size, max(1, ROW_BLOCK_BYTES // (4 * d))) * d * 4
    stages = {
        # the sample's activations, their nonzero magnitudes (candidates, <= 4M sorted), W_down transposed
        "threshold sample": {**common, "hidden states": _states(sample, d, spill_bytes) + _states(held, d, spill_bytes),
                             "sample activations": 2 * sample * n * 4 + (32 << 20) + n * d * 4},
        "PPL-p% search": {**common, "hidden states": _states(held, d, spill_bytes)},
        "calibration": {**common, "hidden states": _states(p.profile_tokens, d, spill_bytes),
                        "masks + co-activation": 2 * p.profile_tokens * n // 8 + coact},
        "predictors": {"layer": layer, "head block": head,
                       # dense, oracle, both strategies and one per cost-aware miss cut (held-out streams)
                       "hidden states": _states(preds_tokens, d, spill_bytes)
                       + (4 + len(p.miss_recalls) * (1 + len(p.larger_miss_shares)))
                       * _states(val, d, spill_bytes) + _states(probes, d, spill_bytes),
                       # inputs twice (float16, kept and the previous layer's), packed and bool masks, and the
                       # tune slice's magnitudes (float16) for the miss cuts
                       "inputs + masks": (preds_tokens + val) * (2 * d * 2 + n // 8 + n)
                       + int(preds_tokens * PredictorParams.tune_share) * n * 2,
                       "batch, training or scoring": phase,
                       # the cache-demand replay before the pass (layout/cache_demand.py): a layer's masks, bool and
                       # packed, and the zstd reader's window; counted through the pass (the heap keeps ~4 MiB)
                       "cache demand": (DEMAND_TOKENS * n * 2 + DEMAND_TOKENS * n // 8 + (8 << 20)) if p.split_cache else 0},
        "per-layer cuts": {"layer": layer, "head block": head, "batch activations": per_batch,
                           "hidden states": mixes * _states(val, d, spill_bytes)},
        # the per-layer files joined into one once the pass has let go of its memory: loaded + serialized
        "predictors saved": {"all predictors": 2 * all_predictors},
        "layout": {"layer": layer, "ordering masks": 3 * min(ORDER_SAMPLE_TOKENS, p.profile_tokens) * n
                   + 2 * p.profile_tokens * n // 8 + 4 * COST_CHUNK_BYTES, "bundle block": BUNDLE_BLOCK * (3 * d) * 4 * 3,
                   "head block": layout_head},
    }
    return MemoryPlan(baseline, stages, spill_bytes, batch, sample, train_jobs)


SPILL_BYTES = 8 << 20  # a stream's hidden states above this go to a file once memory is short
MIN_CETT_TOKENS = 1024  # the threshold sample is never lowered below this


def fit_plan(source: CheckpointSource, params, limit: int | None, baseline: int = 0, **kw) -> MemoryPlan:
    """The plan for ``params``; with a ``limit`` (bytes) and a plan over it, lowers in turn what
    costs no accuracy (fewer windows a batch: 4, 2, 1, each tried with two predictor trainings side
    by side and then one at a time; then hidden states to temporary files, likewise: first those over
    SPILL_BYTES, then every stream's, as the held-out streams are many and small when held-out text
    is short), then the threshold-search sample (halved, down to MIN_CETT_TOKENS), and refuses with
    the numbers when even that is over."""
    plan = plan_prepare(source, params, baseline, **kw)
    if limit is None or plan.peak <= limit:
        return plan
    sample = min(params.cett_tokens, params.profile_tokens)
    tries = [(None, b, sample, j) for b in (8, 4, 2, 1) for j in (2, 1)][1:]  # the first is the plan above
    tries += [(SPILL_BYTES, b, sample, j) for b in (8, 4, 2, 1) for j in (2, 1)]
    tries += [(0, b, sample, j) for b in (8, 4, 2, 1) for j in (2, 1)]  # every stream, however small, to files
    while sample // 2 >= MIN_CETT_TOKENS:
        sample //= 2
        tries.append((0, 1, sample, 1))
    for spill, batch, cett, jobs in tries:
        plan = plan_prepare(source, params, baseline, spill_bytes=spill, batch=batch, cett_tokens=cett,
                            train_jobs=jobs, **kw)
        if plan.peak <= limit:
            lowered = [] if spill is None else ["hidden states to temporary files"]
            if jobs == 1:
                lowered.append("one predictor training at a time")
            if batch != 8:
                lowered.append(f"{batch} windows a batch")
            if cett != min(params.cett_tokens, params.profile_tokens):
                lowered.append(f"threshold sample {cett} tokens")
            return replace(plan, lowered=tuple(lowered))
    raise SparseflashError(f"prepare needs about {fmt_bytes(plan.peak)} even with hidden states in temporary "
                           f"files, 1 window a batch and a {plan.cett_tokens}-token threshold sample, more than "
                           f"--memory {fmt_bytes(limit)}: {plan.text()}; lower --tokens or --heldout-tokens, or "
                           f"allow more memory")
