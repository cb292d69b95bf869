"""PPL-p% search (Sparsing Law): the largest common CETT bound whose thresholds keep held-out
perplexity within p% of the dense model's.

Each bound b gives per-layer thresholds through the layers' ``CettSearch``; perplexity is measured
with every FFN keeping only its active neurons (the caller's masking hook, normally
``NeuronTap.masking_hook``: the schema's one definition of "active"). Bisection on b in [0, 1].
Used by ``sparseflash profile`` and by ``sparseflash sparsity-trend``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm

from sparseflash.layout import stats
from sparseflash.model.ffn import ActivationHook
from sparseflash.model.perplexity import perplexity
from sparseflash.model.transformer import Transformer


@dataclass(frozen=True)
class PplpResult:
    bound: float  # the common CETT bound kept
    thresholds: list[float]  # per layer, at that bound
    ppl_dense: float
    ppl_at_bound: float
    tokens: int  # held-out tokens the perplexities were measured on
    trials: list[dict]  # {"bound", "ppl"} in the order tried


def ppl_p_search(net: Transformer, set_hook: Callable[[ActivationHook | None], None],
                 searches: list[stats.CettSearch], make_hook: Callable[[list[float]], ActivationHook],
                 heldout_ids: list[int],
                 ppl_p: float, ctx: int, max_tokens: int, steps: int, quiet: bool = True) -> PplpResult:
    """Bisection (``steps`` steps) on the common CETT bound until perplexity rises by ``ppl_p`` percent.

    ``set_hook`` installs (or, with None, removes) the hook on the FFN that ``net`` runs; the hook
    is removed on return; ``make_hook(thresholds)`` builds the hook that keeps only the neurons active
    at per-layer ``thresholds``. Perplexity is measured on at most ``max_tokens`` held-out tokens in
    windows of ``ctx``.
    """
    set_hook(None)
    tokens = min(len(heldout_ids) // ctx * ctx, max_tokens)
    dense = perplexity(net, heldout_ids, ctx=ctx, max_tokens=tokens).ppl
    target = dense * (1 + ppl_p / 100)
    trials = []

    def ppl_at(bound):
        thr = [s.threshold_for(bound)[0] for s in searches]
        set_hook(make_hook(thr))
        try:
            value = perplexity(net, heldout_ids, ctx=ctx, max_tokens=tokens).ppl
        finally:
            set_hook(None)
        trials.append({"bound": bound, "ppl": value})
        return value, thr

    lo, hi = 0.0, 1.0
    ppl_lo, thr_lo = ppl_at(0.0)
    for _ in tqdm(range(steps), desc="PPL-p% search", disable=quiet, leave=False):
        mid = (lo + hi) / 2
        value, thr = ppl_at(mid)
        if value <= target:
            lo, ppl_lo, thr_lo = mid, value, thr
        else:
            hi = mid
    return PplpResult(bound=lo, thresholds=thr_lo, ppl_dense=dense, ppl_at_bound=ppl_lo, tokens=tokens, trials=trials)
