"""Parameters of the preparation stages (profile, predictors, layout, prepare, compression plugins),
with their defaults.

This is the one place each default is written: the stages take these dataclasses and the command
line reads its defaults from them. Importing this module is cheap (no torch), so the CLI can.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sparseflash.errors import SparseflashError

ORDERS = ("coact", "frequency", "identity")  # neuron orders (layout/ordering.py)
THRESHOLD_SETS = ("ppl", "cett")  # which profile thresholds define "active"
LAYOUT_DTYPES = ("f16", "bf16", "f32", "q8", "q4")  # q8/q4: GGUF Q8_0/Q4_0 arithmetic along d (kernels/quant.py)
ZSTD_LEVELS = (1, 22)  # zstd's ordinary levels (python-zstandard's MAX_COMPRESSION_LEVEL is 22)


def check_int(flag: str, value, lo: int, hi: int | None = None) -> None:
    """Refuse ``value`` unless it is an integer in [lo, hi] (hi None: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        accepted = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise SparseflashError(f"{flag} must be {accepted}, got {value!r}")


def check_float(flag: str, value, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> None:
    """Refuse ``value`` unless it is a finite number in the interval (open ends as flagged)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
        (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise SparseflashError(f"{flag} must be a number in {interval}, got {value!r}")


@dataclass(frozen=True)
class ProfileParams:
    tokens: int = 50_000  # calibration tokens
    ctx: int = 256  # window length (tokens)
    cett_bound: float = 0.2
    ppl_p: float = 1.0  # percent perplexity rise allowed
    cett_tokens: int = 16384  # tokens sampled for the threshold search
    ppl_tokens: int = 8192  # held-out tokens for the PPL-p% search
    candidates: int = 1000  # magnitude quantiles tried as thresholds
    ppl_steps: int = 10  # bisection steps on the common CETT bound
    batch: int = 8  # windows per forward pass
    spill_bytes: int | None = None  # a stream's hidden states above this go to a temporary file (None: never)
    coact_block_bytes: int = 64 << 20  # co-activation counts are built this many bytes of rows at a time

    def __post_init__(self):
        check_int("--tokens", self.tokens, 1)
        check_int("--ctx", self.ctx, 2)
        check_float("--cett", self.cett_bound, 0, 1)
        check_float("--ppl-p", self.ppl_p, 0, math.inf, lo_open=True, hi_open=True)
        check_int("--cett-tokens", self.cett_tokens, 1)
        check_int("--ppl-tokens", self.ppl_tokens, 1)
        check_int("candidates", self.candidates, 1)
        check_int("--ppl-steps", self.ppl_steps, 0)
        check_int("batch", self.batch, 1)


@dataclass(frozen=True)
class TrainParams:
    epochs: int = 30
    batch: int = 512
    lr: float = 1e-2
    weight_decay: float = 0.0
    max_pos_weight: float = 30.0  # cap on the positive-class weight of the BCE
    seed: int = 0

    def __post_init__(self):
        check_int("--epochs", self.epochs, 1)
        check_int("batch", self.batch, 1)
        check_float("lr", self.lr, 0, math.inf, lo_open=True, hi_open=True)
        check_float("weight_decay", self.weight_decay, 0, math.inf, hi_open=True)
        check_float("max_pos_weight", self.max_pos_weight, 0, math.inf, lo_open=True, hi_open=True)


@dataclass(frozen=True)
class PredictorParams:
    tokens: int = 40_960  # training tokens
    val_tokens: int = 8192  # held-out tokens for every reported figure
    ctx: int = 256
    thresholds: str = "ppl"  # which profile thresholds define "active": ppl | cett
    size_share: float = 0.025  # predictor / FFN values per layer: the smallest rank the choice tries
    # rank 0: chosen by measurement at the first layer: size_share's rank, x2, x4, ... up to max_size_share,
    # each trained for rank_epochs; the smallest whose neurons selected at target_recall (tune slice) are
    # within rank_tolerance of the fewest is the mean rank; each layer's rank follows its active share (from
    # the profile) to the power rank_spread, with the same total (predictor_training.spread_ranks; 0: the
    # same rank for every layer). A tuple gives each layer its own rank.
    rank: int | tuple[int, ...] = 0
    rank_spread: float = 0.5
    max_size_share: float = 0.1
    max_rank: int = 64  # nor above this (unless size_share's rank is): larger ranks were not seen to help
    rank_epochs: int = 8
    rank_tolerance: float = 0.1
    topk_factor: float = 2.0  # top-k strategy predicts this many times the mean active count
    target_recall: float = 0.99  # the threshold strategy's cut is tuned for this recall
    tune_share: float = 0.1  # share of training tokens held back to tune k and the cut
    # cost-aware selection, validated: for each target share of the active neurons' contribution, a logit
    # cut that neurons not in memory must pass (tuned on the tune slice), and the held-out perplexity when
    # every neuron must pass it (nothing cached: the sparsest the runtime can compute); prepare's quality
    # gate keeps the lowest target within its bound (docs/fetchless.md); steps of 0.01 where the bound is
    # usually met, since one step there moves reads by 5-10% (0.98 -> 0.95 alone was 20%); 0.85 and 0.8 for
    # layers that lose little quality there (a per-layer mix takes them: the ReGLU model's three last layers)
    miss_recalls: tuple[float, ...] = (0.995, 0.99, 0.98, 0.97, 0.96, 0.95, 0.93, 0.9, 0.85, 0.8)
    # the validation's cache holds this share of each layer's neurons (the runtime applies a miss cut only
    # where its cache, hot region included, is at least as large)
    miss_share: float = 0.25
    # the candidates are validated again with these larger caches: a run whose cache holds one of these
    # shares applies the sparsest cut validated at the largest share it holds
    larger_miss_shares: tuple[float, ...] = (0.5,)
    # with a miss cut, a neuron in memory is computed down to a lower cut: the one that keeps this share of
    # the active neurons' contribution (tuned as the miss cuts; never above the threshold cut): computing it
    # costs no read, and the quality it buys is what lets the gate keep a stricter miss cut
    cached_share: float = 0.9995
    # per-layer miss cuts (layout/miss_mix.py): the per-layer probes may take this many held-out streams'
    # worth of work (0: none, one cut for every layer); mixes are planned for these shares of the room
    # between the threshold strategy's rise and mix_bound_pct, and validated over the held-out text
    probe_budget: float = 3.0
    # 0.4 and 0.2: the fitted rise errs low by 0.1-0.4 points, so the mixes planned for the upper targets can
    # all fail validation by a hair while a cautious one passes (a ReGLU model: 28% fewer reads at 25%)
    mix_targets: tuple[float, ...] = (1.2, 1.0, 0.8, 0.6, 0.4, 0.2)
    mix_bound_pct: float = 1.0  # prepare passes its gate's bound (a later --gate-rise reuses the mixes)
    # split the cache among layers by their demand (layout/schema_cache.py, measured from the profile's
    # masks and recorded for the runtime): the candidates are validated with the caches such a split gives
    # each layer at each share; hot_fraction as the layout's (LayoutParams), for that split's hot regions
    split_cache: bool = True
    hot_fraction: float = 0.1
    lookahead: bool = True
    train: TrainParams = TrainParams()
    train_jobs: int = 2  # trainings side by side (a layer's and its look-ahead's), one core each
    batch: int = 8  # windows per forward pass
    spill_bytes: int | None = None  # hidden states / recorded inputs above this go to temporary files

    def __post_init__(self):
        check_int("--tokens", self.tokens, 1)
        check_int("--val-tokens", self.val_tokens, 1)
        check_int("--ctx", self.ctx, 2)
        if self.thresholds not in THRESHOLD_SETS:
            raise SparseflashError(f"--thresholds must be ppl or cett, got {self.thresholds!r}")
        check_float("--size-share", self.size_share, 0, 1, lo_open=True)
        check_float("max_size_share", self.max_size_share, 0, 1, lo_open=True)
        check_int("rank_epochs", self.rank_epochs, 1)
        check_float("--rank-spread", self.rank_spread, 0, 4)
        check_int("max_rank", self.max_rank, 1)
        check_float("rank_tolerance", self.rank_tolerance, 0, math.inf, hi_open=True)
        for r in self.rank if isinstance(self.rank, tuple) else (self.rank,):
            check_int("--rank", r, 0)
        check_float("--topk-factor", self.topk_factor, 0, math.inf, lo_open=True, hi_open=True)
        check_float("--target-recall", self.target_recall, 0, 1, lo_open=True)
        check_float("tune_share", self.tune_share, 0, 1, lo_open=True, hi_open=True)
        for r in self.miss_recalls:
            check_float("--miss-recalls", r, 0, 1, lo_open=True)
        check_float("miss_share", self.miss_share, 0, 1, lo_open=True)
        check_float("--hot-fraction", self.hot_fraction, 0, 1, hi_open=True)
        for s in self.larger_miss_shares:
            check_float("larger_miss_shares", s, self.miss_share, 1, lo_open=True)
        check_float("cached_share", self.cached_share, 0, 1, lo_open=True)
        check_float("probe_budget", self.probe_budget, 0, math.inf, hi_open=True)
        for f in self.mix_targets:
            check_float("mix_targets", f, 0, 2)
        check_float("mix_bound_pct", self.mix_bound_pct, 0, math.inf, hi_open=True)
        check_int("train_jobs", self.train_jobs, 1)


@dataclass(frozen=True)
class LayoutParams:
    """How a layout is made."""

    order: str = "coact"  # coact | frequency | identity (ordering.py)
    dtype: str = "f16"  # FFN bundle storage
    resident_dtype: str | None = None  # attention, embeddings, head; None: as dtype, or f16 when dtype is quantized
    hot_fraction: float = PredictorParams.hot_fraction  # share of each layer's neurons pinned resident (the most frequent)
    thresholds: str = "ppl"  # which profile thresholds define "active": ppl | cett
    zstd_level: int | None = None  # None: FFN chunks raw (streaming needs raw chunks)

    @property
    def resident(self) -> str:
        """The storage of resident matrices in force."""
        if self.resident_dtype is not None:
            return self.resident_dtype
        return "f16" if self.dtype in ("q8", "q4") else self.dtype

    def __post_init__(self):
        if self.order not in ORDERS:
            raise SparseflashError(f"--order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.dtype not in LAYOUT_DTYPES:
            raise SparseflashError(f"--dtype must be one of {', '.join(LAYOUT_DTYPES)}, got {self.dtype!r}")
        if self.resident_dtype is not None and self.resident_dtype not in LAYOUT_DTYPES:
            raise SparseflashError(f"--resident-dtype must be one of {', '.join(LAYOUT_DTYPES)}, "
                                   f"got {self.resident_dtype!r}")
        if not 0 <= self.hot_fraction < 1:
            raise SparseflashError(f"--hot-fraction must be in [0, 1), got {self.hot_fraction}")
        if self.thresholds not in THRESHOLD_SETS:
            raise SparseflashError(f"--thresholds must be ppl or cett, got {self.thresholds!r}")
        if self.zstd_level is not None:
            check_int("--zstd", self.zstd_level, *ZSTD_LEVELS)


@dataclass(frozen=True)
class PrepareParams:
    """`prepare`: profile + predictors + layout; each step's parameters are recorded with its output."""

    profile_tokens: int = 32768
    cett_tokens: int = 8192  # tokens sampled for the threshold search
    heldout_tokens: int = 4096  # for the PPL-p% search and predictor validation
    ppl_p: float = ProfileParams.ppl_p
    cett: float = ProfileParams.cett_bound
    predictor_tokens: int = 32768
    rank: int = 0  # 0: chosen by measurement (PredictorParams.rank)
    epochs: int = TrainParams.epochs
    miss_recalls: tuple[float, ...] = PredictorParams.miss_recalls  # cost-aware candidates (PredictorParams)
    cached_share: float = PredictorParams.cached_share  # the cut for neurons in memory (PredictorParams)
    larger_miss_shares: tuple[float, ...] = PredictorParams.larger_miss_shares  # validated again (PredictorParams)
    per_layer_cuts: bool = True  # each layer its own miss cut, probed and validated (layout/miss_mix.py)
    rank_spread: float = PredictorParams.rank_spread  # per-layer ranks by active share (PredictorParams)
    split_cache: bool = PredictorParams.split_cache  # the cache split among layers by demand (PredictorParams)
    order: str = LayoutParams.order
    hot_fraction: float = LayoutParams.hot_fraction
    dtype: str = LayoutParams.dtype
    resident_dtype: str | None = LayoutParams.resident_dtype
    # the quality gate (layout/quality_gate.py): the predicted mode is kept only if its held-out perplexity
    # is within this rise over dense (percent), else the other strategy, else exact streaming (`all`)
    gate_rise_pct: float = 1.0
    dense_sparsity: float = 0.5  # below this PPL-p% sparsity the model is reported too dense to gain

    def __post_init__(self):
        check_float("--gate-rise", self.gate_rise_pct, 0, math.inf, hi_open=True)
        check_float("dense_sparsity", self.dense_sparsity, 0, 1)
        for flag, value in (("--tokens", self.profile_tokens), ("cett_tokens", self.cett_tokens),
                            ("--heldout-tokens", self.heldout_tokens), ("--tokens", self.predictor_tokens),
                            ("--epochs", self.epochs)):
            check_int(flag, value, 1)
        check_int("--rank", self.rank, 0)
        check_float("--rank-spread", self.rank_spread, 0, 4)
        check_float("ppl_p", self.ppl_p, 0, math.inf, lo_open=True, hi_open=True)
        check_float("cett", self.cett, 0, 1)
        for r in self.miss_recalls:
            check_float("miss_recalls", r, 0, 1, lo_open=True)
        check_float("cached_share", self.cached_share, 0, 1, lo_open=True)
        for s in self.larger_miss_shares:
            check_float("larger_miss_shares", s, 0, 1, lo_open=True)
        self.layout_params()  # order, hot fraction and dtype checked there

    def layout_params(self) -> LayoutParams:
        return LayoutParams(order=self.order, dtype=self.dtype, resident_dtype=self.resident_dtype,
                            hot_fraction=self.hot_fraction)


# The bundled model is prepared with every quality default (the rank is chosen by measurement, as for
# any checkpoint: 40 here); fewer epochs and tokens keep its first run short (docs/fetchless.md).
BUNDLED_PARAMS = PrepareParams(epochs=20, predictor_tokens=24576, profile_tokens=24576)


@dataclass(frozen=True)
class PluginTrainParams:
    """`plugins train`: a compression plugin's shape and training schedule (layout/plugin_train.py,
    docs/plugins.md). Lengths in tokens."""

    ratio: int = 2  # prompt tokens per compressed vector
    layer: int = 0  # compress after this layer (0-based)
    tail: int = 16  # last prompt tokens kept uncompressed (at least)
    rank: int = 32  # bottleneck width of the plugin's MLP
    rope: str = "mean"  # rotary position of a compressed vector: last | mean (measured lower KL)
    prompt_tokens: int = 256  # longest training prompt
    min_prompt_tokens: int = 128  # each step draws its prompt length from [min, longest]
    continuation_tokens: int = 64
    steps: int = 150
    batch: int = 8
    lr: float = 3e-2
    pool_windows: int = 192  # training windows whose teacher distributions are computed once
    prompt_buckets: int = 4  # prompt lengths evenly spaced in [min, longest]
    heldout_share: float = 0.1  # the corpus's last share: validation and stored quality only
    quality_prompts: tuple[int, ...] = (64, 128, 256)  # prompt lengths whose ppl rise is stored
    quality_windows: int = 16  # held-out windows per prompt length
    seed: int = 0

    def __post_init__(self):
        if self.ratio < 1 or self.rank < 1 or self.steps < 1 or self.batch < 1 or self.layer < 0 or self.tail < 0:
            raise SparseflashError("--ratio, --rank, --steps, --batch must be >= 1 and --layer, --tail >= 0")
        if self.rope not in ("last", "mean"):
            raise SparseflashError(f"--rope must be last or mean, got {self.rope!r}")
        check_float("--lr", self.lr, 0, math.inf, lo_open=True, hi_open=True)
