"""Training a layer's predictors for the predictors pass: the fit / tune split, trainings side by side
(one core each), and the rank choice by measurement (docs/figures.md, "rank choice")."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from sparseflash.layout.masks import count_true
from sparseflash.layout.params import PredictorParams, TrainParams
from sparseflash.layout.predictor import Predictor, default_rank, train_predictor, tune_cut


def _split(x, mask, p: PredictorParams):
    """(fit inputs, fit masks, tune inputs, tune masks): the last tune_share of the training tokens
    tunes k and the cut."""
    n_tune = max(1, int(len(x) * p.tune_share))
    return x[:-n_tune], mask[:-n_tune], x[-n_tune:], mask[-n_tune:]


def _train_side_by_side(jobs: list, rank: int | list[int], p: PredictorParams, progress=None,
                        train: TrainParams | None = None) -> list[tuple[Predictor, dict]]:
    """Train one predictor per (inputs, masks) job on its fit slice, each on one core (torch's intra-op
    threads set to 1 meanwhile), ``p.train_jobs`` of them side by side in threads. The matrices of a
    training step (a 512-token batch, rank ~30) are too small for two cores to split one step well
    (135M shape: 11.7 ms a step on two threads, 10.9 on one), while two steps at once use both (5.8 ms
    a step). One thread also makes the result independent of the machine's core count.
    ``rank``: one for every job, or a list (one per job); ``train``: the schedule (default p.train).
    ``progress(job, epoch, epochs)`` after each epoch."""
    ranks = rank if isinstance(rank, list) else [rank] * len(jobs)

    def fit(j, x, mask):
        fit_x, fit_m, _, _ = _split(x, mask, p)
        return train_predictor(fit_x, fit_m, ranks[j], train or p.train,
                               progress=None if progress is None else lambda e, total: progress(j, e, total))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if p.train_jobs <= 1 or len(jobs) == 1:
            return [fit(j, x, m) for j, (x, m) in enumerate(jobs)]
        with ThreadPoolExecutor(min(p.train_jobs, len(jobs))) as pool:
            futures = [pool.submit(fit, j, x, m) for j, (x, m) in enumerate(jobs)]
            return [f.result() for f in futures]
    finally:
        torch.set_num_threads(threads)


def active_shares(profile: dict, thresholds: str, layers: int) -> list[float] | None:
    """Each layer's share of neurons active at the profile's ``thresholds`` (ppl | cett), or None."""
    rows = profile.get("layers") or []
    if len(rows) != layers:
        return None
    return [1.0 - float((r.get("ppl") or {}).get("sparsity", r["sparsity"]) if thresholds == "ppl" else r["sparsity"])
            for r in rows]


def spread_ranks(rank: int, active: list[float], spread: float) -> list[int]:
    """Per-layer ranks with (to rounding) the total of ``rank`` at every layer, each in proportion to its
    layer's active share to the power ``spread`` (0: ``rank`` everywhere), kept within [rank / 4, 2 rank]:
    the reads come from the layers where many neurons fire, and a layer where few fire needs less rank to
    rank them (docs/fetchless.md, "Ranks that follow the active share, ..."). Where the clip binds, the other
    layers are rescaled to keep the total; never above it (but for rounding), below it only when every
    layer is clipped."""
    weight = np.power(np.maximum(np.asarray(active, dtype=np.float64), 1e-9), spread)
    share = weight / weight.sum() * len(weight)
    for _ in range(len(share) + 1):
        share = np.clip(share, 0.25, 2.0)
        free = (share > 0.25) & (share < 2.0)
        excess = len(share) - share.sum()
        if abs(excess) < 1e-9 or not free.any():
            break
        share[free] *= 1 + excess / share[free].sum()
    return [max(1, int(round(rank * s))) for s in share]


def layer_ranks(rank: int, profile: dict, p: PredictorParams, layers: int) -> list[int]:
    """Each layer's rank for a mean ``rank``: spread by the profile's active shares (p.rank_spread)."""
    active = active_shares(profile, p.thresholds, layers)
    return spread_ranks(rank, active, p.rank_spread) if p.rank_spread and active else [rank] * layers


def rank_candidates(d: int, n: int, ffn_values: int, p: PredictorParams) -> list[int]:
    """The ranks the choice tries: size_share's, doubled while within the cap (the predictor at most
    max_size_share of the layer's FFN values, and rank at most max_rank unless size_share's rank is
    larger), and the cap itself where it is well above the last doubling."""
    lo = default_rank(d, n, ffn_values, p.size_share)
    hi = max(lo, min(default_rank(d, n, ffn_values, p.max_size_share), p.max_rank))
    out = [lo]
    while out[-1] * 2 <= hi:
        out.append(out[-1] * 2)
    if hi > 1.25 * out[-1]:
        out.append(hi)
    return out


def _choose_rank(x, mask, candidates: list[int], p: PredictorParams, progress=None) -> tuple[int, list[dict]]:
    """Train each candidate rank for p.rank_epochs on the fit slice; on the tune slice, the neurons each
    selects per token at the cut tuned for p.target_recall. The smallest rank within p.rank_tolerance of
    the fewest wins."""
    short = dataclasses.replace(p.train, epochs=p.rank_epochs)
    trained = _train_side_by_side([(x, mask)] * len(candidates), list(candidates), p, progress, short)
    _, _, tune_x, tune_m = _split(x, mask, p)
    table = []
    for rank, (pred, _) in zip(candidates, trained):
        z = pred.logits(tune_x)
        cut = tune_cut(pred, tune_x, tune_m, p.target_recall)
        table.append({"rank": rank, "selected_per_token": count_true(z > cut) / max(len(z), 1)})
    fewest = min(t["selected_per_token"] for t in table)
    chosen = next(t["rank"] for t in table if t["selected_per_token"] <= (1 + p.rank_tolerance) * fewest)
    return chosen, table
