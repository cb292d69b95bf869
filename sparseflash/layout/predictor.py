"""Per-layer activation predictors: score = sigmoid(W2 · relu(W1 · x + b1) + b2), W1 of rank r
(the forward is layout/schema.py:predictor_logits, which the runtime applies to the stored tensors).

x is the FFN input (after the norm) of the layer the predictor serves, or of the previous layer for
a look-ahead predictor. Trained with class-weighted binary cross-entropy on recorded
(input, active-mask) pairs. Two ways to turn scores into an active set: top-k (a fixed number of
neurons per token) and threshold (score above a per-layer cut, tuned for a recall target).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sparseflash.layout.masks import count_true
from sparseflash.layout.params import TrainParams
from sparseflash.layout.schema import predictor_logits
from sparseflash.model.layerwise import heap_reuse


@dataclass
class Predictor:
    """Weights of one layer's predictor plus its decision rule (top-k count and score cut)."""

    w1: torch.Tensor  # (rank, d)
    b1: torch.Tensor  # (rank,)
    w2: torch.Tensor  # (neurons, rank)
    b2: torch.Tensor  # (neurons,)
    topk: int = 0  # neurons predicted per token by the top-k strategy
    cut: float = 0.5  # logit cut of the threshold strategy (score > sigmoid(cut))
    # cost-aware selection: per target contribution recall (PredictorParams.miss_recalls), the logit cut a
    # neuron that is not in memory must pass to be read (tune_miss_cut)
    miss_cuts: tuple[float, ...] = ()
    # with a miss cut, the logit cut for neurons in memory (PredictorParams.cached_share; <= cut); None: cut
    cached_cut: float | None = None

    @property
    def rank(self) -> int:
        return self.w1.shape[0]

    @property
    def neurons(self) -> int:
        return self.w2.shape[0]

    @property
    def param_count(self) -> int:
        return sum(t.numel() for t in (self.w1, self.b1, self.w2, self.b2))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, neurons) pre-sigmoid scores for inputs x (tokens, d), any float dtype (computed in
        float32)."""
        return predictor_logits(x.float(), self.w1, self.b1, self.w2, self.b2)

    def predict_topk(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """(tokens, neurons) bool: the k highest-scoring neurons per token."""
        k = self.topk if k is None else k
        z = self.logits(x)
        mask = torch.zeros_like(z, dtype=torch.bool)
        if k > 0:
            mask.scatter_(1, torch.topk(z, min(k, z.shape[1]), dim=1).indices, True)
        return mask

    def predict_threshold(self, x: torch.Tensor, cut: float | None = None) -> torch.Tensor:
        """(tokens, neurons) bool: neurons whose logit exceeds the cut."""
        return self.logits(x) > (self.cut if cut is None else cut)

    def predict(self, x: torch.Tensor, strategy: str) -> torch.Tensor:
        if strategy == "topk":
            return self.predict_topk(x)
        if strategy == "threshold":
            return self.predict_threshold(x)
        raise ValueError(f"unknown prediction strategy {strategy!r} (topk, threshold)")


def default_rank(d: int, neurons: int, ffn_values: int, share: float = 0.025) -> int:
    """Rank r so that the predictor (r*(d + neurons) values) is ``share`` of the layer's FFN values."""
    return max(1, math.floor(share * ffn_values / (d + neurons)))


def bce_logits_grad(z: torch.Tensor, target: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
    """d/dz of ``F.binary_cross_entropy_with_logits(z, target.float(), pos_weight=pos_weight)`` (the mean
    over every entry) for bool targets: (sigmoid(z) - 1) * pos_weight / N where the target is set,
    sigmoid(z) / N elsewhere. The gradient autograd gives, in three passes over z instead of a dozen."""
    s = torch.sigmoid(z.detach())
    return torch.where(target, (s - 1).mul_(pos_weight), s).div_(z.numel())


def train_predictor(x: torch.Tensor, mask: torch.Tensor, rank: int, params: TrainParams = TrainParams(),
                    x_val: torch.Tensor | None = None, mask_val: torch.Tensor | None = None,
                    progress=None, pos_scale: torch.Tensor | None = None) -> tuple[Predictor, dict]:
    """Fit a predictor on inputs x (tokens, d) and active masks (tokens, neurons) bool. x may be
    float16 (how prepare records it): each batch is widened to float32 as it is used, so the
    results equal those of training on x.float(), without a float32 copy of every input.

    The loss is the positive-weighted BCE over every (token, neuron); its gradient is taken in closed
    form (``bce_logits_grad``). Returns the predictor (topk/cut left at defaults) and a log with the
    loss per epoch (``train_loss``: the epoch's first batch, before its update; ``val_loss``: all of x_val);
    ``progress(epoch, epochs)`` is called after each epoch. ``pos_scale`` (tokens, neurons), if given,
    multiplies each active entry's weight in the gradient (bench/predictor_variants.py weights them by
    contribution; the logged losses stay unweighted).
    """
    g = torch.Generator().manual_seed(params.seed)
    d, n = x.shape[1], mask.shape[1]
    scale = 1.0 / math.sqrt(d)
    w1 = (torch.randn(rank, d, generator=g) * scale).requires_grad_()
    b1 = torch.zeros(rank, requires_grad=True)
    w2 = (torch.randn(n, rank, generator=g) / math.sqrt(rank)).requires_grad_()
    rate = (count_true(mask, 0).float() / len(mask)).clamp(1e-6, 1 - 1e-6)  # no (tokens, n) widened copy
    b2 = torch.log(rate / (1 - rate)).requires_grad_()  # start at each neuron's base rate
    pos = torch.tensor(count_true(mask) / max(mask.numel(), 1), dtype=torch.float32)
    pos_weight = torch.clamp((1 - pos) / torch.clamp(pos, min=1e-6), max=params.max_pos_weight)
    opt = torch.optim.Adam([w1, b1, w2, b2], lr=params.lr, weight_decay=params.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=params.epochs * math.ceil(len(x) / params.batch))
    log = {"train_loss": [], "val_loss": [], "pos_weight": float(pos_weight)}

    def loss_fn(z, mb):
        return F.binary_cross_entropy_with_logits(z, mb.float(), pos_weight=pos_weight)

    with torch.enable_grad(), heap_reuse():
        for epoch in range(params.epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), params.batch):
                idx = order[i : i + params.batch]
                mb = mask[idx]
                z = predictor_logits(x[idx].float(), w1, b1, w2, b2)
                with torch.no_grad():
                    if i == 0:  # the epoch's loss, on its first batch before the update (costs one batch)
                        log["train_loss"].append(float(loss_fn(z, mb)))
                    grad = bce_logits_grad(z, mb, pos_weight if pos_scale is None else
                                           pos_weight * pos_scale[idx].float())
                opt.zero_grad()
                z.backward(grad)  # the loss's own backward, in closed form: a third of the step's time
                opt.step()
                sched.step()
            if x_val is not None:  # a training batch of rows at a time: no (tokens, neurons) temporaries
                with torch.no_grad():
                    total = sum(float(loss_fn(predictor_logits(x_val[j : j + params.batch].float(), w1, b1, w2, b2),
                                              mask_val[j : j + params.batch])) * len(mask_val[j : j + params.batch])
                                for j in range(0, len(x_val), params.batch))
                    log["val_loss"].append(total / max(len(x_val), 1))
            if progress is not None:
                progress(epoch + 1, params.epochs)
    pred = Predictor(w1.detach(), b1.detach(), w2.detach(), b2.detach())
    return pred, log


