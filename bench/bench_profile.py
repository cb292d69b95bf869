"""Profiling analysis cost on a synthetic 13B-sized FFN layer (13,824 neurons, d 5120), extrapolated
to a 40-layer model at `sparseflash prepare`'s defaults; the fast methods next to the old ones.

Measures, for one layer, the analysis `sparseflash profile` runs on top of the forward passes:
- threshold search: every bound a profile asks of a layer (the analysis bound, the PPL-p%
  bisection's bounds, the sparsity-vs-CETT grid) on the threshold sample. Fast: the CETT curve
  (one sweep, stats.CettCurve). Reference: the exact binary search with a dense product per
  candidate (stats.CettSearch), as profiling ran before;
- masks: magnitudes, active masks at two threshold sets, bit-packing, zstd to disk, frequencies for
  every calibration token (the reference also computed per-token CETT at both sets, 3 products);
- co-activation + reuse: from the packed masks of both sets (fast: row blocks, int8 products or
  the pair loop, no n x n table above 4,096 neurons; reference: the full int32 table).
W_down is bfloat16, as 13B checkpoints are published (the CETT sweep reads its rows as stored).
Activations are synthetic ReLU² values with per-neuron biases (hot and cold neurons) and
token-to-token correlation. Per-token costs are extrapolated to 40 layers x prepare's calibration
and sample tokens. Wall and CPU seconds are both printed: the machine may be shared (load shown).

    python bench/bench_profile.py [--tokens 4096] [--cett-tokens 2048] [--reference] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sparseflash.layout import stats
from sparseflash.layout.coactivation import accumulate_coactivation, coactivation_stats
from sparseflash.layout.masks import MaskWriter, pack
from sparseflash.layout.params import PrepareParams, ProfileParams
from sparseflash.layout.profile import BOUND_GRID, FULL_COACT_MAX_NEURONS, NEIGHBORS

LAYERS = 40


def synthetic_batches(tokens: int, neurons: int, d: int, batch: int, seed: int = 0):
    """Yield (activations, w_down) batches: relu(z)^2 with z an AR(1) process over tokens."""
    g = torch.Generator().manual_seed(seed)
    bias = -1.0 - torch.rand(neurons, generator=g) * 1.2  # most neurons rarely fire, some often
    w_down = (torch.randn(d, neurons, generator=g) / np.sqrt(neurons)).to(torch.bfloat16)  # stored as published
    z = torch.randn(neurons, generator=g)
    for start in range(0, tokens, batch):
        rows = []
        for _ in range(min(batch, tokens - start)):
            z = 0.6 * z + 0.8 * torch.randn(neurons, generator=g)  # consecutive tokens share neurons
            rows.append(torch.relu(z + bias) ** 2)
        yield torch.stack(rows), w_down


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Clock:
    """Wall and process-CPU seconds of a block."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def profile_bounds(search, p: ProfileParams) -> None:
    """Every bound a profile asks of one layer: analysis bound, a PPL-p% bisection path, the grid."""
    search.threshold_for(p.cett_bound)
    lo, hi = 0.0, 1.0
    for _ in range(p.ppl_steps):  # a bisection path towards 0.12 (where trained models tend to land)
        mid = (lo + hi) / 2
        search.threshold_for(mid)
        lo, hi = (mid, hi) if mid <= 0.12 else (lo, mid)
    for b in BOUND_GRID:
        search.sparsity_at(search.threshold_for(b)[0])


