"""Per-layer miss cuts (docs/fetchless.md, first section; figures in docs/figures.md): layers differ in what a lower miss
cut saves in reads and costs in quality, so ``prepare`` may give each layer its own candidate.

1. Probes, in the predictors' layer-by-layer pass: for each layer l, a branch of the threshold stream
   (every prediction read) on a few evenly spaced held-out windows, where layer l alone applies the
   lowest candidate miss cut. Its perplexity rise over the threshold stream on the same windows,
   over the contribution that layer lost (MissRun.lost), is the layer's *sensitivity*.
2. Allocation: the uniform candidates' streams give each layer's reads and lost contribution per
   candidate; a mix's predicted rise is a + kappa x sum over layers of sensitivity x lost contribution
   (a and kappa fitted to the uniform candidates' validated rises, rise_upper). For a few
   targets between the threshold stream's rise and the bound, the per-layer choice with the fewest
   reads within the target (a Lagrangian choice per layer).
3. Validation: a second pass streams each mix over the whole held-out text, as the uniform candidates
   were; the gate (layout/quality_gate.py) keeps a mix only if its validated rise holds the bound and
   it reads less than the uniform cut it chose.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sparseflash.layout.miss_cut import MissRun

PROBE = "miss_probe"


def window_ppl(per_window: np.ndarray, ctx: int) -> float:
    """A stream's perplexity from each window's summed NLL (ctx - 1 predicted tokens a window)."""
    return math.exp(float(np.sum(per_window)) / (len(per_window) * (ctx - 1)))


def rise_upper(per_window: np.ndarray, dense_per_window: np.ndarray, ctx: int) -> float:
    """A stream's perplexity rise over dense (%), one standard error above the measured one: per held-out
    window (each ctx - 1 predicted tokens, so their mean is the whole text's) the log-perplexity difference
    to dense; its mean plus its standard error over the windows. The gate wants a cost-aware choice within
    its bound there, not only on average (docs/figures.md, "validated rise")."""
    d = (np.asarray(per_window, dtype=np.float64) - np.asarray(dense_per_window, dtype=np.float64)) / (ctx - 1)
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0
    return 100.0 * (math.exp(float(d.mean()) + se) - 1.0)


def probe_windows(windows: int, layers: int, budget: float) -> np.ndarray:
    """Evenly spaced held-out windows for the probes: as many as keep their work (a probe runs from
    its layer to the last, layers (layers + 1) / 2 layer passes of its windows in all) within
    ``budget`` held-out streams' worth; none when ``budget`` is 0."""
    if budget <= 0 or windows < 1:
        return np.zeros(0, dtype=np.int64)
    n = int(min(windows, max(1, math.floor(budget * windows * 2 / (layers + 1)))))
    return np.unique(np.linspace(0, windows - 1, n).round().astype(np.int64))


def probe_seqs(val: torch.Tensor, windows: np.ndarray, layers: int) -> torch.Tensor:
    """The probe stream's token windows: the chosen windows once per layer (layer l's probe in block l)."""
    return val[torch.from_numpy(windows)].repeat(layers, 1)


class Probes:
    """The per-layer probes of one layer-by-layer pass, in one stream (``PROBE``, block l = layer l's)."""

    def __init__(self, base: str, windows: np.ndarray, layers: int, ctx: int, share: float):
        self.base, self.windows, self.layers, self.ctx = base, windows, layers, ctx
        self.run = MissRun(ctx, layers, share)  # layer l's counts come from its own probe only

    @staticmethod
    def untouched_tokens(windows: int, layers: int, ctx: int) -> int:
        """Token-layers of the probe stream a pass never runs (block l starts at layer l)."""
        return windows * ctx * (layers * layers - layers * (layers + 1) // 2)

    def layer(self, lp, l: int, w, pred, probe_cut: float, down_norms: torch.Tensor) -> None:
        """Before the base stream runs layer l: earlier probes go through it as the threshold strategy,
        layer l's probe branches off the base stream and applies the probe cut."""
        n = len(self.windows)
        if l > 0:
            lp.run(PROBE, l, w, lambda i, rows, x, a: a * pred.predict_threshold(x), window_ids=np.arange(l * n))
        lp.copy_windows(PROBE, self.base, self.windows, l * n)
        lp.run(PROBE, l, w, self.run.hook(pred, probe_cut, pred.cached_cut, down_norms),
               window_ids=np.arange(l * n, (l + 1) * n))

    def measure(self, lp, base_per_window: np.ndarray) -> dict:
        """Per layer: the probe's rise (%) over the base stream (its windows' summed NLL given) on the same
        windows, the contribution it lost, and the sensitivity (rise per unit of lost contribution; 0 where
        it lost none or rose none)."""
        n, tokens = len(self.windows), len(self.windows) * (self.ctx - 1)
        base = float(base_per_window[self.windows].sum())
        probes = lp.nll_windows(PROBE).reshape(self.layers, n).sum(1)
        rise = 100.0 * (np.exp((probes - base) / tokens) - 1.0)
        lost = self.run.lost()
        sens = np.where(lost > 1e-9, np.maximum(rise, 0.0) / np.maximum(lost, 1e-9), 0.0)
        return {"windows": int(n), "rise_pct": rise.tolist(), "lost": lost.tolist(), "sensitivity": sens.tolist()}


def allocate(reads: np.ndarray, cost: np.ndarray, budget: float) -> list[int] | None:
    """Per layer, the candidate (column) that minimizes summed ``reads`` with summed ``cost`` within
    ``budget``, among the Lagrangian choices (each layer: argmin reads + lam x cost, lam the smallest
    that fits, found by bisection); None when even the cheapest choice per layer does not fit."""
    def choice(lam: float) -> np.ndarray:
        score = reads + lam * cost
        best = score.min(axis=1, keepdims=True)
        tie = np.isclose(score, best, rtol=1e-12, atol=1e-12)
        return np.where(tie, cost, np.inf).argmin(axis=1)  # ties: the cheaper

    def total(pick: np.ndarray) -> float:
        return float(cost[np.arange(len(pick)), pick].sum())

    if total(cost.argmin(axis=1)) > budget + 1e-12:
        return None
    pick = choice(0.0)
    if total(pick) <= budget:
        return pick.tolist()
    lo, hi = 0.0, 1.0
    while total(choice(hi)) > budget:
        lo, hi = hi, hi * 2
        if hi > 1e30:
            return cost.argmin(axis=1).tolist()
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if total(choice(mid)) <= budget else (mid, hi)
    return choice(hi).tolist()


def plan_mixes(runs: list[MissRun], rises: list[float], threshold_rise: float, sensitivity: list[float],
               bound: float, targets: tuple[float, ...]) -> dict:
    """The mixes worth validating for one cache share. ``runs`` / ``rises``: the uniform candidates'
    streams and validated rises (%, rise_upper: the gate's measure). A mix's predicted rise is a + kappa x sum over layers of sensitivity
    x the contribution the layer does not compute (MissRun.lost_total), a and kappa fitted (least
    squares) to the uniform candidates. Targets: ``threshold_rise`` + f x (bound - threshold_rise) for
    each f. Mixes equal to a uniform candidate or to another mix are dropped. JSON-ready: the fit, each
    layer's reads and lost contribution per candidate, the mixes (candidate index per layer, the
    predicted rise)."""
    reads = np.stack([r.reads() for r in runs], axis=1)  # (layers, candidates)
    lost = np.maximum.accumulate(np.stack([r.lost_total() for r in runs], axis=1), axis=1)  # steeper loses more
    weighted = np.asarray(sensitivity, dtype=np.float64)[:, None] * lost
    x, y = weighted.sum(axis=0), np.asarray(rises, dtype=np.float64)
    kappa = float(np.cov(x, y, bias=True)[0, 1] / x.var()) if len(x) > 1 and x.var() > 0 else 0.0
    kappa = kappa if kappa > 0 else 1.0
    a = float((y - kappa * x).mean())
    cost = kappa * weighted
    mixes, seen = [], set()
    for f in targets:
        pick = allocate(reads, cost, threshold_rise + f * (bound - threshold_rise) - a)
        if pick is None or len(set(pick)) == 1 or tuple(pick) in seen:
            continue
        seen.add(tuple(pick))
        mixes.append({"target": float(f), "indices": [int(i) for i in pick],
                      "predicted_rise_pct": a + float(cost[np.arange(len(pick)), pick].sum())})
    return {"kappa": kappa, "intercept_pct": a, "reads": reads.tolist(), "lost": lost.tolist(), "mixes": mixes}


def validate_mixes(source, val: torch.Tensor, plans: list[tuple[float, dict]], load, p, quiet: bool, spill_dir,
                   dense_per_window: np.ndarray, split=lambda share: share) -> None:
    """The second pass: each planned mix ((cache share, plan) pairs) streamed over the held-out windows
    as the uniform candidates were (MissRun, a cache of that share, split among layers by ``split``); ``load(l)`` gives layer l's
    predictor. Adds ppl, rise_upper_pct (rise_upper), computed_per_token and read_per_token to each mix."""
    from sparseflash.layout.calibration import LayerPass

    jobs = [(share, mix) for share, plan in plans for mix in plan["mixes"]]
    if not jobs:
        return
    layers = source.config.num_layers
    runs = [MissRun(p.ctx, layers, split(share)) for share, _ in jobs]
    with LayerPass(source, {f"mix_{i}": val for i in range(len(jobs))}, p.batch, "per-layer cuts", quiet,
                   p.spill_bytes, spill_dir) as lp:
        for l, w in lp.layers():
            pred = load(l)
            for i, (_, mix) in enumerate(jobs):
                lp.run(f"mix_{i}", l, w, runs[i].hook(pred, pred.miss_cuts[mix["indices"][l]], pred.cached_cut))
            del pred
        for i, (_, mix) in enumerate(jobs):
            per_window = lp.nll_windows(f"mix_{i}")
            computed, read = runs[i].per_token()
            mix.update(ppl=window_ppl(per_window, p.ctx),
                       rise_upper_pct=rise_upper(per_window, dense_per_window, p.ctx), computed_per_token=computed,
                       read_per_token=read)
