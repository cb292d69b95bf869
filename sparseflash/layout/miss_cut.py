"""Cost-aware selection, validated: the held-out streams of the predictors pass that measure each
candidate miss cut (docs/fetchless.md). A neuron the threshold strategy picks is computed if it is
in a simulated cache or passes the cut (then it is read); a neuron in the cache is computed down to
the predictor's lower cached cut; perplexity, computed and read neurons are what the quality gate
decides on."""

from __future__ import annotations

import numpy as np
import torch

from sparseflash.layout.predictor import Predictor


def miss_stream(recall: float, share: float | None = None) -> str:
    return f"miss_{recall:g}" if share is None else f"miss_{recall:g}_at_{share:g}"


class MissRun:
    """The FFN hook of one cost-aware candidate's held-out stream: within each window, token by token,
    a neuron the threshold strategy picks is computed if it is in memory (a least-recently-used cache
    of ``share`` of the layer's neurons, filled by the neurons computed) or if its logit passes the
    miss cut (then it is read); ``share`` is one share for every layer or one per layer (the split a run
    makes: layout/schema_cache.split_shares); with ``cached_cut``, a neuron in memory is computed if its logit
    passes that (lower) cut instead. The window's first token starts with nothing in memory. Counts
    per layer: computed and read neurons, tokens; with the down projection's column norms, the
    contribution |a_i| x ||W_down[:, i]|| of all neurons, of those the threshold strategy computes and
    of those computed (``lost``)."""

    def __init__(self, ctx: int, layers: int, share):
        self.ctx = ctx
        self.shares = np.broadcast_to(np.asarray(share, dtype=np.float64), (layers,))
        self.computed = np.zeros(layers)
        self.read = np.zeros(layers)
        self.tokens = np.zeros(layers)
        self.contribution = np.zeros((layers, 3))  # all, the threshold strategy's, computed

    def hook(self, pred: Predictor, miss_cut: float, cached_cut: float | None = None,
             down_norms: torch.Tensor | None = None):
        def select(layer, rows, x, a):
            z = pred.logits(x).view(-1, self.ctx, pred.neurons)
            pick = z > (pred.cut if cached_cut is None else min(pred.cut, cached_cut))  # if in memory
            strong = z > max(pred.cut, miss_cut)
            keep = torch.empty_like(pick)
            capacity = max(1, round(float(self.shares[layer]) * pred.neurons))
            last = torch.full(pick[:, 0].shape, -1.0)  # the position each neuron was last computed at (-1: never)
            for t in range(self.ctx):  # every window of the batch at once, one position at a time
                held = torch.zeros_like(pick[:, 0])
                held.scatter_(1, torch.topk(last, min(capacity, pred.neurons), dim=1).indices, True)
                held &= last >= 0
                keep[:, t] = (pick[:, t] & held) | strong[:, t]
                self.read[layer] += float((keep[:, t] & ~held).sum())
                last[keep[:, t]] = t
            self.computed[layer] += float(keep.sum())
            self.tokens[layer] += keep.shape[0] * keep.shape[1]
            keep = keep.view(a.shape)
            if down_norms is not None:
                c = a.abs().float() * down_norms
                self.contribution[layer] += [float(c.sum()), float(c[(z > pred.cut).view(a.shape)].sum()),
                                             float(c[keep].sum())]
            return a * keep

        return select

    def lost(self) -> np.ndarray:
        """Per layer, the contribution the threshold strategy computes and this run does not, over all
        neurons' (negative where the cached cut computes more than the threshold strategy)."""
        all_, plain, kept = self.contribution.T
        return (plain - kept) / np.maximum(all_, 1e-30)

    def lost_total(self) -> np.ndarray:
        """Per layer, the contribution this run does not compute, over all neurons'."""
        all_, _, kept = self.contribution.T
        return 1.0 - kept / np.maximum(all_, 1e-30)

    def reads(self) -> np.ndarray:
        """Per layer, neurons read per token."""
        return self.read / np.maximum(self.tokens, 1)

    def per_token(self) -> tuple[float, float]:
        """(computed, read) neurons per token, summed over the layers."""
        return float((self.computed / self.tokens).sum()), float((self.read / self.tokens).sum())