def run(tokens: int, neurons: int, d: int, cett_tokens: int, reference: bool) -> dict:
    p, ctx = ProfileParams(), ProfileParams.ctx
    sample, w_down = [], None
    for a, w in synthetic_batches(cett_tokens, neurons, d, 512, seed=1):
        sample.append(a)
        w_down = w
    sample = torch.cat(sample)
    out: dict = {"neurons": neurons, "d": d, "tokens": tokens, "cett_tokens": cett_tokens,
                 "sample_nonzero_share": float((sample != 0).float().mean())}
    methods = ["fast"] + (["reference"] if reference else [])
    for method in methods:
        with Clock() as c:
            search = stats.CettCurve(sample, w_down, p.candidates) if method == "fast" else \
                stats.CettSearch(sample, w_down, p.candidates)
            profile_bounds(search, p)
        out[f"{method}_search"] = {"wall_s": c.wall, "cpu_s": c.cpu}
        thresholds = (search.threshold_for(p.cett_bound)[0], search.threshold_for(0.12)[0])
        del search
    col = torch.linalg.vector_norm(w_down.float(), dim=0)
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            writers = [MaskWriter(Path(tmp) / f"{method}{s}.bits.zst", neurons) for s in range(2)]
            packed, freq = [[], []], np.zeros((2, neurons), dtype=np.int64)
            wall = cpu = 0.0
            for a, _ in synthetic_batches(tokens, neurons, d, 512, seed=2):  # generation is not timed
                with Clock() as c:
                    mag = a * col
                    if method == "reference":
                        y_norm = torch.linalg.vector_norm(a @ w_down.float().T, dim=-1)
                    for s, t in enumerate(thresholds):
                        if method == "reference":
                            stats.token_cett(a, mag, w_down.float(), t, y_norm)
                        mask = stats.active_mask(mag, t)
                        freq[s] += mask.sum(0).numpy()
                        packed[s].append(pack(mask.numpy()))
                        writers[s].write(packed[s][-1])
                wall, cpu = wall + c.wall, cpu + c.cpu
            with Clock() as c:
                for wr in writers:
                    wr.close()
            out[f"{method}_masks"] = {"wall_s": wall + c.wall, "cpu_s": cpu + c.cpu}
            masks = [np.concatenate(x) for x in packed]
            with Clock() as c:
                for m in masks:
                    for w in range(0, tokens, ctx):
                        stats.reuse_ratios(m[w : w + ctx])
                    if method == "fast":
                        co = coactivation_stats(m, neurons, NEIGHBORS, keep_full=neurons <= FULL_COACT_MAX_NEURONS,
                                                block_bytes=p.coact_block_bytes)
                        gap = co.gap
                    else:
                        counts = np.zeros((neurons, neurons), dtype=np.int32)
                        accumulate_coactivation(m, neurons, counts)
                        stats.top_neighbors(counts, NEIGHBORS)
                        gap = stats.coactivation_gap(counts)
                        del counts
            out[f"{method}_coactivation"] = {"wall_s": c.wall, "cpu_s": c.cpu}
            out["coact_gap"] = float(gap)
            out["mask_bytes"] = sum(os.path.getsize(wr.path) for wr in writers)
    out["sparsity"] = 1 - float(freq[0].sum()) / (tokens * neurons)
    out["peak_rss_mib"] = peak_rss_mib()
    defaults = PrepareParams()
    out["extrapolated_to"] = {"layers": LAYERS, "tokens": defaults.profile_tokens, "cett_tokens": defaults.cett_tokens}
    for method in methods:
        for clock in ("wall_s", "cpu_s"):
            search = out[f"{method}_search"][clock] * defaults.cett_tokens / cett_tokens
            rest = (out[f"{method}_masks"][clock] + out[f"{method}_coactivation"][clock]) * defaults.profile_tokens / tokens
            out.setdefault(f"{method}_extrapolated_s", {})[clock] = LAYERS * (search + rest)
    out["load_average"] = os.getloadavg()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens measured (masks, co-activation)")
    ap.add_argument("--cett-tokens", type=int, default=2048, help="threshold-sample tokens measured")
    ap.add_argument("--neurons", type=int, default=13824)
    ap.add_argument("--d", type=int, default=5120)
    ap.add_argument("--reference", action="store_true", help="also measure the old exact methods, side by side")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    r = run(args.tokens, args.neurons, args.d, args.cett_tokens, args.reference)
    if args.json:
        print(json.dumps(r))
        return
    methods = ["fast"] + (["reference"] if args.reference else [])
    e = r["extrapolated_to"]
    print(f"synthetic layer: {r['neurons']} neurons, d={r['d']}, {r['tokens']} tokens ({r['cett_tokens']} in the "
          f"threshold sample), nonzero {r['sample_nonzero_share']:.1%}, sparsity {r['sparsity']:.1%}, "
          f"co-activation gap {r['coact_gap']:.3f}")
    print(f"{'step (wall s / cpu s)':<34}" + "".join(f"{m:>22}" for m in methods))
    for step in ("search", "masks", "coactivation"):
        print(f"{step:<34}" + "".join(f"{r[f'{m}_{step}']['wall_s']:>12.2f} /{r[f'{m}_{step}']['cpu_s']:>8.2f}"
                                      for m in methods))
    for clock, name in (("wall_s", "wall"), ("cpu_s", "cpu / 2 cores")):
        div = 1 if clock == "wall_s" else 2
        print(f"{'extrapolated, ' + name + ' (min)':<34}" +
              "".join(f"{r[f'{m}_extrapolated_s'][clock] / 60 / div:>22.1f}" for m in methods))
    print(f"(extrapolated: {e['layers']} layers x {e['tokens']} calibration tokens, {e['cett_tokens']}-token "
          f"threshold sample; target <= 30 min); peak RSS {r['peak_rss_mib']:.0f} MiB; load average "
          f"{', '.join(f'{x:.1f}' for x in r['load_average'])}")


if __name__ == "__main__":
    main()