def recall_and_sparsity(predicted: np.ndarray | torch.Tensor, true: np.ndarray | torch.Tensor) -> tuple[float, float]:
    """(recall, prediction sparsity) of bool masks (tokens, neurons).

    recall = sum over tokens of |P ∩ A| / sum of |A| (1.0 when nothing is active);
    prediction sparsity = 1 - mean |P| / neurons.
    """
    p = torch.as_tensor(predicted, dtype=torch.bool)
    a = torch.as_tensor(true, dtype=torch.bool)
    hits = count_true(p & a)
    actives = count_true(a)
    recall = hits / actives if actives else 1.0
    return recall, 1.0 - count_true(p) / max(p.numel(), 1)


def _below(score: float) -> float:
    """The float32 just below ``score``: logits are float32, so a cut there keeps the score (``z > cut``)."""
    return float(np.nextafter(np.float32(score), np.float32(-np.inf)))


def tune_cut(pred: Predictor, x: torch.Tensor, mask: torch.Tensor, target_recall: float) -> float:
    """The largest logit cut whose recall on (x, mask) is >= target_recall."""
    z = pred.logits(x.float())
    pos = z[mask]
    if pos.numel() == 0:
        return float(z.max()) if z.numel() else 0.0
    # recall(cut) = share of active neurons whose logit > cut: the (1 - target) quantile of their logits
    q = torch.quantile(pos.float()[torch.randperm(pos.numel())[: 1 << 24]], 1 - target_recall).item()
    return _below(q)


def tune_miss_cut(pred: Predictor, x: torch.Tensor, mask: torch.Tensor, magnitude: torch.Tensor,
                  target: float) -> float:
    """The largest logit cut that keeps ``target`` of the active neurons' contribution on (x, mask):
    the active neurons scoring above it carry at least that share of the sum of the active neurons'
    magnitudes (|a_i| * ||W_down[:, i]||, the CETT quantity). Cost-aware selection reads a neuron that is
    not in memory only if it scores above this cut (docs/fetchless.md)."""
    z = pred.logits(x.float())
    pos, mag = z[mask], magnitude[mask].float()
    total = float(mag.sum())
    if pos.numel() == 0 or total <= 0:
        return float(z.max()) if z.numel() else 0.0
    order = torch.argsort(pos, descending=True)
    kept = torch.cumsum(mag[order].double(), 0)  # contribution kept by a cut just below each score
    i = int(torch.searchsorted(kept, torch.tensor([target * total], dtype=torch.float64)).clamp(max=len(kept) - 1))
    return _below(float(pos[order[i]]))


def contribution_recall(selected: torch.Tensor, mask: torch.Tensor, magnitude: torch.Tensor) -> float:
    """Share of the active neurons' summed magnitude that ``selected`` (tokens, neurons) bool covers."""
    m = magnitude.float() * mask
    total = float(m.sum())
    return float((m * selected).sum()) / total if total > 0 else 1.0


def tune_topk(pred: Predictor, x: torch.Tensor, mask: torch.Tensor, target_recall: float) -> int:
    """The smallest k whose top-k recall on (x, mask) is >= target_recall (binary search)."""
    lo, hi = 0, pred.neurons
    z = pred.logits(x.float())
    ranked = torch.argsort(z, dim=1, descending=True)
    hits_by_rank = torch.gather(mask, 1, ranked).float().sum(0).cumsum(0)  # hits within top-(r+1)
    total = float(count_true(mask))
    if total == 0:
        return 0
    while lo < hi:
        mid = (lo + hi) // 2
        if mid > 0 and float(hits_by_rank[mid - 1]) / total >= target_recall:
            hi = mid
        else:
            lo = mid + 1
    return lo
