"""Profiling cost on a synthetic FFN layer of 13,824 neurons (13B-sized), extrapolated to a model.

Measures, for one layer, the analysis that `sparseflash profile` runs on top of the forward pass:
the CETT threshold search on the token sample, masks for every calibration token (magnitudes,
CETT, bit-packing, zstd to disk), and the per-layer pass over the masks (reuse ratios and sparse
co-activation counting). Activations are synthetic ReLU² values with per-neuron biases (hot and
cold neurons) and token-to-token correlation, sparsity about 90-97% like trained ReLU² models.
Prints the measured time and peak memory, and the extrapolation to 40 layers x 100k tokens
(analysis only; the model's own forward passes come on top and scale with its FLOPs).

    python bench/bench_profile.py [--tokens 8192] [--neurons 13824] [--d 5120] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sparseflash.layout import stats
from sparseflash.layout.coactivation import accumulate_coactivation
from sparseflash.layout.masks import MaskWriter, pack, read_masks


def synthetic_batches(tokens: int, neurons: int, d: int, batch: int, seed: int = 0):
    """Yield (activations, w_down) batches: relu(z)^2 with z an AR(1) process over tokens."""
    g = torch.Generator().manual_seed(seed)
    bias = -1.0 - torch.rand(neurons, generator=g) * 1.2  # most neurons rarely fire, some often
    w_down = torch.randn(d, neurons, generator=g) / np.sqrt(neurons)
    z = torch.randn(neurons, generator=g)
    for start in range(0, tokens, batch):
        rows = []
        for _ in range(min(batch, tokens - start)):
            z = 0.6 * z + 0.8 * torch.randn(neurons, generator=g)  # consecutive tokens share neurons
            rows.append(torch.relu(z + bias) ** 2)
        yield torch.stack(rows), w_down


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(tokens: int, neurons: int, d: int, cett_tokens: int, ctx: int = 256) -> dict:
    base_rss = peak_rss_mib()
    t0 = time.perf_counter()
    sample, w_down = [], None
    for a, w in synthetic_batches(cett_tokens, neurons, d, 512, seed=1):
        sample.append(a)
        w_down = w
    gen_s = time.perf_counter() - t0
    t = time.perf_counter()
    search = stats.CettSearch(torch.cat(sample), w_down, candidates=1000)
    threshold, cett = search.threshold_for(0.2)
    for bound in (0.05, 0.1, 0.15):  # what the PPL-p% bisection adds: more bounds on the same sample
        search.threshold_for(bound)
    search_s = time.perf_counter() - t
    del sample, search
    col = torch.linalg.vector_norm(w_down, dim=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "masks.bits.zst"
        writer = MaskWriter(path, neurons)
        freq = np.zeros(neurons, dtype=np.int64)
        masks_s = 0.0  # the synthetic activations' own generation is not timed
        for a, _ in synthetic_batches(tokens, neurons, d, 512, seed=2):
            t = time.perf_counter()
            mag = a * col
            stats.token_cett(a, mag, w_down, threshold)
            mask = stats.active_mask(mag, threshold)
            freq += mask.sum(0).numpy()
            writer.write(pack(mask.numpy()))
            masks_s += time.perf_counter() - t
        t = time.perf_counter()
        writer.close()
        masks_s += time.perf_counter() - t
        mask_bytes = path.stat().st_size
        t = time.perf_counter()
        counts = np.zeros((neurons, neurons), dtype=np.int32)
        for chunk in read_masks(path, neurons, tokens, rows_per_chunk=ctx * 16):
            accumulate_coactivation(chunk, neurons, counts)
            for w in range(0, len(chunk), ctx):
                stats.reuse_ratios(chunk[w : w + ctx])
        coact_s = time.perf_counter() - t
        gap = stats.coactivation_gap(counts)
        del counts
    sparsity = 1 - freq.sum() / (tokens * neurons)
    per_token = (masks_s + coact_s) / tokens
    layers, calib = 40, 100_000
    return {
        "neurons": neurons, "d": d, "tokens": tokens, "cett_tokens": cett_tokens,
        "sparsity": float(sparsity), "mean_cett_sample": float(cett), "coact_gap": float(gap),
        "threshold_search_s": search_s, "masks_s": masks_s, "coactivation_and_reuse_s": coact_s,
        "mask_file_bytes": mask_bytes,
        "peak_rss_mib": peak_rss_mib(), "rss_before_mib": base_rss,
        "extrapolated_40_layers_100k_tokens_s": layers * (search_s + per_token * calib),
        "extrapolated_mask_disk_bytes": layers * mask_bytes / tokens * calib,
        "synthetic_generation_s": gen_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--cett-tokens", type=int, default=2048)
    p.add_argument("--neurons", type=int, default=13824)
    p.add_argument("--d", type=int, default=5120)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    r = run(args.tokens, args.neurons, args.d, args.cett_tokens)
    if args.json:
        print(json.dumps(r))
        return
    print(f"synthetic layer: {r['neurons']} neurons, d={r['d']}, {r['tokens']} tokens, sparsity {r['sparsity']:.1%}, "
          f"co-activation gap {r['coact_gap']:.3f}")
    print(f"{'step':<40}{'seconds':>10}")
    print(f"{'threshold search (' + str(r['cett_tokens']) + ' tokens, 4 bounds)':<40}{r['threshold_search_s']:>10.2f}")
    print(f"{'masks + CETT + zstd (' + str(r['tokens']) + ' tokens)':<40}{r['masks_s']:>10.2f}")
    print(f"{'co-activation + reuse from masks':<40}{r['coactivation_and_reuse_s']:>10.2f}")
    print(f"peak RSS {r['peak_rss_mib']:.0f} MiB (co-activation counts alone: {r['neurons'] ** 2 * 4 / 2**20:.0f} MiB); "
          f"mask file {r['mask_file_bytes'] / 2**20:.1f} MiB")
    print(f"extrapolated to 40 layers x 100k tokens: {r['extrapolated_40_layers_100k_tokens_s'] / 3600:.2f} h of "
          f"analysis, {r['extrapolated_mask_disk_bytes'] / 2**30:.1f} GiB of masks on disk (per threshold set)")


if __name__ == "__main__":
    main()
