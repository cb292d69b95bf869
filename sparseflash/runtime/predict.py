"""Active-set prediction at run time, from the predictor tensors stored in the layout file.

Scores are the stored predictor's logits (layout/schema.py:predictor_logits) with W2/b2 rows in
stored neuron order, so the predicted ids are stored positions directly. Strategies: ``topk``
(the layer's k per token), ``threshold`` (logit above the layer's cut), ``all`` (every neuron:
no predictor).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from sparseflash.errors import ArtefactError, SparseflashError
from sparseflash.layout import schema
from sparseflash.layout.format import LayoutFile
from sparseflash.layout.schema import ModelHeader, PredictorSpec

STRATEGIES = (*schema.STRATEGIES, "all")
FUSED_TOKENS = 8  # host predictions for at most this many tokens run as one Numba call (kernels/predictor.py)


@dataclass(frozen=True)
class LayerPredictor:
    """One layer's stored predictor (tensors on one device) and its decision rule."""

    w1: torch.Tensor  # (rank, d)
    b1: torch.Tensor  # (rank,)
    w2: torch.Tensor  # (neurons, rank), rows in stored order
    b2: torch.Tensor  # (neurons,)
    topk: int
    cut: float
    miss_cut: float | None = None  # cost-aware selection: a neuron not in memory is read only above it
    cached_cut: float | None = None  # and, where the miss cut applies, one in memory is computed above this
    # (share, cut): miss cuts validated with larger caches (Predictors.for_caches picks the one that applies)
    larger_miss_cuts: tuple[tuple[float, float], ...] = ()
    # the same four tensors as float32 numpy arrays (host tensors only), for the fused decode path
    _host: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.w1.device.type == "cpu":
            host = tuple(np.ascontiguousarray(t.detach().numpy(), dtype=np.float32)
                         for t in (self.w1, self.b1, self.w2, self.b2))
            object.__setattr__(self, "_host", host)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w1, self.b1, self.w2, self.b2))

    def to(self, device: torch.device | str) -> LayerPredictor:
        """The same predictor with its tensors on ``device`` (a new object)."""
        return LayerPredictor(*(t.to(device) for t in (self.w1, self.b1, self.w2, self.b2)), self.topk, self.cut,
                              self.miss_cut, self.cached_cut, self.larger_miss_cuts)

    @property
    def cached_bonus(self) -> float:
        """Where the miss cut applies: the logit offset that moves a cached neuron's cut down to
        ``cached_cut`` (a cached neuron is picked if logit + offset > cut); 0 without one."""
        return 0.0 if self.cached_cut is None else max(0.0, self.cut - self.cached_cut)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return schema.predictor_logits(x, self.w1, self.b1, self.w2, self.b2)

    def predict(self, x: torch.Tensor, strategy: str, margin: float = 0.0, scores: bool = False,
                offset: np.ndarray | None = None, cached: np.ndarray | None = None, raise_by: float = 0.0):
        """Sorted stored positions predicted active for any token of x (tokens, d); with ``scores``,
        also every neuron's highest logit over the tokens (float32, stored order). ``offset`` (neurons,)
        is added to the logits before the strategy picks (cost-aware selection), not to the scores.
        ``cached`` (neurons,) bool, where the neuron is in memory: with a miss cut, a picked neuron that
        is not cached is kept only if some token's logit exceeds the miss cut (less the margin).
        ``raise_by`` (logits) raises the threshold cut and the miss cut (not top-k's k): the look-ahead
        read's stricter choice (Policy.lookahead_raise).

        On the host, for up to FUSED_TOKENS tokens (threshold) or one (top-k), the logits and the choice
        are two Numba calls (kernels/predictor.py) instead of a dozen torch and numpy ones."""
        if self._host is not None and x.device.type == "cpu" and (
                x.shape[0] <= (FUSED_TOKENS if strategy == "threshold" else 1)):
            return self._predict_fused(x, strategy, margin, scores, offset, cached, raise_by)
        z = self.logits(x)
        pick = z if offset is None else z + torch.from_numpy(offset).to(z.device)
        if strategy == "topk":
            k = min(z.shape[1], int(np.ceil(self.topk * (1 + margin))))
            positions = np.unique(torch.topk(pick, k, dim=1).indices.cpu().numpy())
        else:
            positions = np.nonzero((pick > self.cut - margin + raise_by).any(dim=0).cpu().numpy())[0]
        top = None
        if scores or (cached is not None and self.miss_cut is not None):
            top = z.max(dim=0).values.float().cpu().numpy()
        if cached is not None and self.miss_cut is not None and len(positions):
            positions = positions[cached[positions] | (top[positions] > self.miss_cut - margin + raise_by)]
        if scores:
            return positions, top
        return positions

    def _predict_fused(self, x: torch.Tensor, strategy: str, margin: float, scores: bool,
                       offset: np.ndarray | None, cached: np.ndarray | None, raise_by: float = 0.0):
        from sparseflash.kernels import predictor as kernel

        top = kernel.top_logits(x.detach().float().numpy(), *self._host)
        miss = None if self.miss_cut is None or cached is None else self.miss_cut - margin + raise_by
        if strategy == "topk":  # one token: its k best (cost offset included), then the miss cut
            pick = top if offset is None else top + offset
            k = min(len(pick), int(np.ceil(self.topk * (1 + margin))))
            if k <= 0:
                positions = np.zeros(0, dtype=np.int64)
            else:
                positions = np.sort(np.argpartition(-pick, k - 1)[:k]) if k < len(pick) else np.arange(len(pick))
            if miss is not None and len(positions):
                positions = positions[cached[positions] | (top[positions] > np.float32(miss))]
        else:
            positions = kernel.select(top, self.cut - margin + raise_by, offset, cached if miss is not None else None, miss)
        return (positions, top) if scores else positions


