"""PPL-p% search (Sparsing Law): the largest common CETT bound whose thresholds keep held-out
perplexity within p% of the dense model's.

Each bound b gives per-layer thresholds through the layers' threshold searches (``stats.CettCurve``
or the exact ``stats.CettSearch``); perplexity is measured with every FFN keeping only its active
neurons (the schema's one definition of "active", ``NeuronTap.masking_hook``). Bisection on b in
[0, 1]. How a perplexity is measured is the caller's: ``sparseflash profile`` runs one layer-wise
pass over a lazily read checkpoint per candidate bound (layout/profile.py), ``sparseflash
sparsity-trend`` runs its small in-memory models (``in_memory_ppl``). Bound 0 keeps every nonzero
activation (threshold 0), so its perplexity is the dense one and is not measured again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm

from sparseflash.model.ffn import ActivationHook
from sparseflash.model.perplexity import perplexity
from sparseflash.model.transformer import Transformer

# ppl_at(thresholds, label): perplexity with every FFN masked at per-layer thresholds (None: dense)
PplAt = Callable[[list[float] | None, str], float]


@dataclass(frozen=True)
class PplpResult:
    bound: float  # the common CETT bound kept
    thresholds: list[float]  # per layer, at that bound
    ppl_dense: float
    ppl_at_bound: float
    tokens: int  # held-out tokens the perplexities were measured on
    trials: list[dict]  # {"bound", "ppl"} in the order tried


def ppl_p_search(searches: list, ppl_at: PplAt, ppl_p: float, steps: int, tokens: int,
                 ppl_dense: float | None = None, quiet: bool = True) -> PplpResult:
    """Bisection (``steps`` steps) on the common CETT bound until perplexity rises by ``ppl_p`` percent.

    ``searches`` answer ``threshold_for(bound) -> (threshold, mean CETT)`` per layer; ``ppl_at``
    measures perplexity on ``tokens`` held-out tokens at per-layer thresholds (``None``: the dense
    model, measured here unless ``ppl_dense`` is given). Progress counts candidate bounds.
    """
    dense = ppl_at(None, "dense perplexity") if ppl_dense is None else ppl_dense
    target = dense * (1 + ppl_p / 100)
    lo, hi = 0.0, 1.0
    ppl_lo, thr_lo = dense, [s.threshold_for(0.0)[0] for s in searches]
    trials = [{"bound": 0.0, "ppl": dense}]
    for step in tqdm(range(steps), desc="PPL-p% search", unit="bound", disable=quiet, leave=False):
        mid = (lo + hi) / 2
        thr = [s.threshold_for(mid)[0] for s in searches]
        value = ppl_at(thr, f"PPL at bound {mid:.4f} ({step + 1}/{steps})")
        trials.append({"bound": mid, "ppl": value})
        if value <= target:
            lo, ppl_lo, thr_lo = mid, value, thr
        else:
            hi = mid
    return PplpResult(bound=lo, thresholds=thr_lo, ppl_dense=dense, ppl_at_bound=ppl_lo, tokens=tokens, trials=trials)


def in_memory_ppl(net: Transformer, set_hook: Callable[[ActivationHook | None], None],
                  make_hook: Callable[[list[float]], ActivationHook], heldout_ids: list[int], ctx: int,
                  max_tokens: int) -> tuple[PplAt, int]:
    """``ppl_at`` for a model held in memory: ``set_hook`` installs (None: removes) the FFN hook of
    ``net``, ``make_hook(thresholds)`` builds the masking hook. Returns (ppl_at, tokens measured)."""
    tokens = min(len(heldout_ids) // ctx * ctx, max_tokens)

    def ppl_at(thresholds: list[float] | None, label: str) -> float:
        set_hook(None if thresholds is None else make_hook(thresholds))
        try:
            return perplexity(net, heldout_ids, ctx=ctx, max_tokens=tokens).ppl
        finally:
            set_hook(None)

    return ppl_at, tokens