@dataclass(frozen=True)
class Predictors:
    """The strategy in force, each layer's predictor and the look-ahead ones (fed layer l-1's input)."""

    strategy: str
    own: dict[int, LayerPredictor]
    lookahead: dict[int, LayerPredictor]
    # the share of a layer's neurons the miss cuts were validated with in memory (prepare's gate): a run
    # applies them only where its cache holds at least that share
    miss_share: float = 0.0

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in (*self.own.values(), *self.lookahead.values()))

    def to(self, device: torch.device | str) -> Predictors:
        move = lambda d: {l: p.to(device) for l, p in d.items()}  # noqa: E731
        return Predictors(self.strategy, move(self.own), move(self.lookahead), self.miss_share)

    def for_caches(self, share: float) -> Predictors:
        """The predictors as a run whose caches hold ``share`` of all neurons (slots over neurons, hot
        regions included) applies them: each layer's (own and look-ahead) miss cut is the one validated
        with the largest cache share at most ``share`` (prepare validated each share with the caches split
        among layers as the run splits them), or none where no validated cache is that small; the
        result's ``miss_share`` is 0, since the choice is made."""
        def fit(l: int, p: LayerPredictor) -> LayerPredictor:
            validated = [(self.miss_share, p.miss_cut), *p.larger_miss_cuts]
            fits = [(s, c) for s, c in validated if c is not None and s <= share + 1e-9]
            return dataclasses.replace(p, miss_cut=max(fits)[1] if fits else None)

        return Predictors(self.strategy, {l: fit(l, p) for l, p in self.own.items()},
                          {l: fit(l, p) for l, p in self.lookahead.items()}, 0.0)


def load_predictors(f: LayoutFile, header: ModelHeader, strategy: str | None = None,
                    lookahead: bool = True, verify: bool = True) -> Predictors:
    """The layout's predictors; ``strategy`` None takes the layout's default (its quality gate's choice,
    else the predictors' own; ``all`` when it has none). With ``verify``, every predictor tensor's
    checksum is checked as it is read."""
    meta = header.predictors
    if strategy is None:
        strategy = meta.default_strategy if meta else "all"
    if strategy not in STRATEGIES:
        raise SparseflashError(f"unknown prediction strategy {strategy!r} (choose from {', '.join(STRATEGIES)})")
    if strategy == "all":
        return Predictors(strategy, {}, {})
    if meta is None:
        raise ArtefactError(f"{f.path}: has no predictors; rebuild it with `sparseflash prepare` (or `sparseflash "
                            "layout --predictors DIR`), or run with --strategy all")

    def load(kind: str, layer: int, spec: PredictorSpec) -> LayerPredictor:
        parts = (torch.from_numpy(np.asarray(f.tensor(schema.predictor_tensor(kind, layer, part), verify=verify),
                                             dtype=np.float32))
                 for part in schema.PREDICTOR_PARTS)
        return LayerPredictor(*parts, spec.topk, spec.cut, spec.miss_cut, spec.cached_cut, spec.larger_miss_cuts)

    own = {l: load("layer", l, spec) for l, spec in enumerate(meta.layers)}
    ahead = {l: load("lookahead", l, spec) for l, spec in enumerate(meta.lookahead)
             if spec is not None and lookahead}
    gate = meta.gate or {}
    return Predictors(strategy, own, ahead, float(gate.get("miss_share", 0.0)))
